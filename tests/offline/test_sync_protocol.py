"""A device that follows the sync protocol (apply a gap snapshot, continue from its version,
pull until ``has_more`` is false) ends up knowing every conversation's last seq and unread
count, whatever page size it uses and whether it logged in before or after the activity.
A real Celery worker prepares the packages and snapshots that devices get at login (and that
go stale as the activity continues); the entries are written by draining the delivery
pipeline here, so that when they land does not depend on the Timer's pace on a loaded box."""

import json

import pytest
from django.test import Client

from delivery.pipeline import delivery_drain
from imcore.models import Membership
from offline import keys, store
from tests.conftest import Member, running_worker, wait_until
from tests.offline.conftest import pull

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


@pytest.fixture(scope="module")
def worker(django_db_setup, django_db_blocker):
    with running_worker() as proc:
        yield proc


def login(member: Member, device_id: str) -> Member:
    """Log another device of ``member`` in through the API."""
    client = Client()
    response = client.post(
        "/api/v1/devices",
        json.dumps(
            {
                "username": member.user.username,
                "password": "pw-for-tests-1",
                "device_id": device_id,
                "platform": "desktop",
            }
        ),
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    return Member(user=member.user, token=response.json()["token"], client=client)


def apply_entry(state: dict[int, dict], e: dict, user_id: int) -> None:
    """Apply one sync entry to a client's ``{conversation id: {last_seq, read_seq, muted}}``
    as the protocol says (seqs only move up; a message the user sent is read by them)."""
    cid = e["conversation_id"]
    if e["type"] == "join":
        old = state.get(cid, {"last_seq": 0, "read_seq": 0})
        state[cid] = {
            "last_seq": max(e["last_seq"], old["last_seq"]),
            "read_seq": max(e["read_seq"], old["read_seq"]),
            "muted": e["muted"],
        }
    elif e["type"] == "leave":
        state.pop(cid, None)
    elif e["type"] == "mute":
        state[cid]["muted"] = e["muted"]
    elif e["type"] == "read":
        state[cid]["read_seq"] = max(state[cid]["read_seq"], e["seq"])
    elif e["type"] == "message":
        c = state[cid]
        c["last_seq"] = max(c["last_seq"], e["seq"])
        if e["message"]["sender_id"] == user_id:
            c["read_seq"] = max(c["read_seq"], e["seq"])


def follow_protocol(device: Member, since: int, limit: int) -> tuple[dict, int]:
    """Pull as the protocol says, applying what comes; returns ``({conversation id: (last
    seq, read seq, unread, muted)}, version reached)``. Checks on the way that no answer
    names a ``latest_version`` below what the user had when it was asked."""
    state: dict[int, dict] = {}
    while True:
        had = store.latest_version(device.id)
        page = pull(device, since, limit)
        assert page["latest_version"] >= had, (page["latest_version"], had)
        if page["gap"]:
            snapshot = page["snapshot"]
            assert snapshot["latest_version"] == page["latest_version"]
            state = {
                c["conversation_id"]: {
                    "last_seq": c["last_seq"],
                    "read_seq": c["read_seq"],
                    "muted": c["muted"],
                }
                for c in snapshot["conversations"]
            }
            since = snapshot["latest_version"]
        for e in page["entries"]:
            apply_entry(state, e, device.id)
            since = e["version"]
        if not page["has_more"]:
            known = {
                cid: (c["last_seq"], c["read_seq"], c["last_seq"] - c["read_seq"], c["muted"])
                for cid, c in state.items()
            }
            return known, since


def truth(user_id: int) -> dict:
    """What PostgreSQL holds for the user: the same shape as :func:`follow_protocol`."""
    return {
        m.conversation_id: (
            m.conversation.last_seq,
            m.last_read_seq,
            m.conversation.last_seq - m.last_read_seq,
            m.muted,
        )
        for m in Membership.objects.filter(user_id=user_id, left_at__isnull=True).select_related(
            "conversation"
        )
    }


def converse(a: Member, b: Member, *, b_sends: int, a_sends: int) -> int:
    """The report's activity: A's phone opens a direct conversation with B, B sends, then A."""
    response = a.post("/conversations", {"kind": "direct", "members": [b.id]})
    assert response.status_code in (200, 201), response.content
    cid = response.json()["id"]
    for i in range(b_sends):
        b.send(cid, f"from b {i}")
    for i in range(a_sends):
        a.send(cid, f"from a {i}")
    return cid


def recorded(user: Member, conversation_id: int, seq: int) -> bool:
    """The Aggregator has written the user's entry for message ``seq``."""
    y = store.client().hget(keys.state(user.id), f"y:{conversation_id}")
    return y is not None and int(y) >= seq


def prepared_snapshot(user: Member, device_id: str) -> dict | None:
    from imcore.models import Device

    pk = Device.objects.get(user_id=user.id, device_id=device_id).pk
    raw = store.client().get(keys.snapshot(user.id, pk))
    return json.loads(raw) if raw else None


@pytest.mark.parametrize("limit", [1, 2, 100])
def test_device_logged_in_before_the_activity_is_not_told_it_is_caught_up_early(
    worker, make_member, limit
):
    """The report: a desk logged in before the activity gets its prepared snapshot at login;
    pulled after the activity, it must not be served as if it were current."""
    a, b = make_member(), make_member()
    desk = login(a, "desk")
    wait_until(lambda: prepared_snapshot(a, "desk"), message="no snapshot was prepared")
    cid = converse(a, b, b_sends=5, a_sends=1)
    delivery_drain()
    assert recorded(a, cid, 6)
    stale = prepared_snapshot(a, "desk")
    assert stale["latest_version"] < store.latest_version(a.id)  # the path under test
    known, version = follow_protocol(desk, 0, limit)
    assert known == truth(a.id) and known[cid] == (6, 6, 0, False)
    assert version == store.latest_version(a.id)
    # B's side too, from a device of B's that also logged in before
    b_known, _ = follow_protocol(b, 0, limit)
    assert b_known == truth(b.id) and b_known[cid] == (6, 5, 1, False)


@pytest.mark.parametrize("limit", [1, 3, 100])
def test_device_logged_in_after_the_activity_learns_everything(worker, make_member, limit):
    """A device that logs in after some activity, with more activity (messages, a read, a mute)
    after its snapshot was prepared, still learns the state at its first pull."""
    a, b, c = make_member(), make_member(), make_member()
    cid = converse(a, b, b_sends=4, a_sends=2)
    delivery_drain()
    assert recorded(a, cid, 6)
    laptop = login(a, "laptop")
    wait_until(lambda: prepared_snapshot(a, "laptop"), message="no snapshot was prepared")
    response = a.post("/conversations", {"kind": "group", "members": [b.id, c.id]})
    team = response.json()["id"]
    for i in range(3):
        c.send(team, f"team {i}")
    b.send(cid, "one more")
    assert a.post(f"/conversations/{team}/read", {"seq": 1}).status_code == 200
    assert a.post(f"/conversations/{cid}/mute", {"muted": True}).status_code == 200
    delivery_drain()
    assert recorded(a, team, 3) and recorded(a, cid, 7)
    assert prepared_snapshot(a, "laptop")["latest_version"] < store.latest_version(a.id)
    known, version = follow_protocol(laptop, 0, limit)
    assert known == truth(a.id)
    assert known[cid] == (7, 6, 1, True) and known[team] == (3, 1, 2, False)
    assert version == store.latest_version(a.id)


def test_a_current_prepared_snapshot_is_served_as_prepared(worker, make_member):
    """While nothing happened after it, the prepared snapshot is what the pull answers (no
    rebuild): the same object the worker stored."""
    a, b = make_member(), make_member()
    cid = converse(a, b, b_sends=2, a_sends=0)
    delivery_drain()
    assert recorded(a, cid, 2)
    desk = login(a, "desk")
    snapshot = wait_until(lambda: prepared_snapshot(a, "desk"), message="nothing prepared")
    assert snapshot["latest_version"] == store.latest_version(a.id)
    page = pull(desk, 0)
    assert page["gap"] and page["snapshot"] == snapshot and not page["has_more"]
