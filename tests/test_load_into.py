"""load_into: key matching, wrapper prefixes, renames, reports, strictness, in-place loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchvault as tv


class Net(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # type: ignore[no-any-return]


class Renamed(nn.Module):
    """Net with its head under another name (a new task head)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.classifier = nn.Linear(8, 3)


class DDP(nn.Module):
    """Stands in for DistributedDataParallel: the model lives at ``.module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


class Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the model lives at ``._orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def trained(classes: int = 3) -> Net:
    torch.manual_seed(1)
    net = Net(classes)
    net(torch.randn(5, 4))  # moves the BatchNorm running statistics
    return net


def fresh(classes: int = 3) -> Net:
    torch.manual_seed(2)
    return Net(classes)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_holds(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def saved(module: nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "source.tv"
    tv.save(module, path)
    return path


# ----------------------------------------------------------------------------- matching files


def test_matching_file_loads_every_key(tmp_path: Path) -> None:
    source, model = trained(), fresh()
    report = tv.load_into(model, saved(source, tmp_path))
    assert report.loaded == tuple(model.state_dict())
    assert report.ok
    assert_holds(model, source.state_dict())


def test_matching_state_dict_loads_every_key() -> None:
    source, model = trained(), fresh()
    report = tv.load_into(model, source.state_dict())
    assert report.ok
    assert_holds(model, source.state_dict())


def test_matching_load_reports_no_differences(tmp_path: Path) -> None:
    report = tv.load_into(fresh(), saved(trained(), tmp_path))
    assert (report.missing, report.unexpected, report.mismatched) == ((), (), ())
    assert (report.casts, report.renamed) == ((), ())


def test_plain_safetensors_file_loads_into_a_model(tmp_path: Path) -> None:
    source, model, path = trained(), fresh(), tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    assert tv.load_into(model, path).ok
    assert_holds(model, source.state_dict())


def test_parameters_and_buffers_are_loaded_in_place(tmp_path: Path) -> None:
    model = fresh()
    before = [(t, t.data_ptr()) for t in (*model.parameters(), *model.buffers())]
    tv.load_into(model, saved(trained(), tmp_path))
    after = [(t, t.data_ptr()) for t in (*model.parameters(), *model.buffers())]
    assert len(after) == len(before)
    for (old, old_ptr), (new, new_ptr) in zip(before, after, strict=True):
        assert new is old
        assert new_ptr == old_ptr


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_stay_tied_after_loading(tmp_path: Path) -> None:
    source, model = TiedLM(), TiedLM()
    report = tv.load_into(model, saved(source, tmp_path))
    assert report.ok
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, source.embed.weight)


def test_loaded_parameters_stay_parameters_requiring_grad(tmp_path: Path) -> None:
    model = fresh()
    tv.load_into(model, saved(trained(), tmp_path))
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())


def test_file_holding_a_nested_checkpoint_raises_naming_its_keys(tmp_path: Path) -> None:
    path, net = tmp_path / "ckpt.tv", trained()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    tv.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, path)
    with pytest.raises(TypeError, match="state dict") as info:
        tv.load_into(fresh(), path)
    assert "'model'" in str(info.value)
    assert "'optimizer'" in str(info.value)


# ----------------------------------------------------------------------------- wrapper prefixes


def test_ddp_checkpoint_loads_into_a_plain_model(tmp_path: Path) -> None:
    source, model = trained(), fresh()
    report = tv.load_into(model, saved(DDP(source), tmp_path))
    assert report.ok
    assert_holds(model, source.state_dict())


def test_ddp_prefix_removal_is_reported_for_every_key(tmp_path: Path) -> None:
    model = fresh()
    report = tv.load_into(model, saved(DDP(trained()), tmp_path))
    assert [(r.source, r.target) for r in report.renamed] == [
        (f"module.{key}", key) for key in model.state_dict()
    ]
    assert all("removed" in r.reason and "module." in r.reason for r in report.renamed)


def test_plain_checkpoint_loads_into_a_ddp_wrapped_model(tmp_path: Path) -> None:
    source, model = trained(), DDP(fresh())
    report = tv.load_into(model, saved(source, tmp_path))
    assert report.ok
    assert_holds(model.module, source.state_dict())
    assert all("added" in r.reason and "module." in r.reason for r in report.renamed)


def test_compiled_checkpoint_loads_into_a_plain_model(tmp_path: Path) -> None:
    source, model = trained(), fresh()
    report = tv.load_into(model, saved(Compiled(source), tmp_path))
    assert report.ok
    assert_holds(model, source.state_dict())
    assert all("_orig_mod." in r.reason for r in report.renamed)


def test_plain_checkpoint_loads_into_a_compiled_model(tmp_path: Path) -> None:
    source, model = trained(), Compiled(fresh())
    report = tv.load_into(model, saved(source, tmp_path))
    assert report.ok
    assert_holds(model._orig_mod, source.state_dict())


def test_compiled_ddp_checkpoint_loads_into_a_plain_model(tmp_path: Path) -> None:
    source, model = trained(), fresh()
    report = tv.load_into(model, saved(DDP(Compiled(source)), tmp_path))
    assert report.ok
    assert_holds(model, source.state_dict())


def test_ddp_checkpoint_loads_into_a_compiled_model(tmp_path: Path) -> None:
    source, model = trained(), Compiled(fresh())
    report = tv.load_into(model, saved(DDP(source), tmp_path))
    assert report.ok
    assert_holds(model._orig_mod, source.state_dict())


# ----------------------------------------------------------------------------- renames


def backbone_as(prefix: str, source: Net) -> dict[str, torch.Tensor]:
    return {key.replace("backbone.", prefix, 1): v for key, v in source.state_dict().items()}


def test_prefix_rename_maps_old_layer_names(tmp_path: Path) -> None:
    source, model = trained(), fresh()
    report = tv.load_into(model, backbone_as("encoder.", source), rename={"encoder.": "backbone."})
    assert report.ok
    assert_holds(model, source.state_dict())


def test_rename_is_reported_with_source_and_target() -> None:
    report = tv.load_into(
        fresh(), backbone_as("encoder.", trained()), rename={"encoder.": "backbone."}
    )
    assert report.renamed[0] == tv.RenamedKey(
        "encoder.0.weight", "backbone.0.weight", "rename rule"
    )
    assert len(report.renamed) == sum(k.startswith("backbone.") for k in fresh().state_dict())


def test_regex_rename_maps_matching_keys() -> None:
    source, model = trained(), fresh()
    state = backbone_as("layers.", source)
    report = tv.load_into(model, state, rename={re.compile(r"^layers\.(\d+)\."): r"backbone.\1."})
    assert report.ok
    assert_holds(model, source.state_dict())


def test_rename_accepts_a_list_of_pairs() -> None:
    source, model = trained(), fresh()
    rules = [("encoder.", "backbone."), ("fc.", "head.")]
    state = {k.replace("head.", "fc."): v for k, v in backbone_as("encoder.", source).items()}
    assert tv.load_into(model, state, rename=rules).ok
    assert_holds(model, source.state_dict())


def test_first_matching_rename_rule_wins() -> None:
    source, model = trained(), fresh()
    rules = [("encoder.", "backbone."), (re.compile("^enc"), "nowhere.")]
    assert tv.load_into(model, backbone_as("encoder.", source), rename=rules).ok


def test_rename_mapping_two_keys_to_one_is_an_error() -> None:
    state = {"a.weight": torch.zeros(1), "b.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"a\.weight"):
        tv.load_into(nn.Linear(1, 1), state, rename={"a.": "x.", "b.": "x."})


# ----------------------------------------------------------------------------- differences


def test_transfer_to_a_new_head_size_loads_the_backbone_and_reports_the_head(
    tmp_path: Path,
) -> None:
    source, model = trained(classes=10), fresh(classes=3)
    head = snapshot(model.head)
    report = tv.load_into(model, saved(source, tmp_path), strict=False)
    assert report.mismatched == (
        tv.ShapeMismatch("head.weight", (10, 8), (3, 8)),
        tv.ShapeMismatch("head.bias", (10,), (3,)),
    )
    assert report.loaded == tuple(k for k in model.state_dict() if k.startswith("backbone."))
    assert not report.ok
    assert_holds(model.backbone, source.backbone.state_dict())
    assert_holds(model.head, head)


def test_renamed_head_is_reported_missing_and_unexpected(tmp_path: Path) -> None:
    source, model = trained(), Renamed()
    classifier = snapshot(model.classifier)
    report = tv.load_into(model, saved(source, tmp_path), strict=False)
    assert report.missing == ("classifier.weight", "classifier.bias")
    assert report.unexpected == ("head.weight", "head.bias")
    assert_holds(model.backbone, source.backbone.state_dict())
    assert_holds(model.classifier, classifier)


def test_fp16_file_loads_into_an_fp32_model_with_casts_reported(tmp_path: Path) -> None:
    source, model, path = trained(), fresh(), tmp_path / "half.tv"
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    tv.save(half, path)
    report = tv.load_into(model, path)
    assert report.ok
    floating = [k for k, v in half.items() if v.is_floating_point()]
    assert report.casts == tuple(tv.DtypeCast(k, "float16", "float32") for k in floating)
    for key, value in model.state_dict().items():
        assert value.dtype == source.state_dict()[key].dtype
        assert torch.equal(value, half[key].to(value.dtype))


# ----------------------------------------------------------------------------- strict


def mismatched_source() -> dict[str, torch.Tensor]:
    state = trained(classes=10).state_dict()
    state.pop("backbone.0.bias")
    state["extra.weight"] = torch.zeros(2)
    return state


def test_strict_mismatch_raises_a_state_dict_mismatch_error() -> None:
    with pytest.raises(tv.StateDictMismatchError) as info:
        tv.load_into(fresh(), mismatched_source())
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.report, tv.LoadReport)
    assert info.value.report.missing == ("backbone.0.bias",)


def test_strict_error_names_every_offending_key_and_both_shapes() -> None:
    with pytest.raises(tv.StateDictMismatchError) as info:
        tv.load_into(fresh(), mismatched_source())
    message = str(info.value)
    assert "backbone.0.bias" in message
    assert "extra.weight" in message
    assert "head.weight: [10, 8] vs [3, 8]" in message
    assert "head.bias: [10] vs [3]" in message


def test_strict_error_says_how_to_fix_it() -> None:
    with pytest.raises(tv.StateDictMismatchError) as info:
        tv.load_into(fresh(), mismatched_source())
    assert "strict=False" in str(info.value)
    assert "rename" in str(info.value)


def test_strict_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "source.tv"
    tv.save(mismatched_source(), path)
    with pytest.raises(tv.StateDictMismatchError, match=r"source\.tv"):
        tv.load_into(fresh(), path)


def test_module_is_unchanged_after_a_strict_error() -> None:
    model = fresh()
    before = snapshot(model)
    with pytest.raises(tv.StateDictMismatchError):
        tv.load_into(model, mismatched_source())
    assert_holds(model, before)


def test_non_strict_load_loads_what_matches() -> None:
    model = fresh()
    source = mismatched_source()
    report = tv.load_into(model, source, strict=False)
    assert report.missing == ("backbone.0.bias",)
    assert report.unexpected == ("extra.weight",)
    assert torch.equal(model.backbone[0].weight, source["backbone.0.weight"])
