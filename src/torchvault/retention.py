"""Retention policies: which committed checkpoints to keep (``KeepLast``, ``KeepBest``, ...).

The public home of :mod:`torchvault.run.retention`, where the policies live beside the run
store that applies them; ``from torchvault.retention import KeepLast`` keeps working.
"""

from __future__ import annotations

from .run.retention import (
    AnyOf,
    CheckpointRecord,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    Pinned,
    RetentionPolicy,
    best_step,
    from_arguments,
    plan_deletions,
    ranked_by,
)

__all__ = [
    "AnyOf",
    "CheckpointRecord",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "Pinned",
    "RetentionPolicy",
    "best_step",
    "from_arguments",
    "plan_deletions",
    "ranked_by",
]
