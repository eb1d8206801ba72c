"""Faults while serving, with real processes: a uvicorn server, a Celery worker and beat (the
Timer), under concurrent senders over HTTP, while the counter store is restarted empty, the
broker is unreachable for 10 s, or PostgreSQL refuses connections for 10 s.

During a fault every answer is 2xx or a 503 JSON error, never a 500 and never later than
10 s. Afterwards the same processes serve again without a restart; the clients retry what
got a 503 (same client_msg_id), and then every message a client was told is stored is in
PostgreSQL, the unread counts and badges equal the truth computed from PostgreSQL, and no
device saw its sync version go backwards.

The servers that fail are the tests' own: private redis-servers for the counter store and
the broker, and a TCP proxy in front of the shared PostgreSQL that the test closes (every
session cut, new connections refused) and opens again. The proxy, not a private cluster:
the test database is already migrated there (a new cluster needs initdb and every migration,
half a minute on this machine), and what the server sees is what it sees when PostgreSQL
restarts or a network path drops: connections reset, then connection refused.
"""

import contextlib
import itertools
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from django.db import connection

from counters.selectors import counters_truth
from imcore import services
from imcore.models import Conversation, Message, User
from tests.conftest import ROOT, celery_env, start_celery, stop, wait_until
from tests.processes import RedisServer, free_port, port_open, uvicorn_command

pytestmark = [pytest.mark.timeout(400), pytest.mark.worker]

OUTAGE_S = 10  # the outage
ANSWER_LIMIT_S = 10  # no request may take longer, fault or not
SENDERS = 4


class PgProxy:
    """A TCP proxy in front of the shared PostgreSQL. ``close()`` resets every proxied session
    and stops listening (connection refused); ``open()`` listens again on the same port."""

    def __init__(self, upstream_port: int = 5432):
        self.port = free_port()
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener: socket.socket | None = None
        self.links: set[socket.socket] = set()
        self.lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            links, self.links = self.links, set()
        for sock in links:
            # a reset, as when the server goes away; shutdown() first: a plain close() would
            # leave the socket open under the pump thread blocked in recv() on it, and the
            # server's query would wait for good (a network that drops packets, not a restart)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, 5)
            except OSError:
                client.close()
                continue
            # 5 s was for connecting: left on the socket it would cut every session that sits
            # idle for 5 s (a pooled connection the server does not need for a while).
            server.settimeout(None)
            with self.lock:
                self.links |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.links -= {src, dst}


@dataclass
class Site:
    base: str
    store: RedisServer
    broker: RedisServer
    pg: PgProxy


@pytest.fixture(scope="module")
def site(django_db_setup, django_db_blocker):
    """The server, a worker and beat on private Redis servers and the PostgreSQL proxy."""
    store, broker, pg = RedisServer(), RedisServer(), PgProxy()
    store.start()
    broker.start()
    pg.open()
    with django_db_blocker.unblock():
        name = connection.settings_dict["NAME"]
    env = {
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{pg.port}/{name}",
        "REDIS_URL": store.url(0),
        "CELERY_BROKER_URL": broker.url(0),
        # a few events make the send itself hand the Flusher to the broker
        "COUNTERS_FLUSH_THRESHOLD": 3,
    }
    port = free_port()
    server = start_server(port, env)
    procs = [server]
    try:
        wait_until(
            lambda: server.poll() is not None or port_open(port),
            timeout=90,
            message="uvicorn did not start",
        )
        worker_log = tempfile.NamedTemporaryFile(prefix="imcore-worker-")  # noqa: SIM115
        procs.append(start_worker(worker_log, env))
        schedule = str(Path(tempfile.mkdtemp(prefix="imcore-beat-")) / "schedule")
        procs.append(start_celery("beat", "--schedule", schedule, **env))
        # (a ping would go out on this process's broker: Celery's control publishes through
        # the app's own producer pool whatever connection it is given)
        wait_until(
            lambda: b" ready." in Path(worker_log.name).read_bytes(),
            timeout=90,
            message="the worker did not get ready",
        )
        assert all(p.poll() is None for p in procs)
        yield Site(f"http://127.0.0.1:{port}/api/v1", store, broker, pg)
    finally:
        for proc in procs:
            stop(proc)
        pg.close()
        store.close()
        broker.close()


def start_worker(log, env: dict) -> subprocess.Popen:
    """A real Celery worker logging at INFO to ``log`` (it says "ready." there)."""
    args = ["worker", "--queues", "default,counters", "--concurrency", "2"]
    args += ["--without-gossip", "--without-mingle", "--hostname", "faults@%h"]
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "imcore", *args, "--loglevel", "INFO"],
        cwd=ROOT,
        env=celery_env(**env),
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def start_server(port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        uvicorn_command(port, "--timeout-graceful-shutdown", "5"),
        cwd=ROOT,
        env=celery_env(**env),
        start_new_session=True,
    )


@dataclass
class Client:
    user_id: int
    token: str
    http: requests.Session = field(default_factory=requests.Session)


@dataclass
class Traffic:
    """What the clients were told, and every way an answer broke the rules."""

    site: Site
    stored: dict[str, tuple[int, int]] = field(default_factory=dict)  # cmid -> (conv, seq)
    retry: list[tuple[Client, str, dict]] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    broken: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    last_seq: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    versions: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, client: Client, method: str, path: str, body=None, **params):
        """One request; returns the JSON answer of a 2xx, or None after a 503."""
        started = time.monotonic()
        try:
            response = client.http.request(
                method,
                self.site.base + path,
                json=body,
                params=params,
                headers={"Authorization": f"Bearer {client.token}"},
                timeout=ANSWER_LIMIT_S + 5,
            )
        except requests.RequestException as exc:
            with self.lock:
                self.broken.append(f"{method} {path}: {exc!r}")
            return None
        took = time.monotonic() - started
        with self.lock:
            self.slowest_s = max(self.slowest_s, took)
            self.statuses[response.status_code] += 1
            if took > ANSWER_LIMIT_S:
                self.broken.append(f"{method} {path} took {took:.1f}s")
        if response.status_code in (200, 201):
            return response.json()
        try:
            error = response.json()["error"]
        except (ValueError, KeyError):
            error = None
        with self.lock:
            self.errors[error] += 1
            if response.status_code != 503 or error is None:
                self.broken.append(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return None

    def send(self, client: Client, conversation_id: int, cmid: str) -> bool:
        body = {"body": f"body of {cmid}", "client_msg_id": cmid}
        answer = self.call(client, "POST", f"/conversations/{conversation_id}/messages", body)
        with self.lock:
            if answer is None:
                self.retry.append((client, f"/conversations/{conversation_id}/messages", body))
                return False
            self.stored[cmid] = (conversation_id, answer["seq"])
            self.last_seq[conversation_id] = max(self.last_seq[conversation_id], answer["seq"])
            return True

    def read(self, client: Client, conversation_id: int) -> None:
        seq = self.last_seq[conversation_id]
        if not seq:
            return
        path, body = f"/conversations/{conversation_id}/read", {"seq": seq}
        if self.call(client, "POST", path, body) is None:
            with self.lock:
                self.retry.append((client, path, body))

    def pull(self, client: Client, since: int) -> int:
        """One sync pull from ``since``; returns the version to continue from."""
        page = self.call(client, "GET", "/sync", since=since, limit=100)
        if page is None:
            return since
        with self.lock:
            self.versions[client.user_id].append(page["latest_version"])
        if page["entries"] and page["has_more"]:
            return page["entries"][-1]["version"]
        return page["latest_version"]

    def retry_until_stored(self, deadline_s: float = 60) -> None:
        """The clients' retries, same requests, until each is answered 2xx."""
        deadline = time.monotonic() + deadline_s
        while self.retry:
            assert time.monotonic() < deadline, f"{len(self.retry)} retries still fail"
            with self.lock:
                todo, self.retry = self.retry, []
            for client, path, body in todo:
                answer = self.call(client, "POST", path, body)
                with self.lock:
                    if answer is None:
                        self.retry.append((client, path, body))
                    elif "client_msg_id" in body:
                        self.stored[body["client_msg_id"]] = (
                            answer["conversation_id"],
                            answer["seq"],
                        )
            if self.retry:
                time.sleep(0.5)


def make_clients(n: int) -> list[Client]:
    clients = []
    for i in range(n):
        name = f"fault{i}-{time.monotonic_ns()}"
        user = User.objects.create_user(name, password="pw-for-tests-1")
        _, token = services.device_login(
            username=name, password="pw-for-tests-1", device_id="phone", platform="ios"
        )
        clients.append(Client(user.pk, token))
    return clients


def make_conversations(traffic: Traffic, clients: list[Client]) -> dict[int, list[int]]:
    """A group of everyone and a direct conversation between neighbours (created through the
    server, so its counter store hears of them); returns each user's conversations."""

    def create(client: Client, kind: str, members: list[int]) -> int:
        body = {"kind": kind, "members": members}
        answer = traffic.call(client, "POST", "/conversations", body)
        assert answer is not None, traffic.broken
        return answer["id"]

    group = create(clients[0], "group", [c.user_id for c in clients[1:]])
    of_user = {c.user_id: [group] for c in clients}
    for a, b in itertools.pairwise(clients):
        direct = create(a, "direct", [b.user_id])
        of_user[a.user_id].append(direct)
        of_user[b.user_id].append(direct)
    return of_user


def run_load(traffic: Traffic, clients, conversations, fault, around_s: float = 1) -> None:
    """Senders, a reader and a sync puller run for ``around_s`` seconds, while ``fault()``
    runs in this thread, and ``around_s`` seconds after it returns."""
    done = threading.Event()

    def sender(client: Client):
        for n in itertools.count():
            if done.is_set():
                return
            mine = conversations[client.user_id]
            traffic.send(client, mine[n % len(mine)], f"{client.user_id}-{n}-{time.time_ns()}")

    def reader(client: Client):
        while not done.wait(0.3):
            for cid in conversations[client.user_id]:
                traffic.read(client, cid)
            traffic.call(client, "GET", "/unread")

    def puller(client: Client):
        since = 0
        while not done.wait(0.2):
            since = traffic.pull(client, since)

    threads = [threading.Thread(target=sender, args=(c,)) for c in clients[:SENDERS]]
    threads += [
        threading.Thread(target=reader, args=(clients[-1],)),
        threading.Thread(target=puller, args=(clients[-1],)),
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(around_s)
        fault()
        time.sleep(around_s)
    finally:
        done.set()
        for t in threads:
            t.join(ANSWER_LIMIT_S + 10)


def unread_from_api(traffic: Traffic, client: Client) -> dict | None:
    answer = traffic.call(client, "GET", "/unread")
    if answer is None:
        return None
    return {
        "badge": answer["badge"],
        "conversations": {k: v for k, v in answer["conversations"].items() if v},
    }


def unread_truth(user_id: int) -> dict:
    truth = counters_truth(user_id=user_id)
    return {
        "badge": truth.badge,
        "conversations": {str(k): v for k, v in truth.conversations.items() if v},
    }


def assert_recovered(traffic: Traffic, clients: list[Client]) -> dict:
    """After the retries: nothing a client was told is lost, counts equal the truth, versions
    never went back; returns the figures."""
    traffic.retry_until_stored()
    # every message answered 2xx is stored, once, with the seq the client was told
    stored = {
        m.client_msg_id: (m.conversation_id, m.seq)
        for m in Message.objects.filter(client_msg_id__in=list(traffic.stored))
    }
    assert stored == traffic.stored
    for conversation in Conversation.objects.all():
        seqs = sorted(
            Message.objects.filter(conversation=conversation).values_list("seq", flat=True)
        )
        assert seqs == list(range(1, conversation.last_seq + 1)), conversation.pk
    # unread counts and badges: the API (Redis) against PostgreSQL, once the pipeline drained
    started = time.monotonic()
    for client in clients:
        wait_until(
            lambda c=client: unread_from_api(traffic, c) == unread_truth(c.user_id),
            timeout=60,
            interval=0.3,
            message=f"user {client.user_id}: {unread_from_api(traffic, client)} != "
            f"{unread_truth(client.user_id)}",
        )
    # the sync versions a device saw never went backwards
    for user_id, seen in traffic.versions.items():
        assert seen == sorted(seen), f"user {user_id} saw versions go back: {seen}"
    assert not traffic.broken, traffic.broken[:10]
    return {
        "messages": len(traffic.stored),
        "statuses": dict(traffic.statuses),
        "errors": dict(traffic.errors),
        "slowest_s": round(traffic.slowest_s, 2),
        "converged_s": round(time.monotonic() - started, 1),
    }


@pytest.fixture
def world(transactional_db, site):
    site.store.client().flushall()
    site.broker.client().flushall()
    clients, traffic = make_clients(SENDERS + 1), Traffic(site)
    return traffic, clients, make_conversations(traffic, clients)


def test_redis_restarted_empty_under_load_loses_nothing_a_client_was_told(world):
    """The counter store restarted empty while clients send: answers are 2xx or 503 JSON
    within 10 s; after the retries the counts equal PostgreSQL's and versions never went back."""
    traffic, clients, conversations = world
    restart = lambda: traffic.site.store.restart(empty=True)  # noqa: E731
    run_load(traffic, clients, conversations, restart, around_s=3)
    figures = assert_recovered(traffic, clients)
    print("redis restarted empty:", figures)


def test_broker_unreachable_for_10s_then_everything_converges(world):
    """The broker down for 10 s while clients send: answers are 2xx or 503 JSON within 10 s;
    once it is back the worker and the Timer catch up and the counts equal PostgreSQL's."""
    traffic, clients, conversations = world

    def outage():
        traffic.site.broker.stop(save=True)  # unreachable, its queues kept on disk
        time.sleep(OUTAGE_S)
        traffic.site.broker.start()

    run_load(traffic, clients, conversations, outage)
    figures = assert_recovered(traffic, clients)
    print("broker unreachable:", figures)


def test_postgres_refusing_connections_for_10s_answers_503_then_recovers(world):
    """PostgreSQL refusing connections for 10 s (its sessions cut): answers are 2xx or 503
    JSON within 10 s; afterwards the same server serves again and nothing told is lost."""
    traffic, clients, conversations = world

    def outage():
        traffic.site.pg.close()
        time.sleep(OUTAGE_S)
        traffic.site.pg.open()

    run_load(traffic, clients, conversations, outage)
    figures = assert_recovered(traffic, clients)
    print("postgres refusing:", figures)
    assert figures["errors"].get("database_unavailable"), figures
