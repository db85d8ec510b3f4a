"""Where loaded tensors go: ``map_location``, read as ``torch.load`` reads it.

Every loader (``load``, ``load_into``, ``load_legacy``, a manager's ``restore``/``load``)
takes the same ``map_location``:

* ``None``: each tensor goes to the device it was saved from;
* a device (``"cpu"``, ``"cuda:1"``, ``"meta"``, a ``torch.device``): every tensor goes there;
* a dict from saved device to target (``{"cuda:0": "cpu"}``); devices it does not name stay
  where they were saved;
* a callable ``(storage, location) -> storage | None``, called once per stored blob with its
  CPU ``torch.UntypedStorage`` and the saved device string; ``None`` means "where it was
  saved", and ``lambda storage, loc: storage`` (the tutorial idiom) keeps it on the CPU.

The argument is checked when the load starts, so a wrong value is a ``TypeError`` or
``ValueError`` naming ``map_location`` before any file is read, and a device this machine
lacks is a ``ValueError`` that says so and how to fix it: never an error about the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .errors import CorruptCheckpointError

StorageMap = Callable[[torch.UntypedStorage, str], object]
MapLocation = str | torch.device | Mapping[str, str] | StorageMap | None

_ACCEPTS = (
    "map_location accepts None (where each tensor was saved), a device such as 'cpu', "
    "'cuda', 'cuda:1' or torch.device('cpu'), a dict from saved device to target "
    "({'cuda:0': 'cpu'}), or a callable (storage, location) -> storage or None"
)


class Placement:
    """A checked ``map_location``; :meth:`place` moves one stored blob to its target.

    Raises:
        TypeError: ``map_location`` is none of the accepted kinds.
        ValueError: it names something that is not a device, or a device this machine lacks.
    """

    def __init__(self, map_location: MapLocation) -> None:
        self._call: StorageMap | None = None
        self._fixed: torch.device | None = None
        self._table: dict[str, torch.device] = {}
        if callable(map_location) and not isinstance(map_location, torch.device):
            self._call = map_location
        elif isinstance(map_location, Mapping):
            for saved, target in map_location.items():
                self._table[_key(saved)] = _available(_device(target, f"map_location[{saved!r}]"))
        elif map_location is not None:
            self._fixed = _available(_device(map_location, "map_location"))
        self._devices: dict[str, torch.device] = {}

    def device(self, saved: str) -> torch.device:
        """The target of a tensor saved on device ``saved`` (a non-callable map_location)."""
        device = self._devices.get(saved)
        if device is None:
            device = self._fixed or self._table.get(saved)
            if device is None:
                device = _available(_device(saved, "the saved device"), saved=saved)
            self._devices[saved] = device
        return device

    def place(self, data: torch.Tensor, saved: str) -> torch.Tensor:
        """``data`` (a blob's bytes on the CPU, covering its own storage) on its target."""
        if self._call is not None:
            storage = data.untyped_storage()
            result = self._call(storage, saved)
            if result is not None:
                return _from_storage(result, storage, data)
        device = self.device(saved)
        return data if device.type == "cpu" else data.to(device)


def check(map_location: MapLocation | Placement) -> Placement:
    """``map_location`` checked now, before a file is opened (see :class:`Placement`);
    a Placement already checked is passed through."""
    return map_location if isinstance(map_location, Placement) else Placement(map_location)


def _key(saved: object) -> str:
    if isinstance(saved, torch.device):
        return str(saved)
    if not isinstance(saved, str):
        raise TypeError(
            f"map_location's keys must be saved device names (str, such as 'cuda:0'); got "
            f"{type(saved).__name__} {saved!r:.40}. {_ACCEPTS}."
        )
    return saved


def _device(value: object, name: str) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} got {type(value).__name__} {value!r:.40}. {_ACCEPTS}.")
    try:
        return torch.device(value)
    except RuntimeError:
        if name == "the saved device":  # the file names a device no torch has
            raise CorruptCheckpointError(
                f"a tensor was saved from device {value!r:.40}, which is not a device torch "
                "knows: the file is damaged or crafted"
            ) from None
        raise ValueError(f"{name}={value!r:.40} is not a device. {_ACCEPTS}.") from None


def _available(device: torch.device, *, saved: str | None = None) -> torch.device:
    """``device`` itself, or a ValueError when this machine cannot hold tensors there."""
    if device.type in ("cpu", "meta"):
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ok = count > 0 and (device.index or 0) < count
        have = f"{count} CUDA device(s)" if count else "no CUDA"
    else:
        try:
            torch.empty(0, device=device)
            ok, have = True, ""
        except (RuntimeError, AssertionError, ValueError):
            ok, have = False, f"no {device.type} device"
    if ok:
        return device
    if saved is not None:
        raise ValueError(
            f"tensors were saved on {saved}, and map_location leaves them there, but this "
            f"machine has {have}; pass map_location='cpu' (or {{{saved!r}: 'cpu'}}) to load "
            "them on the CPU"
        )
    raise ValueError(
        f"map_location={str(device)!r} names a device this machine lacks (it has {have}); "
        "pass map_location='cpu' to load on the CPU"
    )


def _from_storage(result: object, given: torch.UntypedStorage, data: torch.Tensor) -> torch.Tensor:
    """The bytes a map_location callable returned, as a uint8 tensor like ``data``."""
    if isinstance(result, torch.TypedStorage):
        result = result._untyped_storage
    if not isinstance(result, torch.UntypedStorage):
        raise TypeError(
            f"map_location (a callable) returned {type(result).__name__}; it must return the "
            "storage it was given, a copy of it on another device (storage.cuda()), or None "
            "for the saved device"
        )
    if result is given or (result.device == given.device and result.data_ptr() == given.data_ptr()):
        return data
    if result.nbytes() != given.nbytes():
        raise ValueError(
            f"map_location (a callable) returned a storage of {result.nbytes()} bytes for one "
            f"of {given.nbytes()}; it must return the same bytes, on any device"
        )
    return torch.empty(0, dtype=torch.uint8, device=result.device).set_(result)


class Misplaced(Exception):
    """An error of ``map_location`` (or of its callable) raised inside a reader whose net
    turns stray exceptions into errors about the file: it carries the error past that net,
    and the reader re-raises ``error`` as it was, since the file is not at fault."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


Where = MapLocation | Placement  # what internal readers take: checked once by the caller
