"""Values decoded on first use, behind ordinary dataclass fields.

Why: an agent holding a long conversation is suspended at a tool call whose arguments
are the whole conversation (0.85 MB of JSON at 400 turns of ``torpor bench
conversation``). Parsing them took a third of a resume's CPU, yet resuming a call whose
answer is recorded never looks at them: only a call run again, an inspection, a replay
or a fork does. A :class:`LazyField` lets a frozen dataclass (``Snapshot.pending``,
``PendingCall.args``) be built with a :class:`Lazy` in place of the value; reading the
field computes the value once and keeps it, so every reader sees exactly the value it
would have seen had it been decoded up front (equality, ``repr``, ``dataclasses.replace``
all read it). Errors of the computation surface at the first read, as the computation
raises them (the decoder's are its typed ``SnapshotCorrupt``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

__all__ = ["Lazy", "LazyField", "raw"]

T = TypeVar("T")
_UNSET: Any = object()


class Lazy(Generic[T]):
    """A value computed by ``fn`` the first time :meth:`get` is called, then kept.

    Thread-safe: two threads reading at once compute it once (a lock, taken only while
    the value is not there yet)."""

    __slots__ = ("_fn", "_lock", "_value")

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn: Callable[[], T] | None = fn
        self._value: T = _UNSET
        self._lock = threading.Lock()

    def get(self) -> T:
        value = self._value
        if value is _UNSET:
            with self._lock:
                if self._value is _UNSET:
                    assert self._fn is not None
                    self._value = self._fn()
                    self._fn = None  # what it held (a 5 MB payload) may go
                value = self._value
        return value

    @property
    def ready(self) -> bool:
        """Whether the value was computed already (for tests and the encoder)."""
        return self._value is not _UNSET

    def __repr__(self) -> str:
        return f"Lazy({self._value!r})" if self.ready else "Lazy(<not decoded yet>)"


class LazyField(Generic[T]):
    """A dataclass field that may be given a :class:`Lazy`; read, it is the value.

    Declare it as the field's default (``args: LazyField[Any] = LazyField()``): the
    dataclass still requires the argument (the descriptor gives no default), stores what
    it is given, and a read resolves a ``Lazy`` once and keeps the result in the instance.
    :func:`raw` returns what is stored without resolving it.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = "_lazy_" + name
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> LazyField[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> T | LazyField[T]:
        if obj is None:
            raise AttributeError(self._name)  # no class-level default: the field is required
        d = obj.__dict__
        value = d[self._slot]
        if isinstance(value, Lazy):
            value = value.get()
            d[self._slot] = value
        return value  # type: ignore[no-any-return]

    def __set__(self, obj: object, value: T | Lazy[T]) -> None:
        obj.__dict__[self._slot] = value  # the dataclass's frozen __init__ lands here


def raw(obj: object, name: str) -> Any:
    """What ``obj``'s :class:`LazyField` ``name`` holds: the value, or the ``Lazy`` not
    resolved yet (a reader that needs only part of a lazily decoded value)."""
    return obj.__dict__["_lazy_" + name]
