"""Failpoints for the crash and timing tests: a named point in the aggregator kills its own
process (SIGKILL, no cleanup) when a test has armed it in Redis, or pauses there each time it
passes while a pause is armed. Disabled unless ``COUNTERS_FAILPOINTS`` is set, so production
pays nothing for them."""

import os
import signal
import time

from django.conf import settings

from counters.redis import get_redis

from . import keys


def failpoint(name: str) -> None:
    if not settings.COUNTERS_FAILPOINTS:
        return
    pipe = get_redis().pipeline(transaction=False)
    pipe.getdel(keys.failpoint(name))
    pipe.get(keys.failpoint_pause(name))
    kill, pause_ms = pipe.execute()
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    if pause_ms:
        time.sleep(int(pause_ms) / 1000)


def arm(name: str) -> None:
    """Make the next process that passes ``name`` die there (once)."""
    get_redis().set(keys.failpoint(name), 1)


def arm_pause(name: str, ms: int) -> None:
    """Make every process that passes ``name`` wait there ``ms`` milliseconds, until
    :func:`disarm_pause`."""
    get_redis().set(keys.failpoint_pause(name), int(ms))


def disarm_pause(name: str) -> None:
    get_redis().delete(keys.failpoint_pause(name))
