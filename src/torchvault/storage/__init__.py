"""Where a run's bytes live: one small interface, and the backends that implement it.

>>> from torchvault.storage import LocalStorage, MemoryStorage
"""

from __future__ import annotations

from ._base import Storage
from ._local import LocalStorage
from ._memory import MemoryStorage

__all__ = ["LocalStorage", "MemoryStorage", "Storage"]
