"""The two quantization backends, torchao and torch.ao, behind one small interface: which
to use, applying a method, and finding the quantized weights and modules afterwards."""

from __future__ import annotations

import contextlib
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

METHODS = ("int8-dynamic", "int8-weight-only")
_INSTALL = 'pip install "torchvault[quantize]"'


# ----------------------------------------------------------------------------- backends


BACKENDS = {"torchao": "torchao", "torch": "torch.ao", "torch.ao": "torch.ao"}
"""``quantize``'s ``backend`` argument, and the name each is recorded under."""
_SUPPORTS = {"torchao": METHODS, "torch.ao": ("int8-dynamic",)}


def chosen_backend(method: str, backend: str | None) -> str:
    """The backend ``backend`` names (``None``: the default for ``method``), checked to
    support ``method`` and to be installed.

    Raises:
        ValueError: an unknown backend, one that cannot do ``method``, or one whose library
            is missing (naming the extra to install).
    """
    if backend is None:
        return _choose_backend(method)
    choices = "'torchao', 'torch'"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {choices}")
    name = BACKENDS[backend]
    if method not in _SUPPORTS[name]:
        able = [b for b in ("torchao", "torch") if method in _SUPPORTS[BACKENDS[b]]]
        raise ValueError(
            f"backend={backend!r} cannot quantize {method!r} (it does "
            f"{', '.join(map(repr, _SUPPORTS[name]))}); for {method!r} choose "
            f"{', '.join(map(repr, able))}, or leave backend unset"
        )
    try:
        _torchao(f"backend={backend!r}") if name == "torchao" else _torch_ao()
    except ImportError as exc:
        raise ValueError(f"backend={backend!r} is not available here: {exc}") from exc
    return name


def _choose_backend(method: str) -> str:
    # torchao is the maintained path (torch.ao.quantization is deprecated); on this CPU its
    # int8 kernels measured slower than fp32 where torch.ao's were faster
    # (benchmarks/RESULTS-quantize.md), so torch.ao stays the fallback for int8-dynamic only.
    try:
        _torchao(f"the method {method!r}")
    except ImportError:
        if method != "int8-dynamic":
            raise
        _torch_ao()
        return "torch.ao"
    return "torchao"


def _torchao(purpose: str) -> Any:
    """torchao's quantization module, imported on first use (it is an optional extra)."""
    try:
        import torchao.quantization
    except ImportError as exc:
        raise ImportError(f"{purpose} needs torchao, which is not installed: {_INSTALL}") from exc
    return torchao.quantization


def _torchao_version() -> str:
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _torch_ao() -> Callable[..., Any]:
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as exc:
        raise ImportError(
            "int8-dynamic needs torchao, or torch.ao.quantization, which this torch no longer "
            f"has: {_INSTALL}"
        ) from exc
    return quantize_dynamic


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao's deprecation notices: the fallback is chosen knowingly and recorded
    in the report as backend ``"torch.ao"``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, ")
        yield


def _apply(model: torch.nn.Module, method: str, backend: str) -> None:
    if backend == "torchao":
        ao = _torchao(f"the method {method!r} with backend 'torchao'")
        make = (
            ao.Int8DynamicActivationInt8WeightConfig
            if method == "int8-dynamic"
            else ao.Int8WeightOnlyConfig
        )
        # set_inductor_config=True would change torch._inductor's settings for the whole
        # process: not a side effect to have from a checkpoint library.
        ao.quantize_(model, make(set_inductor_config=False))
        return
    quantize_dynamic = _torch_ao()
    with _quiet_torch_ao():
        quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _dynamic_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """torch.ao's dynamically quantized Linear modules, by name."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def _torchao_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that are torchao tensor subclasses, by state-dict key."""
    return {
        _join(name, param_name): param
        for name, module in model.named_modules()
        for param_name, param in module._parameters.items()
        if param is not None and type(param).__module__.startswith("torchao.")
    }


def _quantized_modules(model: torch.nn.Module, backend: str) -> tuple[str, ...]:
    if backend == "torch.ao":
        return tuple(_dynamic_linears(model))
    owners = (key.rpartition(".")[0] for key in _torchao_weights(model))
    return tuple(dict.fromkeys(owners))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_float(model: torch.nn.Module) -> None:
    if _dynamic_linears(model) or _torchao_weights(model):
        raise ValueError(
            "`model` is already quantized; pass the float model (to load a saved quantized "
            "model, pass a float model of its architecture to load_quantized)."
        )
