"""The torch.export program archive, checked before torch sees any of it.

``torch.export.load`` can run code from an archive: pickled example inputs and constants
(``torch.load(weights_only=False)``, ``pickle.loads``), shape expressions handed to sympy's
``eval``, guard code it ``exec``s, and names pasted into generated code. Here the archive is
read with the strict zip reader, the example inputs with the restricted unpickler, every JSON
string is checked against what its field may hold, and torch is given an in-memory archive
rebuilt from the checked parts only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import warnings
from typing import Any, NoReturn

import torch

from .._format import fits_int64
from .._report import GlobalRef, ScanReport
from ..errors import (
    CorruptCheckpointError,
    TorchVaultError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ..legacy._reader import Session, read
from ..legacy._zip import Entry, ZipArchive

_MAX_JSON = 1 << 30
_MODEL = "models/model.json"
_WEIGHTS = "data/weights/model_weights_config.json"
_CONSTANTS = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_WRITER_RECORDS = ("archive_format", "archive_version", "byteorder", ".data/version")
# [0-9], not \d: \d matches every script's digits, and these names reach torch
_RECORD = re.compile(r"data/weights/weight_[0-9]+|data/constants/tensor_[0-9]+")
_NATIVE = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_PICKLED_CONSTANT = re.compile(r"data/constants/(custom_obj|opaque_obj)_[0-9]+")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for messages that chain a library's error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].rstrip('.') if lines else ''}"


def build(archive: io.BytesIO, name: str) -> torch.nn.Module:
    """The module of a rebuilt (checked) archive."""
    try:
        program = torch.export.load(archive)
        module: torch.nn.Module = program.module(check_guards=False)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"{name}: passed torchvault's checks, but torch {torch.__version__} could not "
            f"rebuild the program ({first_line(exc)}). It may come from another torch "
            "version: export it again with this one.",
            path=name,
        ) from exc
    return module


def rebuild(data: Any, name: str) -> io.BytesIO:
    """Check a program archive and return a copy holding only what was checked: the JSON as
    re-serialized, without guard code, the raw tensors, and empty example inputs.

    Raises:
        UnsafeCheckpointError, CorruptCheckpointError, UnsupportedFormatError: see
            :func:`load_program`.
    """
    from torch.export.pt2_archive import PT2ArchiveWriter  # ~1 s (torch._inductor): lazily

    checked = _Checked.of(data, name)
    model = checked.documents[0]
    model["guards_code"] = []  # Python source; torch execs it only with example inputs
    rebuilt = io.BytesIO()
    with PT2ArchiveWriter(rebuilt) as writer:
        for document, rel in zip(checked.documents, _DOCUMENTS, strict=True):
            writer.write_string(rel, json.dumps(document))
        for rel in checked.records:
            writer.write_bytes(rel, bytes(checked.archive.read(checked.members[rel])))
        writer.write_bytes(_SAMPLE_INPUTS, b"")  # no example inputs: nothing to unpickle
    rebuilt.seek(0)
    return rebuilt


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A program archive that passed every check, and the parts a rebuild takes from it."""

    archive: ZipArchive
    members: dict[str, Entry]
    documents: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
    records: tuple[str, ...]

    @classmethod
    def of(cls, data: Any, name: str) -> _Checked:
        archive = ZipArchive(data, name)
        archive.check_all()
        members = {e.name[len(archive.prefix) :]: e for e in archive.entries.values()}
        _check_members(members, name)
        _check_values(archive, members, name)
        model, weights, constants = (_json(archive, members, rel, name) for rel in _DOCUMENTS)
        records = (
            *_payloads(weights, "data/weights/", "weight_", members, name),
            *_payloads(constants, "data/constants/", "tensor_", members, name),
        )
        for document, rel in zip((model, weights, constants), _DOCUMENTS, strict=True):
            _Checker(f"{name}: {rel}").run(document)
        _check_sample_inputs(archive, members.get(_SAMPLE_INPUTS), name)
        return cls(archive, members, (model, weights, constants), records)


def is_program(data: Any) -> bool:
    """Whether the bytes of a file are a zip laid out as a program archive (for ``tv.scan``,
    which reads other zips as torch.save files); a malformed zip is not."""
    try:
        archive = ZipArchive(data, "")
    except TorchVaultError:
        return False
    return archive.find("archive_format") is not None and archive.find(_MODEL) is not None


def scan_program(name: str, data: Any) -> ScanReport:
    """``tv.scan`` of a program archive: every check :func:`load_program` makes, nothing
    loaded. A refused global (of the example inputs, or a graph's call target) is listed."""
    try:
        _Checked.of(data, name)
    except TorchVaultError as exc:
        refused = exc.global_name if isinstance(exc, UnsafeCheckpointError) else None
        found = (GlobalRef(refused, False, 1),) if refused else ()
        return ScanReport(name, "torch-program", found, (exc.message,), (name,))
    return ScanReport(name, "torch-program", files=(name,))


_DOCUMENTS = (_MODEL, _WEIGHTS, _CONSTANTS)


def _unsafe(name: str, what: str, global_name: str | None = None) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{name}: {what}. Nothing from the file was run. Export the model again with "
        "torchvault.export_program, or open the file with torch.export.load only if you "
        "trust whoever wrote it.",
        global_name=global_name,
        path=name,
    )


def _check_members(members: dict[str, Entry], name: str) -> None:
    """Accept only the entries of a program archive; name what the others would run."""
    if "data.pkl" in members:
        raise UnsupportedFormatError(
            f"{name}: is a torch.save file, not a torch.export program; read it with "
            "torchvault.load_legacy",
            path=name,
        )
    missing = [
        rel for rel in ("archive_format", "archive_version", *_DOCUMENTS) if rel not in members
    ]
    if missing:
        raise UnsupportedFormatError(
            f"{name}: is not a torch.export program archive (no {missing[0]}); programs are "
            "written by torchvault.export_program or torch.export.save",
            path=name,
        )
    for rel in members:
        if rel.startswith(_NATIVE):
            raise _unsafe(name, f"it holds compiled code ({rel}) that torch.export.load loads")
        if _PICKLED_CONSTANT.fullmatch(rel):
            raise _unsafe(
                name,
                f"it holds a pickled object ({rel}) that torch.export.load would unpickle with "
                "pickle.loads or TorchScript's unpickler, running whatever it names",
            )
        known = rel in (*_WRITER_RECORDS, *_DOCUMENTS, _SAMPLE_INPUTS, ".data/serialization_id")
        if not (known or _RECORD.fullmatch(rel) or rel.startswith("extra/")):
            raise UnsupportedFormatError(
                f"{name}: entry {rel!r} is not part of a torch.export program (another model, "
                "a pickled weight file of an older format, or something added); export the "
                "model again with this torch",
                path=name,
            )


def _check_values(archive: ZipArchive, members: dict[str, Entry], name: str) -> None:
    from torch.export.pt2_archive import constants

    expected = {
        "archive_format": constants.ARCHIVE_FORMAT_VALUE,
        "archive_version": constants.ARCHIVE_VERSION_VALUE,
        "byteorder": "little",
    }
    for rel, want in expected.items():
        entry = members.get(rel)
        if entry is None:
            continue
        got = bytes(archive.read(entry)[:64])
        if got != want.encode():
            raise UnsupportedFormatError(
                f"{name}: its {rel} is {got!r}, and torch {torch.__version__} reads "
                f"{want!r} only; export the model again with this torch",
                path=name,
            )


def _json(archive: ZipArchive, members: dict[str, Entry], rel: str, name: str) -> dict[str, Any]:
    entry = members[rel]
    if entry.size > _MAX_JSON:
        raise CorruptCheckpointError(f"{name}: {rel} is larger than 1 GiB", path=name)
    try:
        document = json.loads(bytes(archive.read(entry)), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{name}: {rel} is not valid JSON ({exc})", path=name) from exc
    if not isinstance(document, dict):
        raise CorruptCheckpointError(f"{name}: {rel} is not a JSON object", path=name)
    return document


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key appears twice in one object")  # two readers, two meanings
    return document


def _payloads(
    document: dict[str, Any], folder: str, prefix: str, members: dict[str, Entry], name: str
) -> list[str]:
    """The raw tensor records a payload config uses, each entry checked; pickled ones are
    refused."""
    config = document.get("config")
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{name}: {folder} config has no 'config' map", path=name)
    used: set[str] = set()
    for fqn, meta in config.items():
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"{name}: {folder} entry {fqn!r} is malformed", path=name)
        if meta.get("use_pickle") is not False:
            raise _unsafe(
                name,
                f"{fqn!r} is stored as a pickle (a tensor subclass, such as a quantized weight), "
                "which torch.export.load unpickles with torch.load(weights_only=False); "
                "torchvault loads programs whose weights and constants are plain tensors",
            )
        record = meta.get("path_name")
        rel = f"{folder}{record}"
        if not (isinstance(record, str) and re.fullmatch(prefix + r"[0-9]+", record)):
            raise CorruptCheckpointError(f"{name}: {fqn!r} names record {record!r}", path=name)
        if rel not in members:
            raise CorruptCheckpointError(
                f"{name}: {fqn!r} refers to {rel}, which is missing", path=name
            )
        _check_extent(meta.get("tensor_meta"), members[rel], name, fqn)
        used.add(rel)
    stray = sorted(rel for rel in members if rel.startswith(folder) and _RECORD.fullmatch(rel))
    if set(stray) - used:
        extra = sorted(set(stray) - used)[0]
        raise CorruptCheckpointError(f"{name}: record {extra} belongs to no tensor", path=name)
    return sorted(used)


def _check_extent(meta: object, entry: Entry, name: str, fqn: str) -> None:
    """A tensor's sizes, strides and offset must fit its record (each element at least one
    byte; torch checks the exact bound): no allocation is sized by the JSON alone."""
    try:
        if not isinstance(meta, dict):
            raise TypeError("not a map")
        sizes = [_as_int(d) for d in meta["sizes"]]
        strides = [_as_int(d) for d in meta["strides"]]
        offset = _as_int(meta["storage_offset"])
        if len(sizes) != len(strides):
            raise TypeError("sizes and strides differ in length")
    except (KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{name}: {fqn!r}: its tensor_meta is malformed", path=name, key=fqn
        ) from exc
    if not fits_int64(sizes, 1, strides, offset):
        raise CorruptCheckpointError(
            f"{name}: {fqn!r} declares sizes {sizes}, strides {strides} and offset {offset}, "
            "too large for torch (int64)",
            path=name,
            key=fqn,
        )
    if 0 in sizes:
        return
    last = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
    if last >= entry.size:
        raise CorruptCheckpointError(
            f"{name}: {fqn!r} declares sizes {sizes}, strides {strides} and offset {offset}, "
            f"which reach past its record of {entry.size} bytes",
            path=name,
            key=fqn,
        )


def _as_int(value: object) -> int:
    number = value.get("as_int") if isinstance(value, dict) else None
    if type(number) is not int or number < 0:
        raise TypeError("not a non-negative as_int")
    return number


def _check_sample_inputs(archive: ZipArchive, entry: Entry | None, name: str) -> None:
    """Read the example inputs with torchvault's restricted unpickler: a pickle naming any
    global outside the allowlist is refused. They are dropped either way."""
    if entry is None or entry.size == 0:
        return
    session = Session(f"{name}: {_SAMPLE_INPUTS}")
    try:
        with warnings.catch_warnings():  # tensors view read-only bytes; they are dropped
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            read(session, bytes(archive.read(entry)))
    except UnsafeCheckpointError as exc:
        raise _unsafe(
            name,
            f"its example inputs ({_SAMPLE_INPUTS}) are a pickle that names "
            f"{exc.global_name or 'code'}, outside torchvault's allowlist; torch.export.load "
            "unpickles them with torch.load(weights_only=False) when weights_only fails",
            global_name=exc.global_name,
        ) from exc


# ----------------------------------------------------------------------------- the JSON rules

_IDENTIFIER_FIELDS = frozenset({"name", "as_name", "as_names", "user_input_name"})
_IDENTIFIER_LIST_FIELDS = frozenset({"forward_arg_names"})
_FQN_FIELDS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "fqn"})
_TEXT_FIELDS = frozenset({"as_string", "as_strings", "guards_code"})
_REFUSED_FIELDS = {
    "custom_obj_values": "a custom (TorchScript) object, rebuilt by running its class's code",
    "as_custom_obj": "a custom (TorchScript) object, rebuilt by running its class's code",
    "custom_obj": "a custom (TorchScript) object, rebuilt by running its class's code",
    "class_fqn": "a custom (TorchScript) object, rebuilt by running its class's code",
    "treespec_namedtuple_fields": "a named tuple type, looked up by name",
}
_TOKEN = re.compile(r"[A-Za-z0-9_]*")
_VERSION = re.compile(r"[A-Za-z0-9_.+\-<=]*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FQN_PART = re.compile(r"[^\"'\\\x00-\x1f\x7f-\x9f\u2028\u2029.]+")
_OP_NAME = re.compile(r"_?[A-Za-z][A-Za-z0-9_]*")
_SPEC_TYPES = frozenset(
    {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_SYMBOLIC_OPERATORS = frozenset(
    [
        *(
            f"_operator.{op}"
            for op in _words(
                "eq ne le ge lt gt neg pos mul add sub floordiv mod pow truediv and_ or_ "
                "lshift rshift getitem"
            )
        ),
        "math.trunc",
        *(f"torch.sym_{op}" for op in _words("not int float ite max min sqrt")),
    ]
)
"""Python operators on symbolic sizes, as torch.export writes them (serde's ``_SYM_OPS``)."""

_HIGHER_ORDER = _words(
    "cond while_loop map_impl scan associative_scan wrap_with_set_grad_enabled "
    "wrap_with_autocast auto_functionalized auto_functionalized_v2 invoke_subgraph "
    "out_dtype flex_attention"
)
"""Higher-order operators that take graphs of the same file (checked as well) and tensors."""

_REFUSED_ATEN = frozenset({"save", "from_file", "_print", "record_stream"})
"""aten operators that read or write files or streams, which no model needs."""

_EXPRESSION = re.compile(
    r"\s+|(?P<number>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<string>'(?:[A-Za-z_][A-Za-z0-9_]*|[+\-]?[0-9.]+(?:[eE][+\-]?[0-9]+)?)')"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<operator>\*\*|//|<=|>=|==|!=|[-+*/%(),=<>])"
)
_QUOTING = frozenset({"Symbol", "Float"})
"""The only calls a quoted string may be the first argument of: sympy functions such as
``sqrt`` or ``Rational`` sympify a string argument, which is another ``eval``."""
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_EXPRESSION_NAMES = _words(
    # sympy's arithmetic, comparisons and logic as srepr writes them, and keyword arguments
    "Symbol Integer Rational Float Add Mul Pow Mod Min Max Abs floor ceiling sqrt Eq Ne Lt Le "
    "Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or "
    "Not Piecewise ExprCondPair Tuple true false True False oo zoo nan Infinity "
    "NegativeInfinity NaN ComplexInfinity One Zero NegativeOne Half int_oo IntInfinity "
    "NegativeIntInfinity positive negative nonnegative nonpositive integer real finite "
    "infinite zero nonzero even odd rational commutative extended_real precision "
    # torch.utils._sympy.functions, as the deserializer lists them
    "FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift "
    "RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity"
)
"""Names a shape expression may use: sympy.sympify evaluates it as Python, and with only
these names, numbers, quoted symbol names and operators (no attribute access, no other
calls) it can build sympy expressions and nothing else."""


class _Checker:
    """Walks a program's JSON and refuses any string its field may not hold."""

    def __init__(self, where: str) -> None:
        self.where = where

    def run(self, document: object) -> None:
        stack: list[tuple[object, str, str]] = [(document, "", "")]
        while stack:
            value, key, parent = stack.pop()
            if key in _REFUSED_FIELDS and value not in ({}, [], None):
                raise _unsafe(self.where, f"it holds {_REFUSED_FIELDS[key]} ({key})")
            if isinstance(value, dict):
                for child, item in value.items():
                    self.key(child, key)
                    stack.append((item, child, key))
            elif isinstance(value, list):
                stack.extend((item, key, parent) for item in value)
            elif isinstance(value, str):
                self.string(value, key, parent)
            elif not (value is None or isinstance(value, (bool, int, float))):
                raise CorruptCheckpointError(f"{self.where}: {key!r} holds {value!r:.40}")

    def key(self, key: str, parent: str) -> None:
        if parent == "as_string_to_argument":
            self.text(key, parent)
        elif parent == "config":
            self.fqn(key, parent)
        elif not (key.isidentifier() or (parent == "metadata" and _TOKEN.fullmatch(key))):
            self.refuse(parent or "the document", key, "is not a key torch.export writes there")

    def string(self, value: str, key: str, parent: str) -> None:
        if parent == "metadata" or key in _TEXT_FIELDS:
            self.text(value, key)
        elif key in _IDENTIFIER_FIELDS or key in _IDENTIFIER_LIST_FIELDS:
            if value and not value.isidentifier():
                self.refuse(key, value, "is not a Python identifier (torch generates code with it)")
        elif key in _FQN_FIELDS:
            self.fqn(value, key)
        elif key in ("target", "as_operator"):
            if not _allowed_operator(value):
                raise _unsafe(
                    self.where,
                    f"the graph calls {value!r}, which is not an operator torchvault allows "
                    "(aten operators, sympy arithmetic on sizes, control-flow operators); "
                    "torch.export.load would call whatever it names",
                    global_name=value,
                )
        elif key == "expr_str":
            self.expression(value)
        elif key in ("in_spec", "out_spec"):
            self.spec(value, key)
        elif key == "torch_version":
            if not _VERSION.fullmatch(value):
                self.refuse(key, value, "is not a version")
        elif not _TOKEN.fullmatch(value):
            self.refuse(key, value, "is not a value torch.export writes there")

    def text(self, value: str, key: str) -> None:
        if _CONTROL.search(value):
            self.refuse(key, value, "holds control characters (they end a comment in source)")

    def fqn(self, value: str, key: str) -> None:
        if value and not all(_FQN_PART.fullmatch(part) for part in value.split(".")):
            self.refuse(key, value, "is not a dotted attribute path (torch pastes it into code)")

    def expression(self, text: str) -> None:
        at, before = 0, ["", ""]  # the last two tokens
        while at < len(text):
            token = _EXPRESSION.match(text, at)
            if token is None:
                self.refuse("expr_str", text, f"has {text[at : at + 12]!r}, outside the grammar")
            at = token.end()
            word = token.group("name")
            if word and word not in _EXPRESSION_NAMES and not _SYMBOL.fullmatch(word):
                self.refuse("expr_str", text, f"uses the name {word!r}, outside the grammar")
            if token.group("string") and not (before[0] in _QUOTING and before[1] == "("):
                self.refuse("expr_str", text, "quotes a string outside Symbol('...') or Float")
            if not token.group().isspace():
                before = [before[1], token.group()]

    def spec(self, text: str, key: str) -> None:
        """A pytree spec (JSON in a string): only tuples, lists and dicts of tensors."""
        try:
            spec = json.loads(text, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):
            self.refuse(key, text, "is not JSON")
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1):
            self.refuse(key, text, "is not a version 1 pytree spec")
        nodes = [spec[1]]
        while nodes:
            node = nodes.pop()
            if not (isinstance(node, dict) and isinstance(node.get("children_spec"), list)):
                self.refuse(key, text, "is not a pytree spec")
            kind = node.get("type")
            if not isinstance(kind, str | None) or kind not in _SPEC_TYPES:
                self.refuse(key, text, f"names the container type {kind!r} (resolved by name)")
            if not _plain_context(node.get("context")):
                self.refuse(key, text, "has a context other than a list of plain keys")
            nodes.extend(node["children_spec"])

    def refuse(self, key: str, value: str, why: str) -> NoReturn:
        raise _unsafe(self.where, f"field {key!r} holds {value!r:.120}, which {why}")


def _plain_context(context: object) -> bool:
    """A spec node's context: none, or JSON of null or a list of plain dict keys. (torch
    decodes it with a hook that imports any module an ``{"__enum__": ...}`` object names.)"""
    if context is None:
        return True
    try:
        keys = json.loads(context) if isinstance(context, str) else object()
    except (ValueError, RecursionError):
        return False
    plain = (str, int, float, bool, type(None))
    return keys is None or (isinstance(keys, list) and all(isinstance(k, plain) for k in keys))


def _allowed_operator(target: str) -> bool:
    """aten operators (but file and stream I/O), allowlisted higher-order operators, and
    Python's operators on sizes; resolved the way torch resolves them, so that an attribute
    that is not an operator is refused."""
    if target in _SYMBOLIC_OPERATORS:
        return True
    parts = target.split(".")
    if not (parts[:2] == ["torch", "ops"] and all(_OP_NAME.fullmatch(p) for p in parts)):
        return False
    if len(parts) == 5 and parts[2] == "aten" and parts[3] not in _REFUSED_ATEN:
        packet = getattr(torch.ops.aten, parts[3], None)
        return isinstance(getattr(packet, parts[4], None), torch._ops.OpOverload)
    if len(parts) == 4 and parts[2] == "higher_order" and parts[3] in _HIGHER_ORDER:
        operator = getattr(torch.ops.higher_order, parts[3], None)
        return isinstance(operator, torch._ops.HigherOrderOperator)
    return False
