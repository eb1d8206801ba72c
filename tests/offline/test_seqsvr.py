"""The version service's upper bound (seqsvr) with a small ``OFFLINE_VERSION_STEP``: Redis
never holds, let alone hands out, a bound PostgreSQL has not stored; a wipe right after raises
keeps versions above everything handed out; a bound that cannot be raised ends in
``SyncUnavailable`` after ``MAX_ROUNDS`` tries, not in a loop."""

import threading

import psycopg
import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from delivery.pipeline import delivery_drain
from imcore import services as im
from imcore.models import Membership
from offline import keys, store
from offline.models import VersionBound
from tests.conftest import wait_until
from tests.offline.conftest import pull
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)

STEP = 5
BOUNDS = VersionBound._meta.db_table


@pytest.fixture(autouse=True)
def small_step(settings):
    settings.OFFLINE_VERSION_STEP = STEP


def log_versions(user_id: int) -> list[int]:
    return [int(s) for _, s in store.client().zrange(keys.log(user_id), 0, -1, withscores=True)]


def redis_state(user_id: int) -> tuple[int, int]:
    cur, bound = store.client().hmget(keys.state(user_id), "cur", "bound")
    return int(cur), int(bound)


def stored_bound(user_id: int) -> int:
    """The bound PostgreSQL has committed (read on the test's own connection)."""
    return VersionBound.objects.get(user_id=user_id).bound


def waiting_on_locks() -> int:
    """Sessions of the test database waiting for a row lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


def in_thread(fn, *args, **kwargs) -> threading.Thread:
    """Run ``fn`` on a thread with a database connection of its own; an exception it raises
    is kept in ``thread.error``."""

    def run():
        try:
            fn(*args, **kwargs)
        except BaseException as exc:  # reported by the test
            thread.error = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.error = None
    thread.start()
    return thread


def test_redis_gets_a_new_range_only_after_postgresql_stored_it(make_member):
    """While the raise of a user's bound waits for its PostgreSQL row, no writer of that user
    gets a version above the bound PostgreSQL has committed, and Redis holds no higher bound;
    once the raise commits, versions continue, unique and under the stored bound."""
    alice, bob = make_member("alice"), make_member("bob")
    team = group(bob, alice)
    for i in range(STEP - 1):  # versions 2..STEP (alice was loaded at 1, with her join)
        bob.send(team, f"m{i}")
    delivery_drain()
    assert redis_state(alice.id) == (STEP, STEP) == (STEP, stored_bound(alice.id))
    for i in range(2):
        bob.send(team, f"next{i}")  # alice needs versions past the bound: a raise

    settings_dict = connection.settings_dict
    with psycopg.connect(
        dbname=settings_dict["NAME"],
        user=settings_dict["USER"],
        host=settings_dict["HOST"],
        port=settings_dict["PORT"],
    ) as blocker:
        blocker.execute(f"SELECT bound FROM {BOUNDS} WHERE user_id = %s FOR UPDATE", [alice.id])
        aggregator = in_thread(delivery_drain)
        wait_until(lambda: waiting_on_locks() == 1, message="the raise did not wait for its row")
        # A second writer of alice's store (a mark-read) meanwhile.
        membership = Membership.objects.get(user=alice.user, conversation_id=team)
        reader = in_thread(im.conversation_mark_read, membership=membership, seq=4)
        wait_until(lambda: waiting_on_locks() == 2 or not reader.is_alive())
        cur, bound = redis_state(alice.id)
        assert (cur, bound) == (STEP, STEP), "Redis went past the bound PostgreSQL committed"
        assert max(log_versions(alice.id)) <= stored_bound(alice.id) == STEP
        blocker.rollback()  # the row is free: the raise commits
    for thread in (aggregator, reader):
        thread.join(30)
        assert not thread.is_alive() and thread.error is None, thread.error
    versions = log_versions(alice.id)
    assert versions == sorted(set(versions)) and max(versions) == STEP + 3  # 2 messages, 1 read
    assert redis_state(alice.id)[1] == stored_bound(alice.id) >= max(versions)


def test_a_wipe_after_raises_continues_above_everything_handed_out(make_member, second_device):
    """Redis has handed out every version up to PostgreSQL's bound, raised twice, when it
    loses everything: the next versions are above every version handed out before, and a
    device that had them all gets the gap snapshot."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    team = group(bob, alice)
    for i in range(10 * STEP):
        bob.send(team, f"m{i}")
        delivery_drain()
        cur, bound = redis_state(alice.id)
        if cur == bound > 3 * STEP:  # the whole range of the second raise is used
            break
    handed_out = max(log_versions(alice.id))
    assert handed_out == cur == bound == stored_bound(alice.id)

    store.client().flushdb()  # Redis loses everything
    bob.send(team, "after the wipe")
    delivery_drain()
    bob.send(team, "after the reload")
    delivery_drain()
    after = log_versions(alice.id)
    assert after and min(after) > handed_out
    assert stored_bound(alice.id) >= max(after)
    page = pull(laptop, handed_out)
    assert page["gap"] is True and page["latest_version"] > handed_out


@pytest.fixture
def pinned_bound():
    """``pin(user_id)``: PostgreSQL keeps that user's bound where it is whatever an UPDATE asks
    (a trigger), so Redis can never be given more versions."""
    pinned = []

    def pin(user_id: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE OR REPLACE FUNCTION test_pin_bound() RETURNS trigger AS $$ "
                "BEGIN NEW.bound := OLD.bound; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                f"CREATE TRIGGER test_pin_bound BEFORE UPDATE ON {BOUNDS} FOR EACH ROW "
                f"WHEN (OLD.user_id = {int(user_id)}) EXECUTE FUNCTION test_pin_bound()"
            )
        pinned.append(user_id)

    def unpin() -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER IF EXISTS test_pin_bound ON {BOUNDS}")
            cursor.execute("DROP FUNCTION IF EXISTS test_pin_bound()")

    pin.unpin = unpin
    yield pin
    unpin()


def test_a_bound_that_cannot_be_raised_gives_up_after_max_rounds(make_member, pinned_bound):
    """A write that needs a raise PostgreSQL never grants tries ``MAX_ROUNDS`` times (one
    statement each) and raises ``SyncUnavailable`` with nothing written; once the bound can
    move, the same write goes through."""
    alice, bob = make_member("alice"), make_member("bob")
    team = group(bob, alice)
    for i in range(STEP - 1):
        bob.send(team, f"m{i}")
    delivery_drain()
    assert redis_state(alice.id) == (STEP, STEP)
    pinned_bound(alice.id)
    read = store.Op("r", team, 2, 2, "2")
    with CaptureQueriesContext(connection) as queries, pytest.raises(store.SyncUnavailable):
        store.append_ops([(alice.id, [read])])
    raises = [q for q in queries.captured_queries if f"INSERT INTO {BOUNDS}" in q["sql"]]
    assert len(raises) == store.MAX_ROUNDS
    assert max(log_versions(alice.id)) == STEP and redis_state(alice.id) == (STEP, STEP)
    pinned_bound.unpin()
    assert store.append_ops([(alice.id, [read])]) == {alice.id: (STEP + 1, STEP + 1)}
