"""The mullama command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mullama


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mullama", *args], capture_output=True, text=True, timeout=300, **kw)


def test_info(tiny_model_path):
    r = run("info", str(tiny_model_path))
    assert r.returncode == 0, r.stderr
    assert "mullama-tiny" in r.stdout and "n_vocab" in r.stdout and "512" in r.stdout


def test_run_with_model(tiny_model_path):
    r = run("run", "hello", "--model", str(tiny_model_path), "-n", "5")
    assert r.returncode == 0, r.stderr
    with mullama.Model.load(tiny_model_path) as m, m.create_context(2048) as ctx:
        expected = ctx.generate("hello", mullama.StreamConfig.greedy(5)).text
    assert r.stdout == expected + "\n"


def test_bad_model_is_a_clean_error(tmp_path):
    r = run("run", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1
    assert "error" in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.integration
def test_pull_and_run_default_model(default_model_path):
    r = run("pull", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(default_model_path)
    r = run("run", "The capital of France is", "-n", "8")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
