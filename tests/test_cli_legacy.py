"""The ``scan`` and ``convert`` commands: torch.save files read without running their code."""

from __future__ import annotations

import json
import os
import pickletools
import shlex
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchvault as tv
import torchvault.cli
from torchvault.cli import main


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(linear().state_dict(), path)
    return path


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A whole nn.Module saved with torch.save(model): loading it imports its class."""
    path = tmp_path / "model.pt"
    torch.save(linear(), path)
    return path


def global_call(module: str, name: str, argument: str) -> bytes:
    """A protocol-2 pickle of ``module.name(argument)``, written opcode by opcode."""
    arg = argument.encode()
    return (
        b"\x80\x02"  # PROTO 2
        + b"c" + f"{module}\n{name}\n".encode()  # GLOBAL
        + b"X" + struct.pack("<I", len(arg)) + arg  # BINUNICODE
        + b"\x85"  # TUPLE1
        + b"R"  # REDUCE
        + b"."  # STOP
    )  # fmt: skip


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """The file the malicious payloads would create if anything ran them."""
    return tmp_path / "PWNED"


@pytest.fixture
def evil_file(tmp_path: Path, marker: Path) -> Path:
    payload = global_call("os", "system", f"touch {shlex.quote(str(marker))}")
    # Parsed, never run: a well-formed pickle that pickle.loads would execute.
    opcodes = [op.name for op, _, _ in pickletools.genops(payload)]
    assert opcodes == ["PROTO", "GLOBAL", "BINUNICODE", "TUPLE1", "REDUCE", "STOP"]
    path = tmp_path / "evil.pt"
    path.write_bytes(payload)
    return path


def global_rows(out: str) -> list[list[str]]:
    """The ``status global count`` rows of a scan report, in printed order."""
    return [
        line.split() for line in out.splitlines() if line.startswith(("  allowed ", "  REFUSED "))
    ]


# ---------------------------------------------------------------------- scan


def test_scan_safe_state_dict_exits_0_listing_allowed_globals(
    state_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["scan", str(state_file)], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"{state_file}: torch-zip; safe"
    rows = global_rows(out)
    assert ["allowed", "collections.OrderedDict", "1"] in rows
    assert ["allowed", "torch._utils._rebuild_tensor_v2", "1"] in rows
    assert all(row[0] == "allowed" for row in rows)
    assert out.splitlines()[-1].startswith("safe: 1 path, every global allowed")


def test_scan_reads_the_legacy_stacked_pickle_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.pt"
    torch.save(linear().state_dict(), path, _use_new_zipfile_serialization=False)
    code, out, _ = run_main(["scan", str(path)], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{path}: torch-legacy; safe"
    assert ["allowed", "collections.OrderedDict", "1"] in global_rows(out)


def test_scan_whole_model_exits_1_with_its_class_refused_first(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["scan", str(model_file)], capsys)
    assert (code, err) == (1, "")
    assert out.splitlines()[0] == f"{model_file}: torch-zip; UNSAFE, 1 refused"
    rows = global_rows(out)
    assert rows[0] == ["REFUSED", "torch.nn.modules.linear.Linear", "1"]
    assert all(row[0] == "allowed" for row in rows[1:])
    verdict = out.splitlines()[-1]
    assert verdict.startswith("UNSAFE: 1 of 1 paths: ")
    assert "refused torch.nn.modules.linear.Linear" in verdict


@pytest.mark.parametrize("container", ["pickle", "zip"])
def test_scan_os_system_payload_exits_1_and_never_runs_it(
    container: str,
    evil_file: Path,
    marker: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = evil_file
    if container == "zip":  # the same pickle as data.pkl of a torch.save-style archive
        path = tmp_path / "evil-zip.pt"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", evil_file.read_bytes())
            archive.writestr("archive/version", "3\n")
            archive.writestr("archive/byteorder", "little")
    code, out, _ = run_main(["scan", str(path)], capsys)
    assert code == 1
    assert global_rows(out) == [["REFUSED", "os.system", "1"]]
    assert "refused os.system" in out.splitlines()[-1]
    assert not marker.exists()


def test_scan_escapes_control_characters_in_global_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.pt"
    path.write_bytes(global_call("os", "sys\x1b[2Jtem", "true"))
    code, out, _ = run_main(["scan", str(path)], capsys)
    assert code == 1
    assert "\x1b" not in out
    assert global_rows(out) == [["REFUSED", "os.sys\\x1b[2Jtem", "1"]]


def test_scan_truncated_zip_exits_1_with_an_anomaly(
    state_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "truncated.pt"
    data = state_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, out, err = run_main(["scan", str(path)], capsys)
    assert (code, err) == (1, "")
    assert out.splitlines()[0] == f"{path}: unknown; UNSAFE"
    anomalies = [line for line in out.splitlines() if line.startswith("  anomaly: ")]
    assert len(anomalies) == 1
    assert "truncated" in anomalies[0]
    assert "(1 anomaly)" in out.splitlines()[-1]


def test_scan_failed_crc_is_an_anomaly(
    state_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(state_file.read_bytes())
    with zipfile.ZipFile(state_file) as archive:
        entry = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack(
        "<HH", data[entry.header_offset + 26 : entry.header_offset + 30]
    )
    data[entry.header_offset + 30 + name_len + extra_len] ^= 0xFF  # the tensor's first byte
    path = tmp_path / "bitrot.pt"
    path.write_bytes(bytes(data))
    code, out, _ = run_main(["scan", str(path)], capsys)
    assert code == 1
    assert "CRC-32" in out
    assert all(row[0] == "allowed" for row in global_rows(out))


def test_scan_missing_path_exits_3_with_one_line_and_scans_nothing(
    state_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    code, out, err = run_main(["scan", str(state_file), str(missing)], capsys)
    assert (code, out) == (3, "")
    assert err == f"torchvault: error: {missing}: no such file or folder\n"


def test_scan_several_paths_is_unsafe_if_any_is(
    state_file: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["scan", str(state_file), str(model_file)], capsys)
    assert code == 1
    assert f"{state_file}: torch-zip; safe" in out
    assert f"{model_file}: torch-zip; UNSAFE, 1 refused" in out
    assert out.splitlines()[-1].startswith(f"UNSAFE: 1 of 2 paths: {model_file} (refused ")


def test_scan_folder_lists_its_files_and_merges_their_globals(
    tmp_path: Path, model_file: Path, state_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["scan", str(tmp_path)], capsys)
    assert code == 1
    assert out.splitlines()[:2] == [
        f"{tmp_path}: folder; UNSAFE, 1 refused",
        "  files (2): model.pt, weights.pt",
    ]
    rows = global_rows(out)
    assert rows[0] == ["REFUSED", "torch.nn.modules.linear.Linear", "1"]
    assert ["allowed", "collections.OrderedDict", "2"] in rows


def test_scan_safetensors_and_torchvault_files_have_no_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tv.save({"w": torch.ones(2)}, tmp_path / "a.tv")
    tv.convert(tmp_path / "a.tv", tmp_path / "b.safetensors", to="safetensors")
    code, out, _ = run_main(
        ["scan", str(tmp_path / "a.tv"), str(tmp_path / "b.safetensors")], capsys
    )
    assert code == 0
    assert f"{tmp_path / 'a.tv'}: torchvault; safe\n  no pickled globals\n" in out
    assert f"{tmp_path / 'b.safetensors'}: safetensors; safe\n  no pickled globals\n" in out


def test_scan_json_has_every_report_field_and_the_verdict(
    state_file: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["scan", "--json", str(state_file), str(model_file)], capsys)
    result = json.loads(out)
    assert code == 1
    assert result["safe"] is False
    safe, unsafe = result["reports"]
    fields = {"path", "format", "globals", "anomalies", "files", "safe", "unsafe_globals"}
    assert set(safe) == set(unsafe) == fields
    assert (safe["path"], safe["format"], safe["safe"]) == (str(state_file), "torch-zip", True)
    assert safe["files"] == [str(state_file)]
    assert {"name": "collections.OrderedDict", "allowed": True, "count": 1} in safe["globals"]
    assert (unsafe["safe"], unsafe["anomalies"]) == (False, [])
    assert unsafe["unsafe_globals"] == ["torch.nn.modules.linear.Linear"]


def test_scan_process_exits_1_for_the_payload_without_running_it(
    evil_file: Path, state_file: Path, marker: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHVAULT_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "torchvault.cli", "scan", str(state_file), str(evil_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr) == (1, "")
    assert "REFUSED  os.system" in result.stdout
    assert not marker.exists()


# ---------------------------------------------------------------------- convert


def test_convert_to_hf_with_small_shards_writes_shards_and_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {f"layer{i}.weight": torch.full((256,), float(i)) for i in range(4)}  # 1 KiB each
    source = tmp_path / "pytorch_model.bin"
    torch.save(state, source)
    folder = tmp_path / "hf"
    code, out, err = run_main(
        ["convert", str(source), str(folder), "--to", "hf", "--max-shard-size", "2KiB"], capsys
    )
    assert (code, err) == (0, "")
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert sorted(p.name for p in folder.iterdir()) == [*shards, "model.safetensors.index.json"]
    assert out.splitlines()[0] == (
        f"converted {source} to hf at {folder}: 4 tensors, 4.0 KiB in 3 files"
    )
    assert f"  {folder / shards[0]}" in out.splitlines()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    loaded = tv.load(folder)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_convert_to_safetensors_is_readable_by_safetensors(
    state_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "model.safetensors"
    code, out, _ = run_main(
        ["convert", str(state_file), str(out_path), "--to", "safetensors"], capsys
    )
    assert code == 0
    assert out.startswith(f"converted {state_file} to safetensors at {out_path}: 2 tensors")
    expected = linear().state_dict()
    loaded = load_file(str(out_path))
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_convert_reports_tied_weights_as_aliases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = torch.randn(4, 3)
    source = tmp_path / "tied.pt"
    torch.save({"embed.weight": shared, "lm_head.weight": shared}, source)
    args = ["convert", str(source), str(tmp_path / "tied.safetensors"), "--to", "safetensors"]
    code, out, _ = run_main(args, capsys)
    assert code == 0
    assert "1 tensor, 48 B in 1 file" in out.splitlines()[0]
    assert out.splitlines()[-2:] == [
        "aliases (1, stored once under another name):",
        "  lm_head.weight -> embed.weight",
    ]
    code, out, _ = run_main([*args, "--json"], capsys)
    assert json.loads(out)["aliases"] == {"lm_head.weight": "embed.weight"}


def test_convert_json_has_the_report_fields(
    state_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "model.tv"
    code, out, _ = run_main(["convert", str(state_file), str(out_path), "--json"], capsys)
    assert code == 0
    assert json.loads(out) == {
        "source": str(state_file), "destination": str(out_path), "format": "torchvault",
        "tensors": 2, "bytes": 32, "aliases": {}, "files": [str(out_path)],
        "classes": [], "unsafe": [],
    }  # fmt: skip
    assert torch.equal(tv.load(out_path)["weight"], linear().weight.detach())


def test_convert_whole_model_exits_1_naming_the_class_and_writes_nothing(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "model.safetensors"
    code, out, err = run_main(
        ["convert", str(model_file), str(out_path), "--to", "safetensors"], capsys
    )
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(f"torchvault: error: {model_file}: ")
    assert "torch.nn.modules.linear.Linear" in err
    assert not out_path.exists()


class _Payload:
    """Pickles as a call of os.system; torch.save writes it without running anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_convert_salvage_of_a_whole_model_lists_its_classes(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "weights.safetensors"
    code, out, err = run_main(["convert", "--salvage", str(model_file), str(out_path)], capsys)
    assert (code, err) == (0, "")
    assert "salvaged from: torch.nn.modules.linear.Linear" in out
    assert set(load_file(out_path)) == {"weight", "bias"}


def test_convert_salvage_warns_that_the_file_calls_os_system(
    marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "hooked.pt"
    torch.save({"model": linear(), "hook": _Payload(marker)}, source)
    out_path = tmp_path / "weights.tv"
    code, out, err = run_main(["convert", "--salvage", str(source), str(out_path)], capsys)
    assert code == 0
    assert err.startswith(f"torchvault: warning: UNSAFE: {source} calls posix.system, ")
    assert len(err.splitlines()) == 1
    assert not marker.exists()
    assert set(tv.load(out_path)) == {"model.weight", "model.bias"}
    code, out, _ = run_main(["convert", "--salvage", "--json", str(source), str(out_path)], capsys)
    assert json.loads(out)["unsafe"] == ["posix.system"]


def test_convert_payload_exits_1_without_running_it(
    evil_file: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["convert", str(evil_file), str(tmp_path / "x.tv")], capsys)
    assert code == 1
    assert "os.system" in err
    assert not marker.exists()


def test_convert_missing_source_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["convert", str(tmp_path / "nope.pt"), str(tmp_path / "x")], capsys)
    assert (code, out) == (3, "")
    assert len(err.splitlines()) == 1


def test_convert_nested_state_to_safetensors_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "nested.pt"
    torch.save({"model": linear().state_dict(), "epoch": 3}, source)
    args = ["convert", str(source), str(tmp_path / "x.safetensors"), "--to", "safetensors"]
    code, _, err = run_main(args, capsys)
    assert code == 1
    assert "not a flat state dict" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "extra",
    [
        ["--to", "safetensors", "--max-shard-size", "1MB"],  # not a folder
        ["--to", "hf", "--max-shard-size", "12 parsecs"],
        ["--to", "hf", "--max-shard-size", "0"],
        ["--to", "onnx"],
    ],
    ids=str,
)
def test_convert_bad_options_exit_2(
    extra: list[str], state_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["convert", str(state_file), str(tmp_path / "x"), *extra], capsys)
    assert (code, out) == (2, "")
    assert "usage: torchvault convert" in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- help


def test_help_and_module_docstring_document_scan_and_convert(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = run_main(["--help"], capsys)
    for name in ("scan", "convert"):
        assert f"    {name} " in out
    code, out, _ = run_main(["scan", "--help"], capsys)
    assert code == 0
    assert "REFUSED" in out
    doc = torchvault.cli.__doc__ or ""
    assert "torchvault scan PATH... [--json]" in doc
    assert "torchvault convert SRC DST [--to tv|safetensors|hf|torch]" in doc
