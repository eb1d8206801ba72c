"""Recall (DELETE .../messages/{seq}) and edit (PATCH) through the API (issue 15): a recall
leaves a tombstone with its seq and takes one unread (and a mention) from every member who had
not read it, at once, exactly, in small groups (the pipeline's seq-keyed events, in any
order) and in channel-mode groups (O(1): one record per conversation); an edit changes the
body and no count; bad input is a JSON 4xx that changes nothing."""

import json
from unittest.mock import ANY

import pytest

from counters.redis import get_redis
from delivery.pipeline import delivery_drain
from delivery.services import delivery_convert
from imcore.models import Conversation, Message
from tests.helpers import counter_mismatches, read, send
from tests.offline.test_sync import group

from .state import assert_error

pytestmark = pytest.mark.django_db(transaction=True)


def recall(member, cid, seq, token=None):
    return member.delete(f"/conversations/{cid}/messages/{seq}", token=token)


def edit(member, cid, seq, body, token=None):
    return member.client.patch(
        f"/api/v1/conversations/{cid}/messages/{seq}",
        json.dumps({"body": body}) if not isinstance(body, bytes) else body,
        content_type="application/json",
        headers=member._headers(token),
    )


def unread(member, cid):
    counts = member.unread()
    return counts["conversations"].get(str(cid)), counts["mentions"].get(str(cid), 0)


def exact(members):
    for m in members:
        m.unread()
    assert counter_mismatches([m.id for m in members]) == []


def history(member, cid):
    response = member.get(f"/conversations/{cid}/messages")
    assert response.status_code == 200, response.content
    return {m["seq"]: m for m in response.json()["messages"]}


def test_recall_in_a_small_group_drops_unread_and_mention_for_who_had_not_read(make_member):
    """A recall takes one unread (and the mention) from members below its seq, at once, and
    nothing from one who read it; history keeps the seq as a tombstone; a second call is a
    200 no-op."""
    alice, bob, carol = members = [make_member() for _ in range(3)]
    cid = group(alice, bob, carol)
    send(alice, cid, "one")
    s2 = send(alice, cid, "two", mentions=[bob.id, carol.id])
    send(alice, cid, "three")
    delivery_drain()
    read(carol, cid, s2)
    assert unread(bob, cid) == (3, 1) and unread(carol, cid) == (1, 0)
    response = recall(alice, cid, s2)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["deleted"] is True and body["body"] == "" and body["seq"] == s2
    # at once, without a flush
    assert unread(bob, cid) == (2, 0) and bob.unread()["badge"] == 2
    assert unread(carol, cid) == (1, 0)
    exact(members)
    assert Message.objects.get(conversation_id=cid, seq=s2).body == ""
    shown = history(bob, cid)
    assert sorted(shown) == [1, 2, 3]
    assert shown[s2]["deleted"] is True and shown[s2]["body"] == "" and shown[s2]["mentions"] == []
    # idempotent
    again = recall(alice, cid, s2)
    assert again.status_code == 200 and again.json()["deleted"] is True
    assert unread(bob, cid) == (2, 0)
    exact(members)
    # reading past it leaves nothing; the seqs stay dense for the next send
    assert read(bob, cid, 3) == {"unread": 0, "badge": 0, "badge_version": ANY}
    assert send(bob, cid, "four") == 4
    delivery_drain()
    assert unread(carol, cid) == (2, 0)
    exact(members)


def test_a_recall_applied_before_the_message_is_counted_stays_exact(make_member):
    """The recall reaches Redis before the pipeline counted the message (events in any
    order): once drained, the count is still exact, and draining again changes nothing."""
    alice, bob = members = [make_member() for _ in range(2)]
    cid = group(alice, bob)
    send(alice, cid, "a")
    s2 = send(alice, cid, "b", mentions=[bob.id])
    assert recall(alice, cid, s2).status_code == 200
    delivery_drain()
    assert unread(bob, cid) == (1, 0)
    exact(members)
    # a wipe: the rebuild from PostgreSQL knows the tombstone
    get_redis().flushdb()
    assert unread(bob, cid) == (1, 0)
    exact(members)


def test_recall_in_a_channel_mode_group_is_o1_and_exact(large, make_member):
    """In a channel-mode group a recall writes the conversation's record (no call per
    member), and every member's unread counts against it at once."""
    alice, bob, carol, *rest = members = [make_member() for _ in range(6)]
    cid = group(alice, bob, carol, *rest)
    assert Conversation.objects.get(pk=cid).mode == "channel"
    send(alice, cid, "one")
    s2 = send(alice, cid, "two", mentions=[bob.id])
    s3 = send(alice, cid, "three", mention_all=True)
    read(carol, cid, s2)
    exact(members)
    before = get_redis().info("commandstats")
    assert recall(alice, cid, s2).status_code == 200
    assert recall(alice, cid, s3).status_code == 200
    after = get_redis().info("commandstats")
    evals = sum(
        after.get(k, {}).get("calls", 0) - before.get(k, {}).get("calls", 0)
        for k in ("cmdstat_evalsha", "cmdstat_eval")
    )
    assert evals <= 2 * 2  # the record, and bob's mention: not one per member
    assert unread(bob, cid) == (1, 0)
    assert unread(carol, cid) == (0, 0)
    assert unread(rest[0], cid) == (1, 0)
    exact(members)
    # converted back to the aggregate form, and again to channel: nobody's count moves
    assert delivery_convert(conversation_id=cid, force="aggregate") == "aggregate"
    exact(members)
    assert unread(rest[0], cid) == (1, 0)
    assert delivery_convert(conversation_id=cid, force="channel") == "channel"
    exact(members)
    get_redis().flushdb()
    assert unread(rest[0], cid) == (1, 0)
    exact(members)


def test_recall_in_a_small_group_survives_conversion_to_channel(large, make_member):
    """Recalls made while the group was small still count once it is in channel form."""
    alice, bob, carol = members = [make_member() for _ in range(3)]
    cid = group(alice, bob, carol)
    send(alice, cid, "one")
    s2 = send(bob, cid, "two")
    delivery_drain()
    assert recall(bob, cid, s2).status_code == 200
    assert delivery_convert(conversation_id=cid, force="channel") == "channel"
    assert unread(carol, cid) == (1, 0)
    exact(members)


def test_who_may_recall(settings, make_member):
    """The sender within the window, the group's creator at any time; another member, or the
    sender past the window, gets 403 and nothing changes."""
    alice, bob, carol = members = [make_member() for _ in range(3)]
    cid = group(alice, bob, carol)
    s1 = send(bob, cid, "bob's")
    s2 = send(carol, cid, "carol's")
    delivery_drain()
    # another member's message
    assert_error(recall(carol, cid, s1), 403, "forbidden")
    assert_error(edit(carol, cid, s1, "changed"), 403, "forbidden")
    # the creator may recall anyone's message (not edit it)
    assert_error(edit(alice, cid, s2, "changed"), 403, "forbidden")
    settings.MESSAGE_RECALL_WINDOW_S = 0
    assert_error(recall(bob, cid, s1), 403, "forbidden")
    assert_error(edit(bob, cid, s1, "late"), 403, "forbidden")
    assert not Message.objects.filter(conversation_id=cid, deleted=True).exists()
    assert Message.objects.get(conversation_id=cid, seq=s1).body == "bob's"
    assert unread(alice, cid) == (2, 0)
    response = recall(alice, cid, s2)
    assert response.status_code == 200 and response.json()["deleted"] is True
    assert unread(alice, cid) == (1, 0)
    exact(members)


def test_recall_and_edit_refuse_bad_input(make_member):
    """Unknown seq: 404; an outsider: 404; no token: 401; an empty or oversized body, or a
    recalled message to edit: 4xx. Each answer is JSON and changes nothing."""
    alice, bob = members = [make_member() for _ in range(2)]
    outsider = make_member()
    cid = group(alice, bob)
    s1 = send(alice, cid, "keep")
    delivery_drain()
    state = list(Message.objects.order_by("pk").values())
    assert_error(recall(alice, cid, 99), 404, "not_found")
    assert_error(edit(alice, cid, 99, "x"), 404, "not_found")
    assert_error(recall(outsider, cid, s1), 404, "not_found")
    assert_error(edit(outsider, cid, s1, "x"), 404, "not_found")
    assert_error(recall(alice, cid, s1, token=""), 401)
    assert_error(edit(alice, cid, s1, "x", token=""), 401)
    assert_error(recall(alice, 10**9, s1), 404, "not_found")
    assert_error(recall(alice, cid, 0), 422)
    assert_error(edit(alice, cid, s1, ""), 422)
    assert_error(edit(alice, cid, s1, "x" * 100_000))
    assert_error(edit(alice, cid, s1, b"{not json"), 400)
    assert list(Message.objects.order_by("pk").values()) == state
    assert unread(bob, cid) == (1, 0)
    assert recall(alice, cid, s1).status_code == 200
    assert_error(edit(alice, cid, s1, "back"), 409, "conflict")
    exact(members)


def test_edit_changes_the_body_and_no_count(make_member):
    """An edit by the sender keeps the seq and the counts; edit_count and edited_at move."""
    alice, bob = members = [make_member() for _ in range(2)]
    cid = group(alice, bob)
    s1 = send(alice, cid, "typo", mentions=[bob.id])
    delivery_drain()
    response = edit(alice, cid, s1, "fixed")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["body"] == "fixed" and body["edit_count"] == 1 and body["edited_at"]
    assert unread(bob, cid) == (1, 1)
    assert edit(alice, cid, s1, "fixed again").json()["edit_count"] == 2
    assert history(bob, cid)[s1]["body"] == "fixed again"
    exact(members)
