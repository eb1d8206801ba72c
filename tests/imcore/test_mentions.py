"""Mentions through the API (issue 13, part 3): who a message may mention, the unread
mentions each member reads back in ``GET /unread`` and ``GET /conversations``, reads, leaves,
rebuilds and repeated events. The aggregation pipeline is drained in-process
(``delivery_drain``); the last tests run it, and the celery-batches and fan-out paths, on real
Celery workers."""

import pytest

from counters.redis import get_redis
from counters.selectors import counters_truth
from counters.services import counters_reconcile
from delivery.pipeline import delivery_drain
from delivery.services import delivery_message_committed
from imcore.models import Message
from tests.conftest import broker_idle, running_worker, wait_until
from tests.helpers import counter_mismatches
from tests.offline.conftest import first_sync, pull, pull_all
from tests.offline.test_sync import group

from .state import api_counts, assert_error, snapshot

pytestmark = pytest.mark.django_db(transaction=True)


def send(member, cid, *, body="hi", cmid=None, status=201, **fields):
    payload = {"body": body, "client_msg_id": cmid or f"{member.id}-{body}", **fields}
    response = member.post(f"/conversations/{cid}/messages", payload)
    assert response.status_code == status, response.content
    return response.json()


def prime(*members) -> None:
    """Load the members' counters, so that what they read later comes from the events the
    write path applied, not from a rebuild of an unloaded hash (which reads PostgreSQL)."""
    for m in members:
        m.unread()


def exact(*members) -> None:
    """Redis holds each member's counts and mentions exactly as PostgreSQL has them."""
    assert counter_mismatches([m.id for m in members]) == []


def mentions(member) -> dict:
    return member.unread()["mentions"]


def listed(member) -> dict:
    """``{conversation id: (unread, unread_mentions)}`` from ``GET /conversations``."""
    response = member.get("/conversations")
    assert response.status_code == 200, response.content
    return {c["id"]: (c["unread"], c["unread_mentions"]) for c in response.json()}


@pytest.fixture
def team(make_member):
    """alice created a group with bob, carol and dave; erin is in nothing."""
    alice, bob, carol, dave, erin = (
        make_member(n) for n in ("alice", "bob", "carol", "dave", "erin")
    )
    gid = group(alice, bob, carol, dave)
    prime(alice, bob, carol, dave, erin)
    return alice, bob, carol, dave, erin, gid


def test_a_mention_counts_for_the_mentioned_members_only(team):
    """A message that mentions bob and carol gives each of them one unread mention, and no
    one else any; the message shows whom it mentions."""
    alice, bob, carol, dave, _, gid = team
    sent = send(alice, gid, body="look", mentions=[carol.id, bob.id, bob.id])
    assert sent["mentions"] == sorted([bob.id, carol.id])  # folded and sorted
    assert sent["mention_all"] is False
    send(alice, gid, body="plain")
    delivery_drain()
    assert mentions(bob) == {str(gid): 1}
    assert mentions(carol) == {str(gid): 1}
    assert mentions(dave) == {}
    assert mentions(alice) == {}
    assert listed(bob) == {gid: (2, 1)}
    assert listed(dave) == {gid: (2, 0)}
    assert bob.unread()["badge"] == 2  # mentions are not part of the badge
    history = bob.get(f"/conversations/{gid}/messages").json()["messages"]
    assert [(m["mentions"], m["mention_all"]) for m in history] == [
        (sorted([bob.id, carol.id]), False),
        ([], False),
    ]
    exact(alice, bob, carol, dave)


def test_a_read_past_the_mention_clears_it_and_one_before_keeps_it(team):
    """Reading up to a seq below the mention keeps it; reading up to it clears it."""
    alice, bob, *_, gid = team
    send(alice, gid, body="1")
    send(alice, gid, body="2", mentions=[bob.id])
    send(alice, gid, body="3", mentions=[bob.id])
    delivery_drain()
    assert mentions(bob) == {str(gid): 2}
    assert bob.post(f"/conversations/{gid}/read", {"seq": 1}).status_code == 200
    assert mentions(bob) == {str(gid): 2}
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).status_code == 200
    assert mentions(bob) == {str(gid): 1}
    assert listed(bob) == {gid: (1, 1)}
    assert bob.post(f"/conversations/{gid}/read", {"seq": 3}).status_code == 200
    assert mentions(bob) == {}
    assert listed(bob) == {gid: (0, 0)}
    exact(alice, bob)


def test_mention_all_by_the_creator_counts_for_everyone_but_the_sender(team):
    """The creator's mention_all is one unread mention for every other member, muted or not;
    a mention read before it arrives is not counted."""
    alice, bob, carol, dave, _, gid = team
    assert carol.post(f"/conversations/{gid}/mute", {"muted": True}).status_code == 200
    sent = send(alice, gid, body="all hands", mention_all=True)
    assert sent["mention_all"] is True
    assert dave.post(f"/conversations/{gid}/read", {"seq": sent["seq"]}).status_code == 200
    delivery_drain()
    assert mentions(bob) == {str(gid): 1}
    assert mentions(carol) == {str(gid): 1}  # muted: still counted
    assert carol.unread()["badge"] == 0
    assert mentions(dave) == {}  # read before the event was applied
    assert mentions(alice) == {}
    exact(alice, bob, carol, dave)


def test_mentioning_yourself_is_stored_and_counts_for_nobody(team):
    """A sender may mention themself (clients need not strip it); it is never unread."""
    alice, bob, *_, gid = team
    sent = send(alice, gid, mentions=[alice.id])
    assert sent["mentions"] == [alice.id]
    delivery_drain()
    assert mentions(alice) == {}
    assert mentions(bob) == {}
    exact(alice, bob)


@pytest.mark.parametrize(
    ("who", "fields", "status", "code"),
    [
        ("bob", {"mention_all": True}, 403, "forbidden"),
        ("alice", {"mentions": ["erin"]}, 400, "bad_request"),  # not a member
        ("alice", {"mentions": ["left"]}, 400, "bad_request"),  # left the group
        ("alice", {"mentions": ["bob", "unknown"]}, 400, "bad_request"),
        ("alice", {"mentions": ["bob-as-string"]}, 422, "invalid_request"),
        ("alice", {"mentions": [True]}, 422, "invalid_request"),
        ("alice", {"mentions": [0]}, 422, "invalid_request"),
        ("alice", {"mentions": [-4]}, 422, "invalid_request"),
        ("alice", {"mentions": [2**63]}, 422, "invalid_request"),
        ("alice", {"mentions": [["bob"]]}, 422, "invalid_request"),
        ("alice", {"mentions": None}, 422, "invalid_request"),
        ("alice", {"mentions": "bob"}, 422, "invalid_request"),
        ("alice", {"mentions": ["bob"] * 1001}, 422, "invalid_request"),
        ("alice", {"mention_all": "yes"}, 422, "invalid_request"),
        ("alice", {"mention_all": 1}, 422, "invalid_request"),
    ],
    ids=[
        "mention-all-not-creator",
        "non-member",
        "left-member",
        "unknown-user",
        "id-as-string",
        "bool",
        "zero",
        "negative",
        "2**63",
        "nested",
        "null",
        "not-a-list",
        "over-the-limit",
        "mention-all-string",
        "mention-all-int",
    ],
)
def test_bad_mentions_get_a_4xx_and_change_nothing(team, who, fields, status, code):
    """A send with mentions it may not make gets its 4xx JSON error and leaves PostgreSQL,
    Redis and every member's counts as they were."""
    alice, bob, carol, dave, erin, gid = team
    send(alice, gid, body="before", mentions=[bob.id])
    assert dave.delete(f"/conversations/{gid}/members/{dave.id}").status_code == 204
    delivery_drain()
    names = {"bob": bob.id, "erin": erin.id, "left": dave.id, "unknown": 10**9}
    names["bob-as-string"] = str(bob.id)

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return names.get(value, value) if isinstance(value, str) else value

    payload = {k: resolve(v) for k, v in fields.items()}
    members = [alice, bob, carol, dave, erin]
    api_counts(members)  # every member's counters loaded, every device seen
    before = snapshot(members, api=False)
    actor = {"alice": alice, "bob": bob}[who]
    response = actor.post(
        f"/conversations/{gid}/messages", {"body": "x", "client_msg_id": "bad-1", **payload}
    )
    assert_error(response, status, code)
    assert snapshot(members, api=False) == before


def test_mention_all_in_a_direct_conversation_is_a_400(make_member):
    """mention_all is for groups; in a direct conversation it is refused and nothing changes."""
    alice, bob = make_member("alice"), make_member("bob")
    did = alice.post("/conversations", {"kind": "direct", "members": [bob.id]}).json()["id"]
    prime(alice, bob)
    api_counts([alice, bob])
    before = snapshot([alice, bob], api=False)
    response = alice.post(
        f"/conversations/{did}/messages", {"body": "x", "client_msg_id": "d", "mention_all": True}
    )
    assert_error(response, 400, "bad_request")
    assert snapshot([alice, bob], api=False) == before
    # a mention of the other member of a direct conversation is fine
    send(alice, did, mentions=[bob.id])
    delivery_drain()
    assert mentions(bob) == {str(did): 1}


def test_a_leave_clears_the_mentions_and_a_rejoin_starts_without(team):
    """Leaving drops the member's unread mentions; rejoining does not bring them back."""
    alice, bob, *_, gid = team
    send(alice, gid, mentions=[bob.id])
    delivery_drain()
    assert mentions(bob) == {str(gid): 1}
    assert bob.delete(f"/conversations/{gid}/members/{bob.id}").status_code == 204
    assert mentions(bob) == {}
    assert alice.post(f"/conversations/{gid}/members", {"user_ids": [bob.id]}).status_code == 200
    assert mentions(bob) == {}
    assert listed(bob) == {gid: (0, 0)}
    send(alice, gid, body="again", mentions=[bob.id])
    delivery_drain()
    assert mentions(bob) == {str(gid): 1}
    exact(alice, bob)


def test_a_rebuild_after_a_redis_wipe_restores_the_mentions_exactly(team, redis_clean):
    """After Redis loses everything, the first read rebuilds every member's unread mentions
    from PostgreSQL, exactly as they were; a reconcile then finds nothing to repair, and
    repairs a hash whose mentions were damaged."""
    alice, bob, carol, dave, _, gid = team
    other = group(bob, carol, title="other")
    send(alice, gid, body="1", mentions=[bob.id, carol.id])
    send(alice, gid, body="2", mention_all=True)
    send(bob, other, body="3", mentions=[carol.id])
    send(dave, gid, body="4", mentions=[bob.id])
    delivery_drain()
    assert bob.post(f"/conversations/{gid}/read", {"seq": 1}).status_code == 200
    members = [alice, bob, carol, dave]
    before = {m.id: m.unread() for m in members}
    assert before[bob.id]["mentions"] == {str(gid): 2}
    assert before[carol.id]["mentions"] == {str(gid): 2, str(other): 1}
    assert before[dave.id]["mentions"] == {}  # dave sent 4: read up to it
    redis_clean.flushdb()
    assert {m.id: m.unread() for m in members} == before
    assert counters_reconcile(user_ids=[m.id for m in members]).diffs == []
    # seq 3 (dave's, to bob) is no mention of carol's: damage the hash with it
    get_redis().hset(f"imc:{{u:{carol.id}}}:ctr", f"n:{gid}", "1,2,3")
    report = counters_reconcile(user_ids=[carol.id])
    assert [d.mentions for d in report.diffs] == [{gid: (3, 2)}]
    assert carol.unread() == before[carol.id]
    assert counters_truth(user_id=carol.id).mentions == {gid: 2, other: 1}


def test_a_repeated_event_or_retried_send_counts_a_mention_once(team):
    """The same message's event applied again (a retried send, a redelivery) adds nothing;
    a retry with other mentions is a 409."""
    alice, bob, *_, gid = team
    first = send(alice, gid, cmid="once", mentions=[bob.id])
    again = send(alice, gid, cmid="once", mentions=[bob.id, bob.id], status=200)
    assert again["id"] == first["id"]
    delivery_drain()
    assert mentions(bob) == {str(gid): 1}  # (loads bob's hash: no rebuild hides a double)
    for _ in range(3):
        delivery_message_committed(
            conversation_id=gid, seq=first["seq"], sender_id=alice.id, mentions=[bob.id]
        )
    delivery_drain()
    assert mentions(bob) == {str(gid): 1}
    response = alice.post(
        f"/conversations/{gid}/messages",
        {"body": "hi", "client_msg_id": "once", "mentions": []},
    )
    assert_error(response, 409, "conflict")
    assert Message.objects.filter(client_msg_id="once").count() == 1
    exact(alice, bob)


def test_sync_entries_carry_the_mentions(team):
    """A message entry in the offline store shows whom the message mentions."""
    alice, bob, *_, gid = team
    since = first_sync(bob)
    send(alice, gid, mentions=[bob.id])
    delivery_drain()
    entries, _ = pull_all(bob, since)
    messages = [e["message"] for e in entries if e["type"] == "message"]
    assert [(m["mentions"], m["mention_all"]) for m in messages] == [([bob.id], False)]


@pytest.mark.worker
@pytest.mark.parametrize("path", ["pipeline", "batches", "fanout"])
def test_mentions_through_a_real_worker(make_member, settings, path):
    """On each write path, with a real Celery worker (and beat's Timer for the pipeline), the
    mentioned members get their mentions once and the counters end equal to the truth."""
    settings.DELIVERY_WRITE_PATH = path
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = group(alice, bob, carol)
    prime(alice, bob, carol)
    with running_worker(beat=path == "pipeline", DELIVERY_WRITE_PATH=path):
        send(alice, gid, body="1", mentions=[bob.id])
        send(alice, gid, body="2", mention_all=True)
        send(alice, gid, body="3")
        send(alice, gid, body="1", status=200, mentions=[bob.id])  # a retry: counted once
        wait_until(lambda: mentions(bob) == {str(gid): 2} and mentions(carol) == {str(gid): 1})
        wait_until(broker_idle)
        wait_until(lambda: not counter_mismatches([alice.id, bob.id, carol.id]), timeout=20)
    assert mentions(bob) == {str(gid): 2}
    assert mentions(carol) == {str(gid): 1}
    assert mentions(alice) == {}


def test_the_gap_snapshot_carries_each_conversations_unread_mentions(team):
    """A device that starts from the gap snapshot learns the unread mentions with the counts."""
    alice, bob, carol, dave, _, gid = team
    send(alice, gid, body="to-bob", mentions=[bob.id])
    send(alice, gid, body="to-all", mention_all=True)
    page = pull(bob, 0)
    assert page["gap"]
    held = {c["conversation_id"]: c["unread_mentions"] for c in page["snapshot"]["conversations"]}
    assert held == {gid: 2}
    assert {
        c["conversation_id"]: c["unread_mentions"]
        for c in pull(alice, 0)["snapshot"]["conversations"]
    } == {gid: 0}
