"""Every public callable, called with a wrong argument, says which argument is wrong.

hypothesis draws a public callable, one of its arguments and a wrong value for it (a wrong
type, or a wrong value of the right type), and calls it with every other argument valid.
The only acceptable outcomes: a ``TypeError``/``ValueError`` whose message names the
argument, or a torchvault error naming the file. Nothing else may escape (no
``AttributeError``, ``AssertionError``, ``KeyError``, torch's ``RuntimeError``), and a wrong
value must not be accepted silently.

``TABLE`` has an entry for every name in ``torchvault.__all__``, every public method of
``CheckpointManager`` and every retention policy; a test fails when a new public name has
none, so it cannot be forgotten.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchvault as tv
from torchvault import retention
from torchvault.errors import TorchVaultError
from torchvault.run.retention import _Policy

# ----------------------------------------------------------------------------- wrong values


class Opaque:
    """An object of no type any argument takes."""

    def __repr__(self) -> str:
        return "Opaque()"


def _not_device(text: str) -> bool:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return True
    if device.type == "cuda":
        return not torch.cuda.is_available()
    return device.type not in ("cpu", "meta")


JUNK = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.builds(Opaque),
    st.just(torch.float32),
)
SOME = JUNK.filter(lambda v: v is not None)  # for arguments where None means "the default"
URLS = st.builds(
    lambda scheme, rest: f"{scheme}://{rest}",
    st.from_regex(r"[a-zA-Z][a-zA-Z0-9+.\-]{1,8}", fullmatch=True),
    st.from_regex(r"[a-z][a-z/.]{0,8}", fullmatch=True),
)
PATHS = st.one_of(
    SOME,
    st.just(""),
    st.just("a\0b"),
    URLS,
    st.builds(Path, URLS),
)
READ_PATHS = st.one_of(PATHS, st.just("no-such-file.tv"), st.just("no/such/folder"))
FLAGS = st.one_of(
    st.integers(), st.text(max_size=3), st.none(), st.floats(), st.builds(Opaque)
).filter(lambda v: not isinstance(v, bool))
MAP_LOCATIONS = st.one_of(
    st.integers(),
    st.floats(),
    st.lists(st.text(max_size=3), max_size=2),
    st.builds(Opaque),
    st.just(torch.float32),
    st.text(max_size=12).filter(_not_device),
    st.dictionaries(st.integers(), st.just("cpu"), min_size=1, max_size=2),
    st.dictionaries(st.just("cpu"), st.one_of(st.integers(), st.just("gpu")), min_size=1),
)
MODULES = st.one_of(JUNK, st.text(max_size=3), st.just({"weight": torch.zeros(1)}))
COUNTS = st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=3), st.none())
TOLERANCES = st.one_of(
    st.floats(max_value=-1e-9),
    st.just(math.nan),
    st.just(math.inf),
    st.text(max_size=3),
    st.none(),
    st.lists(st.floats(), max_size=1),
)
METADATA = st.one_of(
    st.dictionaries(st.integers(), st.text(max_size=3), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), JUNK, min_size=1, max_size=2),
    st.integers(),
    st.lists(st.text(max_size=3), min_size=1, max_size=2),
)
STEPS = st.one_of(
    st.floats(), st.text(max_size=5).filter(lambda s: s not in ("latest", "best")), st.none()
)
POSITIVES = st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans())


# ----------------------------------------------------------------------------- the table


@dataclass
class Env:
    """Valid arguments: files and objects built once per test, under tmp_path."""

    root: Path
    model: nn.Module = field(default_factory=lambda: nn.Linear(2, 1))
    x: torch.Tensor = field(default_factory=lambda: torch.randn(3, 2))

    @property
    def tv_file(self) -> Path:
        return self.root / "model.tv"

    @property
    def pt_file(self) -> Path:
        return self.root / "model.pt"

    def out(self, name: str) -> Path:
        return self.root / "out" / name

    def manager(self) -> tv.CheckpointManager:
        return tv.CheckpointManager(self.root / "run")


Call = Callable[[Env, dict[str, Any]], object]


@dataclass(frozen=True)
class Spec:
    """How to call one public callable: ``call(env, overrides)``, and for each argument
    checked, the wrong values to try. ``why`` says why arguments not listed take anything."""

    call: Call
    bad: dict[str, st.SearchStrategy[Any]]
    why: str = ""


def _with(env: Env, kwargs: dict[str, Any], **valid: Any) -> dict[str, Any]:
    return {**valid, **kwargs}


def _manager_call(method: str, **valid: Callable[[Env], Any]) -> Call:
    def call(env: Env, kwargs: dict[str, Any]) -> object:
        with env.manager() as mgr:
            args = {name: make(env) for name, make in valid.items()}
            return getattr(mgr, method)(**{**args, **kwargs})

    return call


NOT_CALLED = "a report, error or version: data, not a function to call with arguments"

TABLE: dict[str, Spec | str] = {
    "save": Spec(
        lambda e, kw: tv.save(**_with(e, kw, obj={"w": torch.zeros(2)}, path=e.out("s.tv"))),
        {"path": PATHS, "metadata": METADATA, "quantize": SOME, "dtype": SOME},
        "obj: anything; an unsupported value is an UnsupportedTypeError naming its key",
    ),
    "load": Spec(
        lambda e, kw: tv.load(**_with(e, kw, path=e.tv_file)),
        {
            "path": READ_PATHS,
            "map_location": MAP_LOCATIONS,
            "lazy": FLAGS,
            "verify": FLAGS,
            "restore_dtype": FLAGS,
        },
    ),
    "inspect": Spec(lambda e, kw: tv.inspect(**_with(e, kw, path=e.tv_file)), {"path": READ_PATHS}),
    "verify": Spec(lambda e, kw: tv.verify(**_with(e, kw, path=e.tv_file)), {"path": READ_PATHS}),
    "load_into": Spec(
        lambda e, kw: tv.load_into(**_with(e, kw, module=e.model, source=e.tv_file)),
        {
            "module": MODULES,
            "source": st.one_of(READ_PATHS, st.just({"weight": [[1.0, 2.0]]})),
            "strict": FLAGS,
            "rename": st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.builds(Opaque)),
            "map_location": MAP_LOCATIONS,
        },
    ),
    "load_legacy": Spec(
        lambda e, kw: tv.load_legacy(**_with(e, kw, path=e.pt_file)),
        {"path": READ_PATHS, "map_location": MAP_LOCATIONS, "salvage": FLAGS},
    ),
    "diff": Spec(
        lambda e, kw: tv.diff(**_with(e, kw, a=e.tv_file, b=e.tv_file)),
        {"a": READ_PATHS, "b": READ_PATHS, "atol": TOLERANCES, "item": SOME},
    ),
    "scan": Spec(lambda e, kw: tv.scan(**_with(e, kw, path=e.pt_file)), {"path": READ_PATHS}),
    "convert": Spec(
        lambda e, kw: tv.convert(**_with(e, kw, source=e.pt_file, destination=e.out("c.tv"))),
        {"source": READ_PATHS, "destination": PATHS, "to": SOME, "salvage": FLAGS},
        "max_shard_size: read only for to='hf' (its parsing is convert's own)",
    ),
    "load_program": Spec(
        lambda e, kw: tv.load_program(**_with(e, kw, path=e.root / "model.pt2")),
        {"path": READ_PATHS, "step": STEPS.filter(lambda v: v is not None)},
    ),
    "export_program": Spec(
        lambda e, kw: tv.export_program(
            **_with(e, kw, model=e.model, example_inputs=e.x, path=e.out("p.pt2"), validate=False)
        ),
        {
            "model": MODULES,
            "example_inputs": JUNK,
            "path": PATHS,
            "validate": FLAGS,
            "rtol": TOLERANCES,
            "atol": TOLERANCES,
            "samples": COUNTS,
        },
        "dynamic_shapes: passed to torch.export as it is",
    ),
    "export_onnx": Spec(
        lambda e, kw: tv.export_onnx(
            **_with(e, kw, model=e.model, example_inputs=e.x, path=e.out("m.onnx"), validate=False)
        ),
        {
            "model": MODULES,
            "example_inputs": JUNK,
            "path": PATHS,
            "validate": FLAGS,
            "rtol": TOLERANCES,
            "atol": TOLERANCES,
            "samples": COUNTS,
        },
        "dynamic_shapes, opset, input_names, output_names: passed to torch.onnx as they are",
    ),
    "quantize": Spec(
        lambda e, kw: tv.quantize(**_with(e, kw, model=e.model)),
        {"model": MODULES, "method": JUNK, "samples": COUNTS, "inplace": FLAGS},
        "example_inputs: checked as export's",
    ),
    "save_quantized": Spec(
        lambda e, kw: tv.save_quantized(**_with(e, kw, model=e.model, path=e.out("q.tv"))),
        {"model": MODULES, "path": PATHS, "metadata": METADATA},
    ),
    "load_quantized": Spec(
        lambda e, kw: tv.load_quantized(**_with(e, kw, model=e.model, path=e.tv_file)),
        {"model": MODULES, "path": READ_PATHS},
    ),
    "CheckpointManager": Spec(
        lambda e, kw: tv.CheckpointManager(**_with(e, kw, directory=e.root / "run2")).close(),
        {
            "directory": PATHS,
            "keep_last": POSITIVES,
            "keep_best": POSITIVES,
            "keep_every": POSITIVES,
            "mode": JUNK,
            "policy": st.one_of(st.integers(), st.builds(Opaque), st.text(max_size=3)),
            "async_save": FLAGS,
            "collective_timeout": st.one_of(
                st.sampled_from([0, -1.5, float("nan"), float("inf"), True, "10"]),
                st.builds(Opaque),
            ),
        },
        "monitor: any name",
    ),
    "CheckpointManager.save": Spec(
        _manager_call("save", step=lambda e: 10, model=lambda e: e.model),
        {"step": st.one_of(STEPS, st.integers(max_value=-1)), "metadata": METADATA},
        "items: anything the format holds; metrics: checked by the manager",
    ),
    "CheckpointManager.restore": Spec(
        _manager_call("restore", model=lambda e: e.model),
        {"step": STEPS, "map_location": MAP_LOCATIONS, "strict": FLAGS},
    ),
    "CheckpointManager.load": Spec(
        _manager_call("load"), {"step": STEPS, "map_location": MAP_LOCATIONS}
    ),
    "CheckpointManager.export": Spec(
        _manager_call("export", step=lambda e: 1, path=lambda e: e.out("x.tv")),
        {"step": STEPS, "path": PATHS},
    ),
    "CheckpointManager.metrics": Spec(_manager_call("metrics", step=lambda e: 1), {"step": STEPS}),
    "CheckpointManager.prune": Spec(_manager_call("prune"), {"dry_run": FLAGS}),
    "CheckpointManager.export_program": Spec(
        _manager_call(
            "export_program",
            step=lambda e: 1,
            model=lambda e: e.model,
            example_inputs=lambda e: e.x,
            validate=lambda e: False,
        ),
        {"step": STEPS},
        "options: checked as tv.export_program (above)",
    ),
    "retention.KeepLast": Spec(lambda e, kw: retention.KeepLast(**kw), {"n": POSITIVES}),
    "retention.KeepEvery": Spec(lambda e, kw: retention.KeepEvery(**kw), {"n": POSITIVES}),
    "retention.KeepBest": Spec(
        lambda e, kw: retention.KeepBest(**_with(e, kw, k=1, monitor="val_loss")),
        {"k": POSITIVES, "monitor": st.one_of(JUNK, st.just("")), "mode": JUNK},
    ),
    "retention.Pinned": Spec(
        lambda e, kw: retention.Pinned(**kw),
        {
            "steps": st.one_of(
                st.integers(), st.builds(Opaque), st.lists(st.text(max_size=2), min_size=1)
            )
        },
    ),
    "retention.AnyOf": Spec(
        lambda e, kw: retention.AnyOf(**kw),
        {
            "policies": st.one_of(
                st.just(()), st.tuples(st.integers()), st.tuples(st.builds(Opaque))
            )
        },
    ),
    "retention.KeepAll": "takes no arguments",
    **{
        name: NOT_CALLED
        for name in tv.__all__
        if name.endswith(("Error", "Report", "Info", "Summary"))
        or name
        in (
            "DiffChange",
            "DiffLeaf",
            "DiffSide",
            "DtypeCast",
            "GlobalRef",
            "RenamedKey",
            "ShapeMismatch",
            "StoredTensor",
        )
        or name == "__version__"
    },
    "retention": "a module: its policies have entries of their own (retention.*)",
}


def public_names() -> set[str]:
    """Every name the table must cover."""
    names = set(tv.__all__)
    names |= {
        f"CheckpointManager.{n}"
        for n, v in vars(tv.CheckpointManager).items()
        if not n.startswith("_")
        and callable(v)
        and inspect.signature(v).parameters.keys() - {"self"}
    }
    names |= {
        f"retention.{n}"
        for n, v in vars(retention).items()
        if isinstance(v, type) and issubclass(v, _Policy) and not n.startswith("_")
    }
    return names


def test_every_public_callable_has_an_entry_in_the_table() -> None:
    missing = sorted(public_names() - TABLE.keys())
    assert not missing, f"add these public names to TABLE in {__file__}: {missing}"
    assert not sorted(TABLE.keys() - public_names()), "TABLE names what is no longer public"


CASES = [
    (name, arg)
    for name, spec in sorted(TABLE.items())
    if isinstance(spec, Spec)
    for arg in spec.bad
]


# ----------------------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("public-api")
    torch.manual_seed(0)
    env = Env(root)
    (root / "out").mkdir()
    tv.save(env.model, env.tv_file)
    torch.save(env.model.state_dict(), env.pt_file)
    tv.export_program(env.model, env.x, root / "model.pt2", validate=False)
    with env.manager() as mgr:
        mgr.save(1, model=env.model, metrics={"val_loss": 1.0})
    cwd = os.getcwd()
    os.chdir(root)  # relative paths the strategies draw land here
    try:
        yield env
    finally:
        os.chdir(cwd)


def check_bad_argument(env: Env, name: str, arg: str, value: Any) -> None:
    spec = TABLE[name]
    assert isinstance(spec, Spec)
    exc = _raised(lambda: spec.call(env, {arg: value}))
    call = f"{name}({arg}={value!r:.80})"
    assert exc is not None, f"{call} accepted a wrong {arg}"
    names_file = isinstance(exc, TorchVaultError) and exc.path is not None and exc.path in str(exc)
    # the name as a word: "n" or "to" would be found inside any message
    names_arg = isinstance(exc, TypeError | ValueError) and re.search(rf"\b{arg}\b", str(exc))
    assert names_file or names_arg, f"{call} raised {exc!r}: neither names {arg} nor a file"


def _raised(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


@st.composite
def bad_calls(draw: st.DrawFn) -> tuple[str, str, Any]:
    name, arg = draw(st.sampled_from(CASES))
    spec = TABLE[name]
    assert isinstance(spec, Spec)
    return name, arg, draw(spec.bad[arg])


FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SOAK = settings(FUZZ, max_examples=20_000)


@FUZZ
@given(case=bad_calls())
def test_wrong_arguments_name_the_argument(env: Env, case: tuple[str, str, Any]) -> None:
    check_bad_argument(env, *case)


@pytest.mark.soak
@SOAK
@given(case=bad_calls())
def test_soak_wrong_arguments_name_the_argument(env: Env, case: tuple[str, str, Any]) -> None:
    check_bad_argument(env, *case)


@pytest.mark.parametrize(("name", "arg"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_each_checked_argument_refuses_an_opaque_object(env: Env, name: str, arg: str) -> None:
    """Every (callable, argument) pair at least once, whatever hypothesis draws."""
    check_bad_argument(env, name, arg, Opaque())
