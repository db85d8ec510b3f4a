"""A pickle interpreter that can build data and nothing else.

This is the only code in torchvault that reads pickle opcodes. It shares no code with
:mod:`pickle`: there is no ``find_class``, no import, no call of anything named in the file.
A global is looked up by name in a per-call table (:class:`Globals`) and becomes a
:class:`Global` object of ours; REDUCE, NEWOBJ, INST and OBJ can only call such objects, and
BUILD, SETITEM(S), APPEND(S) and ADDITEMS only act on exactly the containers they were meant
for. Anything else is an error naming the opcode and its byte offset.

Limits keep a hostile stream bounded: every length is checked against the bytes left, text
lines and integers have a maximum size, the memo is a dict (a huge index costs nothing), and
the stack machine is iterative, so deep nesting costs no recursion here (the depth of the
result is checked when it is finished, see ``_finish.py``).
"""

from __future__ import annotations

import abc
import codecs
import functools
import struct
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import CorruptCheckpointError, TorchVaultError, UnsafeCheckpointError

MAX_LINE = 1024  # protocol-0 text lines (names, numbers)
MAX_LONG_BYTES = 1024  # LONG1/LONG4 payloads; torch's largest is its 10-byte magic number
MAX_MEMO = 10_000_000  # entries, and the largest index (pickle numbers them 0, 1, 2, ...)
MAX_KEY_NODES = 1_000
MAX_OPCODES = 100_000_000  # a 300k-tensor state dict takes about 10M


class Global:
    """A name from the file that the caller's table allowed, and what it may do."""

    def __init__(self, name: str) -> None:
        self.name = name

    def call(self, args: tuple[Any, ...]) -> object:
        """REDUCE (and INST/OBJ): call with ``args``."""
        raise UnsafeCheckpointError(
            f"{self.name} may appear in a checkpoint but not be called", global_name=self.name
        )

    def new(self, args: tuple[Any, ...]) -> object:
        """NEWOBJ: create an instance of this class from ``args``."""
        raise UnsafeCheckpointError(
            f"{self.name} may appear in a checkpoint but not be instantiated",
            global_name=self.name,
        )

    def __repr__(self) -> str:
        return f"<global {self.name}>"


class Building(abc.ABC):
    """An object under construction by later opcodes (BUILD, SETITEMS, APPENDS).

    Subclasses accept only the operations their real counterpart needs; ``value`` gives
    the finished object once the whole stream has been read.
    """

    what = "object"

    def build(self, state: object) -> None:
        raise _refuse(f"BUILD on a {self.what}")

    def setitem(self, key: object, value: object) -> None:
        raise _refuse(f"SETITEM on a {self.what}")

    def append(self, value: object) -> None:
        raise _refuse(f"APPEND on a {self.what}")

    @abc.abstractmethod
    def value(self, finish: Callable[[object], object]) -> object:
        """The finished object; ``finish`` finishes the parts it holds."""


Resolve = Callable[[str, str], object]
PersistentLoad = Callable[[object], object]
_DICTS = (dict, OrderedDict, Counter, defaultdict)


class _Mark:
    """The MARK sentinel; never visible outside the stack."""


_MARK = _Mark()


def _refuse(what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{what} is not something torch.save writes")


class Unpickler:
    """Runs one pickle stream from ``data[start:]`` and returns its object.

    Args:
        resolve: maps (module, name) of GLOBAL, STACK_GLOBAL, INST and OBJ to the object to
            push; it raises for names the caller does not allow.
        persistent_load: maps a persistent id (BINPERSID/PERSID) to an object.
        recover: when given, a global's own error (bad arguments, a refused subclass) is
            passed to it and its result pushed instead, so a scan can see the whole stream.
    """

    def __init__(
        self,
        data: memoryview | bytes,
        *,
        resolve: Resolve,
        persistent_load: PersistentLoad,
        start: int = 0,
        recover: Callable[[TorchVaultError], object] | None = None,
    ) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.pos = start
        self.resolve = resolve
        self.persistent_load = persistent_load
        self.recover = recover
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.opcode = 0
        self.at = start

    # -- reading --------------------------------------------------------------------------

    def _take(self, n: int) -> memoryview | bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            self._fail(f"needs {n} bytes but the stream has {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack(fmt, self._take(struct.calcsize(fmt)))
        return value

    def _line(self) -> bytes:
        end = bytes(self.data[self.pos : self.pos + MAX_LINE + 1]).find(b"\n")
        if end < 0:
            self._fail(f"has a text field longer than {MAX_LINE} bytes or no line end")
        line = bytes(self._take(end + 1))[:-1]
        return line[:-1] if line.endswith(b"\r") else line

    def _fail(self, what: str) -> NoReturn:
        raise CorruptCheckpointError(f"pickle opcode {chr(self.opcode)!r} at byte {self.at} {what}")

    # -- stack ----------------------------------------------------------------------------

    def _pop(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            self._fail("pops an empty stack")
        return self.stack.pop()

    def _top(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            self._fail("reads an empty stack")
        return self.stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            self._fail("has no MARK to pop to")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def _put(self, index: int) -> None:
        if not 0 <= index < MAX_MEMO:
            self._fail(f"stores at memo index {index}, outside 0 to {MAX_MEMO}")
        if len(self.memo) >= MAX_MEMO and index not in self.memo:
            self._fail(f"grows the memo past {MAX_MEMO} entries")
        self.memo[index] = self._top()

    def _get(self, index: int) -> None:
        if index not in self.memo:
            self._fail(f"reads memo entry {index}, which was never stored")
        self.stack.append(self.memo[index])

    # -- the loop -------------------------------------------------------------------------

    def load(self) -> tuple[object, int]:
        """The object and the offset just past its STOP."""
        dispatch = _DISPATCH
        data = self.data
        budget = MAX_OPCODES
        while True:
            budget -= 1
            if not budget:
                self._fail(f"is past the limit of {MAX_OPCODES} opcodes")
            self.at = self.pos
            if self.pos >= len(data):
                raise CorruptCheckpointError(
                    f"the pickle stream ends at byte {self.pos} without a STOP opcode "
                    "(truncated or damaged)"
                )
            self.opcode = data[self.pos]
            self.pos += 1
            handler = dispatch.get(self.opcode)
            if handler is None:
                self._fail("is not a pickle opcode torchvault accepts")
            if handler is _stop:
                if len(self.stack) != 1 or self.marks:
                    self._fail("ends the stream with a malformed stack")
                return self.stack[0], self.pos
            handler(self)

    # -- calls ----------------------------------------------------------------------------

    def _call(self, func: object, args: object) -> object:
        if not isinstance(args, tuple):
            self._fail("passes arguments that are not a tuple")
        if not isinstance(func, Global):
            self._fail(f"calls {type(func).__name__}, which is not an allowed global")
        return self._guard(func.call, args)

    def _guard(self, method: Callable[[Any], object], arg: Any) -> object:
        try:
            return method(arg)
        except TorchVaultError as exc:
            if self.recover is None:
                raise
            return self.recover(exc)

    def _new(self, cls: object, args: object) -> object:
        if not isinstance(args, tuple):
            self._fail("passes arguments that are not a tuple")
        if not isinstance(cls, Global):
            self._fail(f"instantiates {type(cls).__name__}, which is not an allowed class")
        return self._guard(cls.new, args)

    def _global(self, module: object, name: object) -> None:
        if not isinstance(module, str) or not isinstance(name, str):
            self._fail("names a global with operands that are not strings")
        self.stack.append(self.resolve(module, name))


# -- opcode handlers ------------------------------------------------------------------------
# One small function per opcode; they are looked up by byte in _DISPATCH.

Op = Callable[[Unpickler], None]
_DISPATCH: dict[int, Op] = {}


def _op(code: bytes) -> Callable[[Op], Op]:
    def register(func: Op) -> Op:
        _DISPATCH[code[0]] = func
        return func

    return register


@_op(b".")
def _stop(u: Unpickler) -> None:  # handled in the loop
    raise AssertionError


@_op(b"\x80")
def _proto(u: Unpickler) -> None:
    if u._unpack("<B") > 5:
        u._fail("asks for a pickle protocol newer than 5")


@_op(b"\x95")
def _frame(u: Unpickler) -> None:
    if u._unpack("<Q") > len(u.data) - u.pos:
        u._fail("declares a frame longer than the stream")


@_op(b"(")
def _mark(u: Unpickler) -> None:
    u.marks.append(len(u.stack))


@_op(b"0")
def _pop_op(u: Unpickler) -> None:
    if u.stack and (not u.marks or len(u.stack) > u.marks[-1]):
        u.stack.pop()
    elif u.marks and len(u.stack) == u.marks[-1]:
        u.marks.pop()  # POP of a bare MARK, as pickle allows
    else:
        u._fail("pops an empty stack")


@_op(b"1")
def _pop_mark_op(u: Unpickler) -> None:
    u._pop_mark()


@_op(b"2")
def _dup(u: Unpickler) -> None:
    u.stack.append(u._top())


# constants


@_op(b"N")
def _none(u: Unpickler) -> None:
    u.stack.append(None)


@_op(b"\x88")
def _true(u: Unpickler) -> None:
    u.stack.append(True)


@_op(b"\x89")
def _false(u: Unpickler) -> None:
    u.stack.append(False)


@_op(b"I")
def _int(u: Unpickler) -> None:
    line = u._line()
    if line in (b"00", b"01"):
        u.stack.append(line == b"01")
    else:
        u.stack.append(_parse_int(u, line))


@_op(b"L")
def _long(u: Unpickler) -> None:
    line = u._line()
    u.stack.append(_parse_int(u, line[:-1] if line.endswith(b"L") else line))


def _parse_int(u: Unpickler, line: bytes) -> int:
    try:
        return int(line.decode("ascii"), 10)
    except ValueError:
        u._fail(f"has a malformed integer {line[:40]!r}")


@_op(b"J")
def _binint(u: Unpickler) -> None:
    u.stack.append(u._unpack("<i"))


@_op(b"K")
def _binint1(u: Unpickler) -> None:
    u.stack.append(u._unpack("<B"))


@_op(b"M")
def _binint2(u: Unpickler) -> None:
    u.stack.append(u._unpack("<H"))


@_op(b"\x8a")
def _long1(u: Unpickler) -> None:
    _long_bytes(u, u._unpack("<B"))


@_op(b"\x8b")
def _long4(u: Unpickler) -> None:
    _long_bytes(u, u._unpack("<i"))


def _long_bytes(u: Unpickler, n: int) -> None:
    if n > MAX_LONG_BYTES:
        u._fail(f"holds a {n}-byte integer (the limit is {MAX_LONG_BYTES})")
    u.stack.append(int.from_bytes(u._take(n), "little", signed=True))


@_op(b"F")
def _float(u: Unpickler) -> None:
    line = u._line()
    try:
        u.stack.append(float(line.decode("ascii")))
    except ValueError:
        u._fail(f"has a malformed float {line[:40]!r}")


@_op(b"G")
def _binfloat(u: Unpickler) -> None:
    u.stack.append(u._unpack(">d"))


# strings and bytes


@_op(b"S")
def _string(u: Unpickler) -> None:
    line = u._line()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        u._fail("has a malformed quoted string")
    try:
        raw = codecs.escape_decode(line[1:-1])[0]
    except ValueError:
        u._fail("has a malformed string escape")
    u.stack.append(_py2_str(raw))


def _py2_str(raw: bytes) -> str:
    # Python 2 str pickles are read as text (pickle's default encoding="ASCII" would reject
    # bytes >= 0x80; latin-1 keeps every byte, and a torch file never relies on either).
    return raw.decode("latin-1")


@_op(b"T")
def _binstring(u: Unpickler) -> None:
    u.stack.append(_py2_str(bytes(u._take(u._unpack("<i")))))


@_op(b"U")
def _short_binstring(u: Unpickler) -> None:
    u.stack.append(_py2_str(bytes(u._take(u._unpack("<B")))))


@_op(b"V")
def _unicode(u: Unpickler) -> None:
    try:
        u.stack.append(u._line().decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        u._fail("has malformed text")


def _text(u: Unpickler, n: int) -> None:
    try:
        u.stack.append(str(u._take(n), "utf-8", "surrogatepass"))
    except UnicodeDecodeError:
        u._fail("has text that is not UTF-8")


@_op(b"X")
def _binunicode(u: Unpickler) -> None:
    _text(u, u._unpack("<I"))


@_op(b"\x8c")
def _short_binunicode(u: Unpickler) -> None:
    _text(u, u._unpack("<B"))


@_op(b"\x8d")
def _binunicode8(u: Unpickler) -> None:
    _text(u, u._unpack("<Q"))


@_op(b"B")
def _binbytes(u: Unpickler) -> None:
    u.stack.append(bytes(u._take(u._unpack("<I"))))


@_op(b"C")
def _short_binbytes(u: Unpickler) -> None:
    u.stack.append(bytes(u._take(u._unpack("<B"))))


@_op(b"\x8e")
def _binbytes8(u: Unpickler) -> None:
    u.stack.append(bytes(u._take(u._unpack("<Q"))))


@_op(b"\x96")
def _bytearray8(u: Unpickler) -> None:
    u.stack.append(bytearray(u._take(u._unpack("<Q"))))


@_op(b"\x98")
def _readonly_buffer(u: Unpickler) -> None:
    u._top()


# containers


@_op(b")")
def _empty_tuple(u: Unpickler) -> None:
    u.stack.append(())


@_op(b"t")
def _tuple(u: Unpickler) -> None:
    u.stack.append(tuple(u._pop_mark()))


@_op(b"\x85")
def _tuple1(u: Unpickler) -> None:
    u.stack.append((u._pop(),))


@_op(b"\x86")
def _tuple2(u: Unpickler) -> None:
    b = u._pop()
    u.stack.append((u._pop(), b))


@_op(b"\x87")
def _tuple3(u: Unpickler) -> None:
    c, b = u._pop(), u._pop()
    u.stack.append((u._pop(), b, c))


@_op(b"]")
def _empty_list(u: Unpickler) -> None:
    u.stack.append([])


@_op(b"l")
def _list(u: Unpickler) -> None:
    u.stack.append(u._pop_mark())


@_op(b"}")
def _empty_dict(u: Unpickler) -> None:
    u.stack.append({})


@_op(b"d")
def _dict(u: Unpickler) -> None:
    items = u._pop_mark()
    if len(items) % 2:
        u._fail("builds a dict from an odd number of items")
    target: dict[Any, Any] = {}
    for key, value in zip(items[::2], items[1::2], strict=True):
        _setitem(u, target, key, value)
    u.stack.append(target)


@_op(b"\x8f")
def _empty_set(u: Unpickler) -> None:
    u.stack.append(set())


@_op(b"\x91")
def _frozenset(u: Unpickler) -> None:
    items = u._pop_mark()
    u.stack.append(frozenset(_hashable(u, item) for item in items))


def is_key(value: object) -> bool:
    """Whether ``value`` can be a dict key or set member. Hashing a tuple walks every path
    through it (tuples do not cache their hash), so the parts are counted first: a few
    shared tuples nested 30 deep would otherwise take minutes to hash."""
    budget = MAX_KEY_NODES
    pending = [value]
    while pending:
        item = pending.pop()
        budget -= 1
        if budget < 0:
            return False
        if type(item) in (tuple, frozenset):
            pending.extend(item)  # type: ignore[arg-type]
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _hashable(u: Unpickler, value: object) -> object:
    if not is_key(value):
        u._fail(f"uses a {type(value).__name__} that is unhashable or too large as a key")
    return value


def _setitem(u: Unpickler, target: object, key: object, value: object) -> None:
    if type(target) in _DICTS:
        target[_hashable(u, key)] = value  # type: ignore[index]
    elif isinstance(target, Building):
        target.setitem(key, value)
    else:
        u._fail(f"sets an item on a {type(target).__name__}, which is not a dict")


@_op(b"s")
def _setitem_op(u: Unpickler) -> None:
    value, key = u._pop(), u._pop()
    _setitem(u, u._top(), key, value)


@_op(b"u")
def _setitems(u: Unpickler) -> None:
    items = u._pop_mark()
    if len(items) % 2:
        u._fail("sets an odd number of items")
    target = u._top()
    for key, value in zip(items[::2], items[1::2], strict=True):
        _setitem(u, target, key, value)


def _append(u: Unpickler, target: object, values: list[Any]) -> None:
    if type(target) is list:
        target.extend(values)
    elif isinstance(target, Building):
        for value in values:
            target.append(value)
    else:
        u._fail(f"appends to a {type(target).__name__}, which is not a list")


@_op(b"a")
def _append_op(u: Unpickler) -> None:
    value = u._pop()
    _append(u, u._top(), [value])


@_op(b"e")
def _appends(u: Unpickler) -> None:
    values = u._pop_mark()
    _append(u, u._top(), values)


@_op(b"\x90")
def _additems(u: Unpickler) -> None:
    items = u._pop_mark()
    target = u._top()
    if type(target) is not set:
        u._fail(f"adds set items to a {type(target).__name__}")
    target.update(_hashable(u, item) for item in items)


# memo


@_op(b"p")
def _put(u: Unpickler) -> None:
    u._put(_parse_int(u, u._line()))


@_op(b"q")
def _binput(u: Unpickler) -> None:
    u._put(u._unpack("<B"))


@_op(b"r")
def _long_binput(u: Unpickler) -> None:
    u._put(u._unpack("<I"))


@_op(b"\x94")
def _memoize(u: Unpickler) -> None:
    u._put(len(u.memo))


@_op(b"g")
def _get(u: Unpickler) -> None:
    u._get(_parse_int(u, u._line()))


@_op(b"h")
def _binget(u: Unpickler) -> None:
    u._get(u._unpack("<B"))


@_op(b"j")
def _long_binget(u: Unpickler) -> None:
    u._get(u._unpack("<I"))


# globals and calls


@_op(b"c")
def _global_op(u: Unpickler) -> None:
    module = u._line().decode("utf-8", "replace")
    u._global(module, u._line().decode("utf-8", "replace"))


@_op(b"\x93")
def _stack_global(u: Unpickler) -> None:
    name = u._pop()
    u._global(u._pop(), name)


@_op(b"R")
def _reduce(u: Unpickler) -> None:
    args = u._pop()
    func = u._pop()
    u.stack.append(u._call(func, args))


@_op(b"\x81")
def _newobj(u: Unpickler) -> None:
    args = u._pop()
    cls = u._pop()
    u.stack.append(u._new(cls, args))


@_op(b"\x92")
def _newobj_ex(u: Unpickler) -> None:
    kwargs, args, cls = u._pop(), u._pop(), u._pop()
    if type(kwargs) is not dict or kwargs:
        u._fail("passes keyword arguments to a constructor")
    u.stack.append(u._new(cls, args))


@_op(b"i")
def _inst(u: Unpickler) -> None:
    module = u._line().decode("utf-8", "replace")
    name = u._line().decode("utf-8", "replace")
    u._global(module, name)
    func = u.stack.pop()
    u.stack.append(u._call(func, tuple(u._pop_mark())))


@_op(b"o")
def _obj(u: Unpickler) -> None:
    items = u._pop_mark()
    if not items:
        u._fail("has no class to instantiate")
    u.stack.append(u._call(items[0], tuple(items[1:])))


@_op(b"b")
def _build(u: Unpickler) -> None:
    state = u._pop()
    target = u._top()
    if isinstance(target, Building):
        u._guard(target.build, state)
    elif isinstance(target, dict) and not state:
        pass  # a dict subclass with an empty __dict__
    elif type(target) is OrderedDict and isinstance(state, dict):
        u._guard(functools.partial(_state_dict_metadata, target), state)
    else:
        u._fail(f"sets the state of a {type(target).__name__}")


def _state_dict_metadata(target: OrderedDict[Any, Any], state: dict[Any, Any]) -> None:
    """BUILD on an OrderedDict: torch.save gives a state dict one attribute, ``_metadata``
    (module versions, a map of maps), which ``load_state_dict`` reads. Containers get their
    contents only through their items: any other attribute (``get`` or ``keys`` as an int)
    would shadow the container's own methods, so it is refused (in permissive reads it is
    dropped and listed as an anomaly)."""
    stray = [key for key in state if key != "_metadata"]
    if stray:
        raise CorruptCheckpointError(
            f"pickle BUILD sets the attribute {str(stray[0])[:40]!r} on an OrderedDict; "
            "a container takes state only through its items (torch.save sets `_metadata` "
            "alone), so the attribute was not set"
        )
    metadata = state.get("_metadata")
    if not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, dict) for k, v in metadata.items())
    ):
        raise CorruptCheckpointError(
            "pickle BUILD sets a state dict's `_metadata` to something other than a map of "
            "module names to maps, so it was not set"
        )
    vars(target).update(state)


@_op(b"Q")
def _binpersid(u: Unpickler) -> None:
    u.stack.append(u._guard(u.persistent_load, u._pop()))


@_op(b"P")
def _persid(u: Unpickler) -> None:
    u.stack.append(u._guard(u.persistent_load, u._line().decode("ascii", "replace")))


def _refused_opcode(what: str) -> Op:
    def handler(u: Unpickler) -> None:
        raise UnsafeCheckpointError(
            f"pickle opcode {chr(u.opcode)!r} at byte {u.at} {what}; torch.save never "
            "writes it, and torchvault does not run it",
            global_name=None,
        )

    return handler


for _code, _what in (
    (b"\x82", "reads the copyreg extension registry (EXT1)"),
    (b"\x83", "reads the copyreg extension registry (EXT2)"),
    (b"\x84", "reads the copyreg extension registry (EXT4)"),
    (b"\x97", "asks for an out-of-band buffer (NEXT_BUFFER)"),
):
    _DISPATCH[_code[0]] = _refused_opcode(_what)
