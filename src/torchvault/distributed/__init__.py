"""Multi-rank checkpoints through ``torch.distributed.checkpoint`` (DCP), stored as a
torchvault run: content-addressed objects, one sealed JSON manifest per checkpoint, no pickle.

``StorageWriter`` and ``StorageReader`` plug into ``dcp.save`` / ``dcp.load``; a
``CheckpointManager`` created while ``torch.distributed`` is initialized uses them itself.
"""

from __future__ import annotations

from ._reader import StorageReader
from ._writer import StorageWriter

__all__ = ["StorageReader", "StorageWriter"]
