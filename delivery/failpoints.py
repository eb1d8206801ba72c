"""Failpoints for the crash tests: a named point in the aggregator kills its own process
(SIGKILL, no cleanup) when a test has armed it in Redis. Disabled unless
``COUNTERS_FAILPOINTS`` is set, so production pays nothing for them."""

import os
import signal

from django.conf import settings

from counters.redis import get_redis

from . import keys


def failpoint(name: str) -> None:
    if settings.COUNTERS_FAILPOINTS and get_redis().getdel(keys.failpoint(name)):
        os.kill(os.getpid(), signal.SIGKILL)


def arm(name: str) -> None:
    """Make the next process that passes ``name`` die there (once)."""
    get_redis().set(keys.failpoint(name), 1)
