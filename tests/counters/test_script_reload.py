"""Pipelined script calls: no ``SCRIPT EXISTS`` round trip before each pipeline, and a Redis
that lost its scripts (``SCRIPT FLUSH``, as after a restart or a failover) still answers
right, the plain commands queued after a script seeing what it wrote."""

from counters import keys
from counters.strategies import get_strategy
from delivery.services import delivery_fanout
from tests.counters.test_rebuild import group_with_traffic
from tests.helpers import commandstats, counter_mismatches


def _calls(stats, name):
    return stats.get(f"cmdstat_{name}", {}).get("calls", 0)


def test_a_read_sends_no_script_exists(make_member, redis_clean):
    alice, bob, carol, gid = group_with_traffic(make_member)
    bob.post(f"/conversations/{gid}/read", {"seq": 1})  # loads what a first call loads
    before = commandstats()
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).json()["unread"] == 1
    after = commandstats()
    assert _calls(after, "script|exists") == _calls(before, "script|exists")
    assert _calls(after, "evalsha") > _calls(before, "evalsha")


def test_reads_and_syncs_after_the_scripts_were_flushed_are_exact(make_member, redis_clean):
    """The read script and the ``HGETALL`` after it share a pipeline: with the script gone,
    the answer must still show the read (the ``HGETALL`` is sent again after the script)."""
    alice, bob, carol, gid = group_with_traffic(make_member)
    bob.post(f"/conversations/{gid}/read", {"seq": 1})
    since = bob.get("/sync?since=0").json()["latest_version"]
    redis_clean.script_flush()
    answer = bob.post(f"/conversations/{gid}/read", {"seq": 2}).json()
    assert (answer["unread"], answer["badge"]) == (1, 1)
    redis_clean.script_flush()
    assert alice.send(gid, "after the flush")["seq"] == 4
    delivery_fanout(conversation_id=gid, seq=4, sender_id=alice.id)
    redis_clean.script_flush()
    entries = bob.get(f"/sync?since={since}").json()["entries"]
    assert [e["type"] for e in entries] == ["read", "message"], entries
    redis_clean.script_flush()
    assert carol.post(f"/conversations/{gid}/read", {"seq": 4}).json()["unread"] == 0
    assert counter_mismatches([bob.id, carol.id]) == []


def test_the_commands_after_a_missing_script_see_what_it_wrote(make_member, redis_clean):
    """``read_fetch`` pipelines the read script and an ``HGETALL`` of the hash it writes (the
    badge of a user in channel-mode groups is summed from it): after a flush the script runs
    late, and the ``HGETALL`` must run after it again."""
    alice, bob, carol, gid = group_with_traffic(make_member)
    bob.post(f"/conversations/{gid}/read", {"seq": 1})
    redis_clean.script_flush()
    counts, fields = get_strategy().read_fetch(bob.id, gid, 2, 3)
    assert counts[0] == 1
    assert fields == redis_clean.hgetall(keys.counters(bob.id))
