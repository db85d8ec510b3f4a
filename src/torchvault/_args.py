"""The checks every public function makes on its caller's arguments, in one place.

A wrong argument is the caller's mistake, never the file's: it raises ``TypeError`` (a wrong
type) or ``ValueError`` (a wrong value) whose message names the argument and says what it
accepts, before any file is opened. ``map_location`` is checked by
:func:`torchvault._placement.check`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# a URL scheme of two or more letters (one letter before ":" is a Windows drive), then ":/":
# pathlib folds "s3://bucket" into "s3:/bucket", which must not become a local folder "s3:"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+:/")


def path(value: object, name: str = "path", *, also: str = "") -> str:
    """``value`` as a local path string.

    Raises:
        TypeError: ``value`` is not a ``str`` or ``os.PathLike`` of ``str``.
        ValueError: it is empty, holds a NUL character, or is a URL (``s3://...``): object
            storage is not supported yet.
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, os.PathLike) and isinstance(fs := os.fspath(value), str):
        text = fs
    else:
        raise TypeError(
            f"{name} must be a local path (str or os.PathLike such as pathlib.Path){also}; got "
            f"{type(value).__name__} {value!r:.60}"
        )
    if not text:
        raise ValueError(f"{name} is an empty string; pass a file or folder path")
    if "\0" in text:
        raise ValueError(f"{name} {text!r:.60} holds a NUL character, which no path can")
    if _URL.match(text):
        raise ValueError(
            f"{name} {text!r:.80} is a URL; torchvault reads and writes local paths only "
            "(object storage such as s3:// is not supported yet). Copy the file to a local "
            "path, or mount the bucket."
        )
    return text


def metadata(value: object) -> dict[str, str] | None:
    """``metadata=``: ``None`` or a mapping of ``str`` to ``str``.

    Raises:
        TypeError: naming the first key or value that is not a ``str`` (a plain one: it is
            the caller's argument, and a torchvault error means the file).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"metadata must be a dict of str to str (or None); got {type(value).__name__}"
        )
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(
                f"metadata keys must be str; key {key!r:.40} is {type(key).__name__}. "
                "Convert it with str()."
            )
        if not isinstance(item, str):
            raise TypeError(
                f"metadata values must be str; metadata[{key!r:.40}] is "
                f"{type(item).__name__}. Convert it with str() or json.dumps()."
            )
    return dict(value)


def flag(value: object, name: str) -> bool:
    """A ``bool`` argument (``lazy=``, ``strict=``, ...): 0 and 1 are not accepted, since a
    misplaced positional number is more likely than a deliberate one."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r:.40}")
    return value


def module(value: object, name: str = "model") -> None:
    """Refuse anything but a ``torch.nn.Module``, naming the argument."""
    import torch  # only the callers that take a module pay for it

    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(value).__name__}")


def count(value: object, name: str) -> int:
    """A non-negative ``int`` argument (``samples=``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0; got {type(value).__name__} {value!r:.40}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def tolerance(value: object, name: str) -> float:
    """A finite, non-negative real number (``rtol=``, ``atol=``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a non-negative number; got {type(value).__name__} {value!r:.40}"
        )
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return float(value)


def exporting(
    model: object, path_: object, validate: object, tolerances: dict[str, object], samples: object
) -> str:
    """The arguments every exporter shares, checked before the (slow) export starts;
    returns the destination path."""
    module(model)
    flag(validate, "validate")
    for name, value in tolerances.items():
        tolerance(value, name)
    count(samples, "samples")
    return path(path_)


def step(value: object, name: str = "step", *, refs: bool = False) -> None:
    """A checkpoint step: an ``int`` >= 0, or with ``refs`` also ``"latest"``/``"best"``."""
    what = "an int >= 0, 'latest' or 'best'" if refs else "an int >= 0"
    if refs and isinstance(value, str):
        if value in ("latest", "best"):
            return
        # a misspelt name must never quietly mean the latest
        raise ValueError(f"{name} {value!r:.40} is not a checkpoint name: {name} must be {what}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__} {value!r:.40}")
    if value < 0:
        raise ValueError(f"{name} must be {what}; got {value}")
