"""Every random number generator a training step draws from, captured and restored exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .errors import CorruptCheckpointError


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
