"""Helpers for the API tests: a snapshot of everything a request could change (PostgreSQL
rows, the counters' Redis database and what the members read back through the API), and the
check that an error response has the one JSON error shape."""

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from django.db import transaction
from django.test import Client

from counters.redis import get_redis
from counters.selectors import counters_get
from imcore import services
from imcore.models import Conversation, Device, Membership, Message, User
from tests.conftest import Member


@cache
def shared_client() -> Client:
    """One test client for requests without a member's own: each new ``Client()`` builds the
    middleware chain again, and WhiteNoise's scan of the static files makes that ~50 ms.
    Every request passes its own Authorization header and no cookies are used."""
    return Client()


def fanout(message: dict) -> None:
    """Apply the counter increments of a sent message to the other members, as the Celery
    task does after commit (the ``db`` fixture's transaction never commits)."""
    from delivery.services import delivery_fanout

    delivery_fanout(
        conversation_id=message["conversation_id"],
        seq=message["seq"],
        sender_id=message["sender_id"],
    )


def db_state() -> dict:
    return {
        "users": list(
            User.objects.order_by("pk").values_list("pk", "username", "is_active", "password")
        ),
        "devices": list(
            Device.objects.order_by("pk").values_list(
                "pk", "user_id", "device_id", "platform", "token_hash"
            )
        ),
        "conversations": list(
            Conversation.objects.order_by("pk").values_list(
                "pk", "kind", "title", "direct_key", "created_by_id", "last_seq"
            )
        ),
        "memberships": list(
            Membership.objects.order_by("pk").values_list(
                "pk",
                "user_id",
                "conversation_id",
                "last_read_seq",
                "muted",
                "joined_at",
                "left_at",
                "rev",
            )
        ),
        "messages": list(
            Message.objects.order_by("pk").values_list(
                "pk", "conversation_id", "seq", "sender_id", "client_msg_id", "body"
            )
        ),
    }


def row_counts() -> dict:
    return {
        model.__name__: model.objects.count()
        for model in (User, Device, Conversation, Membership, Message)
    }


def redis_state() -> dict:
    """Every key of the counters database with its value, except the rate limiter's counters
    (``imc:rl:``): counting an attempt is what a refused login or sign-up is meant to do; and
    the token cache's entries (``imc:{t:<hash>}:dev``): a valid token read from PostgreSQL is
    cached by any call (its tombstones, which only a revocation sets, are kept)."""
    client = get_redis()
    dump = {}
    for key in client.scan_iter(count=1000):
        if key.startswith("imc:rl:") or (key.startswith("imc:{t:") and key.endswith(":dev")):
            continue
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "hash":
            dump[key] = ("hash", client.hgetall(key))
        elif kind == "string":
            dump[key] = ("string", client.get(key))
        elif kind == "list":
            dump[key] = ("list", client.lrange(key, 0, -1))
        elif kind == "set":
            dump[key] = ("set", client.smembers(key))
        elif kind == "zset":
            dump[key] = ("zset", client.zrange(key, 0, -1, withscores=True))
        else:
            dump[key] = (kind, None)
    return dump


def api_counts(members) -> dict:
    """What each member reads back: the badge and counts, and the conversation list."""
    out = {}
    for m in members:
        unread = m.get("/unread")
        listing = m.get("/conversations")
        assert unread.status_code == 200, unread.content
        assert listing.status_code == 200, listing.content
        out[m.id] = (unread.json(), listing.json())
    return out


def selector_counts(members) -> dict:
    """Each member's badge and counts as the API's read path (``counters_get``) returns
    them, read without HTTP (cheap enough to take for every case)."""
    out = {}
    for m in members:
        counts = counters_get(user_id=m.id)
        out[m.id] = (counts.badge, sorted(counts.conversations.items()))
    return out


def snapshot(members, *, api: bool = True) -> dict:
    """PostgreSQL and Redis first, then the reads (so a read that reloads a counter hash
    cannot hide a change the request made). Call ``api_counts`` once before the first
    snapshot so every member's counters are loaded. ``api=False`` reads the counts through
    the selectors the API uses instead of HTTP."""
    db = db_state()
    return {
        "rows": {table: len(rows) for table, rows in db.items()},
        "db": db,
        "redis": redis_state(),
        "counts": api_counts(members) if api else selector_counts(members),
    }


# ---- a shared world for the error and authorization tests ---------------------------------


@dataclass
class World:
    """alice created group ``g`` (alice, bob, carol; 3 messages from alice, bob read 1,
    carol muted it), direct ``d`` (alice, bob; 1 message from bob) and group ``g2`` (alice,
    bob; 1 message; bob left it). dave is in nothing; eve is deactivated."""

    members: dict[str, Member]
    ids: dict[str, int]
    inactive: Member

    def __getattr__(self, name):
        try:
            return self.members[name]
        except KeyError:
            raise AttributeError(name) from None


PASSWORD = "pw-for-tests-1"


def _member(name: str) -> Member:
    user = User.objects.create_user(name, password=PASSWORD)
    _, token = services.device_login(
        username=name, password=PASSWORD, device_id="phone", platform="ios"
    )
    return Member(user=user, token=token, client=shared_client())


def build_world() -> World:
    """Built through the services (the API tests cover the calls themselves); the counter
    increments of the messages are applied with ``delivery_fanout`` directly."""
    from delivery.services import delivery_fanout

    alice, bob, carol, dave, eve = (_member(n) for n in ("alice", "bob", "carol", "dave", "eve"))
    eve.user.is_active = False
    eve.user.save(update_fields=["is_active"])

    def create(who, kind, others, title=""):
        conversation, created = services.conversation_create(
            creator=who.user, kind=kind, member_ids=[o.id for o in others], title=title
        )
        assert created
        return conversation

    def send(who, conversation, body, cmid):
        message, _ = services.message_send(
            sender=who.user, conversation=conversation, body=body, client_msg_id=cmid
        )
        delivery_fanout(conversation_id=conversation.pk, seq=message.seq, sender_id=who.id)

    def membership(who, conversation):
        return Membership.objects.get(user=who.user, conversation=conversation)

    g = create(alice, "group", [bob, carol], "team")
    d = create(alice, "direct", [bob])
    g2 = create(alice, "group", [bob], "left")
    for i in range(3):
        send(alice, g, f"g {i}", f"g-{i}")
    send(bob, d, "dm", "d-0")
    send(alice, g2, "g2", "g2-0")
    services.conversation_mark_read(membership=membership(bob, g), seq=1)
    services.conversation_mute(membership=membership(carol, g), muted=True)
    services.member_remove(actor=bob.user, conversation=g2, user_id=bob.id)

    members = {"alice": alice, "bob": bob, "carol": carol, "dave": dave}
    ids = {
        "g": g.pk,
        "d": d.pk,
        "g2": g2.pk,
        **{name: m.id for name, m in members.items()},
        "eve": eve.id,
        "missing_conv": Conversation.objects.order_by("-pk").first().pk + 1000,
        "missing_user": User.objects.order_by("-pk").first().pk + 1000,
        "big": 2**63,
    }
    return World(members=members, ids=ids, inactive=eve)


@contextmanager
def world_transaction(django_db_blocker):
    """Build the world once in a transaction that every test of the module runs inside (each
    test's ``db`` savepoint rolls its own changes back); it is rolled back at the end."""
    with django_db_blocker.unblock():
        atomic = transaction.atomic()
        atomic.__enter__()
        world = build_world()
    try:
        yield world
    finally:
        with django_db_blocker.unblock():
            transaction.set_rollback(True)
            atomic.__exit__(None, None, None)


def world_prime(world: World) -> None:
    """Load every member's counters (the autouse fixture empties Redis before each test)."""
    for m in world.members.values():
        counters_get(user_id=m.id)


def assert_error(response, status: int | None = None, code: str | None = None) -> dict:
    """A 4xx answer with the JSON error shape ``{"error": ..., "message": ...}``."""
    assert 400 <= response.status_code < 500, (response.status_code, response.content)
    if status is not None:
        assert response.status_code == status, (response.status_code, response.content)
    assert response["Content-Type"].startswith("application/json"), (
        response["Content-Type"],
        response.content,
    )
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if code is not None:
        assert body["error"] == code, body
    return body
