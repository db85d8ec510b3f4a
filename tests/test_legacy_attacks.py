"""The legacy reader against the generated attack corpus: no payload ever runs.

The corpus (``attack_pickles``, section 3 of the security anchors: P1-P10, T1-T6, Z1-Z8,
D1-D4) is written under ``tmp_path`` with every payload aimed at one marker folder. One
driver subprocess then feeds each sample to ``tv.load_legacy``, ``tv.load``, ``tv.scan``
and ``tv.load_legacy(salvage=True)`` and logs one JSON line per call (the error raised,
the wall time, the marker files that appeared) and per sample (the peak RSS afterwards).
The tests read that log, one pytest case per sample and call, so a failure names the
sample. Promises checked for every sample:

* the marker folder stays empty (nothing ran), even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
  set in the driver's environment, so a fallback to ``torch.load`` would show;
* ``load_legacy`` and ``load`` raise a TorchVaultError subclass, and a plain pickle or torch
  zip whose only problem is a refused global raises ``UnsafeCheckpointError``;
* ``scan`` never raises, says ``safe == False``, and lists each literal refused global;
* ``salvage=True`` returns or raises a TorchVaultError, and runs nothing either;
* each call takes under 2 s and peak RSS stays within 512 MiB of the baseline taken after
  importing torch and torchvault.

A driver crash or hang (watchdog) is pinned on the sample in progress; the driver then
restarts after it. Positive controls feed a few payloads to the real ``pickle.loads`` and
see the marker appear, so these tests can fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import attack_pickles as ap

CALL_LIMIT_S = 2.0
RSS_LIMIT_KIB = 512 * 1024
HANG_S = 5.0
"""A call running this long makes the driver's watchdog end it (the sample then fails)."""
RUN_LIMIT_S = 600
MAX_RESTARTS = 25
OPS = ("load_legacy", "load", "scan", "salvage")
UNSAFE_FAMILIES = frozenset({"P1", "P2", "P6", "P8", "P9"})
TESTS_DIR = Path(__file__).resolve().parent

DRIVER_ENV = "TORCHVAULT_ATTACK_DRIVER"
# Names and families only: the bytes depend on the marker folder, made per run. The driver
# imports this module for drive() alone and skips building the corpus again.
SAMPLES: list[ap.Sample] = (
    [] if os.environ.get(DRIVER_ENV) else ap.corpus(Path(tempfile.gettempdir()) / "unused-markers")
)
NAMES = [s.name for s in SAMPLES]
NOT_CONTAINER = [s.name for s in SAMPLES if not s.family.startswith("Z")]
P_WITH_GLOBALS = [s.name for s in SAMPLES if s.family.startswith("P") and s.globals]

POSITIVE_CONTROLS = (
    "p1_os_system_p0_g",
    "p1_subprocess_run_p4_sg",
    "p2_exec_p5_builtins_sg",
    "p2_sour_globals_compile_eval_p0_builtin_g",
    "p3_inst_p0",
    "p3_build_setstate_slots_p2",
    "p4_slot_overwritten_p2",
    "p5_stack_global_from_string_p4",
    "p6_getattr_import_module_p2_g",
    "p6_pkgutil_resolve_name_p4_sg",
    "p8_pickle_loads_p4",
    "p8_marshal_function_type_p2",
    "p9_runpy_run_code",
    "p9_timeit_timeit_setup",
    "p9_mailcap_findmatch",
    "p10_payload_then_bad_opcode_p2",
)


# ----------------------------------------------------------------------------- driver


def _maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _describe_error(exc: BaseException) -> dict[str, Any]:
    import torchvault as tv

    unsafe = getattr(tv, "UnsafeCheckpointError", None)
    global_name = getattr(exc, "global_name", None)
    try:
        message = str(exc)[:400]
    except Exception as inner:  # a hostile object's __str__ may itself fail
        message = f"<str() raised {type(inner).__name__}>"
    return {
        "error": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "typed": isinstance(exc, tv.TorchVaultError),
        "unsafe": unsafe is not None and isinstance(exc, unsafe),
        "global_name": global_name if global_name is None else str(global_name),
        "message": message,
    }


def _describe_report(report: Any) -> dict[str, Any]:
    try:
        return {
            "safe": report.safe,
            "format": str(report.format),
            "globals": [[str(g.name), bool(g.allowed), int(g.count)] for g in report.globals],
            "anomalies": [str(a)[:200] for a in report.anomalies][:20],
        }
    except Exception as exc:
        return {"report_error": f"{type(exc).__name__}: {exc}"[:400]}


def _call(op: str, path: str) -> dict[str, Any]:
    import time

    import torchvault as tv

    result: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        if op == "load_legacy":
            value = tv.load_legacy(path)
        elif op == "salvage":
            value = tv.load_legacy(path, salvage=True)
        elif op == "load":
            value = tv.load(path)
        else:
            value = tv.scan(path)
            result.update(_describe_report(value))
        result["returned"] = type(value).__name__
        del value
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a payload may raise anything, SystemExit included
        result.update(_describe_error(exc))
    result["seconds"] = time.perf_counter() - start
    return result


def _sweep(marker_dir: Path) -> list[str]:
    """The marker files present, removed so the next sample starts clean."""
    import shutil

    found = sorted(os.listdir(marker_dir))
    for name in found:
        target = marker_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    return found


def drive(manifest: str, out: str, start: str) -> None:
    """The driver subprocess: run every sample from index ``start`` on, logging each call."""
    import faulthandler

    import torch  # noqa: F401  (in the baseline, as in any real use)

    import torchvault  # noqa: F401

    spec = json.loads(Path(manifest).read_text())
    marker_dir = Path(spec["marker_dir"])
    with open(out, "a", encoding="utf-8") as log:

        def emit(record: dict[str, Any]) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        emit({"event": "baseline", "rss": _maxrss_kib()})
        for entry in spec["samples"][int(start) :]:
            for op in entry["ops"]:
                emit({"event": "call", "name": entry["name"], "op": op})
                faulthandler.dump_traceback_later(HANG_S, exit=True)
                try:
                    result = _call(op, entry["path"])
                finally:
                    faulthandler.cancel_dump_traceback_later()
                result["markers"] = _sweep(marker_dir)
                emit({"event": "result", "name": entry["name"], "op": op, "result": result})
            emit({"event": "done", "name": entry["name"], "rss": _maxrss_kib()})


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the driver reported, keyed by sample name."""

    samples: dict[str, ap.Sample]
    results: dict[str, dict[str, Any]]
    marker_dir: Path
    late_markers: list[str]


def _launch(manifest: Path, out: Path, start: int, cwd: Path) -> tuple[int, str]:
    env = dict(os.environ)
    # A reader that fell back to torch.load would now run payloads even with
    # weights_only=True, and the marker folder would show it.
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env[DRIVER_ENV] = "1"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import test_legacy_attacks as t; t.drive(*sys.argv[2:])"
    )
    args = [sys.executable, "-c", code, str(TESTS_DIR), str(manifest), str(out), str(start)]
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=RUN_LIMIT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:].decode(errors="replace")
        return -9, f"driver ran past {RUN_LIMIT_S} s\n{tail}"
    return proc.returncode, proc.stderr[-3000:].decode(errors="replace")


def _read_log(out: Path) -> tuple[dict[str, dict[str, Any]], tuple[str, str] | None]:
    """Per sample: each finished call, and the peak RSS with its driver's baseline once the
    sample is done; also the (sample, call) in progress when the log ends."""
    results: dict[str, dict[str, Any]] = {}
    baseline = 0
    in_progress: tuple[str, str] | None = None
    if not out.exists():
        return results, None
    for line in out.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        event = record["event"]
        if event == "baseline":
            baseline = record["rss"]
        elif event == "call":
            in_progress = (record["name"], record["op"])
        elif event == "result":
            calls = results.setdefault(record["name"], {}).setdefault("calls", {})
            calls[record["op"]] = record["result"]
        else:
            results.setdefault(record["name"], {}).update(rss=record["rss"], baseline=baseline)
            in_progress = None
    return results, in_progress


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    marker_dir = tmp_path_factory.mktemp("markers")
    root = tmp_path_factory.mktemp("samples")
    samples = ap.corpus(marker_dir)
    entries: list[dict[str, Any]] = []
    for sample in samples:
        folder = root / sample.name
        folder.mkdir()
        path = folder / sample.filename
        path.write_bytes(sample.data)
        ops = OPS if not sample.family.startswith("Z") else OPS[:3]
        entries.append({"name": sample.name, "path": str(path), "ops": list(ops)})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"marker_dir": str(marker_dir), "samples": entries}))
    out = root / "results.jsonl"
    crashes: dict[str, str] = {}
    start = 0
    for _ in range(MAX_RESTARTS):
        rc, stderr = _launch(manifest, out, start, root)
        _, in_progress = _read_log(out)
        if rc == 0 and in_progress is None:
            break
        if in_progress is None:  # died before its first sample: nothing will work
            crashes["*"] = f"the driver failed (rc={rc})\n{stderr}"
            break
        name, op = in_progress
        ran = _sweep(marker_dir)
        crashes[name] = (
            f"{op} hung over {HANG_S} s or crashed the driver (rc={rc}); "
            f"payload markers found afterwards: {ran}\n{stderr}"
        )
        start = next(i for i, e in enumerate(entries) if e["name"] == name) + 1
        if start >= len(entries):
            break
    results, _ = _read_log(out)
    for entry in entries:
        result = results.setdefault(entry["name"], {})
        why = crashes.get(entry["name"]) or crashes.get("*") or "never run: too many crashes"
        for op in entry["ops"]:
            result.setdefault("calls", {}).setdefault(op, {"crash": why})
        if "rss" not in result:
            result["crash"] = why
    return Run({s.name: s for s in samples}, results, marker_dir, sorted(os.listdir(marker_dir)))


def _call_result(run: Run, name: str, op: str) -> dict[str, Any]:
    call: dict[str, Any] = run.results[name]["calls"][op]
    if "crash" in call:
        pytest.fail(f"{name}: {call['crash']}")
    return call


def _spellings(names: tuple[str, ...]) -> set[str]:
    """The names as written, plus Python 3 spellings of ``__builtin__`` (fix_imports)."""
    out = set(names)
    out |= {
        "builtins." + n.removeprefix("__builtin__.") for n in names if n.startswith("__builtin__.")
    }
    return out


def _assert_nothing_ran(call: dict[str, Any]) -> None:
    assert not call["markers"], f"payload ran: created {call['markers']}"


def _assert_fast(call: dict[str, Any]) -> None:
    assert call["seconds"] < CALL_LIMIT_S, f"took {call['seconds']:.2f} s"


def _assert_typed_refusal(call: dict[str, Any]) -> None:
    assert "returned" not in call, f"accepted the file (returned {call['returned']})"
    assert call["typed"], f"raised {call['error']} (not a TorchVaultError): {call['message']}"


# ----------------------------------------------------------------------------- the corpus


def test_corpus_covers_every_family() -> None:
    families = {s.family for s in SAMPLES}
    assert len(SAMPLES) >= 300
    assert families == set(ap.FAMILIES)
    assert len(set(NAMES)) == len(NAMES)
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in NAMES)
    for family in ap.FAMILIES:
        assert sum(s.family == family for s in SAMPLES) >= 3, family
    containers = {s.container for s in SAMPLES}
    assert containers == {ap.PICKLE, ap.TORCH_ZIP, ap.TORCH_LEGACY, ap.OTHER}


@pytest.mark.parametrize("family", ["P1", "P2"])
def test_direct_call_payloads_come_in_protocols_0_2_4_5(family: str) -> None:
    def protocol(data: bytes) -> int:
        return data[1] if data[:1] == b"\x80" else 0

    seen = {protocol(s.data) for s in SAMPLES if s.family == family and s.container == ap.PICKLE}
    assert {0, 2, 4, 5} <= seen


def test_builtins_payloads_use_both_spellings_and_both_global_opcodes() -> None:
    globals_ = {g for s in SAMPLES if s.family == "P2" for g in s.globals}
    assert {"__builtin__.eval", "builtins.eval", "__builtin__.exec", "builtins.exec"} <= globals_
    p2 = [s.data for s in SAMPLES if s.family == "P2" and s.container == ap.PICKLE]
    assert any(b"c__builtin__\neval\n" in d for d in p2)
    assert any(b"\x8c\x08builtins\x8c\x04eval\x93" in d for d in p2)


def test_wrapped_payloads_sit_in_valid_torch_zips() -> None:
    """In the P, T and D families the container is sound: the unpickler must refuse."""
    import io
    import pickletools
    import zipfile

    for sample in SAMPLES:
        if sample.container != ap.TORCH_ZIP or sample.family.startswith("Z"):
            continue
        with zipfile.ZipFile(io.BytesIO(sample.data)) as archive:
            assert archive.testzip() is None, sample.name
            infos = archive.infolist()
            assert all(i.compress_type == zipfile.ZIP_STORED for i in infos), sample.name
            names = {i.filename for i in infos}
            assert {"archive/data.pkl", "archive/version", "archive/byteorder"} <= names
            if sample.global_only:
                list(pickletools.genops(archive.read("archive/data.pkl")))


def test_global_only_samples_are_well_formed_pickles() -> None:
    import pickletools

    for sample in SAMPLES:
        if sample.global_only and sample.container == ap.PICKLE:
            ops = list(pickletools.genops(sample.data))
            assert ops[-1][0].name == "STOP", sample.name
            assert ops[-1][2] == len(sample.data) - 1, sample.name


@pytest.mark.parametrize("name", POSITIVE_CONTROLS)
def test_positive_control_payload_is_live(name: str, tmp_path: Path) -> None:
    """The real pickle.loads runs the payload: the marker check can fail."""
    sample = next(s for s in ap.corpus(tmp_path) if s.name == name)
    for global_name in sample.globals:
        module = global_name.split(".")[0].replace("__builtin__", "builtins")
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not importable on this Python")
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(sample.data)
    code = (
        "import pickle, sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "try:\n    pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "except Exception:\n    pass\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(payload)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (tmp_path / name).exists(), "the payload did not run under pickle.loads"


# ----------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("name", NAMES)
def test_load_legacy_refuses(attack_run: Run, name: str) -> None:
    sample = attack_run.samples[name]
    call = _call_result(attack_run, name, "load_legacy")
    _assert_nothing_ran(call)
    _assert_typed_refusal(call)
    _assert_fast(call)
    if (
        sample.family in UNSAFE_FAMILIES
        and sample.global_only
        and sample.container in (ap.PICKLE, ap.TORCH_ZIP)
    ):
        assert call["unsafe"], (
            f"expected UnsafeCheckpointError, got {call['error']}: {call['message']}"
        )
        named = call["global_name"]
        assert named is None or named in _spellings(sample.globals) | ap.SAFE_GLOBALS, named


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses(attack_run: Run, name: str) -> None:
    call = _call_result(attack_run, name, "load")
    _assert_nothing_ran(call)
    _assert_typed_refusal(call)
    _assert_fast(call)


@pytest.mark.parametrize("name", NAMES)
def test_scan_reports_unsafe(attack_run: Run, name: str) -> None:
    call = _call_result(attack_run, name, "scan")
    _assert_nothing_ran(call)
    assert "error" not in call, f"scan raised {call['error']}: {call['message']}"
    assert "report_error" not in call, call.get("report_error")
    assert call["safe"] is False, f"reported safe: {call}"
    _assert_fast(call)


@pytest.mark.parametrize("name", P_WITH_GLOBALS)
def test_scan_names_each_refused_global(attack_run: Run, name: str) -> None:
    sample = attack_run.samples[name]
    call = _call_result(attack_run, name, "scan")
    assert "error" not in call, f"scan raised {call['error']}: {call['message']}"
    refused = {g for g, allowed, _ in call.get("globals", []) if not allowed}
    listed = {g for g, _, _ in call.get("globals", [])}
    for global_name in sample.globals:
        spellings = _spellings((global_name,))
        assert spellings & listed, f"{global_name} missing from {sorted(listed)}"
        assert spellings & refused, f"{global_name} reported as allowed"


@pytest.mark.parametrize("name", NOT_CONTAINER)
def test_salvage_runs_nothing(attack_run: Run, name: str) -> None:
    call = _call_result(attack_run, name, "salvage")
    _assert_nothing_ran(call)
    if "returned" not in call:
        assert call["typed"], f"raised {call['error']} (not a TorchVaultError): {call['message']}"
    _assert_fast(call)


@pytest.mark.parametrize("name", NAMES)
def test_memory_stays_bounded(attack_run: Run, name: str) -> None:
    result = attack_run.results[name]
    if "crash" in result:
        pytest.skip("never finished; the call tests report why")
    growth = result["rss"] - result["baseline"]
    assert growth < RSS_LIMIT_KIB, f"peak RSS grew {growth / 1024:.0f} MiB over the baseline"


def test_no_payload_ran_late(attack_run: Run) -> None:
    """Nothing appeared after the driver's last sweep (a spawned process, a thread)."""
    assert attack_run.late_markers == []
