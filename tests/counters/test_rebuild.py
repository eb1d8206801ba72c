"""Rebuilding from the truth: reads after a Redis wipe, the reconcile command, task and admin
action."""

import io
from unittest.mock import ANY

import pytest
from django.core.management import CommandError, call_command

from counters import keys
from counters.selectors import UnreadCounts, counters_peek, counters_truth_rows
from counters.services import counters_rebuild
from counters.tasks import reconcile
from delivery.services import delivery_fanout
from imcore.models import User
from tests.conftest import wait_until
from tests.helpers import counter_mismatches


def group_with_traffic(make_member, n_messages=3):
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = alice.post(
        "/conversations", {"kind": "group", "members": [bob.id, carol.id], "title": "g"}
    ).json()["id"]
    for i in range(n_messages):
        seq = alice.send(gid, f"m{i}")["seq"]
        delivery_fanout(conversation_id=gid, seq=seq, sender_id=alice.id)
    return alice, bob, carol, gid


def test_reads_after_a_wipe_return_exact_counts(make_member, redis_clean):
    """Redis restarted empty mid-way: the next reads rebuild and return the exact counts."""
    alice, bob, carol, gid = group_with_traffic(make_member)
    bob.post(f"/conversations/{gid}/read", {"seq": 1})
    carol.post(f"/conversations/{gid}/mute", {"muted": True})
    redis_clean.flushdb()
    assert bob.unread() == {"badge": 2, "conversations": {str(gid): 2}, "mentions": {}}
    assert carol.unread() == {"badge": 0, "conversations": {str(gid): 3}, "mentions": {}}
    redis_clean.flushdb()
    listing = carol.get("/conversations").json()
    assert [(c["id"], c["unread"], c["muted"]) for c in listing] == [(gid, 3, True)]
    redis_clean.flushdb()
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).json() == {
        "unread": 1,
        "badge": 1,
        "badge_version": ANY,
    }
    assert counter_mismatches([bob.id]) == []


@pytest.mark.parametrize("strategy_name", ["lua", "watch", "lock", "naive"])
def test_an_increment_before_the_rebuilds_rows_are_committed_is_kept(
    make_member, redis_clean, settings, strategy_name
):
    """A rebuild that read its rows before a message committed, and loads them after the
    message was counted in the wiped hash, keeps that count."""
    settings.COUNTERS_STRATEGY = strategy_name
    alice, bob, carol, gid = group_with_traffic(make_member, n_messages=1)
    redis_clean.flushdb()
    rows = counters_truth_rows(user_ids=[bob.id])[bob.id]  # the rebuild reads: last_seq 1
    seq = alice.send(gid, "while empty")["seq"]
    delivery_fanout(conversation_id=gid, seq=seq, sender_id=alice.id)  # counted, not loaded
    counters_rebuild(user_id=bob.id, rows=rows)  # ... and loads what it read
    assert counters_peek(user_id=bob.id) == UnreadCounts(badge=2, conversations={gid: 2})
    assert counter_mismatches([bob.id]) == []


def corrupt(client, user_id, conversation_id):
    client.hset(keys.counters(user_id), mapping={f"u:{conversation_id}": 42, "badge": 99})


def test_reconcile_command_reports_and_repairs(make_member, redis_clean):
    """``manage.py reconcile_counters`` names what differed and puts the truth back."""
    alice, bob, carol, gid = group_with_traffic(make_member)
    bob.unread()  # loads bob
    corrupt(redis_clean, bob.id, gid)
    out = io.StringIO()
    call_command("reconcile_counters", "--user", "bob", stdout=out)
    text = out.getvalue()
    assert f"user {bob.id}: badge 99 -> 3" in text
    assert f"user {bob.id}: conversation {gid} unread 42 -> 3" in text
    assert "1 users checked, 1 differed" in text
    assert bob.unread() == {"badge": 3, "conversations": {str(gid): 3}, "mentions": {}}
    out = io.StringIO()
    call_command("reconcile_counters", "--all", stdout=out)
    assert "0 differed" in out.getvalue()
    assert counter_mismatches([alice.id, bob.id, carol.id]) == []


def test_reconcile_command_rejects_unknown_user(db):
    """An unknown user is a clear command error."""
    with pytest.raises(CommandError, match="no user"):
        call_command("reconcile_counters", "--user", "nobody-here")


def test_admin_action_rebuilds_and_reports(make_member, redis_clean, client):
    """The admin action on users rebuilds their counters and reports the difference."""
    alice, bob, carol, gid = group_with_traffic(make_member)
    bob.unread()
    corrupt(redis_clean, bob.id, gid)
    admin = User.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    response = client.post(
        "/admin/imcore/user/",
        {"action": "rebuild_counters", "_selected_action": [bob.id]},
        follow=True,
    )
    text = response.content.decode()
    assert "1 differed from PostgreSQL" in text
    assert "badge 99 → 3" in text
    assert bob.unread()["badge"] == 3


@pytest.mark.worker
def test_reconcile_task_runs_on_a_worker(transactional_db, make_member, redis_clean, celery_worker):
    """The ``counters.reconcile`` task, run by a real worker, repairs drifted counters."""
    alice, bob, carol, gid = group_with_traffic(make_member)
    wait_until(lambda: bob.unread()["badge"] == 3)  # the worker's own fan-out has landed
    corrupt(redis_clean, bob.id, gid)
    reconcile.delay(user_ids=[bob.id, carol.id])
    wait_until(lambda: bob.unread()["badge"] == 3, message="reconcile did not repair bob")
    assert counter_mismatches([bob.id, carol.id]) == []
