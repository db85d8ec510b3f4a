"""The ``torchvault`` command line: output, JSON schema and exit codes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchvault as tv
import torchvault.cli
from torchvault.cli import main
from torchvault.cli._exit import EPILOG, ExitCode
from torchvault.cli._render import human_bytes


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.tv"
    state = {
        "layer": {"weight": torch.zeros(1024, 4096), "bias": torch.ones(4096, dtype=torch.float16)},
        "step": 7,
    }
    tv.save(state, path, metadata={"run": "exp1"})
    return path


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def flip_byte_in(path: Path, key: str) -> None:
    """Flip one byte inside the stored bytes of tensor ``key``."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    begin, end = header[key]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_inspect_prints_one_aligned_row_per_tensor(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["inspect", str(checkpoint)], capsys)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["key", "dtype", "shape", "size"]
    weight = next(line for line in lines if line.startswith("layer.weight"))
    bias = next(line for line in lines if line.startswith("layer.bias"))
    assert weight.split() == ["layer.weight", "float32", "[1024,", "4096]", "16.0", "MiB"]
    assert bias.split() == ["layer.bias", "float16", "[4096]", "8.0", "KiB"]
    assert weight.index("float32") == bias.index("float16") == lines[0].index("dtype")
    assert len(weight) == len(bias) == len(lines[0])  # sizes right-aligned to one edge


def test_inspect_prints_totals_format_versions_and_metadata(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_main(["inspect", str(checkpoint)], capsys)
    nbytes = 1024 * 4096 * 4 + 4096 * 2
    assert f"2 tensors, 16.0 MiB ({nbytes:,} bytes) of tensor data" in out
    assert f"file {human_bytes(checkpoint.stat().st_size)}" in out
    assert "format:    torchvault (format version 1)" in out
    assert "created:   20" in out
    assert f"torch {torch.__version__}, torchvault {tv.__version__}, python " in out
    assert "metadata:\n  run: exp1" in out


def test_inspect_json_has_the_documented_schema(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["inspect", str(checkpoint), "--json"], capsys)
    info = json.loads(out)
    assert code == 0
    assert set(info) == {
        "path", "format", "format_version", "file_bytes", "tensor_bytes", "created",
        "versions", "metadata", "tensors",
    }  # fmt: skip
    assert (info["path"], info["format"], info["format_version"]) == (
        str(checkpoint),
        "torchvault",
        1,
    )
    assert info["file_bytes"] == checkpoint.stat().st_size
    assert info["tensor_bytes"] == 1024 * 4096 * 4 + 4096 * 2
    assert info["metadata"] == {"run": "exp1"}
    assert info["versions"]["torchvault"] == tv.__version__
    assert info["tensors"][0] == {
        "key": "layer.weight", "dtype": "float32", "shape": [1024, 4096], "nbytes": 1024 * 4096 * 4
    }  # fmt: skip


def test_inspect_escapes_control_characters_in_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.tv"
    tv.save({"evil\x1b[2J\nkey": torch.zeros(2)}, path)
    _, out, _ = run_main(["inspect", str(path)], capsys)
    assert "\x1b" not in out
    assert "evil\\x1b[2J\\nkey" in out


def test_verify_ok_names_file_tensor_count_and_checksums(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["verify", str(checkpoint)], capsys)
    assert code == 0
    assert out == f"OK  {checkpoint}: 2 tensors, 16.0 MiB, checksums match\n"
    assert err == ""


def test_verify_json_ok(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["verify", "--json", str(checkpoint)], capsys)
    assert code == 0
    assert json.loads(out) == {
        "path": str(checkpoint), "ok": True, "tensors": 2,
        "checked_bytes": 1024 * 4096 * 4 + 4096 * 2, "checksummed": True,
    }  # fmt: skip


def test_verify_corrupted_file_fails_naming_the_tensor(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_byte_in(checkpoint, "layer.weight")
    code, out, err = run_main(["verify", str(checkpoint)], capsys)
    assert code == 1
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"FAILED {checkpoint}: ")
    assert "layer.weight" in err


def test_verify_json_corrupted_file_reports_the_key(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_byte_in(checkpoint, "layer.weight")
    code, out, _ = run_main(["verify", "--json", str(checkpoint)], capsys)
    result = json.loads(out)
    assert code == 1
    assert (result["ok"], result["key"]) == (False, "layer.weight")
    assert "layer.weight" in result["error"]


def test_plain_safetensors_file_inspects_and_verifies_without_checksums(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(3, 2)}, str(path))
    code, out, _ = run_main(["inspect", str(path)], capsys)
    assert code == 0
    assert out.splitlines()[2].split() == ["a", "float32", "[3,", "2]", "24", "B"]
    assert "format:    safetensors\n" in out
    assert "versions:  -" in out
    code, out, _ = run_main(["verify", str(path)], capsys)
    assert code == 0
    assert out == f"OK  {path}: 1 tensor, 24 B, structure valid (no checksums)\n"


def test_missing_file_exits_3_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("inspect", "verify"):
        code, out, err = run_main([command, str(tmp_path / "nope.tv")], capsys)
        assert code == 3
        assert out == ""
        assert err.startswith("torchvault: error: no checkpoint at ")
        assert len(err.splitlines()) == 1


def test_malformed_file_exits_1_under_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "junk.tv"
    path.write_bytes(b"not a checkpoint at all")
    code, _, err = run_main(["inspect", str(path)], capsys)
    assert code == 1
    assert err.startswith(f"torchvault: error: {path}")
    assert len(err.splitlines()) == 1


def test_os_error_exits_3_without_errno_noise(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tv, "inspect", refuse)
    code, _, err = run_main(["inspect", str(checkpoint)], capsys)
    assert code == 3
    assert err == f"torchvault: error: {checkpoint}: Permission denied\n"


def test_internal_error_exits_4_asking_for_a_report(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(path: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(tv, "inspect", crash)
    monkeypatch.delenv("TORCHVAULT_DEBUG", raising=False)
    code, _, err = run_main(["inspect", str(checkpoint)], capsys)
    assert code == 4
    assert len(err.splitlines()) == 1
    assert "RuntimeError: boom" in err
    assert "please report this" in err

    monkeypatch.setenv("TORCHVAULT_DEBUG", "1")
    code, _, err = run_main(["inspect", str(checkpoint)], capsys)
    assert code == 4
    assert "Traceback (most recent call last)" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0
    assert out.startswith(f"torchvault {tv.__version__} (torch {torch.__version__}")


@pytest.mark.parametrize(
    "args", [[], ["bogus"], ["inspect"], ["verify", "a.tv", "--frobnicate"]], ids=str
)
def test_usage_error_exits_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(args, capsys)
    assert code == 2
    assert out == ""
    assert "usage: torchvault" in err


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    assert EPILOG in out
    for exit_code in ExitCode:
        assert f" {int(exit_code)}  " in out


def test_module_docstring_lists_the_same_exit_codes() -> None:
    doc = torchvault.cli.__doc__ or ""
    for line in EPILOG.splitlines()[1:]:
        assert f"  {line}\n" in doc


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (16 << 20, "16.0 MiB"),
        (int(1.2 * 2**30), "1.2 GiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def run_cli(*args: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHVAULT_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "torchvault.cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_process_exit_codes_and_no_traceback(checkpoint: Path, tmp_path: Path) -> None:
    ok = run_cli("verify", str(checkpoint))
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith("OK  ")
    flip_byte_in(checkpoint, "layer.bias")
    bad = run_cli("verify", str(checkpoint))
    missing = run_cli("inspect", str(tmp_path / "nope.tv"))
    usage = run_cli("inspect")
    assert (bad.returncode, missing.returncode, usage.returncode) == (1, 3, 2)
    assert "layer.bias" in bad.stderr
    for result in (bad, missing):
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_process_writing_to_a_closed_pipe_exits_quietly(checkpoint: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_cli("inspect", "--json", str(checkpoint), stdout=write_end)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")
