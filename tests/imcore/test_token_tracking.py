"""The token cache's copies in the process (``imcore.tracked``): a hit costs no round trip, and
a write to a token key by anyone, a lost tracking connection, a flush or a backlog drops the
copies before the next look-up. "Another process" is a Redis connection of its own, writing
as the services of another server process would."""

import pytest
import redis

from counters.redis import get_redis, is_cluster
from imcore import keys, services
from imcore.models import Device

pytestmark = pytest.mark.skipif(is_cluster(), reason="no process copies on Redis Cluster")


@pytest.fixture
def local():
    """This process's copies, emptied before and after."""
    cache = services._local_tokens(get_redis())
    assert cache is not None
    cache.close()
    yield cache
    cache.close()


@pytest.fixture
def other_process():
    """A client on a connection of its own."""
    kwargs = get_redis().connection_pool.connection_kwargs
    client = redis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs["db"])
    yield client
    client.close()


@pytest.fixture
def commands(monkeypatch):
    """The Redis commands this process sends (one call per pipeline)."""
    sent = []
    command, pipeline = redis.Redis.execute_command, redis.client.Pipeline.execute

    def counted(self, *args, **kwargs):
        sent.append(str(args[0]))
        return command(self, *args, **kwargs)

    def counted_pipeline(self, *args, **kwargs):
        sent.append("pipeline")
        return pipeline(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "execute_command", counted)
    monkeypatch.setattr(redis.client.Pipeline, "execute", counted_pipeline)
    return sent


def device_key(member) -> str:
    return keys.token_device(services.token_hash(member.token))


def test_a_known_token_costs_no_round_trip(make_member, local, commands):
    """The first look-up reads Redis (and PostgreSQL, the first time); the next ones read
    nothing. With ``AUTH_TOKEN_LOCAL_CACHE_SIZE=0`` each reads Redis (this fails)."""
    member = make_member()
    for _ in range(2):
        assert services.device_authenticate_cached(token=member.token).user_id == member.id
    commands.clear()
    for _ in range(3):
        device = services.device_authenticate_cached(token=member.token)
        assert (device.user_id, device.user.username) == (member.id, member.user.username)
    assert commands == []


def test_a_logout_by_another_process_is_seen_by_the_next_look_up(make_member, local, other_process):
    """Another process deletes the device and its token entry (a logout); the copy here goes
    with the next look-up, which finds no device. Without reading the tracking messages the
    copy would answer (this fails)."""
    member = make_member()
    for _ in range(2):
        assert services.device_authenticate_cached(token=member.token) is not None
    assert local.entries
    Device.objects.filter(user=member.user).delete()
    other_process.delete(device_key(member))
    assert services.device_authenticate_cached(token=member.token) is None


def test_a_token_rewritten_elsewhere_is_read_again(make_member, local, other_process):
    """Another process rewrites the entry (here: a user renamed in the entry); the next
    look-up reads the new one."""
    member = make_member()
    services.device_authenticate_cached(token=member.token)
    services.device_authenticate_cached(token=member.token)
    key = device_key(member)
    entry = other_process.get(key).decode().replace(member.user.username, "renamed")
    other_process.set(key, entry, ex=60)
    assert services.device_authenticate_cached(token=member.token).user.username == "renamed"


def test_a_lost_tracking_connection_drops_every_copy(make_member, local, other_process):
    """The tracking connection is killed, then another process logs the device out: the
    messages about it are lost with the connection, so the look-up must not trust any
    copy."""
    member = make_member()
    services.device_authenticate_cached(token=member.token)
    services.device_authenticate_cached(token=member.token)
    assert local.entries
    tracking = [c for c in other_process.client_list() if "t" in c["flags"]]
    for c in tracking:
        other_process.client_kill_filter(_id=c["id"])
    Device.objects.filter(user=member.user).delete()
    other_process.delete(device_key(member))
    assert services.device_authenticate_cached(token=member.token) is None
    assert not local.entries


def test_a_flush_drops_every_copy(make_member, local, other_process):
    member = make_member()
    services.device_authenticate_cached(token=member.token)
    services.device_authenticate_cached(token=member.token)
    assert local.entries
    other_process.flushdb()
    local.get("nothing")
    assert not local.entries


def test_a_value_read_before_a_write_is_not_kept(local, other_process):
    """``put`` refuses a value when an invalidation arrived after the ``get`` that missed:
    the value may be older than the write."""
    key = f"{keys.token_prefix()}race}}:dev"
    value, mark = local.get(key)
    assert value is None and mark is not None
    other_process.set(key, "new", ex=60)
    assert not local.put(key, "old", 60_000, mark)
    assert local.get(key)[0] is None
    value, mark = local.get(key)
    assert local.put(key, "new", 60_000, mark)
    assert local.get(key)[0] == "new"


def test_a_backlog_of_messages_drops_every_copy(local, other_process):
    """A poll that reads many messages at once may not have read them all (Redis writes a
    client at most 64 KB a pass): every copy goes, not only the keys named."""
    from imcore.tracked import BACKLOG

    kept = f"{keys.token_prefix()}kept}}:dev"
    _, mark = local.get(kept)
    assert local.put(kept, "v", 60_000, mark)
    pipe = other_process.pipeline(transaction=False)
    for i in range(BACKLOG):
        pipe.set(f"{keys.token_prefix()}churn{i}}}:dev", 1, ex=60)
    pipe.execute()
    assert local.get(kept)[0] is None


def test_a_copy_expires_with_its_key(local):
    key = f"{keys.token_prefix()}short}}:dev"
    _, mark = local.get(key)
    assert local.put(key, "v", 1, mark)
    import time

    time.sleep(0.01)
    assert local.get(key)[0] is None


def test_the_copies_can_be_turned_off(make_member, settings, commands):
    settings.AUTH_TOKEN_LOCAL_CACHE_SIZE = 0
    member = make_member()
    services.device_authenticate_cached(token=member.token)
    commands.clear()
    services.device_authenticate_cached(token=member.token)
    assert commands == ["GET"]


def test_the_copies_are_bounded(local, settings):
    for i in range(local.size + 5):
        key = f"{keys.token_prefix()}n{i}}}:dev"
        _, mark = local.get(key)
        local.put(key, "v", 60_000, mark)
    assert len(local.entries) == settings.AUTH_TOKEN_LOCAL_CACHE_SIZE
