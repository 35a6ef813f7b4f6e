#!/usr/bin/env python3
"""Build llama.cpp's static libraries (and, on request, its tools) once per machine.

The build lives outside the source tree, in a cache directory keyed by the
pinned llama.cpp version and every flag that changes the output, so a second
``pip install`` (or a fresh clone on the same machine) reuses it.

CPU features are not taken from ``GGML_NATIVE``: on these VMs ``-march=native``
enables instructions the CPU advertises but the hypervisor refuses (SIGILL).
Instead each x86 feature ggml knows is *probed*: a tiny program using one of its
instructions is compiled and run, and the feature is enabled only if it ran.

Environment:
  CMAKE_ARGS            extra cmake arguments (passed through, part of the cache key)
  MULLAMA_CUDA=1        build the CUDA backend (``-DGGML_CUDA=ON``)
  MULLAMA_BUILD_CACHE   cache root (default ``$MULLAMA_HOME/build`` or ``~/.cache/mullama/build``)
  MULLAMA_NATIVE=1      trust ``GGML_NATIVE=ON`` instead of probing
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_llama_cpp import DEFAULT_DEST, LLAMA_CPP_COMMIT, SDIST_VERSION, ensure_llama_cpp  # noqa: E402

#: static libraries the extension links, dependents before dependencies: llama.cpp's
#: ``common`` (JSON schema to grammar, chat templates with tools) first, then llama and ggml
LINK_LIBS = ("libllama-common.a", "libllama-common-base.a", "libcpp-httplib.a",
             "libllama.a", "libggml.a", "libggml-cpu.a", "libggml-base.a")
#: the library build's targets
LIB_TARGETS = ("llama", "llama-common")

# ggml option -> (gcc flags, C body exercising one instruction of the feature)
_X86_PROBES: dict[str, tuple[str, str]] = {
    "GGML_SSE42": ("-msse4.2", "return (int)_mm_crc32_u32(v, 7u) == 1;"),
    "GGML_AVX": ("-mavx", "__m256 a = _mm256_set1_ps((float)v); a = _mm256_add_ps(a, a); return _mm256_cvtss_f32(a) == 1.0f;"),
    "GGML_AVX2": ("-mavx2", "__m256i a = _mm256_set1_epi32(v); a = _mm256_add_epi32(a, a); return _mm256_extract_epi32(a, 0) == 1;"),
    "GGML_FMA": ("-mfma", "__m256 a = _mm256_set1_ps((float)v); a = _mm256_fmadd_ps(a, a, a); return _mm256_cvtss_f32(a) == 1.0f;"),
    "GGML_F16C": ("-mf16c", "__m128 a = _mm_cvtph_ps(_mm_set1_epi16((short)v)); return _mm_cvtss_f32(a) == 1.0f;"),
    "GGML_BMI2": ("-mbmi2", "return (int)_pdep_u32(v, 0xf0u) == 1;"),
    "GGML_AVX_VNNI": ("-mavx2 -mavxvnni", "__m256i a = _mm256_set1_epi32(v); a = _mm256_dpbusd_avx_epi32(a, a, a); return _mm256_extract_epi32(a, 0) == 1;"),
    "GGML_AVX512": ("-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw", "__m512i a = _mm512_set1_epi16((short)v); a = _mm512_add_epi16(a, a); return _mm512_reduce_add_epi32(a) == 1;"),
    "GGML_AVX512_VBMI": ("-mavx512f -mavx512bw -mavx512vbmi", "__m512i a = _mm512_set1_epi8((char)v); a = _mm512_permutexvar_epi8(a, a); return _mm512_reduce_add_epi32(a) == 1;"),
    "GGML_AVX512_VNNI": ("-mavx512f -mavx512vnni", "__m512i a = _mm512_set1_epi32(v); a = _mm512_dpbusd_epi32(a, a, a); return _mm512_reduce_add_epi32(a) == 1;"),
    "GGML_AVX512_BF16": ("-mavx512f -mavx512bf16", "__m512 a = _mm512_set1_ps((float)v); __m512bh b = _mm512_cvtne2ps_pbh(a, a); return _mm512_reduce_add_ps(_mm512_dpbf16_ps(a, b, b)) == 1.0f;"),
}
# a feature is only tried when the features it builds on work
_REQUIRES = {
    "GGML_AVX2": ("GGML_AVX",), "GGML_FMA": ("GGML_AVX",), "GGML_F16C": ("GGML_AVX",),
    "GGML_AVX_VNNI": ("GGML_AVX2",), "GGML_AVX512": ("GGML_AVX2", "GGML_FMA", "GGML_F16C"),
    "GGML_AVX512_VBMI": ("GGML_AVX512",), "GGML_AVX512_VNNI": ("GGML_AVX512",),
    "GGML_AVX512_BF16": ("GGML_AVX512",),
}


def _log(msg: str) -> None:
    print(f"[mullama build] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    if os.environ.get("MULLAMA_BUILD_CACHE"):
        return Path(os.environ["MULLAMA_BUILD_CACHE"]).expanduser()
    home = os.environ.get("MULLAMA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mullama")
    return Path(home) / "build"


def probe_x86_features(cc: str = "cc") -> dict[str, bool]:
    """Return which of ggml's x86 options this machine really executes."""
    found: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="mullama-probe-") as d:
        for name, (flags, body) in _X86_PROBES.items():
            if not all(found.get(dep) for dep in _REQUIRES.get(name, ())):
                found[name] = False
                continue
            src = Path(d, f"{name}.c")
            exe = Path(d, name)
            src.write_text(
                "#include <immintrin.h>\n"
                "int main(int argc, char **argv) { (void)argv; volatile unsigned vv = (unsigned)argc; unsigned v = vv;\n"
                f"  {body}\n}}\n"
            )
            ok = subprocess.run([cc, "-O1", *flags.split(), str(src), "-o", str(exe)],
                                capture_output=True).returncode == 0
            # exit status is 0 or 1; a signal (SIGILL) gives a negative code
            found[name] = ok and subprocess.run([str(exe)], capture_output=True).returncode in (0, 1)
    return found


def cmake_options() -> list[str]:
    """All -D options of the build, CPU probing and user overrides included."""
    opts = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        # ggml's own thread pool instead of OpenMP: each context gets a pool of
        # its own (see _core.pyx). With OpenMP every thread that ever ran a
        # decode keeps a team; once teams outnumber the cores libgomp throttles
        # all of them, and decode from a worker thread fell to half speed.
        "-DGGML_OPENMP=OFF",
    ]
    machine = platform.machine().lower()
    if os.environ.get("MULLAMA_NATIVE") == "1":
        opts.append("-DGGML_NATIVE=ON")
    elif machine in ("x86_64", "amd64", "i686", "x86"):
        opts.append("-DGGML_NATIVE=OFF")
        for name, ok in probe_x86_features().items():
            opts.append(f"-D{name}={'ON' if ok else 'OFF'}")
    if os.environ.get("MULLAMA_CUDA") == "1":
        opts.append("-DGGML_CUDA=ON")
    # llamafile's sgemm computes a matrix product of two or more rows along
    # another path than one row (it declines n < 2), so a token's logits
    # depended on how many tokens shared its decode: up to 0.43 apart on the
    # default model at 200 tokens of context. Without it ggml computes each
    # row alike whatever the batch (measured bit for bit): speculative
    # decoding's verification, the prompt cache and the batching engine give
    # the outputs of a plain run. Measured cost on the default model (Q4_1,
    # which llamafile does not cover): none (docs/performance.md).
    opts.append("-DGGML_LLAMAFILE=OFF")
    opts += shlex.split(os.environ.get("CMAKE_ARGS", ""))
    return opts


def _cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        try:
            import cmake  # the PyPI package, a build requirement

            exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            raise RuntimeError("cmake not found: pip install cmake") from None
    return exe


def build(targets: tuple[str, ...] = LIB_TARGETS, src: Path = DEFAULT_DEST, tools: bool = False) -> Path:
    """Build *targets* (cached) and return the build directory.

    With ``tools=True`` the tools (llama-bench, llama-batched-bench, llama-server)
    are configured too; that build is kept in its own directory so the library
    build stays lean.
    """
    src = ensure_llama_cpp(src)
    opts = cmake_options()
    opts.append(f"-DLLAMA_BUILD_TOOLS={'ON' if tools else 'OFF'}")
    opts.append("-DLLAMA_BUILD_COMMON=ON")
    if tools:
        # the tools build has llama-server too (bench/structured.py), without its web UI:
        # no npm, and no download of prebuilt assets
        opts = [o for o in opts if o != "-DLLAMA_BUILD_SERVER=OFF"]
        opts += ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    # a fetched tree is identified by its pin (so fresh clones share the cache);
    # a developer's own checkout by its path
    pin = src / ".mullama-pin"
    origin = pin.read_text() if pin.is_file() else str(src)
    key = hashlib.sha256(json.dumps([SDIST_VERSION, LLAMA_CPP_COMMIT, origin, opts]).encode()).hexdigest()[:12]
    bdir = cache_root() / f"llama-{LLAMA_CPP_COMMIT}-{'tools' if tools else 'lib'}-{key}"
    stamp = bdir / f".built-{'-'.join(sorted(targets))}"
    if stamp.exists():
        _log(f"reusing cached llama.cpp build {bdir}")
        return bdir
    bdir.mkdir(parents=True, exist_ok=True)
    (bdir / "mullama-options.json").write_text(json.dumps(opts, indent=1))
    cmake = _cmake()
    _log("configuring llama.cpp: " + " ".join(o for o in opts if "GGML_" in o))
    subprocess.run([cmake, "-S", str(src), "-B", str(bdir), *opts], check=True,
                   stdout=subprocess.DEVNULL if not os.environ.get("MULLAMA_VERBOSE") else None)
    jobs = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)
    _log(f"building {', '.join(targets)} with {jobs} jobs (about 1.5 minutes on 2 cores, once per machine) ...")
    # the build's log goes to stderr: a bench script's stdout carries only its JSON figures
    subprocess.run([cmake, "--build", str(bdir), "--config", "Release", "-j", jobs,
                    *[a for t in targets for a in ("--target", t)]], check=True, stdout=2)
    stamp.touch()
    return bdir


def static_libs(bdir: Path) -> list[str]:
    """Paths of the static libraries to link, in link order (plus any GPU backends)."""
    found = {p.name: p for p in bdir.rglob("*.a")}
    missing = [name for name in LINK_LIBS if name not in found]
    if missing:
        raise RuntimeError(f"llama.cpp build in {bdir} lacks {', '.join(missing)}")
    extra = [str(p) for name, p in sorted(found.items()) if name.startswith("libggml-") and name not in LINK_LIBS]
    first = [str(found[name]) for name in LINK_LIBS[:5]]
    return [*first, *extra, str(found["libggml-cpu.a"]), str(found["libggml-base.a"])]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build llama.cpp (cached)")
    ap.add_argument("targets", nargs="*", default=list(LIB_TARGETS))
    ap.add_argument("--tools", action="store_true", help="configure with the tools (llama-bench ...)")
    a = ap.parse_args()
    print(build(tuple(a.targets), tools=a.tools))
