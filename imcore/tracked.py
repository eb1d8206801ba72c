"""An in-process copy of Redis strings under one key prefix, kept exact by Redis's key
tracking: the token cache's first level (:func:`imcore.services.device_authenticate_cached`).

A hit costs no round trip. Each process holds a connection of its own to Redis in RESP3 with
``CLIENT TRACKING ON BCAST PREFIX <prefix>``: from then on, every write to a key under the
prefix (a SET, a DEL, an expiry, a FLUSHDB), by any client, makes Redis push an
``invalidate`` message to that connection, as part of running that write. Every look-up
first reads what has arrived on it, without waiting (a poll of the socket), and drops the
keys named. So once a write has answered its caller, the look-ups after it do not see the
old value:

- a write in this process: :meth:`TrackedCache.discard` drops the keys at once, before Redis's
  message about them is read;
- a write in another process: Redis writes the message in the same pass of its event loop
  as the writer's reply; the writer's caller then answers its client, which sends the next
  request. By the time that request is looked up here, the message is in the socket.

What keeps that true at the edges:

- **Nothing is cached while tracking is not on.** The connection is opened (and tracking
  turned on) before the first copy is kept; if it breaks (a Redis restart, a ``CLIENT
  KILL``, a timeout), the poll reads its end, every copy is dropped, and nothing is kept
  until a new connection has tracking on again (one try a second).
- **A copy is only kept if nothing was invalidated meanwhile.** :meth:`get` returns a mark
  (the count of keys invalidated so far); :meth:`put` polls again and keeps the value only if
  the count has not moved since, and only within the same connection.
- **A backlog drops everything.** Redis writes at most 64 KB to a client per pass, so a poll
  that reads many invalidated keys at once (:data:`BACKLOG`) might not have read them all:
  every copy is dropped.
- **A copy never outlives its key:** it expires with the key's TTL read with the value.
- **A fork starts empty**: each process (by pid) has its own connection and copies.
- Threads (the ASGI server's, Celery's) share one lock.

Not on Redis Cluster (a connection per node would be needed); there every look-up reads
Redis, as before."""

import logging
import os
import select
import threading
import time
from collections import OrderedDict

import redis

logger = logging.getLogger(__name__)

# A poll that reads this many invalidated keys drops every copy (see the module): 256 keys
# are about 20 KB of messages.
BACKLOG = 256
# After a failed connect, the next try waits this long (seconds).
RETRY_S = 1.0


class TrackedCache:
    """Copies of the strings under ``prefix`` on the Redis a ``connection_class`` with
    ``connection_kwargs`` reaches, at most ``size`` of them (least recently kept first out)."""

    def __init__(self, connection_class, connection_kwargs: dict, prefix: str, size: int):
        self.connection_class, self.connection_kwargs = connection_class, connection_kwargs
        self.prefix, self.size = prefix, size
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.connection: redis.Connection | None = None
        self.poller: select.poll | None = None  # on the connection's socket
        self.retry_at = 0.0
        self.read = 0  # keys invalidated (a flush counts 1), over every connection
        self.epoch = 0  # connections opened

    # ---- the public calls ---------------------------------------------------------------

    def get(self, key: str) -> tuple[str | None, tuple[int, int] | None]:
        """``(value, mark)``: the copy of ``key`` (None: not here), and a mark to give
        :meth:`put` with the value read from Redis (None: tracking is off, keep nothing)."""
        with self.lock:
            if not self._poll():
                return None, None
            entry = self.entries.get(key)
            if entry is not None:
                if entry[1] > time.monotonic():
                    return entry[0], None
                del self.entries[key]
            return None, (self.epoch, self.read)

    def put(self, key: str, value: str, ttl_ms: int, mark: tuple[int, int] | None) -> bool:
        """Keep ``value``, read from Redis after :meth:`get` gave ``mark``, for ``ttl_ms``
        (the key's TTL then); not if anything was invalidated in between."""
        if mark is None or ttl_ms <= 0:
            return False
        with self.lock:
            if not self._poll() or (self.epoch, self.read) != mark:
                return False
            self.entries[key] = (value, time.monotonic() + ttl_ms / 1000)
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
            return True

    def discard(self, keys) -> None:
        """This process wrote ``keys``: drop their copies now."""
        with self.lock:
            for key in keys:
                self.entries.pop(key, None)

    def close(self) -> None:
        """Drop the copies and the connection (the next look-up opens a new one)."""
        with self.lock:
            self._drop()
            self.retry_at = 0.0

    # ---- tracking -----------------------------------------------------------------------

    def _poll(self) -> bool:
        """Read every invalidation that has arrived; False when tracking is off (then no
        copy is held)."""
        if self.connection is None and not self._connect():
            return False
        if not self.poller.poll(0):  # one system call (the loop below ends with nothing parsed)
            return True
        before = self.read
        try:
            while self.connection.can_read(timeout=0):
                self.connection.read_response(push_request=True)
        except (redis.RedisError, OSError):
            logger.warning("token tracking connection lost; local copies dropped")
            self._drop()
            return False
        if self.read - before >= BACKLOG:
            self.entries.clear()
        return True

    def _connect(self) -> bool:
        if time.monotonic() < self.retry_at:
            return False
        connection = self.connection_class(**self.connection_kwargs, protocol=3)
        try:
            connection.connect()
            connection._parser.set_invalidation_push_handler(self._invalidated)
            connection.send_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self.prefix)
            if connection.read_response() not in (b"OK", "OK"):
                raise redis.ResponseError("CLIENT TRACKING refused")
        except (redis.RedisError, OSError):
            logger.warning("token tracking unavailable; looking tokens up in Redis", exc_info=True)
            connection.disconnect()
            self.retry_at = time.monotonic() + RETRY_S
            return False
        self.connection, self.epoch = connection, self.epoch + 1
        self.poller = select.poll()  # readable, or hung up: the poll then reads the error
        self.poller.register(connection._sock, select.POLLIN)
        self.entries.clear()
        return True

    def _drop(self) -> None:
        self.entries.clear()
        if self.connection is not None:
            self.connection.disconnect()
        self.connection = None
        self.retry_at = time.monotonic() + RETRY_S

    def _invalidated(self, message) -> None:
        """An ``invalidate`` push: the keys written (None: every key, after a flush). Redis
        sends one per pass of its event loop, naming every key written in it."""
        keys = message[1] if len(message) > 1 else None
        if keys is None:
            self.read += 1
            self.entries.clear()
            return
        self.read += len(keys)
        for key in keys:
            self.entries.pop(key.decode(), None)


_caches: dict[tuple, TrackedCache] = {}
_caches_lock = threading.Lock()


def tracked_cache(client: redis.Redis, prefix: str, size: int) -> TrackedCache:
    """This process's cache of ``prefix`` on ``client``'s Redis (a new one after a fork)."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    id_ = (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), prefix)
    cache = _caches.get(id_)
    if cache is None or cache.pid != os.getpid():
        with _caches_lock:
            cache = _caches.get(id_)
            if cache is None or cache.pid != os.getpid():
                # its own connection: no connect hook, no health-check PINGs, bytes
                leave = ("redis_connect_func", "health_check_interval", "protocol",
                         "decode_responses", "encoding", "encoding_errors")  # fmt: skip
                connection_kwargs = {k: v for k, v in kwargs.items() if k not in leave}
                cache = TrackedCache(pool.connection_class, connection_kwargs, prefix, size)
                _caches[id_] = cache
    return cache
