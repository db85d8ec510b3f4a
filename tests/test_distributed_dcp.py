"""``dcp.save`` / ``dcp.load`` through torchvault's StorageWriter / StorageReader on real ranks
(spawned processes, gloo on CPU): FSDP2 and DDP at 2 and 4 ranks, the resharding matrix, dedup
(frozen tensors, fixed blocks across a resharded resume, replicated tensors written once),
faults injected into each storage operation of a save, SIGKILLed ranks, and bad input.

A spawn costs seconds on a small machine, so each test runs one short *script* per spawn: a
list of operations (build a model, train, save, load and compare, fail a save, kill a rank)
that ``_Rank`` plays on every rank. Every save of a full state also writes its reference (rank
0, ``tv.save`` of the full tensors), and every load compares the loaded state with it bit for
bit, whatever the world size was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import torchvault as tv
from dist_harness import Outcome, run_ranks
from torchvault import _commit, _format
from torchvault.distributed import StorageReader, StorageWriter, _writer
from torchvault.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    RunLockedError,
    UnsupportedFormatError,
)
from torchvault.run._readers import load_tree
from torchvault.run._store import RunStore, seal
from torchvault.storage._local import LocalStorage

# dcp.save / dcp.load in the test process itself (no process group) say they assume one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

BLOCK = 512  # bytes per fixed block: 2 rows of the first layer, so its chunks span many blocks
# a rank waiting on a dead peer gives up after this (gloo usually sees the peer die at once)
PG_TIMEOUT = 20.0


# ---------------------------------------------------------------------- what the ranks hold


def make_model(seed: int) -> nn.Sequential:
    """30 rows on 4 ranks: chunks of 8, 8, 8, 6 (on 2: 15, 15, across a block); 3 rows on 4
    ranks: one empty chunk."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 3))


def extras(mesh: Any, loaded: bool) -> dict[str, Any]:
    """The storage layer's odd cases: uneven and empty shards, bf16, a 0-dim and an empty
    tensor, and non-tensor values (numpy ones too). ``loaded``: the targets a load fills,
    every value different from the saved one."""
    bf16 = torch.zeros(15, 3) if loaded else torch.arange(45.0).reshape(15, 3) / 7
    odd = torch.zeros(2, 5) if loaded else torch.arange(10.0).reshape(2, 5) - 3
    if mesh is not None:  # 15 rows on 4 ranks: 4, 4, 4, 3; 2 rows on 4 ranks: 1, 1, 0, 0
        bf16_t: Any = distribute_tensor(bf16.bfloat16(), mesh, [Shard(0)])
        odd_t: Any = distribute_tensor(odd, mesh, [Shard(0)])
    else:
        bf16_t, odd_t = bf16.bfloat16(), odd
    return {
        "bf16": bf16_t,
        "odd": odd_t,
        "zero_dim": torch.tensor(0.0 if loaded else 3.25),
        "empty": torch.empty(0, 4),
        "epoch": 0 if loaded else 3,
        "lr": 0.0 if loaded else 0.25,
        "pair": None if loaded else (2, "x"),
        "names": {"a": "" if loaded else "b"},
        "np_scalar": np.float32(0 if loaded else 1.5),
        "np_array": np.zeros(1, np.int16) if loaded else np.arange(4, dtype=np.int16),
    }


def full(obj: object) -> object:
    """The state with every DTensor gathered into a full tensor (collective on every rank)."""
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {key: full(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(full(value) for value in obj)
    return obj


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ: structure, types, dtypes, shapes and bits."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and torch.equal(a, b)
        )
        return [] if same else [f"{path}: {a!r:.60} != {b!r:.60}"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)  # type: ignore[union-attr]
        return [] if same else [f"{path}: {a!r:.60} != {b!r:.60}"]
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} != {type(b).__name__}"]
    if isinstance(a, dict):
        assert isinstance(b, dict)
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} != {list(b)}"]
        return [d for key in a for d in differences(a[key], b[key], f"{path}.{key}")]
    if isinstance(a, list | tuple):
        assert isinstance(b, list | tuple)
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}.{i}")]  # fmt: skip
    return [] if a == b else [f"{path}: {a!r:.60} != {b!r:.60}"]


# ---------------------------------------------------------------------- faults and kills


def _enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _eio(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.EIO, "Input/output error (injected)")


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected failure while hashing")


def _none(*args: Any, **kwargs: Any) -> None:
    return None


def _objects(storage: Any, name: str) -> bool:
    """A ``Storage.size`` call about an object (as the commit checks them all)."""
    return name.startswith("objects/")


def _die(*args: Any, **kwargs: Any) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


def _when(condition: Callable[..., bool], action: Callable[..., Any], original: Any) -> Any:
    """``action`` for the calls that ``condition`` picks, ``original`` for the others."""

    def patched(*args: Any, **kwargs: Any) -> Any:
        return action(*args, **kwargs) if condition(*args, **kwargs) else original(*args, **kwargs)

    return patched


def _into(folder: str) -> Callable[..., bool]:
    """A ``os.replace`` / ``fsync_dir`` call whose destination is in ``folder``."""
    return lambda *args, **kwargs: (
        Path(args[-1]).parent.name == folder or Path(args[-1]).name == folder
    )


def _after(original: Callable[..., Any], action: Callable[..., Any]) -> Callable[..., Any]:
    def patched(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        action()
        return result

    return patched


def _nth(n: int, action: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return action() if calls[0] == n else original(*args, **kwargs)

    return patched


# (what is patched, its replacement given the original): one storage operation of a save each
POINTS: dict[str, tuple[Any, str, Callable[[Any], Any]]] = {
    "put_many": (LocalStorage, "put_many", lambda orig: _enospc),
    "put_many_on_the_coordinator": (LocalStorage, "put_many", lambda orig: _enospc),
    "write": (_commit._WritebackFile, "write", lambda orig: _enospc),
    "fsync": (os, "fsync", lambda orig: _eio),
    "replace": (os, "replace", lambda orig: _enospc),
    "fsync_dir": (_commit, "fsync_dir", lambda orig: _eio),
    "hash": (_format, "hashed_views", lambda orig: _boom),
    "object_vanished": (LocalStorage, "size", lambda orig: _when(_objects, _none, orig)),
    "commit": (os, "replace", lambda orig: _when(_into("checkpoints"), _enospc, orig)),
    "commit_dir_sync": (_commit, "fsync_dir", lambda orig: _when(_into("checkpoints"), _eio, orig)),
    "latest": (os, "replace", lambda orig: _when(_into("refs"), _enospc, orig)),
}
ERRNO = {"fsync": errno.EIO, "fsync_dir": errno.EIO, "commit_dir_sync": errno.EIO}
ERRNO["object_vanished"] = None  # found missing by the commit's check, not by a failed call
# faults at which the manifest is already in place: the step is committed, and the error says so
AFTER_COMMIT = {"commit_dir_sync", "latest"}
# the coordinator (rank 0) for these; rank 1 for the others
VICTIM = dict.fromkeys(
    ["put_many_on_the_coordinator", "object_vanished", "commit", "commit_dir_sync", "latest"], 0
)

KILLS: dict[str, tuple[Any, str, Callable[[Any], Any]]] = {
    "objects_written": (RunStore, "put_all", lambda orig: _after(orig, _die)),
    "before_fsync": (_commit, "fsync_file", lambda orig: _die),
    "before_commit": (RunStore, "commit", lambda orig: _die),
    "mid_object_write": (_commit._WritebackFile, "write", lambda orig: _die),
    "between_renames": (os, "replace", lambda orig: _nth(2, _die, orig)),
    "before_dir_sync": (_commit, "fsync_dir", lambda orig: _die),
    "set_up": (StorageWriter, "set_up_storage_writer", lambda orig: _die),
    "local_plan": (StorageWriter, "prepare_local_plan", lambda orig: _die),
    "hashing": (_format, "hashed_views", lambda orig: _die),
    "checking_objects": (_writer, "check_objects", lambda orig: _die),
    "after_commit": (RunStore, "set_ref", lambda orig: _die),
}


def summary(exc: BaseException) -> dict[str, Any]:
    """What a failed dcp call raised, as plain data: the outer type, and per failing rank the
    inner exception's type, errno and message."""
    out: dict[str, Any] = {"outer": type(exc).__name__, "text": str(exc)[-2000:], "inner": {}}
    if isinstance(exc, CheckpointException):
        for rank, (inner, _) in exc.failures.items():
            out["inner"][rank] = (type(inner).__name__, getattr(inner, "errno", None), str(inner))
    return out


# ---------------------------------------------------------------------- the script player


class _Rank:
    """Plays a script on one rank (or in the test process itself, without torch.distributed)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.mesh: Any = None
        self.model: nn.Module
        self.opt: torch.optim.Optimizer
        self.kind = "plain"

    def build(self, kind: str, seed: int = 0) -> None:
        """A fresh model and AdamW: ``fsdp`` (fully_shard), ``ddp`` or ``plain``."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.kind = kind
        model: nn.Module = make_model(seed)
        if kind != "plain":
            self.mesh = init_device_mesh("cpu", (self.world,))
        if kind == "fsdp":
            fully_shard(model, mesh=self.mesh)
        elif kind == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        self.extra = extras(self.mesh, loaded=seed != 0)

    def train(self, steps: int, freeze_first: bool = False) -> None:
        """AdamW steps on inputs that every rank shares; ``freeze_first``: layer 0 frozen."""
        layers = self.model.module if self.kind == "ddp" else self.model
        assert isinstance(layers, nn.Sequential)
        layers[0].requires_grad_(not freeze_first)
        for i in range(steps):
            x = torch.randn(4, 64, generator=torch.Generator().manual_seed(100 + i))
            self.model(x).square().sum().backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def state(self) -> dict[str, Any]:
        model, optim = get_state_dict(self.model, self.opt)
        return {"model": model, "optim": optim, "extra": self.extra}

    def save(self, run: str, step: int, ref: str | None, block: int | None = BLOCK) -> int:
        """``dcp.save`` of the state; the bytes this rank handed to the store (before dedup)."""
        state = self.state()
        handed = [0]
        original = RunStore.put_all

        def counting(store: RunStore, blobs: list[Any], *args: Any) -> Any:
            handed[0] += sum(blob.nbytes for blob in blobs)
            return original(store, blobs, *args)

        with mock.patch.object(RunStore, "put_all", counting):
            dcp.save(state, storage_writer=StorageWriter(run, step=step, block_bytes=block))
        if ref is not None:
            expected = full(state)
            if self.rank == 0:
                tv.save(expected, ref)
        return handed[0]

    def load(self, run: str, step: int | str, ref: str) -> list[str]:
        """``dcp.load`` into fresh targets, then ``set_state_dict``; what differs from ``ref``."""
        kind = self.kind
        self.build(kind, seed=1)  # other weights and zeros: everything must come from the load
        self.train(1)  # the optimizer's state exists, with other values
        state = self.state()
        dcp.load(state, storage_reader=StorageReader(run, step=step))
        set_state_dict(
            self.model,
            self.opt,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        self.extra = state["extra"]
        got = full(self.state())
        return differences(got, tv.load(ref))

    def snapshot(self, ref: str) -> None:
        """Write the reference of the current state (rank 0) without saving it."""
        expected = full(self.state())
        if self.rank == 0:
            tv.save(expected, ref)

    def fail_save(self, run: str, step: int, point: str, victim: int) -> dict[str, Any]:
        """A save whose storage operation ``point`` fails on rank ``victim`` only; then the
        run's committed steps and the temp files left in it."""
        out = self._expect_failure(lambda: self.save(run, step, None), POINTS, point, victim)
        out["steps"] = RunStore(run).steps()
        out["temp_files"] = [p.name for p in Path(run).rglob(f"*{_commit.TEMP_MARK}*")]
        return out

    def fail_load(self, run: str, step: int | str) -> dict[str, Any]:
        """A load that must fail (a bad manifest): what every rank saw."""
        self.build(self.kind, seed=1)
        return self._expect_failure(
            lambda: dcp.load(self.state(), storage_reader=StorageReader(run, step=step)),
            {},
            "",
            -1,
        )

    def refused_save(self, run: str, step: int) -> dict[str, Any]:
        """A save that must be refused before anything is written."""
        before = len(RunStore(run).storage.list("objects/"))
        out = self._expect_failure(lambda: self.save(run, step, None), {}, "", -1)
        dist.barrier()
        out["objects"] = (before, len(RunStore(run).storage.list("objects/")))
        return out

    def kill_save(self, run: str, step: int, point: str, victim: int) -> dict[str, Any]:
        """A save during which rank ``victim`` is SIGKILLed at ``point`` (the last op)."""
        return self._expect_failure(lambda: self.save(run, step, None), KILLS, point, victim)

    def _expect_failure(
        self, call: Callable[[], Any], points: dict[str, Any], point: str, victim: int
    ) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            if self.rank == victim:
                owner, name, make = points[point]
                stack.enter_context(mock.patch.object(owner, name, make(getattr(owner, name))))
            try:
                call()
            except BaseException as exc:  # CheckpointException is a BaseException
                return summary(exc)
        return {"outer": None}


def play(rank: int, world: int, script: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``script`` on this rank: each entry is (method of _Rank, *arguments)."""
    player = _Rank(rank, world)
    return [getattr(player, op)(*args) for op, *args in script]


def values(outcomes: list[Outcome]) -> list[list[Any]]:
    return [o.value for o in outcomes]


# ---------------------------------------------------------------------- reading the run


def manifest(run: Path, step: int) -> dict[str, Any]:
    return RunStore(run).manifest(step)


def digests(run: Path, step: int, prefix: str = "") -> set[str]:
    """The objects of ``step`` (only those of tensors whose key starts with ``prefix``)."""
    document = manifest(run, step)
    blobs = document["blobs"]
    return {
        blobs[index][0]
        for key, (_, _, chunks) in document["shards"]["tensors"].items()
        if key.startswith(prefix)
        for _, index in chunks
    }


def broken_objects(run: Path) -> list[str]:
    """Object files whose bytes do not match their name: a partial object published."""
    return [
        path.name
        for path in (run / "objects").rglob("*")
        if path.is_file()
        and _commit.TEMP_MARK not in path.name
        and _format.hash_bytes(path.read_bytes()) != path.name
    ]


def objects(run: Path) -> set[str]:
    return {name.rsplit("/", 1)[-1] for name in RunStore(run).storage.list("objects/")}


def new_bytes(run: Path, step: int) -> tuple[int, int]:
    numbers = manifest(run, step)["bytes"]
    return numbers["new"], numbers["total"]


def tensors_of(obj: object, path: str = "") -> dict[str, torch.Tensor]:
    """Copies of the tensors of a state by path (DCP itself resets a target's numpy values
    to None when it sets a load up, so a failed load is judged by its tensors)."""
    if isinstance(obj, torch.Tensor):
        return {path: obj.detach().clone()}
    if isinstance(obj, dict):
        return {
            k: v
            for key, value in obj.items()
            for k, v in tensors_of(value, f"{path}.{key}").items()
        }
    if isinstance(obj, list | tuple):
        return {
            k: v for i, value in enumerate(obj) for k, v in tensors_of(value, f"{path}.{i}").items()
        }
    return {}


def state_bytes(obj: object) -> int:
    """The bytes of every tensor and array of a (full) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


def load_in_process(run: Path, step: int | str, ref: Path) -> list[str]:
    """A load without torch.distributed into a plain model: the N -> 1 case."""
    player = _Rank(0, 1)
    player.build("plain", seed=1)
    return player.load(str(run), step, str(ref))


# ---------------------------------------------------------------------- FSDP2 and resharding


def test_resharding_4_to_2_to_1_and_1_to_2_bit_exact_with_frozen_and_resharded_dedup(
    tmp_path: Path,
) -> None:
    """FSDP2 on 4 ranks saves (step 1), trains layer 2 with layer 0 frozen and saves (step 2);
    2 ranks load step 2 bit-exact and save it again (step 3), and also load a checkpoint
    that ``dcp.save`` wrote in a plain process (no process group) and one that a world of 1
    wrote; one process without torch.distributed loads steps 1 and 3 bit-exact. Step 2 writes
    no object for the frozen tensors; step 3, resharded but unchanged, re-uses most blocks.
    A manifest whose chunks overlap fails on every rank with CorruptCheckpointError."""
    run, ref1, ref2 = str(tmp_path / "run"), str(tmp_path / "ref1.tv"), str(tmp_path / "ref2.tv")
    plain, single = str(tmp_path / "plain"), str(tmp_path / "single")
    ref_plain, ref_single = str(tmp_path / "plain.tv"), str(tmp_path / "single.tv")
    player = _Rank(0, 1)
    player.build("plain")
    player.train(2)
    player.save(plain, 1, ref_plain)
    assert manifest(Path(plain), 1)["world_size"] == 1
    tamper(Path(plain), tmp_path / "bad", overlap_first_chunks)
    run_ranks(
        play, 1, [("build", "fsdp"), ("train", 2), ("save", single, 1, ref_single)],
        pg_timeout=PG_TIMEOUT,
    )  # fmt: skip
    saved = run_ranks(
        play, 4,
        [("build", "fsdp"), ("train", 2), ("save", run, 1, ref1), ("train", 1, True),
         ("save", run, 2, ref2), ("load", run, 1, ref1)],
        pg_timeout=PG_TIMEOUT,
    )  # fmt: skip
    assert all(v[-1] == [] for v in values(saved)), values(saved)
    first, second = manifest(tmp_path / "run", 1), manifest(tmp_path / "run", 2)
    assert (first["world_size"], second["world_size"]) == (4, 4)
    # frozen: layer 0's weights and their AdamW moments are the same objects, never rewritten
    frozen_keys = ("model.0.", "optim.state.0.")
    frozen = set().union(*(digests(tmp_path / "run", 1, k) for k in frozen_keys))
    assert frozen
    assert frozen == set().union(*(digests(tmp_path / "run", 2, k) for k in frozen_keys))
    new2 = {b[0] for b in second["blobs"]} - {b[0] for b in first["blobs"]}
    assert frozen.isdisjoint(new2)
    stored = objects(tmp_path / "run")  # the files: step 1's objects, plus step 2's new ones
    assert len(stored) == len({b[0] for b in first["blobs"]}) + len(new2)
    assert stored == {b[0] for b in first["blobs"] + second["blobs"]}
    # the bytes written are those of the changed objects (two ranks may both write one
    # object that holds equal bytes under two keys, such as two AdamW step counts)
    changed = sum(b[3] for b in second["blobs"] if b[0] in new2)
    unchanged = sum(b[3] for b in second["blobs"] if b[0] not in new2)
    assert 0 < changed <= second["bytes"]["new"] < changed + 0.1 * unchanged

    reloaded = run_ranks(
        play, 2,
        [("build", "fsdp"), ("load", run, 2, ref2), ("save", run, 3, ref2),
         ("load", plain, 1, ref_plain), ("load", single, "latest", ref_single),
         ("fail_load", str(tmp_path / "bad"), 1)],
        pg_timeout=PG_TIMEOUT,
    )  # fmt: skip
    for rank_values in values(reloaded):
        assert rank_values[1] == rank_values[3] == rank_values[4] == [], rank_values
        failed = rank_values[5]
        assert failed["outer"] == "CheckpointException", failed
        assert {kind for kind, _, _ in failed["inner"].values()} == {"CorruptCheckpointError"}
    assert manifest(tmp_path / "run", 3)["world_size"] == 2
    new, total = new_bytes(tmp_path / "run", 3)
    assert new <= 0.25 * total, (new, total)  # resharded 4 -> 2, same values: blocks re-used

    assert load_in_process(tmp_path / "run", 3, Path(ref2)) == []
    assert load_in_process(tmp_path / "run", 1, Path(ref1)) == []
    # consolidation in one process gives the same full tensors
    _, tree = load_tree(RunStore(run), 3)
    items: Any = tree["items"]
    assert differences(items["model"], tv.load(ref2)["model"]) == []


def test_fsdp2_and_ddp_2_ranks_to_4_bit_exact_replicated_written_once_and_fixed_blocks_dedup(
    tmp_path: Path,
) -> None:
    """FSDP2 and DDP save on 2 ranks and load on 4 bit-exact. Saved again unchanged on 4
    ranks, FSDP2's fixed blocks are mostly re-used, while with ``block_bytes=None`` (objects
    follow the sharding) most bytes are new: this is why fixed blocks are the default. DDP
    holds every tensor on every rank: DCP plans each once, so the ranks together hand the
    store the state's bytes once, not world_size times."""
    blocks, chunks, ddp = str(tmp_path / "blocks"), str(tmp_path / "chunks"), str(tmp_path / "ddp")
    ref, ref_ddp = str(tmp_path / "ref.tv"), str(tmp_path / "ddp.tv")
    saved = run_ranks(
        play, 2,
        [("build", "fsdp"), ("train", 2), ("save", blocks, 1, ref),
         ("save", chunks, 1, None, None), ("build", "ddp"), ("train", 2), ("save", ddp, 1, ref_ddp)],
        pg_timeout=PG_TIMEOUT,
    )  # fmt: skip
    resharded = run_ranks(
        play, 4,
        [("build", "fsdp"), ("load", blocks, 1, ref), ("save", blocks, 2, None),
         ("load", chunks, 1, ref), ("save", chunks, 2, None, None),
         ("build", "ddp"), ("load", ddp, 1, ref_ddp), ("save", ddp, 2, None)],
        pg_timeout=PG_TIMEOUT,
    )  # fmt: skip
    for rank_values in values(resharded):
        assert rank_values[1] == rank_values[3] == rank_values[6] == [], rank_values
    new_blocks, total = new_bytes(Path(blocks), 2)
    assert new_blocks <= 0.25 * total, (new_blocks, total)
    new_chunks, total = new_bytes(Path(chunks), 2)
    assert new_chunks >= 0.6 * total, (new_chunks, total)

    for world, handed, step in ((2, [v[6] for v in values(saved)], 1),
                                (4, [v[7] for v in values(resharded)], 2)):  # fmt: skip
        assert sum(handed) == state_bytes(tv.load(ref_ddp)), (world, handed)  # not x world
        assert manifest(Path(ddp), step)["world_size"] == world
    new, total = new_bytes(Path(ddp), 1)  # all new; two ranks may race to write one object
    assert total <= new <= total + 64  # that holds equal bytes under two keys (step counts)
    steps = [manifest(Path(ddp), step) for step in (1, 2)]
    assert objects(Path(ddp)) == {b[0] for document in steps for b in document["blobs"]}
    # unchanged: the model and optimizer are the same objects at 4 ranks as at 2 (only the
    # extras' DTensors, resharded into chunks smaller than a block, make new ones)
    for prefix in ("model.", "optim."):
        assert digests(Path(ddp), 2, prefix) <= digests(Path(ddp), 1, prefix), prefix

    assert load_in_process(Path(blocks), 2, Path(ref)) == []
    assert load_in_process(Path(chunks), 2, Path(ref)) == []


# ---------------------------------------------------------------------- faults


def test_a_failing_storage_operation_on_one_rank_fails_every_rank_and_commits_nothing(
    tmp_path: Path,
) -> None:
    """Each storage operation of a distributed save fails in turn on one rank (rank 1 for
    the objects, rank 0 the coordinator for the manifest and pointer): every rank's
    dcp.save raises, with the failing rank's error inside; nothing is committed (or, for a
    failure after the manifest is in place, the error says the step is committed and it is
    whole); the earlier checkpoint still loads bit-exact, and the next save works. A save at
    a committed step, or into a run a CheckpointManager holds, is refused before anything is
    written."""
    run, locked = str(tmp_path / "run"), tmp_path / "locked"
    refs = {step: str(tmp_path / f"ref{step}.tv") for step in range(1, 5)}
    plan: list[tuple[Any, ...]] = [("build", "fsdp"), ("train", 1), ("save", run, 1, refs[1])]
    step, committed, at, steps_after = 2, [1], {}, {}
    for point in POINTS:
        plan.append(("train", 1))  # new values, so that every save has objects to write
        if point in AFTER_COMMIT:
            plan.append(("snapshot", refs[step]))
        at[point] = len(plan)
        plan.append(("fail_save", run, step, point, VICTIM.get(point, 1)))
        if point in AFTER_COMMIT:
            committed.append(step)
            step += 1
        steps_after[point] = list(committed)
    assert step == 4
    plan += [("refused_save", run, committed[-1]), ("save", run, 4, refs[4]),
             ("load", run, 4, refs[4]), ("refused_save", str(locked), 1)]  # fmt: skip
    with tv.CheckpointManager(locked):
        outcomes = run_ranks(play, 2, plan, pg_timeout=PG_TIMEOUT)
    for rank_values in values(outcomes):
        for point, index in at.items():
            failed, victim = rank_values[index], VICTIM.get(point, 1)
            assert failed["outer"] == "CheckpointException", (point, failed)
            assert set(failed["inner"]) == {victim}, (point, failed)
            assert failed["temp_files"] == [], (point, failed)
            kind, number, text = failed["inner"][victim]
            if point == "hash":  # not a write error: passed through as it was raised
                assert (kind, text) == ("RuntimeError", "injected failure while hashing")
            else:
                assert kind == "CheckpointWriteError", (point, failed)
                assert number == ERRNO.get(point, errno.ENOSPC), (point, failed)
                assert text.startswith(f"rank {victim} "), (point, text)
            assert failed["steps"] == steps_after[point], (point, failed)
            if point in AFTER_COMMIT:
                assert f"Step {failed['steps'][-1]} is committed" in text, (point, text)
            else:
                assert "Nothing was committed" in text or kind == "RuntimeError", (point, text)
        at_latest = rank_values[-4]  # a step already committed: refused before any write
        assert {k for k, _, _ in at_latest["inner"].values()} == {"ValueError"}, at_latest
        assert "already committed" in at_latest["inner"][0][2], at_latest
        assert at_latest["objects"][0] == at_latest["objects"][1]
        assert rank_values[-2] == []  # the save after the faults loads bit-exact
        in_lock = rank_values[-1]
        assert {k for k, _, _ in in_lock["inner"].values()} == {"RunLockedError"}, in_lock
        assert in_lock["objects"] == (0, 0)
    assert RunStore(run).steps() == [1, 2, 3, 4]
    assert broken_objects(tmp_path / "run") == []
    for good in (1, 2, 3, 4):
        assert load_in_process(tmp_path / "run", good, Path(refs[good])) == []
    assert RunStore(locked).steps() == []


def kill_plan(run: str, ref: str, point: str, victim: int) -> list[tuple[Any, ...]]:
    return [
        ("build", "fsdp"),
        ("train", 1),
        ("snapshot", ref),
        ("kill_save", run, 2, point, victim),
    ]


KILL_VICTIM = {"before_commit": 0, "checking_objects": 0, "after_commit": 0, "hashing": 0}
SUITE_KILLS = ["objects_written", "before_fsync", "before_commit"]


def check_kill(tmp_path: Path, point: str) -> None:
    """Step 1 is saved in this process; 2 ranks save step 2 and one is SIGKILLed at
    ``point``: the other errors out (no hang), no partial step is committed, step 1 loads
    bit-exact, and the next save works."""
    run, ref = tmp_path / "run", tmp_path / "ref.tv"
    player = _Rank(0, 1)
    player.build("plain")
    player.train(1)
    player.save(str(run), 1, str(ref))
    victim = KILL_VICTIM.get(point, 1)
    plan = kill_plan(str(run), str(tmp_path / "ref2.tv"), point, victim)
    outcomes = run_ranks(play, 2, plan, check=False, pg_timeout=PG_TIMEOUT)
    assert outcomes[victim].exitcode == -signal.SIGKILL, outcomes
    survivor = outcomes[1 - victim]  # raised (a broken connection), did not hang
    assert survivor.exitcode == 0, survivor
    assert survivor.value[-1]["outer"] is not None, survivor
    assert broken_objects(run) == []  # the victim's unfinished objects are temp files only
    steps = RunStore(run).steps()
    if point == "after_commit":  # killed after the manifest was published: the step is whole
        assert steps == [1, 2]
        assert load_in_process(run, 2, tmp_path / "ref2.tv") == []
    else:
        assert steps == [1], (point, steps)
    assert load_in_process(run, 1, ref) == []
    player.save(str(run), 3, str(tmp_path / "ref3.tv"))
    assert load_in_process(run, 3, tmp_path / "ref3.tv") == []


@pytest.mark.parametrize("point", SUITE_KILLS)
def test_a_rank_sigkilled_during_a_save_commits_nothing_and_keeps_the_earlier_checkpoint(
    tmp_path: Path, point: str
) -> None:
    check_kill(tmp_path, point)


@pytest.mark.soak
@pytest.mark.parametrize("point", [p for p in KILLS if p not in SUITE_KILLS])
def test_soak_a_rank_sigkilled_at_more_points_of_a_save(tmp_path: Path, point: str) -> None:
    check_kill(tmp_path, point)


# ---------------------------------------------------------------------- bad input


def tamper(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """A copy of run ``source`` whose step-1 manifest ``change`` edited (resealed)."""
    import shutil

    shutil.copytree(source, target)
    store = RunStore(target)
    document = store.manifest(1)
    change(document)
    (target / "checkpoints" / "step-000000000001.json").write_bytes(seal(document))


def overlap_first_chunks(document: dict[str, Any]) -> None:
    """The first tensor's chunk list names its first chunk twice."""
    chunks = next(iter(document["shards"]["tensors"].values()))[2]
    chunks.append(chunks[0])


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run whose step 1 ``dcp.save`` wrote in this process (tensors cut into several
    blocks, so that chunks can overlap or leave gaps), and the reference of its state."""
    folder = tmp_path_factory.mktemp("plain")
    player = _Rank(0, 1)
    player.build("plain")
    player.train(1)
    player.save(str(folder / "run"), 1, str(folder / "ref.tv"))
    return folder / "run", folder / "ref.tv"


def _first_tensor(document: dict[str, Any]) -> list[Any]:
    """The [dtype, shape, chunks] of the first tensor with several chunks."""
    specs = document["shards"]["tensors"].values()
    return next(spec for spec in specs if len(spec[2]) > 2)


def _drop_a_chunk(document: dict[str, Any]) -> None:
    _first_tensor(document)[2].pop(1)


def _chunk_past_the_shape(document: dict[str, Any]) -> None:
    spec = _first_tensor(document)
    spec[2][-1][0][0] = spec[1][0]


def _shape_larger(document: dict[str, Any]) -> None:
    _first_tensor(document)[1][0] += 1


def _object_index_out_of_range(document: dict[str, Any]) -> None:
    _first_tensor(document)[2][0][1] = len(document["blobs"])


def _dtype_differs(document: dict[str, Any]) -> None:
    _first_tensor(document)[0] = "F16"


def _world_size(value: object) -> Callable[[dict[str, Any]], None]:
    return lambda document: document.__setitem__("world_size", value)


def _more_value_groups_than_ranks(document: dict[str, Any]) -> None:
    document["shards"]["values"].append([{"dict": {}}, [], []])


def _a_key_stored_twice(document: dict[str, Any]) -> None:
    key = next(iter(document["shards"]["tensors"]))
    tree = document["shards"]["values"][0][0]["dict"]
    tree[key] = 1


def _a_key_without_path(document: dict[str, Any]) -> None:
    del document["shards"]["paths"][next(iter(document["shards"]["tensors"]))]


BAD_MANIFESTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "chunks overlap": overlap_first_chunks,
    "chunks leave a gap": _drop_a_chunk,
    "a chunk past the global shape": _chunk_past_the_shape,
    "a global shape its chunks do not fill": _shape_larger,
    "an object index out of range": _object_index_out_of_range,
    "a dtype its objects do not have": _dtype_differs,
    "world size 0": _world_size(0),
    "world size as a string": _world_size("2"),
    "world size missing": _world_size(None),
    "more value groups than ranks": _more_value_groups_than_ranks,
    "a key both a tensor and a value": _a_key_stored_twice,
    "a key without a path": _a_key_without_path,
}


@pytest.mark.parametrize("name", BAD_MANIFESTS)
def test_an_inconsistent_manifest_is_a_corrupt_checkpoint_for_dcp_load_and_consolidation(
    tmp_path: Path, plain_run: tuple[Path, Path], name: str
) -> None:
    bad = tmp_path / "bad"
    tamper(plain_run[0], bad, BAD_MANIFESTS[name])
    inner = refused_load(bad)
    assert inner.path == str(bad / "checkpoints" / "step-000000000001.json")
    with pytest.raises(CorruptCheckpointError):
        load_tree(RunStore(bad), 1)


def test_a_damaged_object_fails_the_load_before_anything_is_copied(
    tmp_path: Path, plain_run: tuple[Path, Path]
) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(plain_run[0], bad)
    victim = max((bad / "objects").rglob("*"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    assert refused_load(bad).path == str(victim)


def refused_load(bad: Path) -> CorruptCheckpointError:
    """The error ``dcp.load`` of ``bad`` raises on its one rank; nothing reached the targets."""
    player = _Rank(0, 1)
    player.build("plain", seed=1)
    state = player.state()
    before = tensors_of(state)
    with pytest.raises(CheckpointException) as caught:
        dcp.load(state, storage_reader=StorageReader(bad, step=1))
    inner = caught.value.failures[0][0]
    assert isinstance(inner, CorruptCheckpointError), caught.value
    assert differences(tensors_of(state), before) == []  # nothing was copied into the targets
    return inner


def _dcp_load_error(run: Path | str, step: object = "latest") -> BaseException:
    player = _Rank(0, 1)
    player.build("plain", seed=1)
    with pytest.raises(CheckpointException) as caught:
        dcp.load(player.state(), storage_reader=StorageReader(run, step=step))  # type: ignore[arg-type]
    assert list(caught.value.failures) == [0]
    return caught.value.failures[0][0]


def test_reading_a_run_that_does_not_exist_or_a_missing_step(
    tmp_path: Path, plain_run: tuple[Path, Path]
) -> None:
    missing = _dcp_load_error(tmp_path / "nowhere")
    assert isinstance(missing, CheckpointNotFoundError)
    assert "nowhere" in str(missing)
    no_step = _dcp_load_error(plain_run[0], 7)
    assert isinstance(no_step, CheckpointNotFoundError)
    assert "step 7" in str(no_step)
    not_a_run = tmp_path / "folder"
    not_a_run.mkdir()
    assert isinstance(_dcp_load_error(not_a_run), UnsupportedFormatError)


def test_a_checkpoint_saved_by_one_process_is_refused_by_storage_reader_naming_the_fix(
    tmp_path: Path,
) -> None:
    with tv.CheckpointManager(tmp_path / "classic") as manager:
        manager.save(1, model=make_model(0))
    error = _dcp_load_error(tmp_path / "classic", 1)
    assert isinstance(error, UnsupportedFormatError), error
    assert f"tv.load('{tmp_path / 'classic'}@1')" in str(error), error
    assert "CheckpointManager.restore" in str(error)


def test_a_step_at_or_below_the_latest_is_refused_before_anything_is_written(
    plain_run: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(plain_run[0], run)
    player = _Rank(0, 1)
    player.build("plain", seed=1)  # other values: a save would write new objects
    before = objects(run)
    for step, why in ((1, "already committed"), (0, "below the latest step 1")):
        with pytest.raises(CheckpointException) as caught:
            player.save(str(run), step, None)
        inner = caught.value.failures[0][0]
        assert isinstance(inner, ValueError), inner
        assert why in str(inner)
    assert objects(run) == before
    assert RunStore(run).steps() == [1]


def test_dcp_save_into_a_run_a_checkpoint_manager_holds_is_refused(tmp_path: Path) -> None:
    player = _Rank(0, 1)
    player.build("plain")
    with tv.CheckpointManager(tmp_path / "run"), pytest.raises(CheckpointException) as caught:
        player.save(str(tmp_path / "run"), 5, None)
    assert isinstance(caught.value.failures[0][0], RunLockedError)
    assert objects(tmp_path / "run") == set()


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda run: StorageWriter(run, step=-1), ValueError, ["step", ">= 0"]),
        (lambda run: StorageWriter(run, step="x"), TypeError, ["step", "int"]),
        (lambda run: StorageWriter(run, step=True), TypeError, ["step", "int"]),
        (lambda run: StorageWriter(run, step=1.0), TypeError, ["step", "int"]),
        (lambda run: StorageWriter(123, step=1), TypeError, ["run", "path"]),
        (
            lambda run: StorageWriter(run, step=1, block_bytes=0),
            ValueError,
            ["block_bytes", "None"],
        ),
        (
            lambda run: StorageWriter(run, step=1, block_bytes=-5),
            ValueError,
            ["block_bytes", "None"],
        ),
        (
            lambda run: StorageWriter(run, step=1, block_bytes="16M"),
            TypeError,
            ["block_bytes", "None"],
        ),
        (
            lambda run: StorageWriter(run, step=1, block_bytes=1.5),
            TypeError,
            ["block_bytes", "None"],
        ),
        (lambda run: StorageReader(123), TypeError, ["run", "path"]),
        (lambda run: StorageReader(run, step="newest"), ValueError, ["step", "latest"]),
        (lambda run: StorageReader(run, step=-1), ValueError, ["step", ">= 0"]),
        (lambda run: StorageReader(run, step=None), TypeError, ["step", "latest"]),
    ],
)
def test_a_wrong_argument_to_the_writer_or_reader_names_it(
    tmp_path: Path, make: Callable[[Path], object], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as caught:
        make(tmp_path / "run")
    assert not isinstance(caught.value, tv.TorchVaultError)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert not (tmp_path / "run").exists()  # nothing created


@pytest.mark.parametrize(
    "error",
    [
        CheckpointWriteError("disk full", path="/r/objects/x", errno=errno.ENOSPC),
        CorruptCheckpointError("bad", path="/r/m.json", key="model.w"),
        RunLockedError("held", path="/r"),
        UnsupportedFormatError("old", path="/r"),
        CheckpointNotFoundError("gone", path="/r"),
        tv.errors.UnsafeCheckpointError("evil", global_name="os.system", path="/r/.metadata"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_error_survives_the_pickle_dcp_sends_between_ranks(error: Exception) -> None:
    """DCP gathers a failing rank's exception on the coordinator with pickle: an error that
    cannot be rebuilt there breaks the collective and leaves the ranks out of step."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)
    if isinstance(error, OSError):
        assert (copy.errno, copy.filename) == (error.errno, error.filename)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("shape", "itemsize", "block", "rows"),
    [
        ((2048, 2048), 4, 4 << 20, 512),  # exactly 4 MiB of rows
        ((3000, 1000), 4, 4 << 20, 1024),  # 1048 rows fit: rounded down to a power of two
        ((10, 1 << 22), 4, 4 << 20, 1),  # one row is larger than a block: one row
        ((7,), 2, 4 << 20, 1 << 21),  # a vector: at most 4 MiB of elements
        ((0, 5), 4, 64, 2),  # 20-byte rows: 3 fit, 2 is the power of two
    ],
)
def test_blocks_are_a_power_of_two_of_rows(
    shape: tuple[int, ...], itemsize: int, block: int, rows: int
) -> None:
    from torchvault.distributed._layout import block_rows, pieces

    assert block_rows(shape, itemsize, block) == rows
    assert block_rows(shape, itemsize, None) is None
    # a shard of 1024 rows starting at row 1536 is cut at the global multiples of 512
    assert pieces([1536, 0], [1024, 2048], 512) == [(0, 512), (512, 512)]
    assert pieces([1500, 0], [100, 2048], 512) == [(0, 36), (36, 64)]
