"""Objects that own llama.cpp memory: what they share.

:class:`Uncopyable` refuses pickling and copying; :class:`Owner` also warns
about, and closes, an object dropped without being closed.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from ._errors import NotCopyableError

__all__ = ["Uncopyable", "Owner"]


class Uncopyable:
    """Refuses pickling and copying with :class:`NotCopyableError`: the object
    owns llama.cpp memory (a copy would share it, and closing the copy would
    close the original). Subclasses set ``_copy_hint``: what to do instead."""

    __slots__ = ()
    _copy_hint = "create a new one"

    def _refuse(self, verb: str) -> NotCopyableError:
        name = type(self).__name__
        article = "an" if name[0] in "AEIOU" else "a"
        return NotCopyableError(f"{article} {name} cannot be {verb}: it owns llama.cpp memory; {self._copy_hint}")

    def __reduce_ex__(self, protocol: object) -> Any:
        raise self._refuse("pickled")

    def __reduce__(self) -> Any:
        raise self._refuse("pickled")

    def __copy__(self) -> Any:
        raise self._refuse("copied")

    def __deepcopy__(self, memo: object) -> Any:
        raise self._refuse("copied")


class Owner(Uncopyable):
    """An object that must be closed: one dropped open is closed when it is
    garbage collected, with a :class:`ResourceWarning` naming it (as asyncio's
    transports and uvloop's handles do), so that code run with warnings as
    errors (our test suite) fails on a leak. Subclasses define ``closed``,
    and may define ``_holds()`` (whether it holds anything yet; by default
    ``not closed``) and ``_close_unclosed()`` (by default ``close()``: a
    synchronous close that closes what it owns too, which then warns no more)."""

    __slots__ = ()

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def _holds(self) -> bool:
        return not self.closed

    def _close_unclosed(self) -> None:
        self.close()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        if sys.is_finalizing():
            return  # interpreter exit: mullama's atexit hook has stopped what runs; the process frees the rest
        try:
            if not self._holds():
                return
        except Exception:  # __init__ did not finish: it owns nothing yet
            return
        try:
            # no source=self: a recorded warning would keep the object (and what it owns) alive
            warnings.warn(f"unclosed {self!r}: close it (close(), aclose(), or a with block)",
                          ResourceWarning, stacklevel=2)
        finally:
            self._close_unclosed()
