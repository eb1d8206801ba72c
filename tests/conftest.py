"""Shared fixtures: a clean Redis database per test, API members with device tokens, and a
real Celery worker process for tests that cross the queue."""

import contextlib
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


@pytest.fixture(autouse=True)
def redis_clean():
    """Every test starts from an empty counters database and leaves none behind."""
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
        response = self.get("/unread")
        assert response.status_code == 200, response.content
        return response.json()


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


def broker_idle() -> bool:
    """True when the broker holds no waiting or unacknowledged task (acks_late tasks stay in
    kombu's ``unacked`` hash until they finish)."""
    with celery_app.connection_for_write() as conn:
        client = conn.default_channel.client
        waiting = sum(client.llen(q) for q in ("default", "counters"))
        return waiting == 0 and client.hlen("unacked") == 0


def worker_ping() -> list:
    """Ping the workers over a connection of its own: a pooled connection left waiting for
    replies would hang a process forked later (kombu closes inherited connections)."""
    with celery_app.connection_for_write() as conn:
        return celery_app.control.ping(timeout=0.5, connection=conn)


@contextlib.contextmanager
def running_worker(**env_overrides):
    """A real ``celery worker`` process on the test broker and the test database; extra
    environment (e.g. ``COUNTERS_STRATEGY``) goes to the worker. Tests that use it need
    ``transactional_db`` so the worker sees their rows."""
    db_name = connection.settings_dict["NAME"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{db_name}",
        "DATABASE_CONN_MAX_AGE": "0",
        **env_overrides,
    }
    if stale := worker_ping():
        pytest.fail(f"another Celery worker consumes the test broker: {stale}")
    celery_app.control.purge()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "imcore",
            "worker",
            "--queues",
            "default,counters",
            "--concurrency",
            "2",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"test-{os.getpid()}@%h",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: proc.poll() is not None or worker_ping(),
            timeout=60,
            message="the Celery worker did not answer a ping",
        )
        assert proc.poll() is None, "the Celery worker exited"
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        celery_app.control.purge()


@pytest.fixture(scope="module")
def celery_worker(django_db_setup, django_db_blocker):
    """A real worker for the tests of one module (stopped when the module ends, so another
    module can start one with other settings)."""
    with running_worker() as proc:
        yield proc
