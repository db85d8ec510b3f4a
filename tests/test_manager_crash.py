"""Crash consistency and disk errors of CheckpointManager (anchors-security.md section 4).

Workload W, kept small so a full sweep runs in seconds: a first manager (keep_last=2) saves
steps 1 and 2 of a state with three tensors (1 KiB, 1 MiB + 3 B, 4 KiB), an optimizer and a
plain value, every byte a function of the step, and is closed. The operation under test: a
new manager opens the run (removing temp files) and saves step 3, where the 1 KiB and 4 KiB
tensors and the random states are unchanged (deduplicated), then retention deletes step 1
and garbage-collects its objects.

* F1: ``crashfs`` crashes W before each of its file-system operations (and just after it)
  and applies a power loss in every mode. Invariants: I1 ``latest`` is step 2 or 3 and
  loads bit-exact, as does every committed step; I4 step 2 is never lost; I2 no pointer names
  an uncommitted step; I3 a new manager removes every temp file, restores and saves step 4;
  and the documented resume loop (``start = report.step + 1``) finds its step uncommitted.
  One sweep per mode (in each xdist worker that needs it) serves all these tests.
* F2: ENOSPC and EIO at every operation of the save, and of opening or creating a run (once,
  and from then on): CheckpointWriteError with the errno (a failing folder open or close in
  ``fsync_dir`` may be skipped, as test_atomic_write allows), nothing committed before the
  manifest's rename, every committed step intact, and a new manager saves the next step.
* I6: every file the manager creates has mode 0o666 & ~umask (folders 0o777 & ~umask).

The real fsync is replaced by a check of the descriptor in every test: what survives a power
loss is decided by the crashfs model, not the disk, and real fsyncs would take most of the time.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import random
import stat
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import crashfs
import torchvault as tv
from torchvault import _commit
from torchvault.run import _readers, _rng
from torchvault.run._store import RunStore

BIG = (1 << 20) + 3  # 5 numbered writes of crashfs.WRITE_SIZE
KEEP = 2
RNG_SEED = 0  # the same before every save: the random states are deduplicated too
BEST_EFFORT = ("open-dir", "close-dir")  # fsync_dir may skip these (folders that cannot open)
MANIFEST_3 = "checkpoints/step-000000000003.json"


@pytest.fixture(autouse=True)
def cheap_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def check(fd: int) -> None:
        os.fstat(fd)  # a bad descriptor still fails, as it would in fsync

    monkeypatch.setattr(os, "fsync", check)
    monkeypatch.setattr(os, "fdatasync", check)


# ----------------------------------------------------------------------------- the workload


def weights_at(step: int) -> dict[str, torch.Tensor]:
    """Three tensors: ``small`` never changes, ``mid`` changes every other step, ``big``
    every step."""
    return {
        "small": torch.full((256,), 0.5),
        "mid": torch.randn(2048, generator=torch.Generator().manual_seed(step // 2)).to(
            torch.bfloat16
        ),
        "big": torch.randint(
            0, 256, (BIG,), dtype=torch.uint8, generator=torch.Generator().manual_seed(100 + step)
        ),
    }


def optimizer_at(step: int) -> torch.optim.Optimizer:
    """An SGD with momentum after ``step`` steps of a fixed gradient schedule."""
    param = torch.nn.Parameter(torch.zeros(64))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    for i in range(step):
        param.grad = torch.arange(64.0) * (i + 1)
        optimizer.step()
    return optimizer


def seed_all() -> None:
    random.seed(RNG_SEED)
    np.random.seed(RNG_SEED)
    torch.manual_seed(RNG_SEED)


@functools.cache
def expected(step: int) -> dict[str, Any]:
    """The whole decoded state a checkpoint of ``step`` holds (items and random states)."""
    seed_all()
    items = {"weights": weights_at(step), "optimizer": optimizer_at(step).state_dict()}
    return {"items": {**items, "epoch": step}, "rng": _rng.capture()}


def save_step(mgr: tv.CheckpointManager, step: int) -> None:
    seed_all()
    mgr.save(step, weights=weights_at(step), optimizer=optimizer_at(step), epoch=step)


def open_manager(run: Path) -> tv.CheckpointManager:
    _commit._durable_dirs.clear()  # each manager stands for a new process
    return tv.CheckpointManager(run, keep_last=KEEP)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run holding steps 1 and 2, its manager closed."""
    folder = tmp_path / "run"
    with open_manager(folder) as mgr:
        save_step(mgr, 1)
        save_step(mgr, 2)
    return folder


def save_step_3(run: Path) -> Callable[[], None]:
    def action() -> None:
        with open_manager(run) as mgr:
            save_step(mgr, 3)

    return action


def difference(got: Any, want: Any, where: str) -> str | None:
    """Where ``got`` differs from ``want``: types, keys, dtypes, shapes or any bit."""
    if type(got) is not type(want):
        return f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        if (got.dtype, got.shape) != (want.dtype, want.shape):
            return f"{where}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
        if not np.array_equal(bits(got), bits(want)):
            return f"{where}: the bytes differ"
        return None
    if isinstance(want, np.ndarray):
        same = got.dtype == want.dtype and got.shape == want.shape
        return None if same and got.tobytes() == want.tobytes() else f"{where}: the array differs"
    if isinstance(want, dict):
        if list(got) != list(want):
            return f"{where}: keys {list(got)} != {list(want)}"
        pairs = [(got[key], want[key], f"{where}.{key}") for key in want]
    elif isinstance(want, list | tuple):
        if len(got) != len(want):
            return f"{where}: length {len(got)} != {len(want)}"
        pairs = [(a, b, f"{where}.{i}") for i, (a, b) in enumerate(zip(got, want, strict=True))]
    else:
        return None if got == want else f"{where}: {got!r} != {want!r}"
    return next((d for d in (difference(*pair) for pair in pairs) if d), None)


def bits(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def check_step(store: RunStore, step: int) -> str | None:
    """None when ``step`` loads, every object verified, and equals ``expected(step)``."""
    try:
        _, state = _readers.load_tree(store, step)
    except (tv.TorchVaultError, OSError) as exc:
        return f"step {step}: {type(exc).__name__}: {exc}"
    return difference(state, expected(step), f"step {step}")


def temps(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob(f"*{_commit.TEMP_MARK}*"))


# ----------------------------------------------------------------------------- W's operations


def test_step_3_writes_only_the_changed_tensors_and_collects_step_1s(
    monkeypatch: pytest.MonkeyPatch, run: Path
) -> None:
    ops = crashfs.dry_run(monkeypatch, run, save_step_3(run))
    created = [op.path for op in ops if op.kind == "create" and op.path.startswith("objects/")]
    writes = {path: sum(op.kind == "write" and op.path == path for op in ops) for path in created}
    unlinked = [op.path for op in ops if op.kind == "unlink" and op.path.startswith("objects/")]
    assert len(created) == 2, created  # big and the momentum buffer; the rest deduplicated
    assert max(writes.values()) >= BIG // crashfs.WRITE_SIZE + 1, writes
    assert len(unlinked) == 3, unlinked  # step 1's big, mid and momentum buffer
    assert [op.path for op in ops if op.kind == "unlink" and "checkpoints" in op.path] == [
        "checkpoints/step-000000000001.json"
    ]
    assert 50 <= len(ops) <= 120, len(ops)


def test_step_3_publishes_objects_then_manifest_then_pointers_then_deletes(
    monkeypatch: pytest.MonkeyPatch, run: Path
) -> None:
    ops = crashfs.dry_run(monkeypatch, run, save_step_3(run))

    def first(kind: str, where: str) -> int:
        return next(op.index for op in ops if op.kind == kind and where in op.path)

    def last(kind: str, where: str) -> int:
        return max(op.index for op in ops if op.kind == kind and where in op.path)

    objects = max(op.index for op in ops if op.kind == "replace" and "-> objects/" in op.path)
    synced = next(op for op in ops[objects:] if op.kind == "fsync-dir")
    manifest = first("replace", MANIFEST_3)
    assert synced.path == ops[objects].path.rsplit("/", 1)[0].split("-> ")[1], synced
    assert synced.index < first("create", "checkpoints/") < manifest
    assert manifest < first("fsync-dir", "checkpoints") < first("create", "refs/.latest")
    latest = first("replace", "refs/latest.json")
    assert latest < first("fsync-dir", "refs") < first("unlink", "")
    assert first("unlink", "checkpoints/") < first("unlink", "objects/")


# ----------------------------------------------------------------------------- F1: crashes


@dataclass
class Sweep:
    """What one sweep of W in one mode found: per invariant, the cases that broke it."""

    broken: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    latest: set[int | None] = field(default_factory=set)
    steps: set[tuple[int, ...]] = field(default_factory=set)


def observe(run: Path, case: crashfs.Case, found: Sweep) -> None:
    """Check every invariant on the state ``case`` left under ``run`` (then recover it)."""
    store = RunStore(run)
    steps = store.steps()
    found.steps.add(tuple(steps))
    loads = {step: check_step(store, step) for step in steps}
    try:
        latest = _readers.resolve(store, "latest")
    except tv.TorchVaultError as exc:
        latest = None
        found.broken["latest"].append(f"{case}: resolve raised {type(exc).__name__}: {exc}")
    found.latest.add(latest)
    if latest not in (2, 3):
        found.broken["latest"].append(f"{case}: latest is {latest}")
    elif problem := loads.get(latest, f"step {latest} is not committed"):
        found.broken["latest"].append(f"{case}: {problem}")
    if not set(steps) <= {1, 2, 3}:
        found.broken["every step"].append(f"{case}: steps {steps}")
    found.broken["every step"].extend(f"{case}: {p}" for p in loads.values() if p)
    if 2 not in steps:
        found.broken["step 2 kept"].append(f"{case}: step 2 is gone: {steps}")
    if 1 not in steps and 3 not in steps:
        found.broken["step 2 kept"].append(f"{case}: step 1 deleted before step 3: {steps}")
    found.broken["pointers"].extend(f"{case}: {p}" for p in pointer_problems(store, steps))
    for invariant, problem in recover(run):
        found.broken[invariant].append(f"{case}: {problem}")


def pointer_problems(store: RunStore, steps: list[int]) -> Iterator[str]:
    for name in ("latest", "best"):
        try:
            named = store.ref(name)
        except tv.CorruptCheckpointError:  # damaged: resolve must fall back
            if (got := _readers.resolve(store, name)) != steps[-1]:
                yield f"damaged refs/{name}.json resolves to {got}, not {steps[-1]}"
            continue
        if named is not None and named not in steps:
            yield f"refs/{name}.json names step {named}; committed: {steps}"


def recover(run: Path) -> Iterator[tuple[str, str]]:
    """Open the run with a new manager, restore it and save step 4; yield what went wrong,
    as ``("recovery", problem)``, or ``("resume", problem)`` where the documented resume
    loop (``start = mgr.restore(...).step + 1``) would save a step already committed."""
    try:
        mgr = open_manager(run)
    except Exception as exc:
        yield "recovery", f"opening the run raised {type(exc).__name__}: {exc}"
        return
    with mgr:
        if left := temps(run):
            yield "recovery", f"temp files left after opening: {left}"
        target = optimizer_at(0)
        try:
            report = mgr.restore(optimizer=target)
            assert report is not None, "nothing to restore"
            assert report.step in (2, 3), f"restored step {report.step}"
            want = expected(report.step)["items"]
            values = {k: want[k] for k in ("weights", "epoch")}
            assert not (d := difference(report.values, values, "values")), d
            assert not (d := difference(target.state_dict(), want["optimizer"], "optim")), d
            if report.step + 1 in mgr.steps:  # save(report.step + 1) raises ValueError
                yield "resume", f"restore gives step {report.step}; committed: {mgr.steps}"
            save_step(mgr, 4)
        except Exception as exc:
            yield "recovery", f"{type(exc).__name__}: {exc}"
            return
    store = RunStore(run)
    steps = store.steps()
    if len(steps) != KEEP or steps[-1] != 4 or _readers.resolve(store, "latest") != 4:
        yield "recovery", f"after saving step 4: steps {steps}, latest {store.ref('latest')}"
    for step in steps:
        if problem := check_step(store, step):
            yield "recovery", problem


class Sweeps:
    """One sweep of W per mode, run by the first test that asks (in this worker)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._done: dict[str, Sweep] = {}

    def __call__(self, mode: str) -> Sweep:
        if mode not in self._done:
            run = self._factory.mktemp(f"sweep-{mode}") / "run"
            with open_manager(run) as mgr:
                save_step(mgr, 1)
                save_step(mgr, 2)
            found = Sweep()
            for case in crashfs.sweep(None, run, save_step_3(run), modes=(mode,)):
                observe(run, case, found)
            self._done[mode] = found
        return self._done[mode]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> Sweeps:
    return Sweeps(tmp_path_factory)  # called in the tests, under cheap_fsync


def broken(sweeps: Sweeps, mode: str, invariant: str) -> str:
    return "\n".join(sweeps(mode).broken[invariant])


@pytest.mark.parametrize("mode", crashfs.MODES)
def test_crash_leaves_latest_at_step_2_or_3_bit_exact(mode: str, sweeps: Sweeps) -> None:
    assert not broken(sweeps, mode, "latest"), broken(sweeps, mode, "latest")
    assert sweeps(mode).latest == {2, 3}


@pytest.mark.parametrize("mode", crashfs.MODES)
def test_crash_leaves_every_committed_step_bit_exact(mode: str, sweeps: Sweeps) -> None:
    assert not broken(sweeps, mode, "every step"), broken(sweeps, mode, "every step")


@pytest.mark.parametrize("mode", crashfs.MODES)
def test_crash_never_loses_step_2_nor_step_1_before_step_3_is_committed(
    mode: str, sweeps: Sweeps
) -> None:
    assert not broken(sweeps, mode, "step 2 kept"), broken(sweeps, mode, "step 2 kept")
    assert sweeps(mode).steps == {(1, 2), (1, 2, 3), (2, 3)}


@pytest.mark.parametrize("mode", crashfs.MODES)
def test_crash_never_leaves_a_pointer_to_an_uncommitted_step(mode: str, sweeps: Sweeps) -> None:
    assert not broken(sweeps, mode, "pointers"), broken(sweeps, mode, "pointers")


@pytest.mark.parametrize("mode", crashfs.MODES)
def test_crash_then_new_manager_removes_temps_restores_and_saves_step_4(
    mode: str, sweeps: Sweeps
) -> None:
    assert not broken(sweeps, mode, "recovery"), broken(sweeps, mode, "recovery")


@pytest.mark.parametrize("mode", crashfs.MODES)
def test_crash_then_resuming_at_restored_step_plus_1_can_save(mode: str, sweeps: Sweeps) -> None:
    assert not broken(sweeps, mode, "resume"), broken(sweeps, mode, "resume")


def test_damaged_latest_pointer_resolves_to_the_newest_committed_step(
    monkeypatch: pytest.MonkeyPatch, run: Path
) -> None:
    ops = crashfs.dry_run(monkeypatch, run, save_step_3(run))
    k = next(op.index for op in ops if op.kind == "replace" and "refs/latest" in op.path)
    with crashfs.CrashFS(monkeypatch, run, crash_at=k) as fs:
        save_step_3(run)()
    fs.materialize("keep_all")  # step 3 committed, refs/latest.json still names step 2
    pointer = run / "refs" / "latest.json"
    raw = bytearray(pointer.read_bytes())
    assert raw.endswith(b'"step":2}')
    raw[-2] ^= 0x01  # step 2 becomes step 3, committed: only the checksum tells
    pointer.write_bytes(bytes(raw))
    store = RunStore(run)
    with pytest.raises(tv.CorruptCheckpointError):
        store.ref("latest")
    assert _readers.resolve(store, "latest") == 3
    assert check_step(store, 3) is None


# ----------------------------------------------------------------------------- F2: disk errors


class Faults:
    """Numbers every file-system call of ``torchvault._commit`` (0-based) and fails call
    ``fail_at`` with ``code``, or with ``persist`` every call from it on (a disk that stays
    full or broken). The descriptor of a failing close is still released."""

    def __init__(
        self, root: Path, fail_at: int | None = None, code: int = 0, *, persist: bool = False
    ) -> None:
        self.root = root
        self.fail_at = fail_at
        self.code = code
        self.persist = persist
        self.ops: list[str] = []
        self.injected: list[tuple[str, OSError]] = []

    def hit(self, kind: str, path: Any = None) -> None:
        where = "" if path is None else os.fspath(path)
        with contextlib.suppress(ValueError):
            where = Path(where).relative_to(self.root).as_posix()
        n = len(self.ops)
        op = f"{n} {kind} {where}"
        self.ops.append(op)
        if self.fail_at is None or n < self.fail_at or (n > self.fail_at and not self.persist):
            return
        exc = OSError(self.code, os.strerror(self.code), os.fspath(path or ""))
        self.injected.append((op, exc))
        raise exc


class FaultyRaw(io.FileIO):
    """The raw file under the buffered handle: each write(2) and the close are calls."""

    def __init__(self, fd: int, shim: FaultyOs) -> None:
        super().__init__(fd, "wb", closefd=True)
        self._shim = shim
        self._path = shim.paths.get(fd)

    def write(self, data: Any, /) -> int:
        self._shim.faults.hit("write", self._path)
        return super().write(data)

    def close(self) -> None:
        if self.closed:
            return
        self._shim.paths.pop(self.fileno(), None)
        super().close()
        self._shim.faults.hit("close", self._path)


class FaultyOs:
    """Stands in for the ``os`` module inside ``torchvault._commit``."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.paths: dict[int, Any] = {}
        self.dirs: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        is_dir = bool(flags & getattr(os, "O_DIRECTORY", 0)) or os.path.isdir(path)
        kind = "open-dir" if is_dir else "create" if flags & os.O_CREAT else "open"
        self.faults.hit(kind, path)
        fd = os.open(path, flags, mode, **kw)
        self.paths[fd] = path
        if is_dir:
            self.dirs.add(fd)
        return fd

    def fsync(self, fd: int) -> None:
        self.faults.hit("fsync-dir" if fd in self.dirs else "fsync", self.paths.get(fd))
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self.fsync(fd)

    def close(self, fd: int) -> None:
        path = self.paths.pop(fd, None)
        kind = "close-dir" if fd in self.dirs else "close"
        self.dirs.discard(fd)
        os.close(fd)
        self.faults.hit(kind, path)

    def replace(self, src: Any, dst: Any, **kw: Any) -> None:
        self.faults.hit("replace", dst)
        os.replace(src, dst, **kw)

    def rename(self, src: Any, dst: Any, **kw: Any) -> None:
        self.faults.hit("rename", dst)
        os.rename(src, dst, **kw)

    def unlink(self, path: Any, **kw: Any) -> None:
        self.faults.hit("unlink", path)
        os.unlink(path, **kw)

    def remove(self, path: Any, **kw: Any) -> None:
        self.unlink(path, **kw)

    def mkdir(self, path: Any, mode: int = 0o777, **kw: Any) -> None:
        self.faults.hit("mkdir", path)
        os.mkdir(path, mode, **kw)


@contextlib.contextmanager
def faulty_disk(monkeypatch: pytest.MonkeyPatch, faults: Faults) -> Iterator[Faults]:
    with monkeypatch.context() as patch:
        shim = FaultyOs(faults)
        patch.setattr(_commit, "os", shim)
        patch.setattr(
            _commit, "_writer", lambda fd: io.BufferedWriter(FaultyRaw(fd, shim), _commit._BUFFER)
        )
        yield faults


def judge(raised: BaseException | None, faults: Faults, code: int) -> str | None:
    """What is wrong with how a call under ``faults`` ended (None: a typed error, or a
    success because every injected error hit a best-effort folder open or close)."""
    if raised is None:
        hard = [op for op, _ in faults.injected if op.split()[1] not in BEST_EFFORT]
        return f"returned despite the errors at {hard}" if hard else None
    if isinstance(raised, tv.CheckpointWriteError):
        return None if raised.errno == code else f"errno {raised.errno}: {raised}"
    if any(raised is exc for _, exc in faults.injected):
        return f"the injected OSError was not translated: {raised}"
    return f"raised {type(raised).__name__}: {raised}"


def save_under_faults(
    monkeypatch: pytest.MonkeyPatch, run: Path, faults: Faults, step: int
) -> BaseException | None:
    """Open the run (healthy disk), save ``step`` under ``faults``; return what it raised."""
    with open_manager(run) as mgr, faulty_disk(monkeypatch, faults):
        try:
            save_step(mgr, step)
        except Exception as exc:
            return exc
    return None


def save_next_step(run: Path) -> list[str]:
    """With a healthy disk, a new manager removes temps and saves the step after the latest."""
    with open_manager(run) as mgr:
        problems = [f"temp files left after opening: {left}"] if (left := temps(run)) else []
        assert mgr.latest_step is not None
        following = mgr.latest_step + 1
        save_step(mgr, following)
    store = RunStore(run)
    steps = store.steps()
    if steps[-1] != following or _readers.resolve(store, "latest") != following:
        problems.append(f"after saving step {following}: steps {steps}")
    problems.extend(p for step in steps if (p := check_step(store, step)))
    return problems


@pytest.mark.parametrize("persist", [False, True], ids=["fail-once", "fail-from-then-on"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_disk_error_at_every_call_of_a_save_raises_typed_error_and_keeps_the_run(
    code: int, persist: bool, monkeypatch: pytest.MonkeyPatch, run: Path
) -> None:
    start = crashfs.read_tree(run)
    dry = Faults(run)
    assert save_under_faults(monkeypatch, run, dry, 3) is None
    ops = dry.ops
    commit = next(i for i, op in enumerate(ops) if op.endswith(f"replace {MANIFEST_3}"))
    failures: list[str] = []
    for k in range(len(ops)):
        crashfs.write_tree(run, start)
        faults = Faults(run, k, code, persist=persist)
        raised = save_under_faults(monkeypatch, run, faults, 3)
        where = f"k={k} ({ops[k]})"
        if problem := judge(raised, faults, code):
            failures.append(f"{where}: {problem}")
        store = RunStore(run)
        steps = store.steps()
        committed = k > commit or raised is None  # the manifest's rename ran
        want = {(2, 3), (1, 2, 3)} if committed else {(1, 2)}  # retention may have run
        if tuple(steps) not in want:
            failures.append(f"{where}: committed steps {steps}, expected one of {sorted(want)}")
        failures.extend(f"{where}: {p}" for step in steps if (p := check_step(store, step)))
        if not persist and temps(run):
            failures.append(f"{where}: temp files left: {temps(run)}")
        failures.extend(f"{where}: then {problem}" for problem in save_next_step(run))
    assert not failures, "\n".join(failures)


def plant_temps(run: Path) -> list[Path]:
    """Leftovers of a killed save: a temp object, manifest and pointer of a dead process."""
    stem = f"{_commit.TEMP_MARK}{_commit._HOST}-{2**31 - 1}-0123456789ab"
    planted = [
        run / "objects" / "ab" / f".{'ab' * 16}{stem}",
        run / "checkpoints" / f".step-000000000003.json{stem}",
        run / "refs" / f".latest.json{stem}",
    ]
    for path in planted:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    return planted


@pytest.mark.parametrize("persist", [False, True], ids=["fail-once", "fail-from-then-on"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_disk_error_while_opening_a_run_raises_typed_error_and_keeps_the_run(
    code: int, persist: bool, monkeypatch: pytest.MonkeyPatch, run: Path
) -> None:
    plant_temps(run)
    start = crashfs.read_tree(run)
    dry = Faults(run)
    with faulty_disk(monkeypatch, dry):
        open_manager(run).close()
    assert sum(op.split()[1] == "unlink" for op in dry.ops) == 3, dry.ops
    failures: list[str] = []
    for k in range(len(dry.ops)):
        crashfs.write_tree(run, start)
        faults = Faults(run, k, code, persist=persist)
        raised: BaseException | None = None
        with faulty_disk(monkeypatch, faults):
            try:
                open_manager(run).close()
            except Exception as exc:
                raised = exc
        where = f"k={k} ({dry.ops[k]})"
        if problem := judge(raised, faults, code):
            failures.append(f"{where}: {problem}")
        store = RunStore(run)
        if store.steps() != [1, 2] or _readers.resolve(store, "latest") != 2:
            failures.append(f"{where}: steps {store.steps()}, latest {store.ref('latest')}")
        failures.extend(f"{where}: {p}" for step in (1, 2) if (p := check_step(store, step)))
        failures.extend(f"{where}: then {problem}" for problem in save_next_step(run))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("persist", [False, True], ids=["fail-once", "fail-from-then-on"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_disk_error_while_creating_a_run_raises_typed_error_and_the_run_can_start(
    code: int, persist: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "new"
    dry = Faults(tmp_path)
    with faulty_disk(monkeypatch, dry):
        open_manager(folder).close()
    failures: list[str] = []
    for k in range(len(dry.ops)):
        crashfs.write_tree(tmp_path, {})
        faults = Faults(tmp_path, k, code, persist=persist)
        raised: BaseException | None = None
        with faulty_disk(monkeypatch, faults):
            try:
                open_manager(folder).close()
            except Exception as exc:
                raised = exc
        where = f"k={k} ({dry.ops[k]})"
        if problem := judge(raised, faults, code):
            failures.append(f"{where}: {problem}")
        with open_manager(folder) as mgr:  # a half-made run would be refused here
            save_step(mgr, 1)
        if problem := check_step(RunStore(folder), 1):
            failures.append(f"{where}: then {problem}")
        if left := temps(folder):
            failures.append(f"{where}: temp files left: {left}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- I6: modes


def made_by_a_run(tmp_path: Path, umask: int) -> list[os.stat_result]:
    """The stat of every entry of a run saved (with retention) under ``umask``."""
    folder = tmp_path / "run"
    previous = os.umask(umask)
    try:
        with open_manager(folder) as mgr:
            for step in (1, 2, 3):
                save_step(mgr, step)
    finally:
        os.umask(previous)
    return [folder.lstat(), *(path.lstat() for path in folder.rglob("*"))]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_files_the_manager_creates_have_mode_0666_less_umask(umask: int, tmp_path: Path) -> None:
    files = [s for s in made_by_a_run(tmp_path, umask) if stat.S_ISREG(s.st_mode)]
    assert len(files) >= 10  # marker, lock, manifests, pointers, objects
    assert {oct(stat.S_IMODE(s.st_mode)) for s in files} == {oct(0o666 & ~umask)}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_folders_the_manager_creates_have_mode_0777_less_umask(umask: int, tmp_path: Path) -> None:
    folders = [s for s in made_by_a_run(tmp_path, umask) if stat.S_ISDIR(s.st_mode)]
    assert len(folders) >= 4  # the run, objects, checkpoints, refs
    assert {oct(stat.S_IMODE(s.st_mode)) for s in folders} == {oct(0o777 & ~umask)}
