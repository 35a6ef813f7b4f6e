"""GGUF validation: malformed files raise named errors before llama.cpp parses them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import mullama
from mullama._gguf import GGUFArray, read_gguf

F32, Q4_0 = 0, 2  # ggml type ids


def s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", 4, value)


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", 8) + s(value)


def tensor(name: str, shape, ttype: int = F32, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<q", d) for d in shape) + \
        struct.pack("<IQ", ttype, offset)


def gguf(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += b"\0" * (-len(body) % align)
    return body + data


def vocab(model: str, tokens, types):
    return [kv_str("tokenizer.ggml.model", model),
            s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(tokens)) + b"".join(s(t) for t in tokens),
            s("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, len(types)) + struct.pack(f"<{len(types)}i", *types)]


def good_tensors():
    # two f32 tensors of 8 and 4 elements: 32 bytes, then 16 (+16 padding)
    return [tensor("a", (8,)), tensor("b", (2, 2), offset=32)], b"\1" * 32 + b"\2" * 16


@pytest.fixture
def write(tmp_path):
    def write(data: bytes) -> Path:
        p = tmp_path / "m.gguf"
        p.write_bytes(data)
        return p
    return write


def test_a_well_formed_file(write):
    ts, data = good_tensors()
    info = read_gguf(str(write(gguf([kv_str("general.architecture", "llama"), kv_u32("x", 7)], ts, data))))
    assert info.version == 3 and info.n_tensors == 2 and info.n_kv == 2 and info.alignment == 32
    assert info.metadata == {"general.architecture": "llama", "x": 7}
    assert info.tensors == [("a", (8,), F32, 32), ("b", (2, 2), F32, 16)]
    assert info.data_size == 64 and info.data_offset % 32 == 0


def test_real_files(tiny_model_path, llama_cpp_dir):
    info = read_gguf(str(tiny_model_path))
    assert info.n_tensors > 0 and info.metadata["general.architecture"] == "llama"
    assert isinstance(info.metadata["tokenizer.ggml.tokens"], GGUFArray)
    assert info.metadata["tokenizer.ggml.tokens"].count == 512
    vocabs = sorted((llama_cpp_dir / "models").glob("ggml-vocab-*.gguf"))
    assert vocabs
    for v in vocabs:
        assert read_gguf(str(v)).n_tensors == 0


@pytest.mark.integration
def test_default_model_file(default_model_path, default_model):
    info = read_gguf(str(default_model_path))
    assert info.n_tensors == 272 and info.data_offset + info.data_size >= default_model.info.size_bytes


BAD = {
    "version 0": (gguf(version=0), "unknown GGUF version 0"),
    "version 99": (gguf(version=99), "unknown GGUF version 99"),
    "too many kv": (gguf(n_kv=1 << 40), "claims 1099511627776 metadata entries"),
    "too many tensors": (gguf(n_tensors=1 << 60), "claims 1152921504606846976 tensors"),
    "key runs past the end": (gguf([struct.pack("<Q", 1 << 50) + b"k" * 20], n_kv=1), "key of metadata entry 0"),
    "empty key": (gguf([s("") + struct.pack("<II", 4, 1)]), "empty key"),
    "unknown value type": (gguf([s("k") + struct.pack("<II", 13, 0)]), "unknown value type 13"),
    "duplicate key": (gguf([kv_u32("k", 1), kv_u32("k", 2)]), "'k' appears twice"),
    "nested array": (gguf([s("k") + struct.pack("<IIQ", 9, 9, 1)]), "array of arrays"),
    "array of unknown": (gguf([s("k") + struct.pack("<IIQ", 9, 77, 1) + b"\0" * 8]), "unknown element type 77"),
    "array longer than file": (gguf([s("k") + struct.pack("<IIQ", 9, 4, 1 << 29)]), "536870912 uint32"),
    "string array longer than file": (gguf([s("k") + struct.pack("<IIQ", 9, 8, 1 << 29)]), "claims 536870912 strings"),
    "string in array runs past end": (gguf([s("k") + struct.pack("<IIQ", 9, 8, 2) + s("ok") + struct.pack("<Q", 999)]),
                                      "string 1 of 'k'"),
    "file ends in a string's length": (gguf([s("k") + struct.pack("<IIQ", 9, 8, 2) + s("ok" * 8) + b"\x01\x00"]),
                                       "the length of string 1 of 'k'"),
    "alignment not a power of two": (gguf([kv_u32("general.alignment", 24)]), "alignment is 24"),
    "alignment of the wrong type": (gguf([kv_str("general.alignment", "32")]), "alignment is a string"),
    "string longer than llama.cpp reads": (gguf([s("k") + struct.pack("<IQ", 8, (1 << 30) + 1) + b"x" * 20]),
                                           "1073741825 bytes"),
    "array longer than llama.cpp reads": (gguf([s("k") + struct.pack("<IIQ", 9, 0, (1 << 30) + 1) + b"x" * 20]),
                                          "1073741825 elements"),
    "five dimensions": (gguf(tensors=[tensor("t", (1, 1, 1, 1, 1))]), "5 dimensions"),
    "negative dimension": (gguf(tensors=[tensor("t", (4, -1))]), "negative dimension"),
    "too many elements": (gguf(tensors=[tensor("t", (1 << 62, 4))]), "too many elements"),
    "removed type": (gguf(tensors=[tensor("t", (32,), ttype=4)]), "removed ggml type 4"),
    "unknown type": (gguf(tensors=[tensor("t", (32,), ttype=999)]), "unknown or removed ggml type 999"),
    "row not a multiple of the block": (gguf(tensors=[tensor("t", (33,), ttype=Q4_0)]), "block of 32"),
    "name too long": (gguf(tensors=[tensor("n" * 64, (1,))]), "name of 64 bytes"),
    "duplicate tensor": (gguf(tensors=[tensor("t", (8,)), tensor("t", (8,), offset=32)], data=b"\0" * 64),
                         "'t' appears twice"),
    "offset out of order": (gguf(tensors=[tensor("a", (8,)), tensor("b", (8,), offset=64)], data=b"\0" * 96),
                            "starts at data offset 64, expected 32"),
    # found by bench/fuzz_gguf.py: llama.cpp aborts the process on a repeated token, and reads a
    # token only up to its first NUL byte
    "repeated token": (gguf([s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + s("a") + s("b") + s("a")]),
                       "token 2 of the vocabulary repeats token 0"),
    "token repeated up to a NUL": (gguf([s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("ab") +
                                         s("ab\0cd")]), "token 1 of the vocabulary repeats token 0 .b'ab'"),
    "byte token in a WPM vocabulary": (gguf(vocab("bert", ["a", "<0x41>"], [1, 6])),
                                       "token 1 .b'<0x41>'. is a byte token, which a 'bert' vocabulary cannot have"),
    "repeated empty token name": (gguf(vocab("llama", ["", "[EMPTY_0]"], [1, 1])), "token 1 .* repeats token 0"),
    "data past the end": (gguf(tensors=[tensor("a", (8,)), tensor("b", (1000,), offset=32)], data=b"\0" * 64),
                          "data of tensor 'b' .4000 bytes"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_headers_are_named(write, name):
    data, message = BAD[name]
    with pytest.raises(mullama.InvalidModelError, match=message):
        read_gguf(str(write(data)))
    with pytest.raises(mullama.InvalidModelError, match=message):  # and so does loading it
        mullama.Model.load(write(data))


def test_what_llama_cpp_accepts_is_accepted(write):
    """Rules no stricter than llama.cpp: non-UTF-8 strings, several empty tokens, byte tokens outside WPM
    vocabularies in any spelling (XVERSE writes <b'\\x00'>), any vocabulary of a no_vocab model."""
    ok = [s("k") + struct.pack("<I", 8) + struct.pack("<Q", 2) + b"\xff\xfe"]
    info = read_gguf(str(write(gguf(ok + vocab("llama", ["", "a", ""], [1, 1, 1])))))
    assert info.metadata["k"] == "\udcff\udcfe"
    read_gguf(str(write(gguf(vocab("llama", ["a", "<b'\\x00'>"], [1, 6])))))
    read_gguf(str(write(gguf(vocab("plamo2", ["a", "<0x41>"], [1, 6])))))
    read_gguf(str(write(gguf(vocab("no_vocab", ["a", "a"], [1, 1])))))


def test_versions_llama_cpp_cannot_read(write):
    with pytest.raises(mullama.UnsupportedModelError, match="version 1"):
        mullama.Model.load(write(gguf(version=1)))
    big_endian = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    with pytest.raises(mullama.UnsupportedModelError, match="big-endian"):
        mullama.Model.load(write(big_endian))


def test_every_truncation_of_a_real_model_is_named(tiny_model_path, write):
    full = tiny_model_path.read_bytes()
    info = read_gguf(str(tiny_model_path))
    # every byte of the header, every third of the tables, then steps through the tensor data
    cuts = list(range(0, 64)) + list(range(64, info.data_offset + 1, 3)) + \
        list(range(info.data_offset, len(full), len(full) // 50))
    for cut in cuts:
        p = write(full[:cut])
        with pytest.raises(mullama.InvalidModelError):
            read_gguf(str(p))
    for cut in cuts[:: max(1, len(cuts) // 40)]:  # and llama.cpp never sees them
        with pytest.raises(mullama.InvalidModelError):
            mullama.Model.load(write(full[:cut]))


def test_vocabulary_only_file_used_for_generation(llama_cpp_dir):
    vocab = llama_cpp_dir / "models" / "ggml-vocab-llama-spm.gguf"
    with pytest.raises(mullama.InvalidModelError, match="vocabulary-only.*vocab_only=True"):
        mullama.Model.load(vocab)
    with mullama.Model.load(vocab, vocab_only=True) as m:
        assert m.tokenize("hello")
        with pytest.raises(mullama.InvalidModelError, match="tokenize but not generate"):
            m.create_context()


def test_short_fuzz_campaign():
    """Mutated and truncated real GGUF files, loaded in a worker process: each
    loads or raises MullamaError (the long campaign: python bench/fuzz_gguf.py)."""
    from fuzz_gguf import campaign

    c = campaign(150, seed=12345)
    assert c.findings == []
    assert (c.crashes, c.hangs, c.other_errors) == (0, 0, 0)
    assert c.loaded + c.mullama_errors == c.inputs == 150
    assert c.loaded > 0 and c.mullama_errors > 0  # the mutants exercise both outcomes
