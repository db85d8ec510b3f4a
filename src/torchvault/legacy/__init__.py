"""Open the world's existing checkpoints without running their code.

``load_legacy`` reads torch.save files (the zip format of torch >= 1.6 and the older
stacked-pickle format) with torchvault's own zip reader and restricted unpickler; ``scan``
reports every global a file names; ``convert`` rewrites legacy, safetensors and torchvault
files as torchvault, strict safetensors or Hugging Face folders.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal, overload

from .. import _args
from .._file import _gc_paused
from .._placement import MapLocation, check
from .._report import SalvageReport
from ..errors import TorchVaultError
from ._convert import convert
from ._reader import Session, located, open_mapped, read
from ._salvage import tensors
from ._scan import scan

__all__ = ["convert", "load_legacy", "scan"]


@overload
def load_legacy(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    salvage: Literal[False] = False,
) -> object: ...


@overload
def load_legacy(
    path: str | os.PathLike[str], *, map_location: MapLocation = "cpu", salvage: Literal[True]
) -> SalvageReport: ...


def load_legacy(
    path: str | os.PathLike[str], *, map_location: MapLocation = "cpu", salvage: bool = False
) -> object:
    """Read a ``torch.save`` file (.pt, .pth, .bin, .ckpt) without running any of its code.

    The file's pickle is interpreted by torchvault's own restricted unpickler: it builds
    containers, tensors, numpy values and a few plain types, and refuses every other global
    by name. Zip CRCs are checked, and every tensor's size, stride and offset is checked
    against its storage. Tensors are zero-copy views of a private map of the file.

    Args:
        path: a torch.save file, zip format (torch >= 1.6) or the legacy stacked pickles.
        map_location: where tensors go, as ``torch.load`` takes it: a device, ``None`` for
            where they were saved, a dict from saved device to target device, or a callable
            ``(storage, location) -> storage | None``.
        salvage: for a whole model saved with ``torch.save(model)``: recover every tensor by
            its dotted state-dict name without importing or calling the model's classes, and
            return a :class:`SalvageReport` that lists those classes, and the globals the
            file would call (``report.unsafe``; a ``UserWarning`` names them).

    Returns:
        The saved object (usually a state dict), or a :class:`SalvageReport`.

    Raises:
        TypeError, ValueError: a wrong argument, naming it (a URL ``path``, a ``map_location``
            that is not a device or names one this machine lacks, also for tensors saved on
            CUDA that ``map_location=None`` would leave there).
        UnsafeCheckpointError: the file names a function or class outside the allowlist
            (the message names it); nothing was run.
        CorruptCheckpointError: malformed, truncated or fails a CRC.
        UnsupportedFormatError: a TorchScript archive, a compressed wrapper, the tar format
            of torch < 0.4, or a file of another kind (a torchvault file, a program); the
            message names the function that reads it.

    Example:
        >>> state = tv.load_legacy("resnet50.pth")
        >>> report = tv.load_legacy("whole-model.pt", salvage=True)
        >>> model.load_state_dict(report.state_dict)
    """
    placement = check(map_location)
    salvage = _args.flag(salvage, "salvage")
    name, data = open_mapped(_args.path(path))
    session = Session(name, map_location=placement, permissive=salvage)
    with _gc_paused():
        obj = read(session, data)
    if not salvage:
        return obj
    try:
        state: dict[str, object] = dict(tensors(obj))
    except TorchVaultError as exc:
        raise located(exc, name) from exc
    unsafe = tuple(sorted(session.called))
    if unsafe:
        warnings.warn(
            f"{name}: the pickle calls {', '.join(unsafe)}, which torch.load(weights_only=False) "
            "would run; nothing was run and the weights were recovered without it, but the "
            "file was crafted or is not what it claims to be: do not load it with torch.load",
            UserWarning,
            stacklevel=2,
        )
    classes = tuple(sorted(session.refused - session.called))
    return SalvageReport(name, state, classes, unsafe)
