"""A send is one SQL statement (``imcore.services._SEND_SQL``) and one Redis round trip for
its writes, through the HTTP API: seqs stay dense when identical ``client_msg_id``s race, a
repeated send is answered from the stored message and hands it over again, and every refusal
changes nothing."""

import time

import pytest
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext

from delivery import keys as delivery_keys
from delivery.pipeline import shard_of
from imcore.models import Conversation, Membership, Message
from tests.conftest import Member
from tests.counters.test_concurrency import FORK, close_for_fork
from tests.helpers import RoundTrips

# The send commits by itself (autocommit), as in a request: the tests commit.
pytestmark = pytest.mark.django_db(transaction=True)


def group(creator: Member, *others: Member) -> int:
    response = creator.post("/conversations", {"kind": "group", "members": [o.id for o in others]})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def send(member: Member, gid: int, client_msg_id: str, body: str = "hello", **extra):
    return member.post(
        f"/conversations/{gid}/messages", {"body": body, "client_msg_id": client_msg_id, **extra}
    )


def state(gid: int) -> dict:
    """What a send can change in PostgreSQL."""
    return {
        "last_seq": Conversation.objects.get(pk=gid).last_seq,
        "messages": list(
            Message.objects.filter(conversation_id=gid)
            .order_by("seq")
            .values_list("seq", "sender_id", "client_msg_id", "body")
        ),
        "reads": sorted(
            Membership.objects.filter(conversation_id=gid).values_list("user_id", "last_read_seq")
        ),
    }


def assert_dense(gid: int) -> None:
    seqs = list(Message.objects.filter(conversation_id=gid).order_by("seq").values_list("seq"))
    last_seq = Conversation.objects.get(pk=gid).last_seq
    assert [s for (s,) in seqs] == list(range(1, last_seq + 1))


@pytest.mark.parametrize("mode", ["aggregate", "channel"])
def test_a_send_is_one_statement_and_one_redis_round_trip(make_member, monkeypatch, mode):
    """With the token known to the process (``imcore.tracked``), a new message costs one SQL
    statement and one Redis round trip: every write of the send (with mentions too; in
    channel mode a personal mention also schedules the mentioned users' pushes, which reads
    their devices)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = group(alice, bob)
    Conversation.objects.filter(pk=gid).update(mode=mode)
    for warm in ("warm1", "warm2"):  # the token cached in Redis, then here; scripts loaded
        assert send(alice, gid, warm).status_code == 201
    trips = RoundTrips(monkeypatch)
    cases = [({}, 1), ({"mention_all": True}, 1), ({"mentions": [bob.id]}, 1)]
    for n, (extra, expected_trips) in enumerate(cases):
        trips.count = 0
        with CaptureQueriesContext(connection) as queries:
            response = send(alice, gid, f"m{n}", **extra)
        assert response.status_code == 201, response.content
        statements = [q["sql"] for q in queries.captured_queries]
        if mode == "channel" and "mentions" in extra:
            assert [q.split()[0] for q in statements] == ["WITH", "SELECT"], statements
            assert "imcore_device" in statements[1]
            continue
        assert [q.split()[0] for q in statements] == ["WITH"], statements
        assert trips.count == expected_trips
    assert_dense(gid)


def _racing_send(token: str, path: str, cmid: str, go, results) -> None:
    """A client process: wait for ``go``, send once, report ``(cmid, status, body)``."""
    from django.db import connections

    try:
        go.wait(60)
        response = Client().post(
            path,
            {"body": f"body of {cmid}", "client_msg_id": cmid},
            content_type="application/json",
            headers={"Authorization": f"Bearer {token}"},
        )
        results.put((cmid, response.status_code, response.json()))
    except BaseException as exc:  # report it to the parent instead of dying silently
        results.put((cmid, 0, repr(exc)))
    finally:
        connections.close_all()


def test_identical_client_msg_ids_racing_leave_no_seq_gap(make_member):
    """Five client processes, four with one client_msg_id and one with another, all blocked
    on the conversation's row until it is released: one stores the message (201), the other
    three get it back (200, same seq), and the seqs stay 1..last_seq (each loser's bump was
    rolled back with its failed insert)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = group(alice, bob)
    assert send(alice, gid, "first").status_code == 201
    cmids = ["same"] * 4 + ["other"]
    close_for_fork()
    go, results = FORK.Event(), FORK.Queue()
    path = f"/api/v1/conversations/{gid}/messages"
    procs = [
        FORK.Process(target=_racing_send, args=(alice.token, path, c, go, results)) for c in cmids
    ]
    for proc in procs:
        proc.start()
    try:
        with transaction.atomic():
            # Hold the conversation's row: every send passes its checks, then waits on the bump.
            Conversation.objects.select_for_update().get(pk=gid)
            go.set()
            waiting = 0
            for _ in range(1200):  # up to a minute on a loaded machine
                with connection.cursor() as cursor:
                    # pg_stat_activity is read once per transaction unless its snapshot is
                    # cleared.
                    cursor.execute("SELECT pg_stat_clear_snapshot()")
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                    waiting = cursor.fetchone()[0]
                if waiting == len(cmids):
                    break
                time.sleep(0.05)
            assert waiting == len(cmids)
        answers = [results.get(timeout=60) for _ in cmids]
    finally:
        for proc in procs:
            proc.join(60)
    same = [(status, body) for cmid, status, body in answers if cmid == "same"]
    assert sorted(status for status, _ in same) == [200, 200, 200, 201], answers
    assert len({body["seq"] for _, body in same}) == 1
    assert [status for cmid, status, _ in answers if cmid != "same"] == [201]
    assert_dense(gid)
    assert Conversation.objects.get(pk=gid).last_seq == 3
    assert Message.objects.filter(sender=alice.user, client_msg_id="same").count() == 1
    assert Membership.objects.get(conversation_id=gid, user=alice.user).last_read_seq == 3


def test_replay_after_the_statement_answers_the_stored_message_and_hands_it_over(make_member):
    """The same client_msg_id again is 200 with the stored message and changes nothing in
    PostgreSQL; its event is handed over again (a lost enqueue is repaired); another body is
    409."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = group(alice, bob)
    first = send(alice, gid, "once", mentions=[bob.id])
    assert first.status_code == 201, first.content
    stream = delivery_keys.shard_stream(shard_of(gid))
    from counters.redis import get_redis

    get_redis().delete(stream)  # as if the hand-over had been lost
    before = state(gid)
    again = send(alice, gid, "once", mentions=[bob.id])
    assert again.status_code == 200, again.content
    assert again.json() == first.json()
    assert state(gid) == before
    assert get_redis().xlen(stream) == 1
    conflict = send(alice, gid, "once", body="another body", mentions=[bob.id])
    assert conflict.status_code == 409
    assert conflict.json()["details"] == {"conversation_id": gid, "seq": 1}
    assert state(gid) == before


def test_refused_sends_change_nothing(make_member):
    """Not a member (404), a conversation that does not exist (404), a mention of a
    non-member (400), mention_all by someone other than the creator (403), a client_msg_id
    used in another conversation (409): each is refused and leaves PostgreSQL as it was."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = group(alice, bob)
    other = group(alice, carol)
    assert send(alice, gid, "kept").status_code == 201
    before = state(gid), state(other)
    cases = [
        (send(carol, gid, "c1"), 404, "not_found"),
        (send(alice, 10**12, "c2"), 404, "not_found"),
        (send(alice, gid, "c3", mentions=[carol.id]), 400, "bad_request"),
        (send(bob, gid, "c4", mention_all=True), 403, "forbidden"),
        (send(alice, other, "kept"), 409, "conflict"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.content
        assert response.json()["error"] == code
    assert (state(gid), state(other)) == before
