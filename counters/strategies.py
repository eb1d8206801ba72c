"""Interchangeable consistency strategies of the counter store (``settings.COUNTERS_STRATEGY``).

A user's per-conversation unread counts and badge live in one hash and must change together.

- ``lua`` (default): each operation is one Lua script, atomic on the server; one round trip.
- ``watch``: optimistic transaction: WATCH the hash, read it, compute in Python, MULTI/EXEC;
  a concurrent change aborts EXEC and the operation is retried.
- ``lock``: a per-user lock taken with SET NX PX (redis-py's ``Lock``: random token, Lua
  compare-and-delete release), then read, compute, write. Safe while the holder finishes
  within the lock's TTL (``COUNTERS_LOCK_TTL_MS``); a holder paused past it can race the next
  one, because nothing fences the writes.
- ``naive``: read, compute, then two plain writes (fields, then HINCRBY badge). Concurrent
  writers lose updates and the badge drifts from the sum; it exists so the tests can show
  they catch that.

Every strategy exposes the same operations: ``inc_many``, ``read``, ``member``, ``load``,
``recall`` and ``fetch``. The Python ones share :mod:`counters.transitions`.
"""

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cache
from typing import TypeVar

import redis
from django.conf import settings

from . import keys, transitions
from .redis import execute, get_redis, store_id
from .scripts import CounterScripts
from .transitions import MembershipRow, Working

T = TypeVar("T")

# Users per pipeline when a fan-out touches many users.
PIPELINE_CHUNK = 1000


class CountersBusy(Exception):
    """The strategy could not get a consistent write in time (lock wait or WATCH retries)."""


class Strategy(ABC):
    name = "base"

    def __init__(self, client: redis.Redis):
        self.client = client
        self.retries = 0  # WATCH aborts (watch) or lock acquisitions that had to wait (lock)
        self.wait_seconds = 0.0  # time spent waiting for a lock (lock)

    def fetch(self, user_id: int) -> dict[str, str]:
        """The user's whole counter hash."""
        return self.client.hgetall(keys.counters(user_id))

    @abstractmethod
    def inc_many(self, items: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> list[int]:
        """Apply ``[(user_id, [(conversation_id, seq), ...]), ...]``; returns each user's badge
        change, in order."""

    @abstractmethod
    def read(self, user_id: int, conversation_id: int, read_seq: int, top: int) -> tuple[int, int]:
        """Mark read; returns ``(unread, badge)``."""

    def read_fetch(
        self, user_id: int, conversation_id: int, read_seq: int, top: int
    ) -> tuple[tuple[int, int], dict[str, str]]:
        """Mark read, then the user's whole hash (the answer's badge needs the channel-form
        conversations it holds)."""
        return self.read(user_id, conversation_id, read_seq, top), self.fetch(user_id)

    @abstractmethod
    def member(self, user_id: int, row: MembershipRow) -> int:
        """Apply a membership change; returns the badge change."""

    @abstractmethod
    def load(self, user_id: int, rows: Sequence[MembershipRow]) -> int:
        """Load the user's rows from PostgreSQL; returns the badge."""

    @abstractmethod
    def recall(self, user_id: int, conversation_id: int, seq: int) -> int:
        """A message was recalled; returns the badge change."""

    def recall_many(self, user_ids: Sequence[int], conversation_id: int, seq: int) -> list[int]:
        """The same for many users (the members of a small group); each one's badge change."""
        return [self.recall(uid, conversation_id, seq) for uid in user_ids]

    def member_many(self, items: Sequence[tuple[int, MembershipRow]]) -> None:
        """Apply ``[(user_id, row), ...]`` (a group created or joined by many at once)."""
        for user_id, row in items:
            self.member(user_id, row)


class PythonStrategy(Strategy):
    """Runs :mod:`counters.transitions` on a copy of the hash; subclasses say how the copy is
    read and written back."""

    def inc_many(self, items):
        return [
            self._atomic(user_id, lambda w, p=pairs: transitions.inc(w, p))
            for user_id, pairs in items
        ]

    def read(self, user_id, conversation_id, read_seq, top):
        return self._atomic(user_id, lambda w: transitions.read(w, conversation_id, read_seq, top))

    def member(self, user_id, row):
        return self._atomic(user_id, lambda w: transitions.member(w, row))

    def load(self, user_id, rows):
        return self._atomic(user_id, lambda w: transitions.load(w, rows))

    def recall(self, user_id, conversation_id, seq):
        return self._atomic(user_id, lambda w: transitions.recall(w, conversation_id, seq))

    @abstractmethod
    def _atomic(self, user_id: int, fn: Callable[[Working], T]) -> T:
        """Read the user's hash into a Working copy, run ``fn`` on it, write the changes."""

    @staticmethod
    def _queue_writes(pipe, key: str, w: Working) -> None:
        if w.changed:
            pipe.hset(key, mapping=w.changed)
        if w.deleted:
            pipe.hdel(key, *w.deleted)
        if w.badge_delta:
            pipe.hincrby(key, keys.BADGE, w.badge_delta)


class LuaStrategy(Strategy):
    name = "lua"

    def __init__(self, client: redis.Redis):
        super().__init__(client)
        self.scripts = CounterScripts(client)

    def inc_many(self, items):
        return [int(delta) for delta in self._pipelined(self.scripts.inc, items)]

    def member_many(self, items):
        self._pipelined(self.scripts.member, items)

    def _pipelined(self, script, items) -> list:
        """One script call per ``(user_id, arg)``, sent in pipelines of ``PIPELINE_CHUNK``;
        returns the results in order."""
        results: list = []
        for start in range(0, len(items), PIPELINE_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for user_id, arg in items[start : start + PIPELINE_CHUNK]:
                script(user_id, arg, pipe=pipe)
            results.extend(execute(pipe))
        return results

    def read(self, user_id, conversation_id, read_seq, top):
        return self.scripts.read(user_id, conversation_id, read_seq, top)

    def read_fetch(self, user_id, conversation_id, read_seq, top):
        """One round trip: the read script and ``HGETALL`` in one pipeline."""
        pipe = self.client.pipeline(transaction=False)
        self.read_fetch_queue(pipe, user_id, conversation_id, read_seq, top)
        return self.read_fetch_result(execute(pipe))

    def read_fetch_queue(self, pipe, user_id, conversation_id, read_seq, top) -> None:
        """Queue :meth:`read_fetch`'s two commands on a caller's pipeline (no MULTI)."""
        self.scripts.read(user_id, conversation_id, read_seq, top, pipe=pipe)
        pipe.hgetall(keys.counters(user_id))

    def read_fetch_result(self, replies):
        """:meth:`read_fetch`'s answer from the two replies of :meth:`read_fetch_queue`."""
        reply, fields = replies
        return self.scripts.read_result(reply), fields

    def member(self, user_id, row):
        return self.scripts.member(user_id, row)

    def recall(self, user_id, conversation_id, seq):
        return int(self.scripts.recall(user_id, conversation_id, seq))

    def recall_many(self, user_ids, conversation_id, seq):
        items = [(uid, (conversation_id, seq)) for uid in user_ids]
        return [
            int(d)
            for d in self._pipelined(
                lambda uid, a, pipe: self.scripts.recall(uid, *a, pipe=pipe), items
            )
        ]

    def load(self, user_id, rows):
        return self.scripts.load(user_id, rows)


class WatchStrategy(PythonStrategy):
    name = "watch"

    def _atomic(self, user_id, fn):
        key = keys.counters(user_id)
        with self.client.pipeline(transaction=True) as pipe:
            for _ in range(settings.COUNTERS_WATCH_MAX_RETRIES):
                try:
                    pipe.watch(key)
                    w = Working(pipe.hgetall(key))
                    result = fn(w)
                    pipe.multi()
                    self._queue_writes(pipe, key, w)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    self.retries += 1
        raise CountersBusy(f"user {user_id}: WATCH gave up after retries")


class LockStrategy(PythonStrategy):
    name = "lock"

    def _atomic(self, user_id, fn):
        key = keys.counters(user_id)
        lock = self.client.lock(
            keys.counters_lock(user_id),
            timeout=settings.COUNTERS_LOCK_TTL_MS / 1000,
            blocking_timeout=settings.COUNTERS_LOCK_WAIT_MS / 1000,
            sleep=0.001,
        )
        if not lock.acquire(blocking=False):
            self.retries += 1
            started = time.perf_counter()
            acquired = lock.acquire(blocking=True)
            self.wait_seconds += time.perf_counter() - started
            if not acquired:
                raise CountersBusy(f"user {user_id}: lock not acquired in time")
        try:
            w = Working(self.client.hgetall(key))
            result = fn(w)
            pipe = self.client.pipeline(transaction=False)
            self._queue_writes(pipe, key, w)
            pipe.execute()
            return result
        finally:
            # A lock that expired while held raises LockError: the TTL bounds how long a
            # crashed holder blocks others, and the next holder already owns it.
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()


class NaiveStrategy(PythonStrategy):
    name = "naive"

    def _atomic(self, user_id, fn):
        key = keys.counters(user_id)
        w = Working(self.client.hgetall(key))
        result = fn(w)
        if w.changed:
            self.client.hset(key, mapping=w.changed)
        if w.deleted:
            self.client.hdel(key, *w.deleted)
        if w.badge_delta:
            self.client.hincrby(key, keys.BADGE, w.badge_delta)
        return result


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (LuaStrategy, WatchStrategy, LockStrategy, NaiveStrategy)
}


@cache
def _strategy(name: str, url: str) -> Strategy:
    return STRATEGIES[name](get_redis())


def get_strategy(name: str | None = None) -> Strategy:
    """The configured strategy (or the one named), one instance per process and Redis URL."""
    name = name or settings.COUNTERS_STRATEGY
    if name not in STRATEGIES:
        raise ValueError(f"COUNTERS_STRATEGY must be one of {sorted(STRATEGIES)}, not {name!r}")
    return _strategy(name, store_id())
