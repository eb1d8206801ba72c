"""Bad requests and authorization on the two sync calls, ``GET /sync`` and ``POST /sync/ack``:
each bad request gets a 4xx JSON error ``{"error", "message"}`` and changes nothing (the
user's sync hash and log in Redis, the pending and in-flight acks, the Device rows); a device
of one user never reads nor acks another user's entries. The "before" is taken after a first
valid pull (which loads the user's sync state into Redis: a cache fill, not a change); any
call that reaches the device presence would move the device's pending last-seen time. The
counter pipeline is drained in-process."""

import json
import secrets

import pytest
from django.conf import settings as django_settings

from delivery.pipeline import delivery_drain
from imcore.models import Device
from offline import keys, store
from offline.services import offline_flush_acks
from tests.imcore.state import assert_error
from tests.offline.conftest import first_sync, pull, pull_all

pytestmark = pytest.mark.django_db(transaction=True)

BIG = 2**63
AHEAD = "<latest+1>"  # replaced by the user's latest version + 1
CODES = {400: "bad_request", 401: "not_authenticated", 422: "invalid_request"}


def group(owner, *others) -> int:
    response = owner.post("/conversations", {"kind": "group", "members": [m.id for m in others]})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def sync_state(*members) -> dict:
    """What a sync call could change: the users' sync hash and log, the pending and in-flight
    acks of every device, and the users' Device rows."""
    r = store.client()
    out = {
        "pending": r.hgetall(keys.ACKS_PENDING),
        "inflight": r.hgetall(keys.ACKS_INFLIGHT),
        "seen": r.hgetall(keys.SEEN_PENDING),
    }
    for m in members:
        out[m.id] = (
            r.hgetall(keys.state(m.id)),
            r.zrange(keys.log(m.id), 0, -1, withscores=True),
            list(
                Device.objects.filter(user=m.user)
                .order_by("pk")
                .values_list("pk", "acked_version", "last_seen_at")
            ),
        )
    return out


@pytest.fixture
def pair(make_member, settings):
    """alice and bob in a group with 3 messages from alice; bob's phone pulled everything
    and acked version 1. Returns (alice, bob, bob's latest version)."""
    alice, bob = make_member("alice"), make_member("bob")
    cid = group(alice, bob)
    for i in range(3):
        alice.send(cid, f"m{i}")
    delivery_drain()
    latest = first_sync(bob)
    assert latest > 1
    assert bob.post("/sync/ack", {"version": 1}).json() == {"acked_version": 1}
    return alice, bob, latest


PULL_CASES = {
    "since-negative": ({"since": -1}, 422),
    "since-text": ({"since": "abc"}, 422),
    "since-float": ({"since": "1.5"}, 422),
    "since-empty": ({"since": ""}, 422),
    "since-2**63": ({"since": BIG}, 422),
    "since-10**30": ({"since": 10**30}, 422),
    "since-ahead": ({"since": AHEAD}, 400),
    "since-bigint-max": ({"since": BIG - 1}, 400),
    "limit-zero": ({"limit": 0}, 422),
    "limit-negative": ({"limit": -1}, 422),
    "limit-text": ({"limit": "abc"}, 422),
    "limit-float": ({"limit": "1.5"}, 422),
    "limit-over-max": ({"limit": django_settings.SYNC_PAGE_MAX + 1}, 422),
    "limit-2**70": ({"limit": 2**70}, 422),
    "since-ahead-limit-zero": ({"since": AHEAD, "limit": 0}, 422),
}


@pytest.mark.parametrize(("params", "status"), PULL_CASES.values(), ids=PULL_CASES.keys())
def test_bad_pull(pair, params, status):
    alice, bob, latest = pair
    params = {k: latest + 1 if v == AHEAD else v for k, v in params.items()}
    before = sync_state(alice, bob)
    body = assert_error(bob.get("/sync", **params), status, CODES[status])
    if status == 400:
        assert body["details"] == {"latest_version": latest}
    assert sync_state(alice, bob) == before


ACK_CASES = {  # a str is sent as is, anything else JSON-encoded
    "empty-object": ("{}", 422),
    "empty-body": ("", 422),
    "negative": ({"version": -1}, 422),
    "string": ({"version": "5"}, 422),
    "float": ({"version": 1.5}, 422),
    "integral-float-2**100": ({"version": 2.0**100}, 422),  # an integer, past bigint
    "bool": ({"version": True}, 422),
    "null": ({"version": None}, 422),
    "2**63": ({"version": BIG}, 422),
    "10**30": ({"version": 10**30}, 422),
    "extra-field": ({"version": 1, "extra": 1}, 422),
    "list": ([{"version": 1}], 422),
    "bare-number": ("1", 422),
    "invalid-json": ("{version: 1}", 400),
    "truncated-json": ('{"version": 1', 400),
    "ahead": ({"version": AHEAD}, 400),
    "bigint-max": ({"version": BIG - 1}, 400),
}


@pytest.mark.parametrize(("body", "status"), ACK_CASES.values(), ids=ACK_CASES.keys())
def test_bad_ack(pair, body, status):
    alice, bob, latest = pair
    if isinstance(body, dict) and body.get("version") == AHEAD:
        body = {"version": latest + 1}
    raw = body if isinstance(body, str) else json.dumps(body)
    before = sync_state(alice, bob)
    error = assert_error(bob.post("/sync/ack", raw=raw), status)
    code = "malformed_body" if isinstance(body, str) and status == 400 else CODES[status]
    assert error["error"] == code, error
    if code == "bad_request":
        assert error["details"] == {"latest_version": latest}
    assert sync_state(alice, bob) == before


def test_the_compared_state_sees_valid_calls(pair):
    """The control: the boundary values are accepted, and a valid ack shows in the state."""
    alice, bob, latest = pair
    before = sync_state(alice, bob)
    assert pull(bob, latest, limit=django_settings.SYNC_PAGE_MAX)["entries"] == []
    assert pull(bob, latest, limit=1)["latest_version"] == latest
    assert sync_state(alice, bob) != before  # the device's last-seen time moved
    before = sync_state(alice, bob)
    assert bob.post("/sync/ack", {"version": latest}).json() == {"acked_version": latest}
    after = sync_state(alice, bob)
    assert after["pending"] != before["pending"]
    assert after[alice.id] == before[alice.id]


BAD_AUTH = {
    "no-header": lambda m: {},
    "empty-bearer": lambda m: {"Authorization": "Bearer "},
    "garbage": lambda m: {"Authorization": "Bearer garbage"},
    "unknown-token": lambda m: {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"},
    "truncated-token": lambda m: {"Authorization": f"Bearer {m.token[:-1]}"},
    "wrong-scheme": lambda m: {"Authorization": f"Token {m.token}"},
    "token-without-scheme": lambda m: {"Authorization": m.token},
}


def deactivated(member) -> dict:
    member.user.is_active = False
    member.user.save(update_fields=["is_active"])
    return {"Authorization": f"Bearer {member.token}"}


@pytest.mark.parametrize("call", ["pull", "ack"])
@pytest.mark.parametrize("variant", [*BAD_AUTH, "deactivated-user"])
def test_sync_refuses_missing_or_bad_token(pair, call, variant):
    alice, bob, latest = pair
    headers = deactivated(bob) if variant == "deactivated-user" else BAD_AUTH[variant](bob)
    before = sync_state(alice, bob)
    if call == "pull":
        response = bob.client.get("/api/v1/sync", {"since": 0}, headers=headers)
    else:
        response = bob.client.post(
            "/api/v1/sync/ack",
            json.dumps({"version": latest}),
            content_type="application/json",
            headers=headers,
        )
    assert_error(response, 401, "not_authenticated")
    assert sync_state(alice, bob) == before


def test_auth_is_checked_before_the_input(pair):
    """Without a token even invalid input gets 401, not a validation error."""
    alice, bob, latest = pair
    before = sync_state(alice, bob)
    assert_error(bob.client.get("/api/v1/sync", {"since": -1}), 401, "not_authenticated")
    assert_error(bob.client.get("/api/v1/sync", {"since": BIG - 1}), 401, "not_authenticated")
    for raw in ("{not json", '{"version": "x"}', json.dumps({"version": BIG - 1})):
        response = bob.client.post("/api/v1/sync/ack", raw, content_type="application/json")
        assert_error(response, 401, "not_authenticated")
    assert sync_state(alice, bob) == before


def test_a_device_never_sees_another_users_entries(make_member):
    """bob's pull after alice and carol exchange messages holds nothing of theirs, and bob
    cannot pull from a version only alice's log has reached."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    shared = group(alice, bob)
    alice.send(shared, "for bob too")
    delivery_drain()
    since_bob = first_sync(bob)
    r = alice.post("/conversations", {"kind": "direct", "members": [carol.id]})
    private = r.json()["id"]
    for i in range(3):
        alice.send(private, f"secret a{i}")
        carol.send(private, f"secret c{i}")
    assert carol.post(f"/conversations/{private}/read", {"seq": 5}).status_code == 200
    assert alice.post(f"/conversations/{private}/mute", {"muted": True}).status_code == 200
    delivery_drain()
    entries, latest = pull_all(bob, since_bob)
    assert entries == [] and latest == since_bob
    everything = pull(bob, 0)  # a new device of bob's: the snapshot of all he has
    assert everything["gap"] is True
    assert {c["conversation_id"] for c in everything["snapshot"]["conversations"]} == {shared}
    assert "secret" not in json.dumps(everything)
    alice_latest = first_sync(alice)
    assert alice_latest > since_bob
    before = sync_state(alice, bob, carol)
    body = assert_error(bob.get("/sync", since=alice_latest), 400, "bad_request")
    assert body["details"] == {"latest_version": since_bob}
    assert sync_state(alice, bob, carol) == before


def test_an_ack_never_touches_another_users_device(make_member, second_device):
    """bob's acks (valid, ahead of his own log, or naming a device) leave alice's two
    devices' acks alone, in Redis and, after the flush, in PostgreSQL."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    cid = group(alice, bob)
    for i in range(3):
        alice.send(cid, f"m{i}")
    delivery_drain()
    b_latest = first_sync(bob)
    assert alice.post(f"/conversations/{cid}/mute", {"muted": True}).status_code == 200
    a_latest = first_sync(alice)
    assert first_sync(laptop) == a_latest > b_latest
    assert alice.post("/sync/ack", {"version": 1}).json() == {"acked_version": 1}
    assert laptop.post("/sync/ack", {"version": a_latest}).json() == {"acked_version": a_latest}
    phone_pk, laptop_pk = (
        Device.objects.filter(user=alice.user).order_by("pk").values_list("pk", flat=True)
    )
    alice_before = sync_state(alice)
    r = store.client()
    assert r.hmget(keys.ACKS_PENDING, [phone_pk, laptop_pk]) == ["1", str(a_latest)]

    assert bob.post("/sync/ack", {"version": b_latest}).json() == {"acked_version": b_latest}
    body = assert_error(bob.post("/sync/ack", {"version": a_latest}), 400, "bad_request")
    assert body["details"] == {"latest_version": b_latest}
    for extra in ({"device": phone_pk}, {"device_id": "phone"}, {"user_id": alice.id}):
        assert_error(bob.post("/sync/ack", {"version": 2, **extra}), 422, "invalid_request")
    after = sync_state(alice)
    assert after[alice.id] == alice_before[alice.id]
    assert r.hmget(keys.ACKS_PENDING, [phone_pk, laptop_pk]) == ["1", str(a_latest)]

    offline_flush_acks()
    acked = dict(Device.objects.values_list("pk", "acked_version"))
    bob_pk = Device.objects.get(user=bob.user).pk
    assert acked == {phone_pk: 1, laptop_pk: a_latest, bob_pk: b_latest}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"pushkey": ""},
        {"pushkey": 5},
        {"pushkey": "x" * 513},
        {"pushkey": "a", "extra": 1},
        {"pushkey": "a\u0000b"},
        {"pushkey": "a", "app_id": ""},
        [],
    ],
)
def test_bad_pushkey_bodies_change_nothing(make_member, body):
    alice = make_member("alice")
    before = list(Device.objects.values_list("pk", "pushkey", "push_app_id"))
    response = alice.put("/devices/current/pushkey", body)
    assert_error(response, 422, "invalid_request")
    assert list(Device.objects.values_list("pk", "pushkey", "push_app_id")) == before
    assert_error(alice.put("/devices/current/pushkey", {"pushkey": "k"}, token="bad"), 401)
    assert_error(alice.get("/devices", token="bad"), 401)


def test_a_login_with_a_bad_pushkey_creates_nothing(make_member):
    alice = make_member("alice")
    count = Device.objects.count()
    response = alice.post(
        "/devices",
        {
            "username": "alice",
            "password": "pw-for-tests-1",
            "device_id": "tablet",
            "platform": "ios",
            "pushkey": "",
        },
    )
    assert_error(response, 422, "invalid_request")
    assert Device.objects.count() == count
