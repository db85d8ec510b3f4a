"""Every random number generator a training step draws from, captured and restored exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError


def capture() -> dict[str, object]:
    """The states of Python's ``random``, NumPy's global generator, torch's CPU generator and,
    when CUDA is available, every CUDA device's generator."""
    state: dict[str, object] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: object, path: str) -> tuple[str, ...]:
    """Put the generators back as :func:`capture` saw them; return the ones restored.

    Raises:
        CorruptCheckpointError: a state that the generator refuses.
    """
    if not isinstance(state, dict):
        raise _corrupt(path, "the saved random states are not a dict")
    restored = []
    try:
        if "python" in state:
            random.setstate(_python_state(state["python"]))
            restored.append("python")
        if "numpy" in state:
            np.random.set_state(state["numpy"])
            restored.append("numpy")
        if "torch" in state:
            torch.set_rng_state(_byte_tensor(state["torch"]))
            restored.append("torch")
        if "cuda" in state and torch.cuda.is_available():
            saved = list(state["cuda"])
            for device in range(min(len(saved), torch.cuda.device_count())):
                torch.cuda.set_rng_state(_byte_tensor(saved[device]), device)
            restored.append("cuda")
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, OverflowError) as exc:
        raise _corrupt(path, f"a saved random state was refused ({exc})") from exc
    return tuple(restored)


def generator_state(generator: torch.Generator) -> dict[str, object]:
    """What a ``torch.Generator`` item of a checkpoint holds: its device and its state (a
    uint8 tensor on the CPU, whatever the device: that is what ``get_state`` returns)."""
    return {"device": str(generator.device), "state": generator.get_state()}


def check_generator(target: object, saved: object, name: str, path: str) -> torch.Tensor:
    """The state to put into ``target``, a ``torch.Generator`` for the saved item ``name``.

    Raises:
        TypeError: ``target`` is not a ``torch.Generator``.
        ValueError: ``target`` is on another kind of device than the saved generator (their
            states differ in kind: a CPU Mersenne Twister, a CUDA Philox seed and offset).
        CorruptCheckpointError: the saved state is malformed.
    """
    if not isinstance(target, torch.Generator):
        raise TypeError(
            f"restore({name}=...) needs a torch.Generator ({name!r} was saved from one), "
            f"got {type(target).__name__}"
        )
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("device"), str)
        or not isinstance(saved.get("state"), torch.Tensor)
        or saved["state"].dtype != torch.uint8
    ):
        raise _corrupt(path, f"the saved state of generator {name!r} is malformed")
    try:
        device = torch.device(saved["device"])
    except RuntimeError as exc:
        raise _corrupt(path, f"generator {name!r} names no device ({exc})") from exc
    if device.type != target.device.type:
        raise ValueError(
            f"restore({name}=...) got a generator on {target.device}, but {name!r} was saved "
            f"from one on {device}: pass torch.Generator(device={device.type!r})"
        )
    state: torch.Tensor = saved["state"]
    return state


def set_generator(target: torch.Generator, saved: object, name: str, path: str) -> None:
    """Put a saved ``torch.Generator`` item's state into ``target`` in place (checked as by
    :func:`check_generator`, whose errors it raises).

    Raises:
        CorruptCheckpointError: also when the generator refuses the saved state.
    """
    state = check_generator(target, saved, name, path)
    try:
        target.set_state(_byte_tensor(state))
    except (TypeError, RuntimeError) as exc:
        raise _corrupt(path, f"generator {name!r}: its saved state was refused ({exc})") from exc


def _python_state(value: Any) -> tuple[object, ...]:
    # random.setstate wants the inner sequence as a tuple, as getstate() gives it.
    if (
        not isinstance(value, tuple | list)
        or len(value) != 3
        or not isinstance(value[1], tuple | list)
    ):
        raise ValueError("Python's random state is a (version, internal state, gauss) triple")
    return (value[0], tuple(value[1]), value[2])


def _byte_tensor(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise TypeError("a torch random state is a uint8 tensor")
    return value.detach().to("cpu").clone()


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {what}.", path=path)
