"""Channel mode for large groups (issue 13), through the API with the real services: a message
costs O(1) (no pipeline event, no per-member write, no offline entry), every member's unread
and the badge stay exact at once, mentions count once, and converting a group either way
(with sends, reads and mutes racing it) changes nobody's counts."""

import threading
from unittest.mock import ANY

import pytest

from counters.redis import get_redis
from delivery import failpoints
from delivery.pipeline import delivery_drain, shard_lengths
from delivery.services import delivery_channel_badges, delivery_convert
from imcore.models import Conversation, Device
from offline import push, store
from offline import store as push_store
from tests.conftest import running_worker, wait_until
from tests.helpers import commandstats, counter_mismatches, read, send
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)


def mode(cid: int) -> str:
    return Conversation.objects.values_list("mode", flat=True).get(pk=cid)


def mute(member, cid, muted=True):
    response = member.post(f"/conversations/{cid}/mute", {"muted": muted})
    assert response.status_code == 200, response.content
    return response.json()


def exact(members):
    """Redis answers each member's unread, mentions and badge exactly as PostgreSQL has them
    (the rebuild of any member Redis had not loaded yet included)."""
    for m in members:
        m.unread()
    assert counter_mismatches([m.id for m in members]) == []


def log_lengths(members) -> list[int]:
    client = store.client()
    return [client.zcard(f"imc:{{u:{m.id}}}:log") for m in members]


def test_a_large_group_costs_o1_per_message_and_stays_exact(large, make_member):
    alice, *others = members = [make_member() for _ in range(6)]
    cid = group(alice, *others)
    assert mode(cid) == "channel"
    exact(members)
    logs = log_lengths(members)
    commands = commandstats()
    for i in range(5):
        send(members[i % 3], cid, f"m{i}")
    after = commandstats()
    # no pipeline event, no offline entry, and the counts are right without any flush
    assert shard_lengths() == [0] * len(shard_lengths())
    assert log_lengths(members) == logs
    exact(members)
    counts = others[3].unread()
    assert counts["conversations"] == {str(cid): 5} and counts["badge"] == 5
    # the counter scripts ran a handful of times for five messages to six members
    evals = sum(
        after.get(k, {}).get("calls", 0) - commands.get(k, {}).get("calls", 0)
        for k in ("cmdstat_evalsha", "cmdstat_eval")
    )
    assert evals <= 5 * 3

    # reads are immediate and never go backwards; the answer carries the badge
    assert read(others[3], cid, 3) == {"unread": 2, "badge": 2, "badge_version": ANY}
    assert read(others[3], cid, 1) == {"unread": 2, "badge": 2, "badge_version": ANY}
    # muting moves the group out of the badge, unmuting back in
    assert mute(others[4], cid)["badge"] == 0
    send(alice, cid, "after-mute")
    assert others[4].unread()["badge"] == 0
    assert others[4].unread()["conversations"][str(cid)] == 6
    assert mute(others[4], cid, False)["badge"] == 6
    exact(members)

    # a joiner starts at zero; a leaver's count goes
    newcomer = make_member()
    add(alice, cid, newcomer)
    assert newcomer.unread() == {"badge": 0, "conversations": {str(cid): 0}, "mentions": {}}
    send(bob := others[0], cid, "welcome")
    assert newcomer.unread()["conversations"] == {str(cid): 1}
    assert others[2].delete(f"/conversations/{cid}/members/{others[2].id}").status_code == 204
    assert others[2].unread() == {"badge": 0, "conversations": {}, "mentions": {}}
    send(bob, cid, "after-leave")
    exact([*members, newcomer])


def test_mentions_in_a_large_group_count_once_and_clear_on_read(large, make_member):
    alice, bob, carol, *rest = members = [make_member() for _ in range(6)]
    cid = group(alice, bob, carol, *rest)
    assert mode(cid) == "channel"
    s1 = send(bob, cid, "to-carol", mentions=[carol.id])
    s2 = send(alice, cid, "to-all", mention_all=True)
    s3 = send(bob, cid, "to-carol-and-all", mentions=[carol.id])
    assert carol.unread()["mentions"] == {str(cid): 3}
    assert rest[0].unread()["mentions"] == {str(cid): 1}  # the mention_all
    assert alice.unread()["mentions"] == {}  # her own mention_all is read by sending it
    assert bob.unread()["mentions"] == {}  # sending s3 read the mention_all before it
    exact(members)
    read(carol, cid, s1)
    assert carol.unread()["mentions"] == {str(cid): 2}
    read(carol, cid, s2)
    assert carol.unread()["mentions"] == {str(cid): 1}
    read(carol, cid, s3)
    assert carol.unread()["mentions"] == {}
    listed = {c["id"]: c["unread_mentions"] for c in rest[1].get("/conversations").json()}
    assert listed == {cid: 1}
    exact(members)


def test_a_wiped_redis_rebuilds_channel_counts_from_postgresql(large, make_member):
    members = [make_member() for _ in range(5)]
    cid = group(*members)
    send(members[0], cid, "a", mention_all=True)
    send(members[1], cid, "b", mentions=[members[2].id])
    before = [m.unread() for m in members]
    get_redis().flushdb()
    assert [m.unread() for m in members] == before
    exact(members)


def converting(cid: int, target: str, pause_at: str, ms: int):
    """Run ``delivery_convert`` towards ``target`` in a thread that pauses ``ms`` at
    ``pause_at`` each time it passes it (the conversion is then under way for the caller)."""
    failpoints.arm_pause(pause_at, ms)
    done: list = []
    thread = threading.Thread(
        target=lambda: done.append(delivery_convert(conversation_id=cid, force=target))
    )
    thread.start()
    return thread, done


def counts_of(members):
    return [m.unread() for m in members]


@pytest.mark.parametrize("pause_at", ["convert.after_mode", "convert.after_chunk"])
def test_converting_both_ways_changes_nobodys_counts(large, make_member, settings, pause_at):
    """A group converts to channel mode and back while members send, read and mute; after
    every step each member's unread, mentions and badge are what PostgreSQL says."""
    settings.COUNTERS_FAILPOINTS = True
    settings.LARGE_GROUP_CONVERT_CHUNK = 2
    alice, bob, carol, dave = members = [make_member() for _ in range(4)]
    cid = group(alice, bob, carol, dave)
    other = group(bob, carol)  # a small group beside it, in the badge too
    assert mode(cid) == "aggregate"
    send(alice, cid, "one", mentions=[carol.id])
    send(bob, other, "two")
    send(alice, cid, "all", mention_all=True)
    delivery_drain()
    exact(members)
    before = counts_of(members)
    for target in ("channel", "aggregate"):
        thread, done = converting(cid, target, pause_at, 400)
        try:
            wait_until(lambda t=target: mode(cid) == f"to_{t}", timeout=5)
            # during the conversion: sends, a read, a mute, a mention
            send(bob, cid, f"during-{target}-1")
            send(carol, cid, f"during-{target}-2", mentions=[dave.id])
            read(dave, cid, 2)
            mute(carol, cid, target == "channel")
            delivery_drain()
            exact(members)
        finally:
            failpoints.disarm_pause(pause_at)
            thread.join(timeout=30)
        assert done == [target] and mode(cid) == target
        delivery_drain()
        exact(members)
        send(dave, cid, f"after-{target}")
        delivery_drain()
        exact(members)
    assert counts_of(members) != before  # the test did move the counts


def add(actor, cid, member):
    response = actor.post(f"/conversations/{cid}/members", {"user_ids": [member.id]})
    assert response.status_code == 200, response.content


def test_crossing_the_line_converts_in_a_worker_with_hysteresis(large, make_member):
    """Joins and leaves that cross the line convert the group in a Celery task; a group near
    the line does not flip back and forth."""
    alice, bob, carol, dave, erin, fay = members = [make_member() for _ in range(6)]
    cid = group(alice, bob, carol, dave)
    send(bob, cid, "before")
    env = {"LARGE_GROUP_MIN_MEMBERS": 5, "LARGE_GROUP_EXIT_MEMBERS": 3}
    with running_worker(**env):
        add(alice, cid, erin)
        wait_until(lambda: mode(cid) == "channel", message="the group did not convert")
        exact(members)
        send(erin, cid, "in channel mode")
        exact(members)
        # 5 -> 4 members: above the exit line, it stays in channel mode
        assert bob.delete(f"/conversations/{cid}/members/{bob.id}").status_code == 204
        add(alice, cid, fay)
        assert carol.delete(f"/conversations/{cid}/members/{carol.id}").status_code == 204
        assert mode(cid) == "channel"
        # 4 -> 3: it converts back
        assert dave.delete(f"/conversations/{cid}/members/{dave.id}").status_code == 204
        wait_until(lambda: mode(cid) == "aggregate", message="the group did not convert back")
        send(erin, cid, "aggregate again")
        delivery_drain()
        exact(members)


def test_pushes_in_a_large_group_alert_only_mentions_and_badges_follow_per_interval(
    large, make_member
):
    """A plain message schedules no push for anyone; a mention alerts the mentioned user only;
    the beat task then schedules silent badge updates for the unmuted members with a pushkey,
    and a silent update that would carry an unchanged badge is not sent."""
    large.PUSH_INTERVAL_S = 0
    alice, bob, carol, dave, erin = members = [make_member() for _ in range(5)]
    for m in (bob, carol, dave):
        response = m.put("/devices/current/pushkey", {"pushkey": f"key-{m.id}"})
        assert response.status_code in (200, 204), response.content
    cid = group(*members)
    mute(dave, cid)
    delivery_channel_badges()  # the group's creation is not news
    push.push_send_due()

    def scheduled():
        due = dict(push_store.push_take())
        return {Device.objects.get(pk=pk).user_id: kind for pk, kind in due.items()}

    send(alice, cid, "plain")
    assert scheduled() == {}
    send(alice, cid, "to-bob", mentions=[bob.id])
    assert scheduled() == {bob.id: "alert"}
    assert delivery_channel_badges() == 2  # bob and carol (dave muted, erin has no pushkey)
    assert scheduled() == {bob.id: "silent", carol.id: "silent"}
    assert delivery_channel_badges() == 0  # nothing new in the group since
    send(alice, cid, "to-all", mention_all=True)
    delivery_channel_badges()
    assert scheduled() == {bob.id: "alert", carol.id: "alert"}
    # a silent update carrying the badge the last push carried is skipped
    push.push_badge_changed(user_ids=[bob.id, carol.id], alert=False)
    assert push.push_send_due() == 2
    push.push_badge_changed(user_ids=[bob.id, carol.id], alert=False)
    assert push.push_send_due() == 0
    send(alice, cid, "more")
    delivery_channel_badges()
    assert push.push_send_due() == 2
