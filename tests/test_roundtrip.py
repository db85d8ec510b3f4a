"""save -> load gives back exactly what was saved: types, values, dtypes and sharing."""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import torchvault as tv
from torchvault import _dtypes

STORABLE = list(_dtypes.STORABLE.values())
GRAD_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
NUMPY_DTYPES = [
    np.dtype(name).newbyteorder(order)
    for name in (
        "bool",
        "u1",
        "i1",
        "u2",
        "i2",
        "u4",
        "i4",
        "u8",
        "i8",
        "f2",
        "f4",
        "f8",
        "c8",
        "c16",
    )
    for order in "<>"
]
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------- helpers


def round_trip(obj: object, path: Path) -> Any:
    tv.save(obj, path)
    return tv.load(path)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The exact bytes of a tensor's elements in logical order (nan- and -0.0-exact)."""
    flat = tensor.detach().clone(memory_format=torch.contiguous_format).reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def filled(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """A tensor of ``shape`` whose bytes follow a fixed pattern (valid 0/1 for bool)."""
    count = math.prod(shape) * dtype.itemsize
    pattern = (torch.arange(count, dtype=torch.int64) * 37 + 11) % 251
    raw = (pattern % 2 if dtype == torch.bool else pattern).to(torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def assert_same(actual: object, expected: object, where: str = "") -> None:
    """``actual`` equals ``expected`` exactly: same types all the way down, bit-exact data."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys differ"  # type: ignore[call-overload]
        for key, value in expected.items():
            assert_same(actual[key], value, f"{where}.{key!r}")  # type: ignore[index]
    elif isinstance(expected, list | tuple) and not isinstance(expected, torch.Size):
        assert len(actual) == len(expected), f"{where}: lengths differ"  # type: ignore[arg-type]
        for i, (a, b) in enumerate(zip(actual, expected, strict=True)):  # type: ignore[call-overload]
            assert_same(a, b, f"{where}.{i}")
    elif isinstance(expected, torch.Tensor):
        _assert_same_tensor(actual, expected, where)  # type: ignore[arg-type]
    elif isinstance(expected, np.ndarray | np.generic):
        assert actual.dtype.str == expected.dtype.str, where  # type: ignore[union-attr]
        assert actual.shape == expected.shape, where  # type: ignore[union-attr]
        assert actual.tobytes() == expected.tobytes(), where  # type: ignore[union-attr]
    elif isinstance(expected, float):
        assert same_float(actual, expected), f"{where}: {actual!r} != {expected!r}"  # type: ignore[arg-type]
    elif isinstance(expected, complex):
        assert same_float(actual.real, expected.real), where  # type: ignore[attr-defined]
        assert same_float(actual.imag, expected.imag), where  # type: ignore[attr-defined]
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _assert_same_tensor(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    assert actual.dtype == expected.dtype, where
    assert actual.shape == expected.shape, where
    assert actual.device == expected.device, where
    assert actual.requires_grad == expected.requires_grad, where
    assert raw_bytes(actual) == raw_bytes(expected), f"{where}: values differ"


def tensors_in(obj: object) -> list[torch.Tensor]:
    """Every tensor of a nested value, in a fixed order."""
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in tensors_in(value)]
    if isinstance(obj, list | tuple) and not isinstance(obj, torch.Size):
        return [t for value in obj for t in tensors_in(value)]
    return [obj] if isinstance(obj, torch.Tensor) else []


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() > 0 and b.numel() > 0 and storage(a) == storage(b)


# ----------------------------------------------------------------------------- strategies


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(STORABLE))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    count = math.prod(shape) * dtype.itemsize
    data = draw(st.binary(min_size=count, max_size=count))
    raw = torch.tensor(list(data), dtype=torch.uint8)
    tensor = (raw % 2 if dtype == torch.bool else raw).view(dtype).reshape(shape)
    if len(shape) >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)
    elif len(shape) >= 1 and draw(st.booleans()):
        tensor = tensor[::2]
    if dtype in GRAD_DTYPES and draw(st.booleans()):
        tensor = tensor.clone().requires_grad_(True)
    if draw(st.booleans()):
        grad = tensor.requires_grad
        tensor = torch.nn.Parameter(tensor.detach(), requires_grad=grad)
    return tensor


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    array = draw(hnp.arrays(dtype, shape))
    return array.T if draw(st.booleans()) else array


def numpy_scalars() -> st.SearchStrategy[np.generic]:
    native = [dtype.newbyteorder("=") for dtype in NUMPY_DTYPES]
    return st.sampled_from(native).flatmap(
        lambda dtype: hnp.from_dtype(dtype).map(lambda v: np.array(v, dtype=dtype)[()])
    )


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(),
    st.complex_numbers(),
    st.text(),
    st.binary(),
    st.binary().map(bytearray),
    st.sampled_from(list(_dtypes.DTYPES.values())),
    st.sampled_from(["cpu", "cuda", "cuda:1", "meta", "mps"]).map(torch.device),
    st.lists(st.integers(0, 2**40), max_size=4).map(torch.Size),
)
LEAVES = st.one_of(SCALARS, tensors(), numpy_arrays(), numpy_scalars())
KEYS = st.one_of(
    st.text(),
    st.integers(),
    st.tuples(st.text(max_size=3), st.integers()),
)
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(), children, max_size=4),
        st.dictionaries(KEYS, children, max_size=4),
        st.dictionaries(KEYS, children, max_size=4).map(lambda d: OrderedDict(d.items())),
    ),
    max_leaves=12,
)


@st.composite
def shared_views(draw: st.DrawFn) -> list[torch.Tensor]:
    """Tensors cut from one buffer (some the same object twice), in random order."""
    base = filled(draw(st.sampled_from(STORABLE)), draw(st.integers(1, 12)))
    members = [base] if draw(st.booleans()) else []
    if draw(st.booleans()):
        members.append(base.view(torch.uint8))
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, base.numel() - 1))
        stop = draw(st.integers(start + 1, base.numel()))
        members.append(base[start : stop : draw(st.integers(1, 3))])
    if len(members) >= 2 and draw(st.booleans()):
        members.append(members[0])
    return draw(st.permutations(members))


# ----------------------------------------------------------------------------- properties


@PROPERTY
@given(value=VALUES)
def test_any_nested_value_round_trips_exactly(
    value: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "any-value.tv"
    assert_same(round_trip(value, path), value)


@PROPERTY
@given(groups=st.lists(shared_views(), min_size=1, max_size=3))
def test_views_of_one_buffer_come_back_sharing_storage(
    groups: list[list[torch.Tensor]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "shared.tv"
    loaded = round_trip({"groups": groups}, path)
    assert_same(loaded, {"groups": groups})
    before, after = tensors_in(groups), tensors_in(loaded)
    for i, a in enumerate(before):
        for j, b in enumerate(before):
            assert (after[i] is after[j]) == (a is b)
            if shares_storage(a, b):
                assert shares_storage(after[i], after[j])


# ----------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize("dtype", STORABLE, ids=str)
def test_every_storable_dtype_round_trips_bit_exactly(dtype: torch.dtype, tmp_path: Path) -> None:
    tensor = filled(dtype, 3, 4)
    assert_same(round_trip({"t": tensor}, tmp_path / "t.tv")["t"], tensor)


@pytest.mark.parametrize("dtype", STORABLE, ids=str)
def test_zero_dimensional_tensor_round_trips(dtype: torch.dtype, tmp_path: Path) -> None:
    tensor = filled(dtype)
    assert_same(round_trip({"t": tensor}, tmp_path / "t.tv")["t"], tensor)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128, torch.bool], ids=str)
def test_empty_tensor_keeps_its_shape(
    dtype: torch.dtype, shape: tuple[int, ...], tmp_path: Path
) -> None:
    tensor = torch.empty(shape, dtype=dtype)
    assert_same(round_trip({"t": tensor}, tmp_path / "t.tv")["t"], tensor)


@pytest.mark.parametrize(
    "make", [lambda: torch.randn(1, 4)[:, 1], lambda: torch.randn(4)[1:2:2]], ids=["column", "step"]
)
def test_single_element_view_with_non_unit_stride_round_trips(make: Any, tmp_path: Path) -> None:
    tensor = make()
    assert_same(round_trip({"t": tensor}, tmp_path / "t.tv")["t"], tensor)


def test_empty_tensor_with_zero_stride_round_trips(tmp_path: Path) -> None:
    tensor = torch.empty_strided((0,), (0,), dtype=torch.float64)
    assert_same(round_trip({"t": tensor}, tmp_path / "t.tv")["t"], tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex128], ids=str)
def test_non_contiguous_tensor_round_trips_with_its_values(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    tensor = filled(dtype, 4, 6).t()[::2]
    loaded = round_trip({"t": tensor}, tmp_path / "t.tv")["t"]
    assert_same(loaded, tensor)


def test_bare_tensor_round_trips(tmp_path: Path) -> None:
    tensor = torch.randn(3, 2)
    assert_same(round_trip(tensor, tmp_path / "t.tv"), tensor)


def test_tensor_nan_inf_and_negative_zero_round_trip_bit_exactly(tmp_path: Path) -> None:
    tensor = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45])
    loaded = round_trip({"t": tensor}, tmp_path / "t.tv")["t"]
    assert torch.equal(loaded.view(torch.int32), tensor.view(torch.int32))


# ----------------------------------------------------------------------------- parameters and grads


def test_parameter_comes_back_as_parameter_requiring_grad(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(2, 3))
    loaded = round_trip({"p": param}, tmp_path / "p.tv")["p"]
    assert type(loaded) is torch.nn.Parameter
    assert loaded.requires_grad
    assert torch.equal(loaded, param)


def test_frozen_parameter_keeps_requires_grad_false(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(2, 3), requires_grad=False)
    loaded = round_trip({"p": param}, tmp_path / "p.tv")["p"]
    assert type(loaded) is torch.nn.Parameter
    assert not loaded.requires_grad


def test_tensor_requiring_grad_comes_back_as_a_leaf_requiring_grad(tmp_path: Path) -> None:
    tensor = torch.randn(4, requires_grad=True)
    loaded = round_trip({"t": tensor}, tmp_path / "t.tv")["t"]
    assert type(loaded) is torch.Tensor
    assert loaded.requires_grad
    assert loaded.is_leaf


def test_plain_tensor_does_not_require_grad(tmp_path: Path) -> None:
    loaded = round_trip({"t": torch.randn(4)}, tmp_path / "t.tv")["t"]
    assert type(loaded) is torch.Tensor
    assert not loaded.requires_grad


# ----------------------------------------------------------------------------- sharing and identity


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_come_back_sharing_storage(tmp_path: Path) -> None:
    loaded = round_trip(TiedLM(), tmp_path / "tied.tv")
    embed, head = loaded["embed.weight"], loaded["head.weight"]
    assert shares_storage(embed, head)
    embed[0, 0] = 123.0
    assert head[0, 0] == 123.0


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    path = tmp_path / "tied.tv"
    tv.save(TiedLM(), path)
    with safe_open(path, "pt") as f:
        assert len(list(f.keys())) == 1


def test_views_covered_by_their_base_share_its_storage(tmp_path: Path) -> None:
    buf = torch.arange(12.0)
    saved = {"buf": buf, "head": buf[:4], "rows": buf.view(3, 4)[1:], "col": buf.view(3, 4)[:, 1]}
    loaded = round_trip(saved, tmp_path / "views.tv")
    assert_same(loaded, saved)
    loaded["buf"][5] = -1.0
    assert loaded["rows"][0, 1] == -1.0
    assert loaded["col"][1] == -1.0


def test_overlapping_views_without_their_base_keep_overlapping(tmp_path: Path) -> None:
    buf = torch.arange(12.0)
    saved = {"a": buf[1:5], "b": buf[3:9], "t": buf.view(3, 4).t()}
    loaded = round_trip(saved, tmp_path / "views.tv")
    assert_same(loaded, saved)
    loaded["a"][2] = -1.0
    assert loaded["b"][0] == -1.0
    assert loaded["t"][3, 0] == -1.0


def test_views_of_different_dtypes_share_storage(tmp_path: Path) -> None:
    buf = torch.arange(8, dtype=torch.float32)
    saved = {"f": buf, "bits": buf.view(torch.int32)[2:], "bytes": buf.view(torch.uint8)}
    loaded = round_trip(saved, tmp_path / "views.tv")
    assert_same(loaded, saved)
    assert shares_storage(loaded["f"], loaded["bits"])
    assert shares_storage(loaded["f"], loaded["bytes"])


def test_same_tensor_object_twice_comes_back_as_one_object(tmp_path: Path) -> None:
    tensor = torch.randn(3)
    loaded = round_trip({"x": tensor, "y": tensor, "list": [tensor]}, tmp_path / "same.tv")
    assert loaded["x"] is loaded["y"]
    assert loaded["x"] is loaded["list"][0]


def test_same_parameter_twice_comes_back_as_one_parameter(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(3))
    loaded = round_trip([param, param], tmp_path / "same.tv")
    assert loaded[0] is loaded[1]
    assert type(loaded[0]) is torch.nn.Parameter


def test_distinct_equal_tensors_stay_distinct(tmp_path: Path) -> None:
    loaded = round_trip({"x": torch.zeros(3), "y": torch.zeros(3)}, tmp_path / "two.tv")
    assert loaded["x"] is not loaded["y"]
    assert not shares_storage(loaded["x"], loaded["y"])


def test_tensors_whose_dotted_paths_collide_both_round_trip(tmp_path: Path) -> None:
    saved = {"a.b": torch.zeros(2), "a": {"b": torch.ones(3)}}
    assert_same(round_trip(saved, tmp_path / "collide.tv"), saved)


# ----------------------------------------------------------------------------- numpy


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: d.str)
def test_numpy_array_keeps_dtype_and_byte_order(dtype: np.dtype[Any], tmp_path: Path) -> None:
    array = np.arange(6).reshape(2, 3).astype(dtype)
    loaded = round_trip({"a": array}, tmp_path / "a.tv")["a"]
    assert type(loaded) is np.ndarray
    assert loaded.dtype.str == dtype.str
    np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize("dtype", ["<f8", ">i4", "|b1"])
def test_zero_dimensional_numpy_array_keeps_no_dimensions(dtype: str, tmp_path: Path) -> None:
    array = np.array(1, dtype=dtype)
    assert_same(round_trip({"a": array}, tmp_path / "a.tv")["a"], array)


@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)])
def test_empty_numpy_array_round_trips(shape: tuple[int, ...], tmp_path: Path) -> None:
    array = np.zeros(shape, dtype=np.float64)
    assert_same(round_trip({"a": array}, tmp_path / "a.tv")["a"], array)


def test_non_contiguous_numpy_array_round_trips(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.float64).reshape(4, 6).T[::2]
    assert_same(round_trip({"a": array}, tmp_path / "a.tv")["a"], array)


def test_read_only_numpy_array_round_trips(tmp_path: Path) -> None:
    array = np.arange(5, dtype=np.int32)
    array.setflags(write=False)
    assert_same(round_trip({"a": array}, tmp_path / "a.tv")["a"], array)


@pytest.mark.parametrize(
    "scalar",
    [
        np.float16(1.5),
        np.float32(math.nan),
        np.float64(-0.0),
        np.int8(-3),
        np.uint16(65535),
        np.int64(-(2**63)),
        np.uint64(2**64 - 1),
        np.bool_(True),
        np.complex64(1 - 2j),
        np.complex128(complex(-0.0, math.inf)),
    ],
    ids=repr,
)
def test_numpy_scalar_keeps_its_type_and_value(scalar: np.generic, tmp_path: Path) -> None:
    assert_same(round_trip({"s": scalar}, tmp_path / "s.tv")["s"], scalar)


# ----------------------------------------------------------------------------- python values


@pytest.mark.parametrize(
    "number",
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**100, -(10**100)],
)
def test_int_of_any_size_round_trips(number: int, tmp_path: Path) -> None:
    assert_same(round_trip({"n": number}, tmp_path / "n.tv")["n"], number)


@pytest.mark.parametrize(
    "number", [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, 0.1]
)
def test_special_floats_round_trip_with_their_sign(number: float, tmp_path: Path) -> None:
    assert_same(round_trip({"x": number}, tmp_path / "x.tv")["x"], number)


def test_complex_with_nan_and_negative_zero_round_trips(tmp_path: Path) -> None:
    number = complex(-0.0, math.nan)
    assert_same(round_trip([number], tmp_path / "c.tv")[0], number)


def test_ordered_dict_stays_ordered_dict_in_order(tmp_path: Path) -> None:
    saved = OrderedDict([("b", 1), ("a", 2), ("c", OrderedDict([(3, "x"), (1, "y")]))])
    assert_same(round_trip(saved, tmp_path / "o.tv"), saved)


def test_dict_with_int_and_tuple_keys_keeps_keys_and_order(tmp_path: Path) -> None:
    saved = {3: "three", ("layer", 1): [1.0], "name": None, -(2**70): b"big", (): ()}
    assert_same(round_trip(saved, tmp_path / "k.tv"), saved)


def test_lists_and_tuples_keep_their_types(tmp_path: Path) -> None:
    saved = [(1, [2, (3,)]), [], ()]
    assert_same(round_trip(saved, tmp_path / "l.tv"), saved)


def test_bytes_and_bytearray_keep_their_types(tmp_path: Path) -> None:
    saved = {"b": b"\x00\xff", "ba": bytearray(b"\x01\x02"), "empty": b""}
    assert_same(round_trip(saved, tmp_path / "b.tv"), saved)


@pytest.mark.parametrize("dtype", list(_dtypes.DTYPES.values()), ids=str)
def test_torch_dtype_value_round_trips(dtype: torch.dtype, tmp_path: Path) -> None:
    assert round_trip({"d": dtype}, tmp_path / "d.tv")["d"] is dtype


def test_devices_and_sizes_round_trip(tmp_path: Path) -> None:
    saved = [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta"), torch.Size([2, 0])]
    assert_same(round_trip(saved, tmp_path / "d.tv"), saved)


def test_empty_containers_round_trip(tmp_path: Path) -> None:
    saved: dict[str, object] = {"d": {}, "l": [], "t": (), "o": OrderedDict()}
    assert_same(round_trip(saved, tmp_path / "e.tv"), saved)


def test_python_random_state_round_trips_and_restores(tmp_path: Path) -> None:
    rng = random.Random(1234)
    state = rng.getstate()
    loaded = round_trip(state, tmp_path / "rng.tv")
    assert loaded == state
    expected = rng.random()
    rng.setstate(loaded)
    assert rng.random() == expected


def test_torch_and_numpy_rng_states_round_trip(tmp_path: Path) -> None:
    saved = {"torch": torch.get_rng_state(), "numpy": np.random.RandomState(7).get_state()}
    assert_same(round_trip(saved, tmp_path / "rng.tv"), saved)


# ----------------------------------------------------------------------------- modules and optimizers


def adamw_after_one_step() -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_adamw_state_dict_round_trips_exactly(tmp_path: Path) -> None:
    _, optimizer = adamw_after_one_step()
    state = optimizer.state_dict()
    assert_same(round_trip(state, tmp_path / "opt.tv"), state)


def test_loaded_adamw_state_resumes_identically(tmp_path: Path) -> None:
    model, optimizer = adamw_after_one_step()
    loaded = round_trip(optimizer.state_dict(), tmp_path / "opt.tv")
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_optimizer.load_state_dict(loaded)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        net(torch.ones(5, 4)).sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_saving_a_module_saves_its_state_dict(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(6, 3))
    loaded = round_trip(model, tmp_path / "model.tv")
    assert_same(loaded, model.state_dict())


def test_saved_module_state_loads_back_into_a_fresh_module(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 4)
    fresh = torch.nn.Linear(3, 4)
    fresh.load_state_dict(round_trip(model, tmp_path / "model.tv"))
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh.bias, model.bias)
