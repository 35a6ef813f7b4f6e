#!/usr/bin/env python3
"""Put the pinned llama.cpp source into ``third_party/llama.cpp``.

llama.cpp reaches this project only from a package registry: the source
distribution of ``llama-cpp-python`` carries it as ``vendor/llama.cpp``.  This
script downloads that sdist with pip, checks its sha256 against the pin below
and unpacks only ``vendor/llama.cpp``.  A ``third_party/llama.cpp`` that is
already there (a developer's own clone, say) is used as it is.

Upgrading llama.cpp means changing the three pins below.

Usage::

    python tools/fetch_llama_cpp.py [--dest DIR] [--sdist FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: upstream llama.cpp commit carried by that sdist (for humans and cache keys)
LLAMA_CPP_COMMIT = "0c1e57098"

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "third_party" / "llama.cpp"
_MEMBER_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"


class FetchError(RuntimeError):
    """The pinned source could not be fetched or did not match its pin."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(directory: Path) -> Path:
    """Download the pinned sdist into *directory* with pip and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
        # only this package as source: ``:all:`` would build cmake from source
        # for the metadata step
        "--no-binary", SDIST_NAME,
        "--dest", str(directory),
        f"{SDIST_NAME}=={SDIST_VERSION}",
    ]
    print(f"fetching {SDIST_NAME}=={SDIST_VERSION} (llama.cpp {LLAMA_CPP_COMMIT}) ...", file=sys.stderr)
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as exc:
        raise FetchError(f"pip could not download {SDIST_NAME}=={SDIST_VERSION}: {exc}") from exc
    found = sorted(directory.glob("*.tar.gz"))
    if not found:
        raise FetchError(f"pip reported success but left no sdist in {directory}")
    return found[0]


def unpack(sdist: Path, dest: Path) -> None:
    """Check *sdist* against the pin and extract only vendor/llama.cpp into *dest*."""
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise FetchError(
            f"{sdist.name}: sha256 {digest} does not match the pin {SDIST_SHA256}; refusing to use it"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(_MEMBER_PREFIX) or not (m.isfile() or m.isdir()):
                    continue
                m.name = m.name[len(_MEMBER_PREFIX):]
                if not m.name or m.name.startswith("/") or ".." in Path(m.name).parts:
                    continue
                members.append(m)
            if not members:
                raise FetchError(f"{sdist.name} holds no {_MEMBER_PREFIX}")
            tar.extractall(tmp, members=members, filter="data")
        (tmp / ".mullama-pin").write_text(f"{SDIST_NAME}=={SDIST_VERSION} {LLAMA_CPP_COMMIT}\n")
        os.replace(tmp, dest)  # atomic: a half-unpacked tree is never left at dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_llama_cpp(dest: Path = DEFAULT_DEST, sdist: Path | None = None) -> Path:
    """Return *dest*, fetching the pinned llama.cpp there first if it is missing."""
    if (dest / "include" / "llama.h").is_file():
        return dest
    if dest.exists():
        raise FetchError(f"{dest} exists but holds no include/llama.h; remove it and retry")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if sdist is not None:
        unpack(sdist, dest)
    else:
        with tempfile.TemporaryDirectory(prefix="mullama-sdist-") as d:
            unpack(download_sdist(Path(d)), dest)
    print(f"llama.cpp {LLAMA_CPP_COMMIT} is in {dest}", file=sys.stderr)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    ap.add_argument("--sdist", type=Path, help="use this already downloaded sdist (still sha256-checked)")
    args = ap.parse_args(argv)
    try:
        ensure_llama_cpp(args.dest.resolve(), args.sdist)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
