"""The Redis client of the counters app (one connection pool per process)."""

from functools import cache

import redis
from django.conf import settings


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def get_redis() -> redis.Redis:
    """The client for ``settings.REDIS_URL``. redis-py's pool notices a fork and reconnects."""
    return _client(settings.REDIS_URL)
