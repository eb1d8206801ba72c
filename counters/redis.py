"""The Redis client of the counters app (one connection pool per process)."""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import redis
from django.conf import settings
from redis.commands.core import Script
from redis.exceptions import NoScriptError


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def get_redis() -> redis.Redis:
    """The client for ``settings.REDIS_URL``. redis-py's pool notices a fork and reconnects."""
    return _client(settings.REDIS_URL)


@dataclass(frozen=True)
class ScriptCall:
    """One call of a registered Lua script, to be sent with others (:func:`scripts_call`)."""

    script: Script
    keys: Sequence[str]
    args: Sequence


def scripts_call(calls: Sequence[ScriptCall], client: redis.Redis | None = None) -> list:
    """Run script calls in one round trip: one pipeline (no MULTI) of EVALSHA. redis-py's own
    pipelined ``Script`` asks ``SCRIPT EXISTS`` first, a round trip more every time; here a
    script the server lacks (after a restart or a flush) answers NOSCRIPT, which means that
    call did not run: those scripts are loaded and just those calls sent again. Returns the
    results in order; the first error is raised after every call has run. On Redis Cluster a
    pipeline is split by node, one round trip per node its keys live on."""
    client = client or get_redis()
    results = _evalsha_all(client, calls)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        for script in {id(calls[i].script): calls[i].script for i in missing}.values():
            script.sha = client.script_load(script.script)
        again = _evalsha_all(client, [calls[i] for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _evalsha_all(client: redis.Redis, calls: Sequence[ScriptCall]) -> list:
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    return pipe.execute(raise_on_error=False)
