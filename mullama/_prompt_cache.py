"""The batching engine's host-memory prompt cache.

When a slot's KV cells are about to be given to a request with another
prefix, the engine saves the slot's sequence (llama.cpp's per-sequence state:
its KV cells) here, under a byte budget with least-recently-used eviction; a
later request whose prompt starts with those tokens has them restored instead
of evaluated. Used by the engine's driver thread only (the counters are read
from anywhere).
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

from . import _core

__all__ = ["HostPromptCache", "PromptCacheStats", "default_prompt_cache_bytes"]

#: a saved sequence: the engine gives anonymous mappings (pages of their own,
#: returned to the system when an entry goes)
State = Union[bytes, mmap.mmap]

#: the default budget: this fraction of the machine's memory, at most DEFAULT_CAP bytes
DEFAULT_FRACTION = 0.1
DEFAULT_CAP = 2 << 30


def default_prompt_cache_bytes() -> int:
    """A tenth of the machine's physical memory, at most 2 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: a conservative guess
        total = 4 << 30
    return int(min(total * DEFAULT_FRACTION, DEFAULT_CAP))


class _Entry:
    __slots__ = ("tokens", "data")

    def __init__(self, tokens: List[int], data: State) -> None:
        self.tokens = tokens
        self.data = data


class HostPromptCache:
    """Saved KV sequences keyed by their tokens, within *budget* bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()  # least recently used first
        self._next = 0
        #: bytes the entries hold (never above the budget)
        self.bytes = 0
        #: entries saved, restored and evicted so far
        self.saves = 0
        self.restores = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, tokens: List[int]) -> Tuple[Optional[int], int]:
        """The entry sharing the longest prefix with *tokens*, and that length."""
        key, length = None, 0
        for k, entry in self._entries.items():
            n = _core.common_prefix(entry.tokens, tokens)
            if n > length:
                key, length = k, n
        return key, length

    def holds(self, tokens: List[int]) -> bool:
        """Some entry already starts with all of *tokens* (saving them adds nothing)."""
        n = len(tokens)
        return any(len(e.tokens) >= n and _core.common_prefix(e.tokens, tokens) == n
                   for e in self._entries.values())

    def get(self, key: int) -> Tuple[List[int], State]:
        entry = self._entries[key]
        self._entries.move_to_end(key)
        self.restores += 1
        return entry.tokens, entry.data

    def make_room(self, size: int) -> bool:
        """Evict least recently used entries until *size* more bytes fit (before
        they are allocated: memory never holds more than the budget); False if
        *size* alone is over the budget."""
        if size > self.budget:
            return False
        while self.bytes + size > self.budget:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        return True

    def put(self, tokens: List[int], data: State) -> bool:
        """Keep *data* (the state of a sequence holding *tokens*); entries whose
        tokens are a prefix of *tokens* go (restoring this one gives theirs),
        then the least recently used ones until the budget holds. False if
        *data* alone is over the budget."""
        size = len(data)
        if size == 0 or size > self.budget:
            return False
        n = len(tokens)
        for k, entry in list(self._entries.items()):
            if len(entry.tokens) <= n and _core.common_prefix(entry.tokens, tokens) == len(entry.tokens):
                self._drop(k)
        self.make_room(size)
        self._entries[self._next] = _Entry(list(tokens), data)
        self._next += 1
        self.bytes += size
        self.saves += 1
        return True

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.data)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


@dataclass(frozen=True)
class PromptCacheStats:
    """The batching engine's prompt cache, now.

    Attributes:
        cached_prompt_tokens: prompt tokens of started requests reused from a
            cache (a slot's cells, a running request's, or host memory).
        evaluated_prompt_tokens: prompt tokens of started requests evaluated.
        slot_cells: KV cells the free slots keep for later prompts (inside the
            KV cache allocated at load: they cost no extra memory).
        host_bytes: bytes the host-memory cache holds (at most ``host_budget``).
        host_budget: its budget (``AsyncConfig.prompt_cache_bytes``; 0: none).
        host_entries: sequences it holds.
        host_saves, host_restores, host_evictions: sequences saved, restored
            and evicted so far.
        refreshed_tokens: generated tokens evaluated again as a prompt while
            the engine had nothing else to do, so that a follow-up request
            reuses them exactly (see the README's "Prompt cache").
        decoded_cells_reused: generated tokens' cells are reused as they
            are: the engine found that this model's decode steps compute them
            bit for bit as a prompt does, so nothing is evaluated again (or
            the cache is not exact, ``prompt_cache_exact=False``).
    """

    cached_prompt_tokens: int
    evaluated_prompt_tokens: int
    slot_cells: int
    host_bytes: int
    host_budget: int
    host_entries: int
    host_saves: int
    host_restores: int
    host_evictions: int
    refreshed_tokens: int = 0
    decoded_cells_reused: bool = False

    @property
    def hit_ratio(self) -> float:
        """The share of prompt tokens reused rather than evaluated."""
        total = self.cached_prompt_tokens + self.evaluated_prompt_tokens
        return self.cached_prompt_tokens / total if total else 0.0
