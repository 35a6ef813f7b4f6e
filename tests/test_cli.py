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


def test_stop_strings_are_unescaped_as_typed_in_a_shell(tiny_model_path):
    from mullama.cli import unescape

    assert unescape(r"\n") == "\n" and unescape(r"a\tb\\n") == "a\tb\\n" and unescape("é\\r") == "é\r"
    with mullama.Model.load(tiny_model_path) as m, m.create_context(2048) as ctx:
        full = ctx.generate("hello", mullama.StreamConfig.greedy(40)).text
    stop = full[10:12]  # two characters from the middle: the output stops before them
    typed = stop.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    r = run("run", "hello", "--model", str(tiny_model_path), "-n", "40", "--stop", typed, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == full[:full.index(stop)] + ("\n" if full.index(stop) else "")


def test_cli_errors_name_cli_options_and_print_no_stray_line(tiny_model_path):
    r = run("run", "a b " * 300, "--model", str(tiny_model_path), "-c", "256")
    assert r.returncode == 1
    assert r.stdout == ""  # no empty line before the error
    assert "-c/--context-size" in r.stderr and "reset()" not in r.stderr


def test_version_help_and_home_paths(tiny_model_path, tmp_path, monkeypatch):
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("mullama ")
    r = run("run", "--help")
    assert "(default: 128)" in r.stdout and "the text to continue" in r.stdout
    (tmp_path / "m.gguf").write_bytes(tiny_model_path.read_bytes())
    r = run("info", "~/m.gguf", env={**__import__("os").environ, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "mullama-tiny" in r.stdout


@pytest.mark.integration
def test_pull_shows_its_own_progress_not_pips(tmp_path, default_model_path):
    """Into an empty cache: mullama's progress on stderr, the path on stdout, none of pip's chatter."""
    r = run("pull", env={**__import__("os").environ, "MULLAMA_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "models" / default_model_path.name)
    assert "pulling" in r.stderr
    for chatter in ("Collecting", "Saved", "Looking in", "Downloading", "Successfully"):
        assert chatter not in r.stderr, r.stderr


def test_prompt_cache_mb_flag():
    from mullama.cli import _mib

    assert _mib(None, "--prompt-cache-mb") is None  # the default budget
    assert _mib(0, "--prompt-cache-mb") == 0 and _mib(1.5, "--prompt-cache-mb") == 3 << 19
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(mullama.InvalidConfigError, match="--prompt-cache-mb must be"):
            _mib(bad, "--prompt-cache-mb")
