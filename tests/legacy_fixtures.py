"""Build a corpus of benign legacy checkpoints with the real libraries, for the interop tests.

``torchvault.legacy`` reads files written by ``torch.save`` (zip and the older stacked-pickle
format), Lightning checkpoints and Hugging Face ``save_pretrained`` folders without running
their pickles. A restricted reader is only useful if it reads everything real tools write and
gives back exactly what ``torch.load`` would, so this module writes such files in the ways
people actually produce them: every serialization switch ``torch.save`` has (zip or legacy,
pickle protocols 2, 4 and 5, no byte-order record, no CRC-32), every dtype, awkward tensors
(empty, 0-dim, views, storages shared by several tensors, Parameters), training state
(optimizers, schedulers, a GradScaler, RNG state, argparse namespaces), a real Lightning
``Trainer.fit`` and real ``transformers`` models.

Each builder writes into the directory it is given and returns :class:`Benign` records: the
path and a zero-argument ``reference`` that loads the same thing with torch (or the owning
library), which the tests compare against. Lightning and transformers are imported inside
their builders only, so importing this module stays cheap and needs neither.

Nothing here downloads anything: transformers models are built from tiny configs.
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

Reference = Callable[[], Any]

# Every dtype the brief names, which both serialization formats can store...
CLASSIC_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
# ...the float8 formats, which only the zip format can store...
FLOAT8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
# ...and the rest of what torch 2.13's zip format round-trips (kept in a file of their own, so
# a reader that refuses them fails on that file alone).
EXTRA_DTYPES: tuple[torch.dtype, ...] = (
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
)


@dataclass(frozen=True)
class Benign:
    """One benign checkpoint (a file, or a Hugging Face folder) and how torch loads it.

    Attributes:
        name: a short, unique id (used as the pytest id).
        path: the file or folder.
        reference: loads the same content with torch or the owning library.
        legacy: written in torch's pre-1.6 stacked-pickle format.
        tags: what the file exercises (``"state_dict"``, ``"optimizer"``, ``"hf"``, ...).
    """

    name: str
    path: Path
    reference: Reference = field(repr=False)
    legacy: bool = False
    tags: frozenset[str] = frozenset()

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


def torch_reference(path: Path) -> Reference:
    """How ``torch.load`` reads ``path``: full unpickling, everything onto the CPU."""
    return functools.partial(torch.load, path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# Small models (module level, so that a whole-model pickle can name them)


class SmallCNN(nn.Module):
    """A conv net with BatchNorm buffers (running stats, an int64 counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # type: ignore[no-any-return]


class TinyTransformer(nn.Module):
    """An encoder LM whose output projection is tied to its embedding (one shared Parameter)."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, 12, width))
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("mask", torch.ones(12, 12, dtype=torch.bool).tril())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        return self.head(self.norm(self.encoder(x)))  # type: ignore[no-any-return]


class SalvageNet(nn.Module):
    """The model saved whole with ``torch.save(model)``: its class is in the pickle."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("offset", torch.arange(4, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale + self.offset  # type: ignore[no-any-return]


SALVAGE_CLASSES = (
    f"{__name__}.SalvageNet",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.activation.ReLU",
)
"""The classes a pickle of :class:`SalvageNet` names, as ``module.QualName``."""


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (NaN patterns included for float types)."""
    gen = seeded(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape) * itemsize
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN()
    model.train()
    model(torch.randn(4, 3, 8, 8))  # moves the BatchNorm running stats off their defaults
    return model


def tiny_transformer(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


def salvage_net(seed: int = 0) -> SalvageNet:
    torch.manual_seed(seed)
    return SalvageNet()


def trained_optimizers() -> tuple[SmallCNN, dict[str, Any]]:
    """A CNN trained a few steps by AdamW, SGD with momentum, schedulers and a GradScaler.

    Returns the model and the state dicts (``adamw``, ``sgd``, ``schedulers``, ``scaler``).
    """
    model = small_cnn(1)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.98),
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    step_lr = torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adamw, T_max=10, eta_min=1e-5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(sgd, patience=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    gen = seeded(3)
    for step in range(4):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        for opt in (adamw, sgd):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)
        scaler.update()
        step_lr.step()
        cosine.step()
        plateau.step(1.0 / (step + 1))
    one_cycle_opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(one_cycle_opt, max_lr=0.5, total_steps=10)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(one_cycle_opt, lambda epoch: 0.9**epoch)
    for _ in range(3):
        one_cycle_opt.step()
        one_cycle.step()
        lambda_lr.step()
    states = {
        "adamw": adamw.state_dict(),
        "sgd": sgd.state_dict(),
        "schedulers": {
            "step": step_lr.state_dict(),
            "cosine": cosine.state_dict(),
            "plateau": plateau.state_dict(),
            "one_cycle": one_cycle.state_dict(),
            "lambda": lambda_lr.state_dict(),
        },
        "scaler": scaler.state_dict(),
    }
    return model, states


# --------------------------------------------------------------------------------------------
# Contents


def dtype_tensors(dtypes: Iterable[torch.dtype], seed: int = 10) -> dict[str, torch.Tensor]:
    out = {}
    for index, dtype in enumerate(dtypes):
        name = str(dtype).removeprefix("torch.")
        out[name] = random_tensor(dtype, (3, 5), seed + index)
    out["float32_special"] = torch.tensor(
        [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-45, 3.4e38]
    )
    return out


def edge_tensors() -> dict[str, Any]:
    return {
        "empty_1d": torch.empty(0),
        "empty_2d": torch.zeros(0, 3, dtype=torch.int64),
        "empty_3d": torch.ones(3, 0, 2, dtype=torch.float16),
        "empty_bool": torch.zeros(0, dtype=torch.bool),
        "scalar_f32": torch.tensor(2.5),
        "scalar_i64": torch.tensor(-7),
        "scalar_bool": torch.tensor(True),
        "scalar_bf16": torch.tensor(0.1, dtype=torch.bfloat16),
        "scalar_nan": torch.tensor(float("nan"), dtype=torch.float64),
        "scalar_complex": torch.tensor(1 - 2j, dtype=torch.complex64),
        "one": torch.ones(1),
        "large": torch.randn(1 << 16, generator=seeded(4)),
        "high_rank": torch.arange(64, dtype=torch.int16).reshape(2, 2, 2, 2, 2, 2),
    }


def view_tensors() -> dict[str, Any]:
    """Non-contiguous views and offsets, many of them into one storage."""
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    flat = base.view(-1)
    other = torch.randn(2, 3, 4, 5, generator=seeded(5))
    return {
        "base": base,
        "transposed": base.transpose(0, 2),
        "permuted": base.permute(2, 0, 1),
        "strided": base[:, ::2, 1:],
        "row": base[1],
        "column": base[:, :, 3],
        "narrow_offset": flat.narrow(0, 7, 11),
        "diagonal": base[0].diagonal(),
        "overlapping": flat.as_strided((5, 4), (2, 1), 3),
        "reversed_stride_view": base.flip(0).transpose(0, 1),  # a copy, then a view
        "expanded": torch.arange(4.0).unsqueeze(0).expand(3, 4),  # stride 0
        "channels_last": other.to(memory_format=torch.channels_last),
        "only_a_slice": torch.arange(100, dtype=torch.int32)[40:50:3],  # base not saved
    }


def shared_storage_tensors() -> dict[str, Any]:
    """Several tensors that are slices of one base, without the base; one repeated object."""
    qkv = torch.randn(3 * 8, 8, generator=seeded(6))
    query, key, value = qkv.chunk(3)
    pieces = list(torch.arange(40, dtype=torch.float64).split(10))
    same = torch.randn(4, generator=seeded(7))
    return {
        "query": query,
        "key": key,
        "value": value,
        "pieces": pieces,
        "halves": (pieces[0][:5], pieces[0][5:]),
        "same_object": [same, same, {"again": same}],
    }


def parameter_tensors() -> dict[str, Any]:
    model = small_cnn(2)
    leaf = torch.randn(3, generator=seeded(8)).requires_grad_(True)
    return {
        "trainable": nn.Parameter(torch.randn(3, 3, generator=seeded(9))),
        "frozen": nn.Parameter(torch.randn(2, generator=seeded(10)), requires_grad=False),
        "int_parameter": nn.Parameter(torch.arange(3), requires_grad=False),
        "leaf_requires_grad": leaf,
        "plain": torch.randn(2, generator=seeded(11)),
        "keep_vars": model.state_dict(keep_vars=True),
    }


def container_values() -> dict[str, Any]:
    nested: Any = {"leaf": torch.ones(2)}
    for depth in range(25):
        nested = {f"level{depth}": nested, "list": [depth, (depth,)]}
    ordered = collections.OrderedDict([("b", 1), ("a", torch.zeros(1)), ("c", [None])])
    return {
        "dict": {"x": 1, 2: "two", (3, 4): [5], None: 0.5, 1.5: True},
        "list": [1, 2.0, "three", [4, [5, [6]]], torch.arange(3)],
        "tuple": (1, (2, (3,)), ()),
        "empty": [[], {}, (), set(), ""],
        "ordered": ordered,
        "counter": collections.Counter("abracadabra"),
        "set": {1, 2, "three", (4, 5)},
        "frozenset": frozenset({"a", "b"}),
        "nested": nested,
        "shared_list": [ordered, ordered],  # the same object twice
    }


def scalar_values() -> dict[str, Any]:
    return {
        "namespace": argparse.Namespace(
            lr=3e-4, layers=[64, 64], name="run-7", amp=True, resume=None, betas=(0.9, 0.999)
        ),
        "size": torch.Size([2, 3, 4]),
        "empty_size": torch.Size([]),
        "dtypes": [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn],
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
        "bytes": b"\x00\xffbinary",
        "bytearray": bytearray(b"mutable"),
        "str": "ünïcödé ✓ \n\t",
        "nan": float("nan"),
        "inf": float("inf"),
        "negative_zero": -0.0,
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, 255, 2**31, -(2**63), 2**100],
    }


def numpy_values() -> dict[str, Any]:
    rng = np.random.default_rng(12)
    return {
        "f32_scalar": np.float32(1.5),
        "f64_nan": np.float64("nan"),
        "i64_scalar": np.int64(-3),
        "u8_scalar": np.uint8(200),
        "bool_scalar": np.bool_(True),
        "c128_scalar": np.complex128(1 + 2j),
        "f32_matrix": rng.standard_normal((3, 4)).astype(np.float32),
        "i64_vector": np.arange(10, dtype=np.int64),
        "bool_array": rng.random(6) > 0.5,
        "f16_array": np.linspace(0, 1, 5, dtype=np.float16),
        "complex_array": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "zero_dim": np.array(7.0),
        "dtype": np.dtype("float32"),
    }


def empty_bytes_values() -> dict[str, Any]:
    """Values whose pickle carries zero bytes of data (``bytes()`` under protocol 2)."""
    return {
        "bytes": b"",
        "bytearray": bytearray(),
        "empty_array": np.zeros((0, 3), dtype=np.int32),
        "nested": [b"", (b"",)],
    }


def numpy_text_values() -> dict[str, Any]:
    """numpy arrays of text: unicode and byte strings (labels, vocabularies, class names)."""
    return {
        "unicode": np.array(["a", "bc", "déf"]),
        "bytes": np.array([b"x", b"yz"]),
        "scalar": np.str_("label"),
    }


def numpy_big_endian_values() -> dict[str, Any]:
    """Non-native byte order: numpy's own unpickling gives native arrays back."""
    return {"array": np.arange(4, dtype=">i4"), "scalar": np.array(1.5, dtype=">f8")[()]}


def training_checkpoint() -> dict[str, Any]:
    """A hand-rolled ``trainer.save_checkpoint``: model, optimizer, RNG states, args."""
    model, states = trained_optimizers()
    random.seed(1)
    np.random.seed(1)
    return {
        "epoch": 3,
        "global_step": 42,
        "model": model.state_dict(),
        "optimizer": states["adamw"],
        "scheduler": states["schedulers"]["cosine"],
        "scaler": states["scaler"],
        "args": argparse.Namespace(lr=1e-3, epochs=10, data="/data/imagenet", seed=1),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
        "best_metric": float("nan"),
        "history": [{"loss": np.float32(0.5), "acc": 0.25}, {"loss": np.float32(0.4)}],
    }


# --------------------------------------------------------------------------------------------
# Writing: one declarative table, so that tests can parametrize over names before any file
# exists.


def _save_plain(obj: Any, path: Path, spec: Spec) -> None:
    kwargs: dict[str, Any] = {"_use_new_zipfile_serialization": not spec.legacy}
    if spec.protocol is not None:
        kwargs["pickle_protocol"] = spec.protocol
    torch.save(obj, path, **kwargs)


def _save_no_byteorder(obj: Any, path: Path, spec: Spec) -> None:
    torch.save(obj, path, _disable_byteorder_record=True)


def _save_without_crc32(obj: Any, path: Path, spec: Spec) -> None:
    """``torch.serialization.set_crc32_options(False)``: every zip entry's CRC-32 field is 0."""
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.set_crc32_options(True)


def _save_via_buffer(obj: Any, path: Path, spec: Spec) -> None:
    """Saved to a file object: the zip's top-level folder is ``archive``, not the file stem."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())


Writer = Callable[[Any, Path, "Spec"], None]


@dataclass(frozen=True)
class Spec:
    """How one torch-only fixture file is made."""

    name: str
    make: Callable[[], Any] = field(repr=False)
    suffix: str = ".pt"
    legacy: bool = False
    protocol: int | None = None
    tags: frozenset[str] = frozenset()
    write: Writer = _save_plain
    filename: str | None = None  # default: name + suffix

    def build(self, directory: Path) -> Benign:
        path = directory / (self.filename or f"{self.name}{self.suffix}")
        self.write(self.make(), path, self)
        return Benign(self.name, path, torch_reference(path), legacy=self.legacy, tags=self.tags)


@functools.cache
def _cnn() -> SmallCNN:
    return small_cnn(0)


@functools.cache
def _lm() -> TinyTransformer:
    return tiny_transformer(0)


@functools.cache
def _trained() -> tuple[SmallCNN, dict[str, Any]]:
    return trained_optimizers()


def _cnn_state() -> Any:
    return _cnn().state_dict()


def _lm_state() -> Any:
    return _lm().state_dict()


def _tags(*names: str) -> frozenset[str]:
    return frozenset(names)


SD_CNN = _tags("state_dict", "cnn")
SD_LM = _tags("state_dict", "lm", "tied")


def _dtypes_zip() -> dict[str, torch.Tensor]:
    return {**dtype_tensors(CLASSIC_DTYPES), **dtype_tensors(FLOAT8_DTYPES, seed=40)}


def _bare() -> torch.Tensor:
    return torch.randn(4, 4, generator=seeded(13))


def _tensor_list() -> list[torch.Tensor]:
    return [torch.ones(2), torch.zeros(3, dtype=torch.int8)]


TORCH_SPECS: tuple[Spec, ...] = (
    # State dicts, in both container formats and every pickle protocol.
    Spec("cnn_state_dict", _cnn_state, tags=SD_CNN),
    Spec("cnn_state_dict_legacy", _cnn_state, suffix=".pth", legacy=True, tags=SD_CNN),
    Spec("cnn_state_dict_p4", _cnn_state, suffix=".bin", protocol=4, tags=SD_CNN),
    Spec("cnn_state_dict_p5", _cnn_state, protocol=5, tags=SD_CNN),
    Spec("lm_state_dict", _lm_state, suffix=".bin", tags=SD_LM),
    Spec("lm_state_dict_p5", _lm_state, suffix=".pth", protocol=5, tags=SD_LM),
    Spec("lm_state_dict_legacy_p2", _lm_state, legacy=True, protocol=2, tags=SD_LM),
    Spec("lm_state_dict_legacy_p4", _lm_state, suffix=".pth", legacy=True, protocol=4, tags=SD_LM),
    Spec("lm_state_dict_legacy_p5", _lm_state, legacy=True, protocol=5, tags=SD_LM),
    Spec("cnn_no_byteorder", _cnn_state, tags=SD_CNN, write=_save_no_byteorder),
    Spec("cnn_no_crc32", _cnn_state, tags=SD_CNN, write=_save_without_crc32),
    Spec("cnn_via_buffer", _cnn_state, tags=SD_CNN, write=_save_via_buffer),
    Spec("cnn_unicode_name", _cnn_state, tags=SD_CNN, filename="state dict ü ✓.pt"),
    Spec(
        "cnn_wrapped_ckpt", lambda: {"state_dict": _cnn_state()}, suffix=".ckpt", tags=_tags("cnn")
    ),
    Spec("trained_cnn", lambda: _trained()[0].state_dict(), tags=SD_CNN),
    # Tensors: dtypes, shapes, views, sharing, Parameters.
    Spec("dtypes", _dtypes_zip, tags=_tags("dtypes")),
    Spec("dtypes_p4", _dtypes_zip, protocol=4, tags=_tags("dtypes")),
    Spec("dtypes_legacy", lambda: dtype_tensors(CLASSIC_DTYPES), legacy=True, tags=_tags("dtypes")),
    Spec("dtypes_extra", lambda: dtype_tensors(EXTRA_DTYPES, seed=60), tags=_tags("dtypes")),
    Spec("edge_tensors", edge_tensors, tags=_tags("edge")),
    Spec("edge_tensors_legacy", edge_tensors, suffix=".pth", legacy=True, tags=_tags("edge")),
    Spec("views", view_tensors, tags=_tags("views", "shared")),
    Spec("views_legacy", view_tensors, legacy=True, tags=_tags("views", "shared")),
    Spec("views_p5", view_tensors, suffix=".bin", protocol=5, tags=_tags("views", "shared")),
    Spec("shared_storage", shared_storage_tensors, tags=_tags("shared")),
    Spec("shared_storage_legacy", shared_storage_tensors, legacy=True, tags=_tags("shared")),
    Spec("bare_tensor", _bare, tags=_tags("tensor")),
    Spec("bare_tensor_legacy", _bare, legacy=True, tags=_tags("tensor")),
    Spec("tensor_list", _tensor_list, suffix=".bin", tags=_tags("tensor")),
    Spec("parameters", parameter_tensors, tags=_tags("parameters")),
    Spec("parameters_legacy", parameter_tensors, legacy=True, tags=_tags("parameters")),
    # Training state.
    Spec("adamw_state", lambda: _trained()[1]["adamw"], tags=_tags("optimizer")),
    Spec(
        "adamw_state_legacy", lambda: _trained()[1]["adamw"], legacy=True, tags=_tags("optimizer")
    ),
    Spec(
        "sgd_momentum_state", lambda: _trained()[1]["sgd"], suffix=".pth", tags=_tags("optimizer")
    ),
    Spec("lr_schedulers", lambda: _trained()[1]["schedulers"], tags=_tags("scheduler")),
    Spec("grad_scaler", lambda: _trained()[1]["scaler"], tags=_tags("scaler")),
    Spec("training_checkpoint", training_checkpoint, suffix=".ckpt", tags=_tags("training")),
    Spec(
        "training_checkpoint_p5",
        training_checkpoint,
        suffix=".pth",
        protocol=5,
        tags=_tags("training"),
    ),
    Spec(
        "training_checkpoint_legacy",
        training_checkpoint,
        suffix=".ckpt",
        legacy=True,
        tags=_tags("training"),
    ),
    # Plain Python, numpy and torch values.
    Spec("containers", container_values, tags=_tags("containers")),
    Spec("containers_p5", container_values, protocol=5, tags=_tags("containers")),
    Spec(
        "containers_legacy_p2", container_values, legacy=True, protocol=2, tags=_tags("containers")
    ),
    Spec("scalars", scalar_values, tags=_tags("scalars")),
    Spec("scalars_p5", scalar_values, suffix=".bin", protocol=5, tags=_tags("scalars")),
    Spec("scalars_legacy", scalar_values, legacy=True, tags=_tags("scalars")),
    Spec("numpy_values", numpy_values, tags=_tags("numpy")),
    Spec("numpy_values_p5", numpy_values, protocol=5, tags=_tags("numpy")),
    Spec("numpy_values_legacy", numpy_values, legacy=True, tags=_tags("numpy")),
    Spec("numpy_text", numpy_text_values, tags=_tags("numpy")),
    Spec("numpy_big_endian", numpy_big_endian_values, tags=_tags("numpy")),
    Spec("empty_bytes", empty_bytes_values, tags=_tags("containers")),
    Spec("empty_bytes_p4", empty_bytes_values, protocol=4, tags=_tags("containers")),
)
TORCH_FILE_NAMES: tuple[str, ...] = tuple(spec.name for spec in TORCH_SPECS)


def build_torch_files(directory: Path) -> list[Benign]:
    """Write every :data:`TORCH_SPECS` file into ``directory``; needs only torch and numpy."""
    directory.mkdir(parents=True, exist_ok=True)
    if len(set(TORCH_FILE_NAMES)) != len(TORCH_FILE_NAMES):
        raise AssertionError("duplicate fixture names")
    return [spec.build(directory) for spec in TORCH_SPECS]


def build_whole_model(directory: Path) -> tuple[Path, SalvageNet]:
    """``torch.save(model)`` of a :class:`SalvageNet`: not benign for a restricted reader."""
    directory.mkdir(parents=True, exist_ok=True)
    model = salvage_net(5)
    path = directory / "whole_model.pt"
    torch.save(model, path)
    return path, model


# --------------------------------------------------------------------------------------------
# Lightning


LIGHTNING_NAMES = ("lightning_topk", "lightning_last")
HF_FOLDER_NAMES = (
    "hf_bert_safetensors",
    "hf_gpt2_safetensors",
    "hf_gpt2_safetensors_sharded",
    "hf_gpt2_bin",
    "hf_bert_bin_sharded",
)


@dataclass(frozen=True)
class LightningRun:
    """A real ``Trainer.fit`` and the checkpoints its ModelCheckpoint callback wrote."""

    module: nn.Module  # the LightningModule, after fitting
    checkpoint: Path  # the top-k checkpoint
    last: Path  # last.ckpt
    prefix: str  # the attribute the LightningModule keeps its network in, with a dot

    def network(self) -> nn.Module:
        """A fresh, untrained copy of the network inside the LightningModule."""
        return _lightning_network()

    def entries(self) -> list[Benign]:
        return [
            Benign(
                "lightning_topk",
                self.checkpoint,
                torch_reference(self.checkpoint),
                tags=frozenset({"lightning"}),
            ),
            Benign(
                "lightning_last",
                self.last,
                torch_reference(self.last),
                tags=frozenset({"lightning"}),
            ),
        ]


def _lightning_network() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def build_lightning_checkpoint(directory: Path) -> LightningRun:
    """Fit a tiny LightningModule for 2 steps on the CPU and return its checkpoints."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class TinyRegressor(L.LightningModule):
        def __init__(
            self,
            hidden: int = 8,
            lr: float = 0.01,
            name: str = "tiny",
            betas: tuple[float, float] = (0.9, 0.99),
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = _lightning_network()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)  # type: ignore[no-any-return]

        def training_step(
            self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
        ) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(
                self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas
            )
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

    directory.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    gen = seeded(20)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    checkpoints = directory / "checkpoints"
    callback = ModelCheckpoint(
        dirpath=checkpoints,
        filename="tiny-{step}",
        monitor="train_loss",
        save_last=True,
        save_top_k=1,
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[callback],
        default_root_dir=directory,
        log_every_n_steps=1,
    )
    module = TinyRegressor()
    with warnings.catch_warnings():
        # Lightning 2.6 still asks torch 2.13's pytree the old way; harmless here.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
        trainer.fit(module, loader)
    topk = Path(callback.best_model_path)
    last = checkpoints / "last.ckpt"
    if not topk.is_file() or not last.is_file():
        raise RuntimeError(f"Lightning wrote no checkpoint: {sorted(checkpoints.iterdir())}")
    return LightningRun(module=module, checkpoint=topk, last=last, prefix="model.")


# --------------------------------------------------------------------------------------------
# Hugging Face transformers


@dataclass(frozen=True)
class HFFolder:
    """A ``save_pretrained``-style folder, the model that wrote it, and its tensors."""

    name: str
    path: Path
    model: nn.Module
    layout: str  # "safetensors", "safetensors-sharded", "bin", "bin-sharded"

    def reference(self) -> dict[str, torch.Tensor]:
        """The tensors the folder's weight files hold, merged, as the owning libraries read them."""
        return read_hf_folder(self.path)

    def benign(self) -> Benign:
        return Benign(self.name, self.path, self.reference, tags=frozenset({"hf", self.layout}))

    def fresh_model(self) -> nn.Module:
        """A model of the same class and config, with other random weights."""
        torch.manual_seed(1234)
        return type(self.model)(self.model.config)  # type: ignore[operator]


@dataclass(frozen=True)
class HFCorpus:
    folders: tuple[HFFolder, ...]
    gpt2: nn.Module  # tied lm_head <-> wte
    bert: nn.Module

    def entries(self) -> list[Benign]:
        out = [folder.benign() for folder in self.folders]
        out.extend(  # the .bin files inside are torch.save files too
            Benign(
                f"{folder.name}/{path.name}",
                path,
                torch_reference(path),
                tags=frozenset({"hf-bin"}),
            )
            for folder in self.folders
            for path in sorted(folder.path.glob("*.bin"))
        )
        return out

    def folder(self, name: str) -> HFFolder:
        (found,) = (folder for folder in self.folders if folder.name == name)
        return found


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=1000,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def read_hf_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Merge a folder's weight files the way transformers finds them (index first)."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            return load_file(path)
        return dict(torch.load(path, map_location="cpu", weights_only=True))

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            merged: dict[str, torch.Tensor] = {}
            for name in files:
                merged.update(load(folder / name))
            return merged
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return load(folder / name)
    raise FileNotFoundError(f"no weights in {folder}")


def _shards(state: dict[str, torch.Tensor], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor
        size += nbytes
    if shard:
        yield shard


def save_bin_folder(model: nn.Module, folder: Path, *, max_shard_bytes: int | None = None) -> None:
    """Write a ``pytorch_model.bin`` folder as transformers 4.x did (this version writes none).

    With ``max_shard_bytes``, split into ``pytorch_model-0000k-of-0000n.bin`` shards plus a
    ``pytorch_model.bin.index.json`` that maps every key to its shard.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)  # type: ignore[union-attr,operator]
    state = model.state_dict()
    if max_shard_bytes is None:
        torch.save(state, folder / "pytorch_model.bin")
        return
    shards = list(_shards(dict(state), max_shard_bytes))
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def build_hf_folders(directory: Path) -> HFCorpus:
    """Write save_pretrained layouts of a tiny GPT-2 (tied embeddings) and a tiny BERT."""
    directory.mkdir(parents=True, exist_ok=True)
    gpt2 = tiny_gpt2(0)
    bert = tiny_bert(0)
    folders = []

    single = directory / "bert-safetensors"
    bert.save_pretrained(single)
    folders.append(HFFolder("hf_bert_safetensors", single, bert, "safetensors"))

    single_tied = directory / "gpt2-safetensors"
    gpt2.save_pretrained(single_tied)  # lm_head.weight is tied to wte: saved once
    folders.append(HFFolder("hf_gpt2_safetensors", single_tied, gpt2, "safetensors"))

    # Three shards; the last one's header is 0x180 bytes long, so the file starts with
    # b"\x80\x01", which is also how a protocol-1+ pickle starts: a reader that sniffs
    # "pickle" from the first byte before trying safetensors misreads it.
    sharded = directory / "gpt2-safetensors-sharded"
    gpt2.save_pretrained(sharded, max_shard_size="100KB")
    folders.append(HFFolder("hf_gpt2_safetensors_sharded", sharded, gpt2, "safetensors-sharded"))

    bin_folder = directory / "gpt2-bin"
    save_bin_folder(gpt2, bin_folder)
    folders.append(HFFolder("hf_gpt2_bin", bin_folder, gpt2, "bin"))

    bin_sharded = directory / "bert-bin-sharded"
    save_bin_folder(bert, bin_sharded, max_shard_bytes=100_000)
    folders.append(HFFolder("hf_bert_bin_sharded", bin_sharded, bert, "bin-sharded"))

    for folder in folders:
        _check_layout(folder)
    return HFCorpus(tuple(folders), gpt2, bert)


def _check_layout(folder: HFFolder) -> None:
    names = {p.name for p in folder.path.iterdir()}
    expected = {
        "safetensors": lambda: "model.safetensors" in names,
        "safetensors-sharded": lambda: (
            "model.safetensors.index.json" in names
            and sum(n.endswith(".safetensors") for n in names) >= 2
        ),
        "bin": lambda: "pytorch_model.bin" in names,
        "bin-sharded": lambda: (
            "pytorch_model.bin.index.json" in names and sum(n.endswith(".bin") for n in names) >= 2
        ),
    }[folder.layout]()
    if not expected or "config.json" not in names:
        raise RuntimeError(f"{folder.path} is not a {folder.layout} folder: {sorted(names)}")
