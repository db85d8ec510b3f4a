"""The package's layout: documented import paths, the run package, and who may import whom."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import torchvault

PACKAGE = Path(torchvault.__file__).resolve().parent

# Every import path the README, the docstrings and ARCHITECTURE.md show users.
DOCUMENTED = {
    "torchvault": ["CheckpointManager", "load", "save", "inspect", "verify", "retention"],
    "torchvault.retention": [
        "AnyOf",
        "CheckpointRecord",
        "KeepAll",
        "KeepBest",
        "KeepEvery",
        "KeepLast",
        "Pinned",
        "RetentionPolicy",
    ],
    "torchvault.storage": ["LocalStorage", "MemoryStorage", "Storage"],
    "torchvault.errors": ["TorchVaultError", "CorruptCheckpointError", "RunLockedError"],
    "torchvault.export": ["export_onnx", "export_program", "load_program", "quantize"],
    "torchvault.legacy": ["convert", "load_legacy", "scan"],
}

RUN_MODULES = ["_manager", "_manager_args", "_readers", "_rng", "_store", "retention"]


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_documented_import_path_works(module: str) -> None:
    imported = importlib.import_module(module)
    for name in DOCUMENTED[module]:
        assert hasattr(imported, name), f"{module}.{name}"
    for name in getattr(imported, "__all__", ()):
        assert hasattr(imported, name), f"{module}.__all__ names a missing {name}"


def test_retention_is_reachable_every_documented_way() -> None:
    from torchvault import retention
    from torchvault.retention import KeepLast
    from torchvault.run import retention as run_retention

    assert retention.KeepLast is KeepLast is run_retention.KeepLast
    assert torchvault.retention is retention
    assert isinstance(torchvault.CheckpointManager, type)


@pytest.mark.parametrize("name", RUN_MODULES)
def test_run_modules_live_in_the_run_package(name: str) -> None:
    assert (PACKAGE / "run" / f"{name}.py").is_file()
    flat = {"_readers": "_run"}.get(name, name)
    if flat != "retention":  # the public module stays, as a re-export
        assert not (PACKAGE / f"{flat}.py").exists(), f"torchvault/{flat}.py is still flat"


def test_writer_lock_lives_with_the_storage_backends_that_take_it() -> None:
    assert (PACKAGE / "storage" / "_lock.py").is_file()
    assert not (PACKAGE / "_lock.py").exists()


def _imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The torchvault modules ``path`` imports (anywhere in it, function-local included),
    as dotted names relative to the package."""
    here = path.relative_to(package).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(here[: len(here) - node.level + 1]) if node.level else []
            module = [*base, *(node.module.split(".") if node.module else [])]
            if not node.level and module[:1] == ["torchvault"]:
                module = module[1:]
            elif not node.level:
                continue
            found.add(".".join(module))
            found.update(".".join([*module, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torchvault."):
                    found.add(alias.name.removeprefix("torchvault."))
    return found


def _package_files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def test_file_layer_does_not_import_legacy() -> None:
    imported = _imports(PACKAGE / "_file.py")
    assert not {m for m in imported if m == "legacy" or m.startswith("legacy.")}


@pytest.mark.parametrize("path", _package_files("legacy"), ids=lambda p: p.name)
def test_legacy_does_not_import_the_dispatch(path: Path) -> None:
    assert "_open" not in _imports(path)


def test_one_module_opens_what_a_path_holds() -> None:
    from torchvault import _open

    for name in ("load", "inspect", "verify"):
        assert getattr(torchvault, name) is getattr(_open, name)
    # outside legacy/, only the dispatch hands a path to legacy's foreign-file readers
    users = [
        p.relative_to(PACKAGE).as_posix()
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.parent.name != "legacy"
        and {"legacy._foreign", "legacy._reader.is_foreign"} & _imports(p)
    ]
    assert users == ["_open.py"]


# The imports that go up a layer, each made at its call (docs/ARCHITECTURE.md, "Layers").
UPWARD = {
    ("_file", "export"),  # save() of a model quantized by tv.quantize
    ("_load_into", "export"),  # load_into() of a quantized model file
    ("legacy", "export"),  # scan() of a torch.export program
    ("legacy", "run._consolidate"),  # scan() of a run folder, convert("RUN@STEP")
    ("_open", "run._consolidate"),  # tv.load/inspect/verify("RUN@STEP")
    ("run._readers", "distributed"),  # restore() of a sharded checkpoint, through DCP
    ("run._manager", "distributed"),  # a CheckpointManager under torch.distributed
}


def _unit(module: str, modules: set[str]) -> str | None:
    """The layer ``module`` belongs to: a subpackage whole, a run module or a root module."""
    while module and module not in modules:
        module = module.rpartition(".")[0]  # a name imported from a module: the module
    if module.split(".")[0] in ("legacy", "export", "storage", "cli", "distributed"):
        return module.split(".")[0]
    return module or None


def import_graph(package: Path) -> dict[str, set[str]]:
    """Which layer imports which, over every import in ``package`` (function-local too)."""
    files = {
        ".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        unit = _unit(name, modules)
        if unit is None or unit == "__main__":
            continue
        edges = graph.setdefault(unit, set())
        for imported in _imports(path, package):
            target = _unit(imported, modules)
            if target not in (None, unit) and (unit, target) not in UPWARD:
                edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path around each cycle found by a depth-first walk (empty: the graph is layered)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return found


def test_layers_import_only_downward() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_every_entry_module_imports_first_in_a_fresh_interpreter() -> None:
    # an import cycle shows only when the module that closes it is imported first
    modules = [
        "torchvault._file",
        "torchvault._open",
        "torchvault.legacy",
        "torchvault.run",
        "torchvault.run._store",
        "torchvault.run._readers",
        "torchvault.run._manager",
        "torchvault.retention",
        "torchvault.storage",
        "torchvault._load_into",
        "torchvault.cli",
    ]
    script = (
        "import importlib, sys\n"
        "import torch\n"
        f"for name in {modules!r}:\n"
        "    for key in [k for k in sys.modules if k.split('.')[0] == 'torchvault']:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module(name)\n"
        "    importlib.import_module('torchvault').load\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
