"""Objects that own llama.cpp memory: what they share."""

from __future__ import annotations

from typing import Any

from ._errors import NotCopyableError

__all__ = ["Uncopyable"]


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
