"""The stack `make run` starts (`make serve`: bin/stack.py, honcho with the Procfile) serves
HTTP and the WebSocket on one port (nginx in front of uWSGI and uvicorn) and stops as
one: after a SIGTERM to its process group, a SIGTERM and a SIGKILL 3 s later, or a SIGTERM to
`make` alone, every process it started is gone within 30 s, its ports are free, and it starts
again at once on them.

It runs on ports, a Redis and a broker of its own (a private redis-server) and the test
database, so a `make run` someone has up on 8000 and 5555 is never in the way."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
import requests
from django.core.management import call_command
from websockets.sync.client import connect

from tests.conftest import ROOT, celery_env, wait_until
from tests.processes import (
    RedisServer,
    describe,
    free_port,
    kill_tagged,
    port_bindable,
    port_open,
    tagged_pids,
)

pytestmark = pytest.mark.timeout(420)

STOP_LIMIT_S = 30


class Stack:
    """``make serve`` in a session of its own, tagged so that every process it starts (and
    every orphan it might leave) can be found in /proc."""

    def __init__(self, redis_server: RedisServer):
        self.web, self.flower = free_port(), free_port()
        self.tag = uuid.uuid4().hex
        self.redis = redis_server
        self.log = tempfile.NamedTemporaryFile(prefix="imcore-stack-", suffix=".log")  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self, **env) -> float:
        """Start the stack (``env``: more of its environment); returns the seconds until the
        API and Flower answered."""
        env = celery_env(
            IMCORE_PORT=self.web,
            FLOWER_PORT=self.flower,
            REDIS_URL=self.redis.url(0),
            CELERY_BROKER_URL=self.redis.url(1),
            IMCORE_TEST_TAG=self.tag,
            WEB_CONCURRENCY=2,  # uWSGI's master and 2 workers
            CELERY_CONCURRENCY=1,
            **env,
        )
        started = time.monotonic()
        self.proc = subprocess.Popen(
            ["make", "--silent", "--no-print-directory", "serve"],
            cwd=ROOT,
            env=env,
            start_new_session=True,  # its own process group, as a supervisor gives it
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(
            lambda: self.proc.poll() is not None or (self.api_answers() and port_open(self.flower)),
            timeout=120,
            message="the stack did not come up",
        )
        assert self.proc.poll() is None, self.output()
        return time.monotonic() - started

    def api_answers(self) -> bool:
        with contextlib.suppress(requests.RequestException):
            url = f"http://127.0.0.1:{self.web}/api/v1/schema"
            return requests.get(url, timeout=2).status_code == 200
        return False

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def wait_stopped(self, since: float, mode: str) -> float:
        """Wait until no process of the stack lives and both ports are free; returns the
        seconds since ``since``. Fails after ``STOP_LIMIT_S``."""

        def stopped():
            return not tagged_pids(self.tag) and all(
                port_bindable(p) for p in (self.web, self.flower)
            )

        deadline = since + STOP_LIMIT_S
        while not stopped():
            if time.monotonic() > deadline:
                left = describe(tagged_pids(self.tag))
                pytest.fail(
                    f"{STOP_LIMIT_S}s after the {mode} these still live: {left}; ports free: "
                    f"{self.web}={port_bindable(self.web)} "
                    f"{self.flower}={port_bindable(self.flower)}\n{self.output()}"
                )
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1)
        return time.monotonic() - since

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-4000:]

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
        kill_tagged(self.tag)
        self.log.close()


@pytest.fixture
def stack(transactional_db):
    redis_server = RedisServer()
    redis_server.start()
    stack = Stack(redis_server)
    try:
        yield stack
    finally:
        stack.cleanup()
        redis_server.close()


def start_slow_upload(stack: Stack) -> socket.socket:
    """A request whose body is still on its way (a client on a slow link): without a graceful
    shutdown timeout uvicorn's worker waits for it for good, and its master with it."""
    sock = socket.create_connection(("127.0.0.1", stack.web), 5)
    sock.sendall(
        b"POST /api/v1/users HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"username": '
    )
    return sock


def test_sigterm_and_sigkill_to_the_group_stop_everything_and_it_starts_again_at_once(stack):
    """SIGTERM to the stack's group, then SIGTERM and SIGKILL 3 s later, then SIGTERM to
    `make` alone, each while a request is in flight: each time no process the stack started
    is left within 30 s and its ports are free, and it binds them again at once."""
    timings = {"start": stack.start()}
    modes = ("sigterm to the group", "sigterm, sigkill 3 s later", "sigterm to make alone")
    for n, mode in enumerate(modes):
        if n:
            timings[f"restart before {mode}"] = stack.start()  # at once, on the same ports
        running = tagged_pids(stack.tag)
        assert len(running) >= 6, describe(
            running
        )  # make, honcho, nginx, uwsgi x3, uvicorn, worker, beat...
        upload = start_slow_upload(stack)
        try:
            time.sleep(0.5)  # the worker has the request
            since = time.monotonic()
            if mode == "sigterm to make alone":
                os.kill(stack.proc.pid, signal.SIGTERM)
            else:
                stack.signal_group(signal.SIGTERM)
            if mode == "sigterm, sigkill 3 s later":
                time.sleep(3)
                stack.signal_group(signal.SIGKILL)
            timings[mode] = stack.wait_stopped(since, mode)
        finally:
            upload.close()
    print({k: round(v, 1) for k, v in timings.items()})


def test_one_port_serves_the_api_the_admin_static_files_and_the_websocket(stack):
    """Through the stack's one port: a device logs in over the API and reads its counters,
    the admin logs in with a form (CSRF: the proxy passes the Host with its port) and sees its
    index, a static file comes from disk, and the device's WebSocket connects and answers."""
    from imcore.models import User

    call_command("collectstatic", "--no-input", verbosity=0)  # as `make run` does first
    User.objects.create_superuser("root", "root@example.com", "root-pass-1")
    User.objects.create_user("dev", password="dev-pass-1")
    stack.start()
    base = f"http://127.0.0.1:{stack.web}"

    login = requests.post(
        f"{base}/api/v1/devices",
        json={"username": "dev", "password": "dev-pass-1", "device_id": "d1", "platform": "web"},
        timeout=10,
    )
    assert login.status_code == 201, login.text  # the rate limit found the client's address
    token = login.json()["token"]
    unread = requests.get(
        f"{base}/api/v1/unread", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert unread.status_code == 200, unread.text
    assert unread.json()["badge"] == 0

    admin = requests.Session()
    form = admin.get(f"{base}/admin/login/", timeout=10)
    assert form.status_code == 200, form.text
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    index = admin.post(
        f"{base}/admin/login/?next=/admin/",
        data={"username": "root", "password": "root-pass-1", "csrfmiddlewaretoken": csrf},
        headers={"Origin": base, "Referer": f"{base}/admin/login/"},  # as a browser sends
        timeout=10,
    )
    assert index.status_code == 200, index.text[-2000:]
    assert index.url == f"{base}/admin/", index.url
    assert "Site administration" in index.text

    # A body past nginx's limit (16 MiB) is answered by nginx, as the API's JSON error.
    too_big = requests.post(
        f"{base}/api/v1/users",
        data=b"x" * (17 * 2**20),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert too_big.status_code == 413
    assert too_big.json()["error"] == "body_too_large", too_big.text

    css = requests.get(f"{base}/static/admin/css/base.css", timeout=10)
    assert css.status_code == 200
    assert css.headers["Content-Type"].startswith("text/css")
    assert "body" in css.text

    url = f"ws://127.0.0.1:{stack.web}/ws/v1/sync"
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as sock:
        first = json.loads(sock.recv(timeout=10))
        assert first["type"] == "sync", first
        sock.send(json.dumps({"type": "ping"}))
        deadline = time.monotonic() + 10
        while json.loads(sock.recv(timeout=max(deadline - time.monotonic(), 0.01)))["type"] != (
            "pong"
        ):
            pass


def test_a_logout_is_seen_by_every_server_process_at_once(stack):
    """The token copies of the stack's server processes (``imcore.tracked``): after a
    device's token has been used on every uWSGI worker (each then keeps a copy and a
    tracking connection to Redis), its logout through one of them is seen by the very next
    request on any of them: 401, never an answer from a stale copy."""
    from imcore.models import User

    User.objects.create_user("dev", password="dev-pass-1")
    stack.start()
    base = f"http://127.0.0.1:{stack.web}/api/v1"
    tracking = lambda: [c for c in stack.redis.client().client_list() if "t" in c["flags"]]  # noqa: E731
    for round_ in range(5):
        login = requests.post(
            f"{base}/devices",
            json={"username": "dev", "password": "dev-pass-1", "device_id": f"d{round_}",
                  "platform": "web"},
            timeout=10,
        )  # fmt: skip
        assert login.status_code == 201, login.text
        auth = {"Authorization": f"Bearer {login.json()['token']}"}
        for _ in range(12):  # a connection each: nginx spreads them over the workers
            assert requests.get(f"{base}/unread", headers=auth, timeout=10).status_code == 200
        assert len(tracking()) >= 2, tracking()  # both workers hold copies
        assert (
            requests.delete(f"{base}/devices/current", headers=auth, timeout=10).status_code == 204
        )
        answers = [
            requests.get(f"{base}/unread", headers=auth, timeout=10).status_code for _ in range(12)
        ]
        assert answers == [401] * 12, answers


def test_a_cut_database_session_fails_one_request_per_worker_then_the_workers_reconnect(stack):
    """uWSGI's workers keep their PostgreSQL session across requests (Django's persistent
    connections, no ``SELECT 1`` before each request: the Procfile's ``app``). Sessions cut behind
    their back (a PostgreSQL restart, an idle timeout) cost at most one 503
    ``database_unavailable`` per worker; the worker closes the broken session after that
    request, and every request after it is served again."""
    from django.db import connection

    from imcore.models import User

    User.objects.create_user("dev", password="dev-pass-1")
    stack.start(DATABASE_CONN_MAX_AGE=60)  # the tests' Celery processes close them (0)
    base = f"http://127.0.0.1:{stack.web}/api/v1"
    login = requests.post(
        f"{base}/devices",
        json={"username": "dev", "password": "dev-pass-1", "device_id": "d", "platform": "web"},
        timeout=10,
    )
    assert login.status_code == 201, login.text
    auth = {"Authorization": f"Bearer {login.json()['token']}"}
    conversations = lambda: requests.get(f"{base}/conversations", headers=auth, timeout=10)  # noqa: E731

    def sessions() -> set[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                "AND query LIKE %s",  # the sessions that served the conversation list
                ["%imcore_membership%"],
            )
            return {pid for (pid,) in cursor.fetchall()}

    for _ in range(12):  # a connection each: nginx spreads them over both workers
        assert conversations().status_code == 200
    before = sessions()
    for _ in range(12):
        assert conversations().status_code == 200
    assert before and sessions() == before  # the same sessions served them: none per request

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [list(before)]
        )
    answers = [conversations() for _ in range(12)]
    failed = [a.json()["error"] for a in answers if a.status_code != 200]
    assert all(a.status_code in (200, 503) for a in answers), [a.text for a in answers]
    # the first request lands on a worker whose session is gone: no SELECT 1 found it first
    assert failed.count("database_unavailable") == len(failed) and 1 <= len(failed) <= 2, failed
    assert [conversations().status_code for _ in range(12)] == [200] * 12
