"""Which event loop an async object is in use by.

An :class:`~mullama.aio.AsyncContext` or a :class:`~mullama.aio.ModelPool`
keeps anyio locks and events, and those belong to the loop that waits on
them: a task of a second loop (another thread's ``anyio.run``, or asyncio and
trio) waiting on them is never woken, and would hang. So each such object
records the loop of its current users; a use from another loop while they
run raises :class:`~mullama.LoopConflictError` at once. When the last user
is done the object is free again, for any loop.

An object that serves several loops at once (an
:class:`~mullama.aio.AsyncModel`) keeps one of each such primitive per loop
instead (:class:`LoopLimiters`).
"""

from __future__ import annotations

from typing import Any, Optional
from weakref import WeakKeyDictionary

import anyio
import anyio.lowlevel

from .._errors import LoopConflictError

__all__ = ["LoopBinding", "LoopLimiters"]


class LoopBinding:
    """The loop of an object's current users, and how many there are."""

    __slots__ = ("_what", "_token", "users")

    def __init__(self, what: str) -> None:
        self._what = what
        self._token: Optional[Any] = None
        self.users = 0

    def check(self) -> bool:
        """Raise LoopConflictError if the object is in use by another loop;
        returns True if the calling loop is not the one it was last used by
        (its loop-bound primitives must then be made anew)."""
        token = anyio.lowlevel.current_token()
        if self.users and token != self._token:
            raise LoopConflictError(
                f"the {self._what} is in use by another event loop (another thread, or asyncio and trio); "
                "a loop cannot wait for another loop's tasks: use it from one event loop at a time")
        return token != self._token

    def enter(self) -> bool:
        """Count a user of the calling loop (see :meth:`check`); pair with :meth:`leave`."""
        moved = self.check()
        self._token = anyio.lowlevel.current_token()
        self.users += 1
        return moved

    def leave(self) -> None:
        self.users -= 1


class LoopLimiters:
    """A :class:`anyio.CapacityLimiter` of *total_tokens* for each event loop
    that asks (a limiter is waited on by one loop's tasks only); a loop's
    limiter is forgotten with the loop."""

    __slots__ = ("_total", "_by_loop")

    def __init__(self, total_tokens: int) -> None:
        self._total = total_tokens
        # keyed by the loop's native token (asyncio's loop, trio's TrioToken), as anyio's RunVar is
        self._by_loop: "WeakKeyDictionary[object, anyio.CapacityLimiter]" = WeakKeyDictionary()

    def current(self) -> anyio.CapacityLimiter:
        """The calling loop's limiter (made on its first use)."""
        loop = anyio.lowlevel.current_token().native_token
        limiter = self._by_loop.get(loop)
        if limiter is None:
            limiter = self._by_loop[loop] = anyio.CapacityLimiter(self._total)
        return limiter
