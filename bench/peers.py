#!/usr/bin/env python3
"""The peer binding, built from the same pinned source: llama-cpp-python in a virtual environment of its own.

llama-cpp-python's source distribution is the one that carries our pinned
llama.cpp (tools/fetch_llama_cpp.py), so the peer is built from the very same
sha256-checked file, with the CPU options our own build probes on this machine
(GGML_NATIVE=OFF plus the instruction sets that really run here: a native
build dies with SIGILL on these VMs). Everything else is the peer's own
default build, as its users get it. The environment is cached under the
mullama build cache, keyed by the pin and the options; building it takes a few
minutes, once per machine.

Measurements run inside that environment (``bench/_peer_llama_cpp.py``) and
come back as JSON, so the two bindings never share a process. The async
measurements drive the peer with the same anyio and trio versions as mullama's
(installed into that environment too).

Usage: python bench/peers.py            # build (or reuse) the environment and print its python
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from build_llama_cpp import cache_root, cmake_options  # noqa: E402
from fetch_llama_cpp import SDIST_NAME, SDIST_SHA256, SDIST_VERSION, download_sdist, sha256_file  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_peer_llama_cpp.py"


def _log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def peer_cmake_args() -> List[str]:
    """Our probed CPU options; the rest of the build is the peer's default."""
    return [o for o in cmake_options() if o.startswith(("-DGGML_NATIVE", "-DGGML_AVX", "-DGGML_FMA", "-DGGML_F16C",
                                                       "-DGGML_BMI2", "-DGGML_SSE", "-DGGML_AMX", "-DGGML_CUDA"))] \
        + ["-DLLAMA_CURL=OFF"]


def ensure_peer() -> Path:
    """The python of a virtual environment with llama-cpp-python built from the pinned sdist."""
    args = peer_cmake_args()
    key = hashlib.sha256(json.dumps([SDIST_VERSION, SDIST_SHA256, args, sys.version_info[:2]]).encode()).hexdigest()
    env_dir = cache_root() / f"peer-{SDIST_NAME}-{SDIST_VERSION}-{key[:12]}"
    python = env_dir / "bin" / "python"
    stamp = env_dir / ".built"
    if stamp.exists():
        _log(f"reusing {env_dir}")
        _ensure_async_libs(python)
        return python
    _log(f"building {SDIST_NAME}=={SDIST_VERSION} into {env_dir} (a few minutes, once per machine)")
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    with tempfile.TemporaryDirectory(prefix="mullama-peer-") as tmp:
        sdist = download_sdist(Path(tmp))
        digest = sha256_file(sdist)
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist.name}: sha256 {digest} does not match the pin {SDIST_SHA256}")
        env = dict(os.environ, CMAKE_ARGS=" ".join(args), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(sdist)], check=True, env=env)
    stamp.touch()
    _ensure_async_libs(python)
    return python


def _ensure_async_libs(python: Path) -> None:
    """anyio and trio in the peer's environment, at the versions this environment runs."""
    wanted = [f"{name}=={importlib.metadata.version(name)}" for name in ("anyio", "trio")]
    stamp = python.parent.parent / f".async-{'-'.join(wanted)}"
    if not stamp.exists():
        _log(f"installing {' '.join(wanted)} into the peer's environment")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted], check=True)
        stamp.touch()


def run_peer(python: Path, task: Dict[str, Any]) -> Dict[str, Any]:
    """Run one measurement *task* in the peer's environment; its JSON result."""
    out = subprocess.run([str(python), str(WORKER), json.dumps(task)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(ensure_peer())
