"""Shared fixtures: a clean Redis database per test, API members with device tokens, and a
real Celery worker process for tests that cross the queue."""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client

from counters.redis import get_redis
from imcore import services
from imcore.celery import app as celery_app
from imcore.models import User

ROOT = Path(__file__).resolve().parent.parent


def _load_redis_cluster():
    spec = importlib.util.spec_from_file_location(
        "redis_cluster", ROOT / "bin" / "redis_cluster.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


redis_cluster = _load_redis_cluster()

# IMCORE_TEST_REDIS_CLUSTER=1: the hot state (settings.REDIS_CLUSTER_NODES) lives on a local
# 3-master Redis Cluster the session starts (ports IMCORE_TEST_REDIS_CLUSTER_PORTS, default
# 7101-7103) and stops; `make test` runs a chosen subset this way after the full suite.
ON_CLUSTER = os.environ.get("IMCORE_TEST_REDIS_CLUSTER", "") not in ("", "0")


@pytest.fixture(scope="session")
def redis_store():
    """The store the tests run on: the single Redis of REDIS_URL, or (ON_CLUSTER) a local
    cluster, given to this process's settings and to every process a test starts (env)."""
    if not ON_CLUSTER:
        yield None
        return
    from django.conf import settings

    lo, _, hi = os.environ.get("IMCORE_TEST_REDIS_CLUSTER_PORTS", "7101-7103").partition("-")
    cluster = redis_cluster.LocalCluster(range(int(lo), int(hi or lo) + 1)).start()
    before = settings.REDIS_CLUSTER_NODES
    settings.REDIS_CLUSTER_NODES = cluster.nodes.split(",")
    os.environ["REDIS_CLUSTER_NODES"] = cluster.nodes
    try:
        yield cluster
    finally:
        settings.REDIS_CLUSTER_NODES = before
        os.environ.pop("REDIS_CLUSTER_NODES", None)
        cluster.stop()


@pytest.fixture(autouse=True)
def redis_clean(redis_store):
    """Every test starts from an empty counters database and leaves none behind (on a
    cluster, FLUSHDB goes to every master)."""
    client = get_redis()
    client.flushdb()
    yield client
    client.flushdb()


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, message: str = ""):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message or f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class Member:
    """A user with a logged-in device, calling the API as a client would."""

    user: User
    token: str
    client: Client

    @property
    def id(self) -> int:
        return self.user.pk

    def _headers(self, token):
        token = self.token if token is None else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path, token=None, **params):
        return self.client.get(f"/api/v1{path}", params, headers=self._headers(token))

    def post(self, path, body=None, *, raw=None, token=None):
        data = raw if raw is not None else json.dumps(body if body is not None else {})
        return self.client.post(
            f"/api/v1{path}", data, content_type="application/json", headers=self._headers(token)
        )

    def put(self, path, body=None, token=None):
        return self.client.put(
            f"/api/v1{path}",
            json.dumps(body if body is not None else {}),
            content_type="application/json",
            headers=self._headers(token),
        )

    def delete(self, path, token=None):
        return self.client.delete(f"/api/v1{path}", headers=self._headers(token))

    # shortcuts for the common calls
    def send(self, conversation_id: int, body: str = "hi", client_msg_id: str | None = None):
        cmid = client_msg_id or f"m-{time.monotonic_ns()}"
        response = self.post(
            f"/conversations/{conversation_id}/messages", {"body": body, "client_msg_id": cmid}
        )
        assert response.status_code == 201, response.content
        return response.json()

    def unread(self) -> dict:
        """``GET /unread`` without its ``badge_version`` (checked to be a version)."""
        response = self.get("/unread")
        assert response.status_code == 200, response.content
        counts = response.json()
        assert isinstance(counts.pop("badge_version"), int)
        return counts


@pytest.fixture
def make_member(db):
    """``make_member("alice")`` creates a user and logs a device in for it."""
    created = 0

    def make(username: str | None = None, device_id: str = "phone") -> Member:
        nonlocal created
        created += 1
        name = username or f"user{created}-{time.monotonic_ns()}"
        user = User.objects.create_user(name, password="pw-for-tests-1")
        _, token = services.device_login(
            username=name, password="pw-for-tests-1", device_id=device_id, platform="ios"
        )
        return Member(user=user, token=token, client=Client())

    return make


QUEUES = ("default", "counters")


def broker_idle() -> bool:
    """True when no task is anywhere between its publish and its end, read at one instant (a
    MULTI: Redis runs nothing between its commands):

    - none waits in a queue;
    - none is unacknowledged: every task is ``acks_late``, so a task a worker reserved or runs
      stays in kombu's ``unacked`` hash until it has finished (after what it published);
    - none is in flight between the two. kombu's BRPOP takes a message out of its list, and
      the worker adds it to ``unacked`` only once it has read the reply; meanwhile (the reply
      is in the socket, or the worker paused reading at its prefetch limit) its consuming
      connection is no longer blocked. So every connection whose last command was BRPOP
      must be blocked in it: one that is not may hold a popped message.
    """
    with celery_app.connection_for_write() as conn:
        client = conn.default_channel.client
        db = client.connection_pool.connection_kwargs.get("db", 0)
        pipe = client.pipeline(transaction=True)
        for queue in QUEUES:
            pipe.llen(queue)
        pipe.hlen("unacked")
        pipe.client_list()
        *waiting, unacked, clients = pipe.execute()
    consumers = [c for c in clients if c["cmd"] == "brpop" and int(c["db"]) == int(db)]
    return sum(waiting) == 0 and unacked == 0 and all("b" in c["flags"] for c in consumers)


def worker_ping() -> list:
    """Ping the workers over a connection of its own: a pooled connection left waiting for
    replies would hang a process forked later (kombu closes inherited connections)."""
    with celery_app.connection_for_write() as conn:
        return celery_app.control.ping(timeout=0.5, connection=conn)


def celery_env(**overrides) -> dict[str, str]:
    """The environment of a Celery process that works on the test database and broker."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{connection.settings_dict['NAME']}",
        "DATABASE_CONN_MAX_AGE": "0",
        **{k: str(v) for k, v in overrides.items()},
    }


def start_celery(*args: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "imcore", *args, "--loglevel", "WARNING"],
        cwd=ROOT,
        env=celery_env(**env),
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop a process group started by :func:`start_celery` (SIGKILL if it lingers)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children of a worker killed with SIGKILL
        os.killpg(proc.pid, signal.SIGKILL)


def start_worker(name: str = "w1", pool: str = "prefork", concurrency: int = 2, **env):
    """Start a real ``celery worker`` and wait until it answers a ping."""
    proc = start_celery(
        "worker",
        "--queues",
        "default,counters",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        f"{name}-{os.getpid()}@%h",
        **env,
    )
    wait_until(
        lambda: proc.poll() is not None or any(name in h for r in worker_ping() for h in r),
        timeout=60,
        message="the Celery worker did not answer a ping",
    )
    assert proc.poll() is None, "the Celery worker exited"
    return proc


def broker_reset() -> None:
    """Empty the test broker: waiting tasks, and the unacknowledged ones a killed worker left
    (kombu would redeliver those only after its visibility timeout, an hour)."""
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in QUEUES:
            channel.queue_purge(queue)
        channel.client.delete("unacked", "unacked_index", "unacked_mutex")


@contextlib.contextmanager
def running_worker(*, beat: bool = False, workers: int = 1, **env):
    """Real ``celery worker`` processes (and ``celery beat``, the Timer, when asked) on the
    test broker and the test database; ``env`` (e.g. ``COUNTERS_STRATEGY``) goes to them.
    Tests that use it need ``transactional_db`` so the workers see their rows."""
    if stale := worker_ping():
        pytest.fail(f"another Celery worker consumes the test broker: {stale}")
    broker_reset()
    procs = []
    try:
        procs += [start_worker(f"w{i}", **env) for i in range(1, workers + 1)]
        if beat:
            schedule = ROOT / ".pytest-beat-schedule"
            procs.append(start_celery("beat", "--schedule", str(schedule), **env))
        yield procs[0]
    finally:
        for proc in procs:
            stop(proc)
        broker_reset()


@pytest.fixture(scope="module")
def celery_worker(django_db_setup, django_db_blocker):
    """A real worker and Celery beat (the Timer) for the tests of one module, stopped when the
    module ends so another module can start them with other settings."""
    with running_worker(beat=True) as proc:
        yield proc
