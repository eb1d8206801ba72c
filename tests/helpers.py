"""Assertions shared by the counter tests: Redis against the truth in PostgreSQL."""

import contextlib

import redis
from redis.cluster import RedisCluster

from counters.redis import get_redis
from counters.selectors import counters_peek, counters_truth
from imcore.models import User

DEAD_REDIS = "redis://127.0.0.1:1/0"


@contextlib.contextmanager
def store_down(settings):
    """The hot store refuses connections (nothing listens on port 1), on a single Redis or a
    cluster (``REDIS_CLUSTER_NODES``) alike."""
    good = settings.REDIS_URL, settings.REDIS_CLUSTER_NODES
    settings.REDIS_URL = DEAD_REDIS
    if settings.REDIS_CLUSTER_NODES:
        settings.REDIS_CLUSTER_NODES = ["127.0.0.1:1"]
    try:
        yield
    finally:
        settings.REDIS_URL, settings.REDIS_CLUSTER_NODES = good


def commandstats() -> dict[str, dict]:
    """INFO commandstats of the hot store, summed over every master of a cluster."""
    client = get_redis()
    if not isinstance(client, RedisCluster):
        return client.info("commandstats")
    total: dict[str, dict] = {}
    for stats in client.info("commandstats", target_nodes=RedisCluster.PRIMARIES).values():
        for name, row in stats.items():
            total.setdefault(name, {"calls": 0})["calls"] += row["calls"]
    return total


def counter_mismatches(user_ids=None) -> list[str]:
    """Every way in which Redis differs from PostgreSQL, as readable lines (empty = exact)."""
    if user_ids is None:
        user_ids = list(User.objects.values_list("pk", flat=True))
    problems = []
    for user_id in user_ids:
        truth = counters_truth(user_id=user_id)
        held = counters_peek(user_id=user_id)
        if held is None:
            problems.append(f"user {user_id}: not loaded in Redis")
            continue
        if held.conversations != truth.conversations:
            problems.append(f"user {user_id}: unread {held.conversations} != {truth.conversations}")
        if held.mentions != truth.mentions:
            problems.append(f"user {user_id}: mentions {held.mentions} != {truth.mentions}")
        if held.badge != truth.badge:
            problems.append(f"user {user_id}: badge {held.badge} != {truth.badge}")
        if any(n < 0 for n in held.conversations.values()) or held.badge < 0:
            problems.append(f"user {user_id}: negative count {held}")
    return problems


def send(member, cid, body="hi", **fields) -> int:
    """A member's send through the API (201 expected, its ``client_msg_id`` made of the
    member, the conversation and the body); returns the seq."""
    payload = {"body": body, "client_msg_id": f"m-{member.id}-{cid}-{body}", **fields}
    response = member.post(f"/conversations/{cid}/messages", payload)
    assert response.status_code == 201, response.content
    return response.json()["seq"]


def read(member, cid, seq) -> dict:
    """A member's mark-read through the API (200 expected); returns the answer."""
    response = member.post(f"/conversations/{cid}/read", {"seq": seq})
    assert response.status_code == 200, response.content
    return response.json()


class RoundTrips:
    """Redis round trips of this process (each is one write of packed commands)."""

    def __init__(self, monkeypatch):
        self.count = 0
        send_packed = redis.connection.AbstractConnection.send_packed_command

        def counted(conn, *args, **kwargs):
            self.count += 1
            return send_packed(conn, *args, **kwargs)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
