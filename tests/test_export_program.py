"""export_program and load_program: a whole model in one file that runs without its class,
published only when it computes what the model computes, and loaded without running anything
the file asks for.

The attack archives are real programs with one part replaced, rebuilt with torch's own
archive writer so that the zip checks pass and the part under test is what must be refused.
Each payload would create a marker file under ``tmp_path``; positive controls feed them to
``torch.export.load`` in a subprocess and see the markers appear, so the refusals can fail.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.export.pt2_archive import PT2ArchiveWriter

import torchvault as tv
from torchvault import _commit
from torchvault._report import ExportReport
from torchvault.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ExportError,
    ExportMismatchError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from torchvault.export._program import export_program, load_program, program_path
from torchvault.export._pt2 import is_program, scan_program

SAMPLES = 3


# ----------------------------------------------------------------------------- models


class MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():  # statistics that are not the identity, so eval mode shows
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class Encoder(nn.TransformerEncoderLayer):
    def __init__(self) -> None:
        super().__init__(16, 4, 32, dropout=0.0, batch_first=True)


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + y * self.scale, (x * y).sum(-1)


class Counter(nn.Module):
    """Python state that changes on every call: the program freezes the first value."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


class Branchy(nn.Module):
    """A Python branch on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if float(x.sum()) > 0 else x - 1


@dataclass
class Case:
    make: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]


CASES = {
    "mlp": Case(MLP, lambda b: (torch.randn(b, 8),)),
    "cnn": Case(SmallCNN, lambda b: (torch.randn(b, 3, 8, 8),)),
    "encoder": Case(Encoder, lambda b: (torch.randn(b, 5, 16),)),
    "two": Case(TwoInTwoOut, lambda b: (torch.randn(b, 4), torch.randn(b, 4))),
}
BATCH = 3


@dataclass
class Exported:
    path: Path
    model: nn.Module
    report: ExportReport


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Each model exported once with a dynamic batch."""
    folder = tmp_path_factory.mktemp("programs")
    torch.manual_seed(0)
    out = {}
    for name, case in CASES.items():
        model = case.make().eval()
        path = folder / f"{name}.pt2"
        report = export_program(
            model, case.inputs(BATCH), path, dynamic_shapes="batch", samples=SAMPLES
        )
        out[name] = Exported(path, model, report)
    return out


def _flat(result: object) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------- exporting


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_model_exports_with_a_report_of_what_was_compared(
    exported: dict[str, Exported], name: str
) -> None:
    report = exported[name].report
    assert report.format == "program"
    assert report.path == str(exported[name].path)
    assert report.file_bytes == exported[name].path.stat().st_size
    assert report.batch_sizes == (1, BATCH, 2 * BATCH + 1)
    assert report.checked == 1 + SAMPLES + 2
    assert report.max_abs_diff <= report.atol + report.rtol
    assert report.opset is None
    assert report.torch_latency_ms > 0
    assert report.runtime_latency_ms > 0
    assert report.torch_latency_iqr_ms >= 0
    assert report.runtime_latency_iqr_ms >= 0
    assert len(report.input_names) == len(CASES[name].inputs(1))


def test_programs_run_in_a_fresh_process_where_the_model_classes_do_not_exist(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    jobs = {}
    for name, item in exported.items():
        inputs = CASES[name].inputs(5)  # a batch size the export never saw
        with torch.no_grad():
            expected = _flat(item.model(*inputs))
        data = tmp_path / f"{name}.tv"
        tv.save({"inputs": list(inputs), "expected": expected}, data)
        jobs[name] = {"program": str(item.path), "data": str(data)}
    script = textwrap.dedent(
        """
        import importlib.util, json, sys
        import torch
        import torchvault as tv
        from torchvault.export._program import load_program

        jobs, module = json.loads(sys.argv[1]), sys.argv[2]
        assert importlib.util.find_spec(module) is None, module  # the classes are not here
        for name, job in jobs.items():
            program = load_program(job["program"])
            data = tv.load(job["data"])
            with torch.no_grad():
                result = program(*data["inputs"])
            got = [t for t in torch.utils._pytree.tree_leaves(result)]
            assert len(got) == len(data["expected"]), name
            for want, have in zip(data["expected"], got):
                torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
        assert module not in sys.modules
        print("ran", sorted(jobs))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(jobs), MLP.__module__],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ran {sorted(CASES)}" in done.stdout


def test_a_dynamic_batch_program_runs_any_batch_and_a_static_one_refuses_others(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    dynamic = load_program(exported["mlp"].path)
    with torch.no_grad():
        for batch in (1, 2, 11):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(dynamic(x), exported["mlp"].model(x))
    model = MLP().eval()
    report = export_program(model, torch.randn(4, 8), tmp_path / "static.pt2", samples=0)
    assert report.batch_sizes == (4,)
    assert report.checked == 1
    static = load_program(tmp_path / "static.pt2")
    with pytest.raises(RuntimeError):
        static(torch.randn(5, 8))


def test_a_program_that_computes_something_else_raises_and_leaves_the_old_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "counter.pt2"
    path.write_bytes(b"the previous file")
    with pytest.raises(ExportMismatchError) as caught:
        export_program(Counter(), torch.ones(2, 3), path, samples=SAMPLES)
    report = caught.value.report
    assert isinstance(report, ExportReport)
    assert report.max_abs_diff >= 1.0
    assert report.checked == 1 + SAMPLES
    assert "Nothing was written" in str(caught.value)
    assert path.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter.pt2"]  # no temp file


def test_validate_false_writes_a_loadable_file_and_reports_nothing_measured(
    tmp_path: Path,
) -> None:
    report = export_program(MLP().eval(), torch.randn(2, 8), tmp_path / "m.pt2", validate=False)
    assert report.checked == 0
    assert report.batch_sizes == ()
    assert math.isnan(report.max_abs_diff)
    assert math.isnan(report.runtime_latency_ms)
    assert math.isnan(report.runtime_latency_iqr_ms)
    assert load_program(tmp_path / "m.pt2")(torch.randn(2, 8)).shape == (2, 4)


def test_every_submodules_training_flag_comes_back(tmp_path: Path) -> None:
    model = SmallCNN().train()
    model.bn.eval()  # deliberately frozen statistics
    export_program(model, torch.randn(2, 3, 8, 8), tmp_path / "cnn.pt2", samples=0)
    assert model.training
    assert model.conv.training
    assert not model.bn.training


def test_an_untraceable_model_raises_unsupported_type_naming_its_class(tmp_path: Path) -> None:
    path = tmp_path / "branchy.pt2"
    with pytest.raises(ExportError, match="Branchy") as caught:
        export_program(Branchy(), torch.randn(2, 3), path)
    assert caught.value.__cause__ is not None
    assert not path.exists()


def test_a_batch_of_one_cannot_be_dynamic_and_the_error_says_why(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="batch of 2 or more"):
        export_program(MLP(), torch.randn(1, 8), tmp_path / "m.pt2", dynamic_shapes="batch")


def test_bad_destinations_and_arguments_fail_before_exporting(tmp_path: Path) -> None:
    x = torch.randn(2, 8)
    with pytest.raises(CheckpointWriteError, match="is a folder"):
        export_program(MLP(), x, tmp_path)
    with pytest.raises(CheckpointWriteError, match="does not exist"):
        export_program(MLP(), x, tmp_path / "missing" / "m.pt2")
    with pytest.raises(ValueError, match="scalar"):
        export_program(MLP(), (x, torch.tensor(1.0)), tmp_path / "m.pt2", dynamic_shapes="batch")
    with pytest.raises(ValueError, match="dynamic_shapes"):
        export_program(MLP(), x, tmp_path / "m.pt2", dynamic_shapes="batches")
    with pytest.raises(ValueError, match="samples"):
        export_program(MLP(), x, tmp_path / "m.pt2", samples=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- loading


def test_loading_never_unpickles(
    exported: dict[str, Exported], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")

    class NoUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch._C, "_pickle_load_obj", refuse)
    for item in exported.values():
        assert isinstance(load_program(item.path), nn.Module)


def test_a_flipped_byte_in_a_weight_fails_its_crc(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    data = bytearray(exported["mlp"].path.read_bytes())
    with zipfile.ZipFile(exported["mlp"].path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("weight_0"))
    name_length, extra_length = struct.unpack_from("<2H", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_length + extra_length + 3] ^= 0x10  # in the weights
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC"):
        load_program(damaged)


def test_a_torch_save_file_and_a_missing_file_are_told_apart(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "state.pt")
    with pytest.raises(UnsupportedFormatError, match="load_legacy"):
        load_program(tmp_path / "state.pt")
    with pytest.raises(CheckpointNotFoundError):
        load_program(tmp_path / "nothing.pt2")


def test_load_program_reads_the_program_of_a_run_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    models = {1: MLP().eval(), 2: MLP().eval(), 3: MLP().eval()}
    with tv.CheckpointManager(run, monitor="loss") as manager:
        for step, loss in ((1, 0.5), (2, 0.9), (3, 0.7)):
            manager.save(step, model=models[step], metrics={"loss": loss})
    program_path(run, 1).parent.mkdir()
    x = torch.randn(2, 8)
    for step in (1, 3):
        export_program(models[step], x, program_path(run, step), samples=0)
    assert program_path(run, 3) == run / "programs" / "step-000000000003.pt2"
    with torch.no_grad():
        for step, want in (("best", 1), ("latest", 3), (3, 3), (None, 3)):
            torch.testing.assert_close(load_program(run, step=step)(x), models[want](x))
    with pytest.raises(CheckpointNotFoundError, match=r"step 2 .* has no program"):
        load_program(run, step=2)
    with pytest.raises(CheckpointNotFoundError, match="not a torchvault run"):
        load_program(tmp_path, step="latest")


# ----------------------------------------------------------------------------- attacks


class Payload:
    """Pickles as ``os.system("touch <marker>")``; never called here."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


_WRITER_OWNS = {"archive_format", "archive_version", "byteorder", ".data/version"}
_MODEL, _WEIGHTS = "models/model.json", "data/weights/model_weights_config.json"
_CONSTANTS = "data/constants/model_constants_config.json"


def rewrite(source: Path, target: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a program archive with its members changed by ``edit``, written by torch's own
    archive writer (the zip layout torch.export.save produces)."""
    with zipfile.ZipFile(source) as archive:
        prefix = archive.namelist()[0].split("/", 1)[0] + "/"
        members = {n[len(prefix) :]: archive.read(n) for n in archive.namelist()}
    edit(members)
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for name, data in members.items():
            if name not in _WRITER_OWNS and not name.startswith(".data/serialization_id"):
                writer.write_bytes(name, data)
    target.write_bytes(buffer.getvalue())
    return target


def _json_edit(member: str, change: Callable[[Any], None]) -> Callable[[dict[str, bytes]], None]:
    def edit(members: dict[str, bytes]) -> None:
        document = json.loads(members[member])
        change(document)
        members[member] = json.dumps(document).encode()

    return edit


def _shell(marker: Path) -> str:
    """A Python expression running ``touch marker`` without a dot (dots split FQNs)."""
    escaped = str(marker).replace(".", "\\x2e")
    return f'exec("import os\\x3b os\\x2esystem(\\x27touch {escaped}\\x27)")'


def _sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(members: dict[str, bytes]) -> None:
        members["data/sample_inputs/model.pt"] = _torch_saved(Payload(marker))

    return edit


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(members: dict[str, bytes]) -> None:
        config = json.loads(members[_WEIGHTS])
        meta = next(iter(config["config"].values()))
        meta["use_pickle"] = True
        members[_WEIGHTS] = json.dumps(config).encode()
        members[f"data/weights/{meta['path_name']}"] = _torch_saved(Payload(marker))

    return edit


def _opaque_constant(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(members: dict[str, bytes]) -> None:
        entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}
        members[_CONSTANTS] = json.dumps(
            {"config": {"evil": {**entry, "tensor_meta": None}}}
        ).encode()
        members["data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))

    return edit


def _shape_expression(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:
        sizes = document["graph_module"]["graph"]["tensor_values"]["input"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] += f" + 0*__import__('os').system('touch {marker}')"

    return _json_edit(_MODEL, change)


def _guard_code(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:
        document["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]

    return _json_edit(_MODEL, change)


def _parameter_name(marker: Path) -> Callable[[dict[str, bytes]], None]:
    evil = f'0"), {_shell(marker)}, ("'  # pasted as getattr(getattr(self, "0"), exec(...))

    def edit(members: dict[str, bytes]) -> None:
        for member in (_MODEL, _WEIGHTS):
            members[member] = members[member].replace(b'"0.weight"', json.dumps(evil).encode())

    return edit


def _call_target(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:
        node = document["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]

    return _json_edit(_MODEL, change)


def _operator_attribute(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:
        document["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.linear.overloads"

    return _json_edit(_MODEL, change)


def _file_operator(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:
        document["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.save.default"

    return _json_edit(_MODEL, change)


def _container_type(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        signature["out_spec"] = json.dumps(
            [
                1,
                {
                    "type": "collections.defaultdict",
                    "context": '["os", "system"]',
                    "children_spec": [],
                },
            ]
        )

    return _json_edit(_MODEL, change)


def _quoted_string(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:  # sqrt sympifies a string: an eval inside the eval
        sizes = document["graph_module"]["graph"]["tensor_values"]["input"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] += " + 0*sqrt('os')"

    return _json_edit(_MODEL, change)


def _enum_context(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(document: Any) -> None:  # pytree's enum hook imports the module it names
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        enum = {"__enum__": True, "fqn": "os:environ", "name": "HOME"}
        node = {"type": "builtins.dict", "context": json.dumps([enum]), "children_spec": []}
        signature["out_spec"] = json.dumps([1, node])

    return _json_edit(_MODEL, change)


def _native_library(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(members: dict[str, bytes]) -> None:
        members["data/aotinductor/model/model.so"] = b"\x7fELF" + bytes(60)

    return edit


def _custom_object(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(members: dict[str, bytes]) -> None:
        members["data/constants/custom_obj_0"] = pickle.dumps(Payload(marker))

    return edit


ATTACKS: dict[str, Callable[[Path], Callable[[dict[str, bytes]], None]]] = {
    "sample_inputs": _sample_inputs,
    "pickled_weight": _pickled_weight,
    "opaque_constant": _opaque_constant,
    "shape_expression": _shape_expression,
    "parameter_name": _parameter_name,
    "call_target": _call_target,
    "operator_attribute": _operator_attribute,
    "file_operator": _file_operator,
    "container_type": _container_type,
    "quoted_string": _quoted_string,
    "enum_context": _enum_context,
    "native_library": _native_library,
    "custom_object": _custom_object,
}
LIVE = (
    "sample_inputs",
    "pickled_weight",
    "opaque_constant",
    "shape_expression",
    "guard_code",
    "parameter_name",
)
"""The attacks shown to run a command through plain torch.export.load (positive controls)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A program to tamper with: a Sequential (parameters named ``0.weight``), dynamic batch."""
    path = tmp_path_factory.mktemp("base") / "base.pt2"
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    export_program(model, torch.randn(3, 4), path, dynamic_shapes="batch", samples=0)
    return path


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_tampered_program_is_refused_and_nothing_runs(
    base: Path, tmp_path: Path, attack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a torch.load would run it
    marker = tmp_path / "marker"
    path = rewrite(base, tmp_path / "evil.pt2", ATTACKS[attack](marker))
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_program(path)  # refused before torch sees the file: no program to call
    assert "run" in str(caught.value)  # "Nothing (from the file) was run"
    assert not marker.exists()


def test_refusals_name_what_they_refuse(base: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeCheckpointError) as pickled:
        load_program(rewrite(base, tmp_path / "a.pt2", _sample_inputs(marker)))
    assert pickled.value.global_name in ("posix.system", "os.system", "nt.system")
    with pytest.raises(UnsafeCheckpointError) as called:
        load_program(rewrite(base, tmp_path / "b.pt2", _call_target(marker)))
    assert called.value.global_name == "torch.os.system"
    with pytest.raises(UnsafeCheckpointError, match="expr_str"):
        load_program(rewrite(base, tmp_path / "c.pt2", _shape_expression(marker)))


def test_guard_code_is_dropped_not_run(base: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    program = load_program(rewrite(base, tmp_path / "guards.pt2", _guard_code(marker)))
    assert program(torch.randn(3, 4)).shape == (3, 3)
    assert not marker.exists()


def test_an_older_program_format_with_pickled_weights_is_not_read(
    base: Path, tmp_path: Path
) -> None:
    def edit(members: dict[str, bytes]) -> None:
        members["data/weights/model.pt"] = _torch_saved({"w": torch.ones(1)})

    with pytest.raises(UnsupportedFormatError, match=r"data/weights/model\.pt"):
        load_program(rewrite(base, tmp_path / "old.pt2", edit))


def test_scan_program_reports_a_clean_program_and_names_a_refused_global(
    base: Path, tmp_path: Path
) -> None:
    clean = scan_program(str(base), base.read_bytes())
    assert clean.safe
    assert clean.format == "torch-program"
    evil = rewrite(base, tmp_path / "evil.pt2", _sample_inputs(tmp_path / "marker"))
    report = scan_program(str(evil), evil.read_bytes())
    assert not report.safe
    assert report.unsafe_globals in (("posix.system",), ("os.system",), ("nt.system",))
    assert is_program(base.read_bytes())
    torch.save({"w": torch.ones(1)}, tmp_path / "state.pt")
    assert not is_program((tmp_path / "state.pt").read_bytes())
    assert not is_program(b"not a zip")


def test_positive_controls_torch_export_load_runs_the_live_attacks(
    base: Path, tmp_path: Path
) -> None:
    attacks = {**ATTACKS, "guard_code": _guard_code}
    paths = {}
    for name in LIVE:
        marker = tmp_path / f"marker-{name}"
        paths[name] = (
            str(rewrite(base, tmp_path / f"{name}.pt2", attacks[name](marker))),
            str(marker),
        )
    script = textwrap.dedent(
        """
        import json, sys, torch
        for path, _ in json.loads(sys.argv[1]).values():
            try:
                torch.export.load(path).module()(torch.randn(3, 4))
            except Exception:
                pass
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert {name: Path(marker).exists() for name, (_, marker) in paths.items()} == dict.fromkeys(
        LIVE, True
    )


def test_staged_temp_files_of_an_interrupted_export_are_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_commit.os, "fsync", disk_full)
    with pytest.raises(CheckpointWriteError, match="disk is full"):
        export_program(MLP().eval(), torch.randn(2, 8), tmp_path / "m.pt2", samples=0)
    assert list(tmp_path.iterdir()) == []


def test_a_manager_attaches_a_program_that_retention_deletes(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(4, 8)
    run = tmp_path / "run"
    with tv.CheckpointManager(run, keep_last=1) as manager:
        manager.save(1, model=model)
        report = manager.export_program(1, model, (x,))
        assert report.format == "program"
        assert torch.allclose(tv.load_program(run, step="latest")(x), model(x), atol=1e-6)
        with pytest.raises(tv.CheckpointNotFoundError, match="not committed"):
            manager.export_program(7, model, (x,))
        manager.save(2, model=model)
    assert not (run / "programs" / "step-000000000001.pt2").exists()
