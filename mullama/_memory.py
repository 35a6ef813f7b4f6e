"""How much memory a context needs, and how much the machine has, before
llama.cpp allocates anything.

A context's size is mostly its KV cache: for every attention layer, K and V
vectors (``head_count_kv`` heads of ``key_length`` / ``value_length`` values,
f16) for every token it holds. Without flash attention, evaluating a batch
also needs the attention scores of every query head against every cell
(``n_ctx x n_ubatch x n_head`` f32 values) in the compute buffer. Both are
estimated from the GGUF metadata; a context whose estimate exceeds the memory
available (``MemAvailable``, or what the cgroup's limit leaves) is refused
with :class:`~mullama.InsufficientMemoryError` instead of being allocated and
getting the process OOM-killed.

The estimate is a lower bound where the metadata leaves doubt (sliding-window
layers whose pattern the file does not spell out count as sliding-window), so
a context that would fit is never refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

from ._errors import InsufficientMemoryError

__all__ = ["KVLayout", "kv_layout", "available_memory", "check_memory"]

GIB = 1 << 30
_F16 = 2  # bytes of a K or V element (llama.cpp's default cache type)
_F32 = 4  # bytes of an attention score

#: architectures llama.cpp runs without a KV cache (encoders, diffusion models): llama_model::create_memory
_NO_KV_CACHE = frozenset({
    "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert", "eurobert",
    "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada", "llada-moe", "rnd1",
})

_MAX_LAYERS = 4096


@dataclass(frozen=True)
class KVLayout:
    """What one KV cell costs in a model, from its GGUF metadata."""

    #: bytes per cell over the layers that attend to the whole context
    full: int
    #: bytes per cell over the sliding-window layers
    swa: int
    #: their window (tokens)
    n_swa: int
    #: most query heads of an attention layer (the attention scores without flash attention)
    n_head: int

    def estimate(self, n_ctx_seq: int, n_seq: int, n_ubatch: int, flash_attention: bool) -> Tuple[int, int]:
        """(KV cache bytes, attention score bytes) of a context of *n_seq*
        sequences of *n_ctx_seq* tokens evaluating *n_ubatch* tokens a step."""
        window = min(n_ctx_seq, self.n_swa) if self.n_swa > 0 else n_ctx_seq
        kv = n_seq * (self.full * n_ctx_seq + self.swa * window)
        scores = 0
        if not flash_attention and (self.full or self.swa):
            n_kv = n_ctx_seq if self.full else window
            scores = n_kv * min(n_ubatch, n_ctx_seq * n_seq) * self.n_head * _F32
        return kv, scores


def _per_layer(value: Any, n_layer: int) -> Optional[List[int]]:
    """A per-layer hyperparameter: an int for all layers, or an array of one per layer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value] * n_layer
    values = getattr(value, "values", None)  # a GGUFArray
    if isinstance(values, tuple) and len(values) >= n_layer and all(isinstance(v, int) for v in values):
        return [int(v) for v in values[:n_layer]]
    return None


def kv_layout(meta: Mapping[str, Any]) -> Optional[KVLayout]:
    """The :class:`KVLayout` of a model from its GGUF metadata (typed values,
    as :func:`mullama._gguf.read_gguf` reads them); None if the metadata does
    not say enough to estimate it."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    if arch in _NO_KV_CACHE:
        return KVLayout(0, 0, 0, 0)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_layer = get("block_count")
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or not 0 < n_layer <= _MAX_LAYERS:
        return None
    n_embd = get("embedding_length", 0)
    n_head = _per_layer(get("attention.head_count", 0), n_layer)
    if n_head is None or not isinstance(n_embd, int):
        return None
    n_head_kv_raw = get("attention.head_count_kv")
    n_head_kv = n_head if n_head_kv_raw is None else _per_layer(n_head_kv_raw, n_layer)
    if n_head_kv is None:
        return None

    # which layers attend at all (hybrid models mix attention and recurrent layers)
    attends = [h > 0 for h in n_head_kv]  # a per-layer array has 0 for a recurrent layer
    interval = get("full_attention_interval")
    if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
        attends = [a and (il + 1) % interval == 0 for il, a in enumerate(attends)]
    elif isinstance(n_head_kv_raw, int) and any(k.startswith((f"{arch}.ssm.", f"{arch}.wkv.")) for k in meta):
        return None  # a hybrid model whose attention layers the metadata does not list
    shared = get("attention.shared_kv_layers", 0)  # later layers reuse earlier layers' cache (gemma3n)
    if isinstance(shared, int) and not isinstance(shared, bool) and 0 < shared < n_layer:
        attends = [a and il < n_layer - shared for il, a in enumerate(attends)]

    # sliding-window layers: from the file's per-layer pattern, or all of them (a lower bound)
    n_swa = get("attention.sliding_window", 0)
    n_swa = n_swa if isinstance(n_swa, int) and not isinstance(n_swa, bool) and n_swa > 0 else 0
    swa = [False] * n_layer
    if n_swa:
        pattern = get("attention.sliding_window_pattern")
        values = getattr(pattern, "values", None)
        if isinstance(values, tuple) and len(values) >= n_layer:
            swa = [bool(v) for v in values[:n_layer]]
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern == 1:
            swa = [False] * n_layer
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 1:
            swa = [il % pattern < pattern - 1 for il in range(n_layer)]
        else:
            swa = [True] * n_layer

    key_mla = get("attention.key_length_mla")
    full = part = 0
    for il in range(n_layer):
        if not attends[il]:
            continue
        head_dim = n_embd // n_head[il] if n_head[il] else 0
        if isinstance(key_mla, int) and key_mla > 0:  # MLA: one compressed K per token, no V
            k, v = key_mla, 0
        else:
            k, v = get("attention.key_length", head_dim), get("attention.value_length", head_dim)
            if not isinstance(k, int) or not isinstance(v, int):
                return None
        cell = (k + v) * n_head_kv[il] * _F16
        if swa[il]:
            part += cell
        else:
            full += cell
    heads = max((h for h, a in zip(n_head, attends) if a), default=0)
    return KVLayout(full, part, n_swa, heads)


# -- what the machine has -----------------------------------------------------------------

_MEMINFO = "/proc/meminfo"
_CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _meminfo_available() -> Optional[int]:
    text = _read(_MEMINFO)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _stat_value(text: Optional[str], key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _cgroup_dirs() -> List[str]:
    """The cgroup v2 directories of this process, innermost first, up to the root."""
    dirs = []
    text = _read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().strip("/")
            while rel:
                dirs.append(os.path.join(_CGROUP_ROOT, rel))
                rel = os.path.dirname(rel)
    dirs.append(_CGROUP_ROOT)
    return dirs


def _cgroup_available() -> Optional[int]:
    """What the tightest cgroup memory limit leaves: limit - usage + reclaimable page cache."""
    best: Optional[int] = None
    for d in _cgroup_dirs():
        limit = (_read(os.path.join(d, "memory.max")) or "").strip()
        if not limit or limit == "max":
            continue
        try:
            left = int(limit) - int((_read(os.path.join(d, "memory.current")) or "0").strip() or 0)
        except ValueError:
            continue
        left += _stat_value(_read(os.path.join(d, "memory.stat")), "inactive_file")
        best = left if best is None else min(best, left)
    v1 = os.path.join(_CGROUP_ROOT, "memory")
    limit_v1 = (_read(os.path.join(v1, "memory.limit_in_bytes")) or "").strip()
    if limit_v1.isdigit() and int(limit_v1) < 1 << 60:  # cgroup v1; a huge value means no limit
        usage = (_read(os.path.join(v1, "memory.usage_in_bytes")) or "0").strip()
        left = int(limit_v1) - (int(usage) if usage.isdigit() else 0)
        left += _stat_value(_read(os.path.join(v1, "memory.stat")), "total_inactive_file")
        best = left if best is None else min(best, left)
    return None if best is None else max(best, 0)


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate: ``MemAvailable`` of
    ``/proc/meminfo``, or less if a cgroup memory limit leaves less. None
    where neither can be read (not Linux)."""
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check_memory(layout: Optional[KVLayout], *, n_ctx_seq: int, n_seq: int = 1, n_ubatch: int,
                 flash_attention: bool, count: int = 1, what: str) -> None:
    """Raise :class:`InsufficientMemoryError` if *count* contexts of *n_seq*
    sequences of *n_ctx_seq* tokens cannot fit in the memory available.

    *what* names what was asked, for the message (``"context_size=1048576"``).
    """
    if layout is None:
        return
    kv, scores = layout.estimate(n_ctx_seq, n_seq, n_ubatch, flash_attention)
    need = count * (kv + scores)
    if need == 0:
        return
    avail = available_memory()
    if avail is None or need <= avail:
        return
    parts = f"KV cache {_gib(count * kv)}"
    if scores:
        parts += f" + attention scores {_gib(count * scores)} (without flash attention)"
    hint = "use a smaller context_size"
    if scores:
        hint += " or flash_attention=True"
    raise InsufficientMemoryError(
        f"{what} needs about {_gib(need)} of memory ({parts}) but only {_gib(avail)} is available; {hint}")
