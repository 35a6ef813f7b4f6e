"""The pinned llama.cpp fetch and the cached build (no network, no compiler run)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import build_llama_cpp
import fetch_llama_cpp


def make_sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_sha_mismatch_is_refused(tmp_path):
    sdist = tmp_path / "fake.tar.gz"
    make_sdist(sdist, {"x/vendor/llama.cpp/include/llama.h": b"//"})
    with pytest.raises(fetch_llama_cpp.FetchError, match="does not match the pin"):
        fetch_llama_cpp.ensure_llama_cpp(tmp_path / "llama.cpp", sdist)
    assert not (tmp_path / "llama.cpp").exists()


def test_only_vendor_llama_cpp_is_unpacked(tmp_path, monkeypatch):
    prefix = f"llama_cpp_python-{fetch_llama_cpp.SDIST_VERSION}/"
    sdist = tmp_path / "fake.tar.gz"
    make_sdist(sdist, {
        prefix + "vendor/llama.cpp/include/llama.h": b"// llama.h",
        prefix + "vendor/llama.cpp/src/a.cpp": b"int a;",
        prefix + "llama_cpp/llama.py": b"# not wanted",
        prefix + "vendor/llama.cpp/../../escape.txt": b"no",
    })
    monkeypatch.setattr(fetch_llama_cpp, "SDIST_SHA256", fetch_llama_cpp.sha256_file(sdist))
    dest = fetch_llama_cpp.ensure_llama_cpp(tmp_path / "llama.cpp", sdist)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [".mullama-pin", "include/llama.h", "src/a.cpp"]
    assert not (tmp_path / "escape.txt").exists()


def test_existing_checkout_is_used_as_is(tmp_path, monkeypatch):
    dest = tmp_path / "llama.cpp"
    (dest / "include").mkdir(parents=True)
    (dest / "include" / "llama.h").write_text("// mine")
    monkeypatch.setattr(fetch_llama_cpp, "download_sdist", lambda d: pytest.fail("must not download"))
    assert fetch_llama_cpp.ensure_llama_cpp(dest) == dest


def test_second_build_reuses_the_cache(tmp_path, monkeypatch, llama_cpp_dir):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setenv("MULLAMA_BUILD_CACHE", str(tmp_path))
    monkeypatch.setattr(build_llama_cpp, "probe_x86_features", lambda: {"GGML_AVX2": True})
    monkeypatch.setattr(build_llama_cpp.subprocess, "run", fake_run)
    first = build_llama_cpp.build()
    assert len(calls) == 2  # configure + build, library targets only
    assert calls[1][-4:] == ["--target", "llama", "--target", "llama-common"]
    assert "-DGGML_NATIVE=OFF" in calls[0] and "-DGGML_AVX2=ON" in calls[0]
    assert "-DLLAMA_BUILD_TESTS=OFF" in calls[0] and "-DBUILD_SHARED_LIBS=OFF" in calls[0]
    assert build_llama_cpp.build() == first
    assert len(calls) == 2  # nothing ran the second time
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=ON")  # other flags, other cache entry
    assert build_llama_cpp.build() != first
    assert "-DGGML_CUDA=ON" in calls[2]


def test_probe_enables_only_what_runs():
    found = build_llama_cpp.probe_x86_features()
    assert set(found) == set(build_llama_cpp._X86_PROBES)
    for name, deps in build_llama_cpp._REQUIRES.items():
        if found[name]:
            assert all(found[d] for d in deps)


def test_the_sdist_holds_what_its_build_needs(tmp_path):
    """A source distribution builds on its own: setup.py imports tools/build_llama_cpp.py (and the
    fetch script), and the extension needs its C++ header and declaration files."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (sdist,) = tmp_path.glob("mullama-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("setup.py", "pyproject.toml", "tools/build_llama_cpp.py", "tools/fetch_llama_cpp.py",
                   "mullama/_core.pyx", "mullama/_core.pxd", "mullama/_llama.pxd", "mullama/_threads.h",
                   "mullama/_sampling.h", "mullama/_common.h",
                   "mullama/_core.pyi", "mullama/py.typed"):
        assert needed in names, needed
    assert not any(n.startswith("third_party/") or n.endswith(".gguf") for n in names)  # nothing third-party
