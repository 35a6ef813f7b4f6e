"""llama.cpp's own tokenizer test vectors (models/ggml-vocab-*.gguf with .inp/.out)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mullama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from fetch_llama_cpp import ensure_llama_cpp  # noqa: E402

MODELS = ensure_llama_cpp() / "models"
VOCABS = sorted(p for p in MODELS.glob("ggml-vocab-*.gguf") if p.with_name(p.name + ".inp").is_file())
SEP = b"\n__ggml_vocab_test__\n"


def read_cases(vocab: Path):
    raw = vocab.with_name(vocab.name + ".inp").read_bytes()
    if raw.endswith(SEP):  # upstream's reader adds no empty case after a final separator
        raw = raw[: -len(SEP)]
    inputs = raw.split(SEP)
    outputs = vocab.with_name(vocab.name + ".out").read_bytes().decode().split("\n")
    if outputs and outputs[-1] == "":
        outputs.pop()
    assert len(inputs) == len(outputs), f"{vocab.name}: .inp and .out disagree"
    return [(i, [int(t) for t in o.split()]) for i, o in zip(inputs, outputs)]


def test_vectors_present():
    assert len(VOCABS) >= 10, f"expected upstream's vocab files in {MODELS}"


@pytest.mark.parametrize("vocab", VOCABS, ids=lambda p: p.name[len("ggml-vocab-"):-len(".gguf")])
def test_tokenizer_vectors(vocab):
    try:
        model = mullama.Model.load(vocab, vocab_only=True)
    except mullama.UnsupportedModelError as exc:  # a tokenizer this llama.cpp cannot load
        pytest.skip(f"llama.cpp cannot load {vocab.name}: {exc}")
    with model:
        failures = []
        for text, expected in read_cases(vocab):
            got = model._core.tokenize(text, False, False)  # exact bytes, as upstream's test
            if got != expected:
                failures.append((text[:40], expected[:12], got[:12]))
        assert not failures, f"{len(failures)} mismatches, first: {failures[:3]}"
        with pytest.raises(mullama.InvalidModelError, match="vocab_only"):
            model.create_context()
