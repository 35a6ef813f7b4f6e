"""Check a GGUF file's structure before llama.cpp parses it.

llama.cpp's parser is the last line of defence; this reader is the first. It
walks the header, the metadata table and the tensor table of a file with
bounds checks on every read (magic, version, counts and lengths within the
file's size, known value types, tensor shapes, types and data offsets inside
the file), so that a truncated, corrupt or hostile file raises
:class:`~mullama.InvalidModelError` naming what is wrong and where, and never
reaches code that might crash on it.

Pure Python over a read-only memory map: only the header pages are read.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ._errors import InvalidModelError, UnsupportedModelError

__all__ = ["GGUFInfo", "read_gguf"]

MAGIC = b"GGUF"
MAX_DIMS = 4         # GGML_MAX_DIMS
MAX_NAME = 64        # GGML_MAX_NAME, terminator included
DEFAULT_ALIGNMENT = 32
INT64_MAX = (1 << 63) - 1
MAX_STRING = 1 << 30   # GGUF_MAX_STRING_LENGTH
MAX_ARRAY = 1 << 30    # GGUF_MAX_ARRAY_ELEMENTS
MAX_KEPT_ARRAY = 4096  # numeric arrays up to this long keep their values (GGUFArray.values)

# GGUF value types: id -> (struct format, size); 8 = string, 9 = array
_SCALARS: Dict[int, Tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_TOKENS = "tokenizer.ggml.tokens"
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
# smallest encodings, to bound counts by the bytes left
_MIN_KV = 8 + 4 + 1          # empty key, type, a 1-byte value
_MIN_TENSOR = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset


@dataclass(frozen=True)
class GGUFArray:
    """An array value, summarised: its element type and length."""

    type: str
    count: int
    #: file offset of its first element
    offset: int = field(default=0, compare=False, repr=False)
    #: the elements of a short numeric array (per-layer hyperparameters), else None
    values: Optional[Tuple[Any, ...]] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of a well-formed GGUF file says."""

    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    #: file offset where the tensor data starts
    data_offset: int
    #: bytes of tensor data (padding included)
    data_size: int
    file_size: int
    #: scalar and string values, and :class:`GGUFArray` summaries
    metadata: Dict[str, Any] = field(repr=False)
    #: (name, shape, ggml type id, bytes) of each tensor
    tensors: List[Tuple[str, Tuple[int, ...], int, int]] = field(repr=False)


class _Reader:
    __slots__ = ("buf", "pos", "size", "path", "tokens")

    def __init__(self, buf: Any, size: int, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.size = size
        self.path = path
        #: the vocabulary's token texts (as llama.cpp reads them), once read
        self.tokens: List[bytes] = []

    def fail(self, what: str) -> InvalidModelError:
        return InvalidModelError(f"{self.path} is not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends after "
                            f"{self.size - self.pos} (truncated?)")

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str) -> str:
        """A string; bytes that are not UTF-8 kept as surrogates (llama.cpp does not check)."""
        n = self.u64(f"the length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes (llama.cpp reads at most {MAX_STRING})")
        self.need(n, f"{what} ({n} bytes)")
        start = self.pos
        self.pos += n
        return bytes(self.buf[start:self.pos]).decode("utf-8", "surrogateescape")

    def _walk_strings_checked(self, count: int, what: str) -> None:
        """Walk the strings again checking each: raises naming the first that does not fit."""
        buf, pos, size, length = self.buf, self.pos, self.size, _U64.unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"the length of string {i} of {what}")
            end = pos + 8 + length(buf, pos)[0]
            if end > size:
                self.pos = pos + 8
                self.need(end - pos - 8, f"string {i} of {what}")
            pos = end
        raise AssertionError("unreachable: the fast walk found a string outside the file")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            fmt, n = _SCALARS[vtype]
            v = self.unpack(fmt, n, what)
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.u32(f"the element type of {what}")
            count = self.u64(f"the length of {what}")
            if etype == _ARRAY:
                raise self.fail(f"{what} is an array of arrays, which GGUF does not allow")
            if count > MAX_ARRAY:
                raise self.fail(f"{what} claims {count} elements (llama.cpp reads at most {MAX_ARRAY})")
            offset = self.pos
            values = None
            if etype in _SCALARS:
                fmt, n = _SCALARS[etype]
                self.need(count * n, f"{what} ({count} {_TYPE_NAMES[etype]} values)")
                if count <= MAX_KEPT_ARRAY:  # per-layer values (head counts, window pattern)
                    values = struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos)
                    if etype == 7:
                        values = tuple(bool(v) for v in values)
                self.pos += count * n
            elif etype == _STRING:
                if count * 8 > self.size - self.pos:
                    raise self.fail(f"{what} claims {count} strings, more than the file can hold")
                # vocabularies hold 100k+ strings: walked in C, and again here only to
                # name what is wrong with a file that failed
                from ._core import gguf_walk_strings

                keep = what == repr(_TOKENS)
                pos, tokens = gguf_walk_strings(self.buf, self.pos, count, keep)
                if pos < 0:
                    self._walk_strings_checked(count, what)
                if tokens is not None:  # kept
                    self.tokens = tokens
                self.pos = pos
            else:
                raise self.fail(f"{what} has unknown element type {etype}")
            return GGUFArray(_TYPE_NAMES[etype], count, offset, values)
        raise self.fail(f"{what} has unknown value type {vtype}")


def read_gguf(path: str, type_sizes: Optional[List[Tuple[int, int]]] = None) -> GGUFInfo:
    """Read and check the structure of the GGUF file at *path*.

    Args:
        type_sizes: (block size, bytes per block) per ggml type id; default:
            the ones of the linked llama.cpp.

    Raises:
        InvalidModelError: naming what is wrong and at which byte.
        UnsupportedModelError: a GGUF version this llama.cpp cannot read.
    """
    if type_sizes is None:
        from . import _core

        type_sizes = _core.ggml_type_sizes()
    with open(path, "rb") as f:
        head = f.read(4)
        if head != MAGIC:
            raise InvalidModelError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF')")
        f.seek(0, 2)
        size = f.tell()
        if size < 4 + 4 + 8 + 8:
            raise InvalidModelError(f"{path} is too small ({size} bytes) to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read(_Reader(buf, len(buf), path), type_sizes)


def _read(r: _Reader, type_sizes: List[Tuple[int, int]]) -> GGUFInfo:
    r.pos = 4  # the magic was checked
    version = r.u32("the version")
    if version == 1:
        raise UnsupportedModelError(f"{r.path} is GGUF version 1, which llama.cpp no longer reads; convert it again")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (2, 3):
            raise UnsupportedModelError(f"{r.path} is a big-endian GGUF file; this machine reads little-endian ones")
        raise r.fail(f"unknown GGUF version {version}")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the metadata count")
    left = r.size - r.pos
    if n_kv * _MIN_KV > left:
        raise r.fail(f"it claims {n_kv} metadata entries, more than its {r.size} bytes can hold")
    if n_tensors * _MIN_TENSOR > left:
        raise r.fail(f"it claims {n_tensors} tensors, more than its {r.size} bytes can hold")

    metadata: Dict[str, Any] = {}
    types: Dict[str, int] = {}
    for i in range(n_kv):
        key = r.string(f"the key of metadata entry {i}")
        if not key:
            raise r.fail(f"metadata entry {i} has an empty key")
        if key in metadata:
            raise r.fail(f"metadata key {key!r} appears twice")
        vtype = types[key] = r.u32(f"the type of {key!r}")
        metadata[key] = r.value(vtype, repr(key))

    _check_vocabulary(r, metadata)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata:
        if types["general.alignment"] != 4:
            raise r.fail(f"general.alignment is a {_TYPE_NAMES.get(types['general.alignment'])}, not a uint32")
        if alignment <= 0 or alignment & (alignment - 1):
            raise r.fail(f"general.alignment is {alignment}, not a power of two")

    tensors: List[Tuple[str, Tuple[int, ...], int, int]] = []
    offsets: List[int] = []
    names = set()
    for i in range(n_tensors):
        name = r.string(f"the name of tensor {i}")
        name_bytes = len(name.encode("utf-8", "surrogateescape"))
        if name_bytes >= MAX_NAME:
            raise r.fail(f"tensor {i} has a name of {name_bytes} bytes (at most {MAX_NAME - 1})")
        if name in names:
            raise r.fail(f"tensor name {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(f"the dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = tuple(r.unpack("<q", 8, f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        n_elements = 1
        for d in shape:
            if d < 0:
                raise r.fail(f"tensor {name!r} has a negative dimension: {shape}")
            n_elements *= d
        if n_elements > INT64_MAX:
            raise r.fail(f"tensor {name!r} has too many elements: {shape}")
        ttype = r.u32(f"the type of tensor {name!r}")
        if ttype >= len(type_sizes) or type_sizes[ttype][0] == 0:
            raise r.fail(f"tensor {name!r} has unknown or removed ggml type {ttype}")
        block, block_bytes = type_sizes[ttype]
        row = shape[0] if shape else 1
        if row % block:
            raise r.fail(f"tensor {name!r} has rows of {row} elements, not a multiple of its type's block of {block}")
        offsets.append(r.u64(f"the data offset of tensor {name!r}"))
        tensors.append((name, shape, ttype, n_elements // block * block_bytes))

    data_offset = -(-r.pos // alignment) * alignment if n_tensors else r.pos
    expected = 0
    for (name, shape, _, nbytes), offset in zip(tensors, offsets):
        if offset != expected:
            raise r.fail(f"tensor {name!r} starts at data offset {offset}, expected {expected} "
                         "(tensors are laid out in order, each aligned)")
        if data_offset + offset + nbytes > r.size:
            raise r.fail(f"the data of tensor {name!r} ({nbytes} bytes at byte {data_offset + offset}) runs past "
                         f"the end of the file ({r.size} bytes; truncated?)")
        expected += -(-nbytes // alignment) * alignment
    return GGUFInfo(version, n_tensors, n_kv, alignment, data_offset, expected, r.size, metadata, tensors)


# tokenizer.ggml.model values whose token_to_piece aborts the process on a byte token (WPM)
_NO_BYTE_TOKEN_MODELS = {"bert"}
_BYTE_TYPE = 6  # LLAMA_TOKEN_TYPE_BYTE


def _check_vocabulary(r: _Reader, metadata: Dict[str, Any]) -> None:
    """What llama.cpp asserts about a vocabulary (it aborts the process otherwise): no
    token repeated (llama-vocab.cpp: id_to_token.size() == token_to_id.size()), and no
    byte token in a WPM vocabulary (token_to_byte)."""
    model = metadata.get("tokenizer.ggml.model")
    if model in ("no_vocab", "none"):  # llama.cpp does not read the tokens
        return
    if len(set(r.tokens)) != len(r.tokens):  # which one: only for a file that fails
        seen: Dict[bytes, int] = {}
        for i, text in enumerate(r.tokens):
            first = seen.setdefault(text, i)
            if first != i:
                raise r.fail(f"token {i} of the vocabulary repeats token {first} ({text[:40]!r}; a token ends at "
                             "its first NUL byte)")
    types = metadata.get("tokenizer.ggml.token_type")
    if model not in _NO_BYTE_TOKEN_MODELS or not isinstance(types, GGUFArray) or types.type != "int32":
        return
    n = min(types.count, len(r.tokens))
    values = memoryview(r.buf)[types.offset:types.offset + 4 * n].cast("i")  # little-endian hosts only
    try:
        for i in range(n):
            if values[i] == _BYTE_TYPE:
                raise r.fail(f"token {i} ({r.tokens[i][:40]!r}) is a byte token, which a {model!r} vocabulary "
                             "cannot have")
    finally:
        values.release()
