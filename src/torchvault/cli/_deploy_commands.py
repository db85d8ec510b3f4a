"""The deployment commands: ``export onnx``, ``export program`` and ``quantize``.

Each builds the model from a factory the user names (``--model pkg.module:make_model``: the
user's own code, imported like any script would), loads the weights from a checkpoint file
or the best checkpoint of a run, writes the artifact and prints the report that proves it
computes what the model computes::

    torchvault export onnx --model nets:small_cnn --checkpoint runs/exp1 \\
        --input-shape 1,3,32,32 model.onnx
    torchvault quantize --model nets:mlp --checkpoint mlp.tv --input-shape 8,64 mlp-int8.tv

``torchvault export RUN OUT`` (a checkpoint to a standalone file) stays as it was: ``export``
followed by ``onnx`` or ``program`` is routed here by :func:`route`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .._load_into import load_into
from .._report import ExportReport, QuantizationReport
from ..errors import CheckpointNotFoundError
from ..export._pt2 import first_line
from ..export._quantize_backends import chosen_backend
from ..run import _readers
from ..run._readers import StepRef
from ..run._store import RunStore
from ._commands import JSON, Argument, command, print_json
from ._exit import ExitCode, UsageError, one_line
from ._progress import Progress
from ._runs import open_run, resolve, step_argument, tolerance

DEPLOY_EXPORTS = {"onnx": "export-onnx", "program": "export-program"}
SPOKEN = {command: f"export {kind}" for kind, command in DEPLOY_EXPORTS.items()}
"""The names users type (``export onnx``) of the commands routed from them."""


def route(argv: Sequence[str]) -> list[str]:
    """``export onnx ...`` and ``export program ...`` as their own commands."""
    args = list(argv)
    if len(args) >= 2 and args[0] == "export" and args[1] in DEPLOY_EXPORTS:
        return [DEPLOY_EXPORTS[args[1]], *args[2:]]
    return args


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32")
    return dims


MODEL_ARGUMENTS = (
    Argument(
        ("--model",),
        {
            "required": True,
            "metavar": "MODULE:FACTORY",
            "help": "a function that returns the model, e.g. nets:small_cnn (imported from the "
            "current folder or the Python path)",
        },
    ),
    Argument(
        ("--checkpoint",),
        {
            "metavar": "PATH_OR_RUN",
            "help": "weights: a checkpoint file (torchvault, safetensors, torch.save, Lightning) "
            "or a run folder (its best checkpoint by default, or its latest when no metric "
            "ranks the run); none: the factory's weights",
        },
    ),
    Argument(
        ("--step",),
        {
            "type": step_argument,
            "default": None,
            "metavar": "latest|best|N",
            "help": "with a run folder: the checkpoint to load (default: best, or latest when "
            "no metric defines a best; stderr says which)",
        },
    ),
    Argument(
        ("--item",),
        {
            "default": "model",
            "metavar": "NAME",
            "help": "with a run folder: the item holding the model (default: model)",
        },
    ),
    Argument(
        ("--input-shape",),
        {
            "type": _shape,
            "action": "append",
            "required": True,
            "metavar": "N,C,...",
            "help": "the shape of one example input (repeat for several inputs)",
        },
    ),
    Argument(
        ("--input-dtype",),
        {
            "default": "float32",
            "metavar": "DTYPE",
            "help": "the dtype of the example inputs (default: float32; int64 for token ids)",
        },
    ),
)
EXPORT_ARGUMENTS = (
    *MODEL_ARGUMENTS,
    Argument(("out",), {"metavar": "OUT", "help": "the file to write"}),
    Argument(("--dynamic-batch",), {"action": "store_true", "help": "make dim 0 dynamic"}),
    # checked by argparse: a negative or non-finite tolerance is a usage error, not internal
    Argument(("--rtol",), {"type": tolerance, "default": None, "help": "relative tolerance"}),
    Argument(("--atol",), {"type": tolerance, "default": None, "help": "absolute tolerance"}),
    JSON,
)
QUANTIZE_ARGUMENTS = (
    *MODEL_ARGUMENTS,
    Argument(("out",), {"metavar": "OUT", "help": "the torchvault file to write"}),
    Argument(
        ("--method",),
        {
            "default": "int8-dynamic",
            "choices": ("int8-dynamic", "int8-weight-only"),
            "help": "the quantization (default: int8-dynamic)",
        },
    ),
    Argument(
        ("--backend",),
        {
            "choices": ("torchao", "torch"),
            "default": None,
            "help": "the library that quantizes (default: torchao where installed, else torch; "
            "torch does int8-dynamic only)",
        },
    ),
    JSON,
)


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The user's model with the checkpoint's weights, in eval mode, and example inputs it
    was seen to run on.

    Raises:
        UsageError: the factory cannot be imported or called, does not return a module, or
            the model cannot run on inputs of ``--input-shape`` and ``--input-dtype``: all
            mistakes of the command line or the user's code, not of a checkpoint (exit 2).
    """
    model = _make_model(args.model)
    if args.checkpoint is not None:
        _load_weights(model, args)
    dtype = getattr(torch, args.input_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"--input-dtype {args.input_dtype!r} is not a torch dtype")
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(
        torch.randn(shape, generator=generator).to(dtype)
        if dtype.is_floating_point
        else torch.randint(0, 2, shape, generator=generator).to(dtype)
        for shape in args.input_shape
    )
    model.eval()
    _check_runs(model, inputs, args)
    return model, inputs


def _make_model(spec: str) -> torch.nn.Module:
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise UsageError(f"--model {spec!r}: write MODULE:FACTORY, e.g. nets:small_cnn")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: missing, or failing as it is imported
        raise UsageError(
            f"--model {spec!r}: cannot import {module_name} ({first_line(exc)}); run from the "
            "folder that holds it, or put it on PYTHONPATH"
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {module_name} has no function {factory_name}")
    try:
        model = factory()
    except Exception as exc:  # the user's code, not torchvault's: say whose it is
        raise UsageError(f"--model {spec!r} raised {first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec!r} returned a {type(model).__name__}, not a module")
    return model


def _check_runs(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], args: argparse.Namespace
) -> None:
    """Run the model once on the example inputs: a shape or dtype it does not take is the
    command line's mistake, said in one line before any exporter prints its own traces."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        shapes = " --input-shape ".join(",".join(map(str, shape)) for shape in args.input_shape)
        raise UsageError(
            f"--input-shape {shapes}: {args.model} cannot run on {args.input_dtype} inputs of "
            f"this shape ({first_line(exc)}); pass the shape (and --input-dtype) of one real "
            "input"
        ) from None


def _load_weights(model: torch.nn.Module, args: argparse.Namespace) -> None:
    source = args.checkpoint
    if not os.path.exists(source):
        raise CheckpointNotFoundError(f"{source}: no such file or run folder", path=source)
    if os.path.isdir(source) and os.path.isdir(os.path.join(source, "checkpoints")):
        store = open_run(source)
        step = resolve(store, _default_step(store) if args.step is None else args.step)
        _, state = _readers.load_tree(store, step)
        items = state[_readers.ITEMS]
        if args.item not in items:
            raise CheckpointNotFoundError(
                f"{source}: step {step} has no item {args.item!r} (it has {sorted(items)}); "
                "pass --item",
                path=source,
            )
        load_into(model, items[args.item])
    else:
        load_into(model, source)


def _default_step(store: RunStore) -> StepRef:
    """``best`` when a metric defines it, else ``latest``, said on stderr: a run without a
    metric has no best, and the latest is only the default, never labelled best."""
    steps = store.steps()
    if not steps or _readers.best_of(store, steps)[0] is not None:
        return "best"
    print(
        f"torchvault: {one_line(str(store.root))} has no metric that defines a best "
        f"checkpoint: loading the latest, step {steps[-1]}",
        file=sys.stderr,
    )
    return "latest"


def _dynamic(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"dynamic_shapes": "batch"} if args.dynamic_batch else {}
    if args.rtol is not None:
        options["rtol"] = args.rtol
    if args.atol is not None:
        options["atol"] = args.atol
    return options


@command("export-onnx", arguments=EXPORT_ARGUMENTS)
def export_onnx(args: argparse.Namespace) -> int:
    """Export the model to ONNX, check it with onnxruntime against PyTorch, print the report.

    Invoked as ``torchvault export onnx``. Exits 1 (and writes nothing) when the outputs
    differ beyond the tolerance.
    """
    from ..export import export_onnx as run

    model, inputs = build_model(args)
    with Progress(f"exporting {args.model} to ONNX") as progress, progress.ticking():
        report = run(model, inputs, args.out, **_dynamic(args))
    _print(report, args.json)
    return ExitCode.OK


@command("export-program", arguments=EXPORT_ARGUMENTS)
def export_program(args: argparse.Namespace) -> int:
    """Export the model as a torch.export program that runs without its Python class.

    Invoked as ``torchvault export program``. Exits 1 (and writes nothing) when the loaded
    program's outputs differ beyond the tolerance.
    """
    from ..export import export_program as run

    model, inputs = build_model(args)
    with Progress(f"exporting {args.model} as a program") as progress, progress.ticking():
        report = run(model, inputs, args.out, **_dynamic(args))
    _print(report, args.json)
    return ExitCode.OK


@command("quantize", arguments=QUANTIZE_ARGUMENTS)
def quantize(args: argparse.Namespace) -> int:
    """Quantize the model for CPU inference, save it, print size, latency and deviation."""
    from ..export import quantize as run
    from ..export import save_quantized

    model, inputs = build_model(args)
    try:
        chosen_backend(args.method, args.backend)
    except ValueError as exc:
        raise UsageError(str(exc).replace("backend=", "--backend ")) from None
    with Progress(f"quantizing {args.model}") as progress, progress.ticking():
        quantized, report = run(model, args.method, example_inputs=inputs, backend=args.backend)
        save_quantized(quantized, args.out)
    _print(report, args.json)
    return ExitCode.OK


def _print(report: ExportReport | QuantizationReport, as_json: bool) -> None:
    fields = dataclasses.asdict(report)
    if as_json:
        print_json(
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in fields.items()}
        )
        return
    shown = {k: v for k, v in fields.items() if not k.endswith(_IQR)}
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        if key.endswith("_latency_ms"):
            text = _latency_text(value, fields.get(key.removesuffix("_ms") + _IQR, math.nan))
        elif isinstance(value, (tuple, list)):
            text = ", ".join(map(str, value))
        else:
            text = str(value)
        print(f"{key:<{width}}  {one_line(text)}")


_IQR = "_iqr_ms"


def _latency_text(median: float, iqr: float) -> str:
    """``0.083 ms (IQR 0.004 ms)``: the median, and the spread of the runs around it."""
    if math.isnan(median):
        return "not measured"
    return f"{median:.3f} ms (IQR {iqr:.3f} ms)"
