"""``make bench-push``: live sync over the WebSocket ``/ws/v1/sync``, measured through one real
uvicorn process (``imcore.asgi``, as the Procfile's ``ws``, without nginx in front), in one
run on one machine:

1. idle sockets: authenticated devices connect in steps (``--steps``) and stay idle; after
   each step, the server's RSS (``VmRSS`` of ``/proc/<pid>/status``), RSS per socket (growth
   since the step with 0 sockets / sockets) and the server's CPU over ``--idle-seconds`` of
   idling (20 s: the server pings every socket and refreshes its presence every 20 s, so a
   shorter window right after a step sees none of that, and one later sees a burst). Steps
   stop early when one fails or takes longer than ``--slow-step`` seconds;
2. delivery latency: ``--members`` devices online (one per user, all members of one group,
   the sockets of step 1 kept), a member sends ``--messages`` messages ``--interval`` s apart
   with ``message_send``, and every device stamps ``time.time()`` when the frame with the
   message's entry arrives. Latency = that stamp - ``time.time()`` right after
   ``message_send`` returned (the commit), over every (message, device) pair. Twice:
   ``delivery_drain()`` right after each send in this process (no Timer interval: commit →
   socket of the live path), and a real Celery worker + beat running the pipeline with its
   Timer (``COUNTERS_FLUSH_INTERVAL``), nothing drained here.

The sockets are ``websockets.asyncio.client`` connections, held by ``--clients`` client
processes (this script with ``--client``), each opening its share with ``--concurrency``
handshakes in flight; the client offers permessage-deflate as browsers do and sends no pings
of its own (the server pings every 20 s). Everything runs on this machine, so the clocks of
the server, the clients and this process agree. The members' users and devices come from
``create_user`` and ``device_login`` (with the MD5 password hasher in this process only, so
set-up does not spend minutes hashing; the tasks ``device_login`` sends run eagerly here, so
nothing of the set-up waits in the broker); the other devices, which only hold idle sockets,
are bulk-inserted with the token hash ``device_login`` would store. Handshakes that fail are
retried once with ``--retry-concurrency`` in flight. The commit the run measured is recorded,
and a change of the code during the run is reported.

    python bench/push.py [--steps 0,1000,2000,4000] [--members 1000] [--messages 20]
                         [--interval 0.5] [--runs 2] [--settle 20] [--quiet 3]
                         [--idle-seconds 20] [--clients 2] [--concurrency 100]
                         [--retry-concurrency 10] [--slow-step 90] [--no-celery]

Writes bench/results/push-<date>-<host>.md and .json. Stops uvicorn, the client processes,
the Celery worker and beat (and the broker redis-server when this run started it) on the way
out, errors included. Flushes only the benchmark's Redis database (``common.ENV``, db 8).
"""

import argparse
import asyncio
import contextlib
import datetime
import glob
import json
import logging
import os
import queue
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

PASSWORD = "bench-push"
STARTED = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:4.0f} s] {text}", flush=True)


# ---- the client processes (``--client``) -----------------------------------------------------


class Sock:
    """One device's connection, as the client process keeps it."""

    def __init__(self, ws):
        self.ws = ws
        self.receipts: dict[tuple[int, int], float] = {}  # (conversation, seq) -> arrival
        self.duplicates = 0
        self.frames = 0
        self.errors: list[str] = []
        self.closed: str | None = None  # why the connection ended, when it did
        self.task: asyncio.Task | None = None

    def take(self, raw, now: float) -> None:
        frame = json.loads(raw)
        self.frames += 1
        if frame.get("type") == "sync":
            for e in frame.get("entries", []):
                if e.get("type") == "message":
                    key = (e["conversation_id"], e["seq"])
                    if key in self.receipts:
                        self.duplicates += 1
                    else:
                        self.receipts[key] = now
        elif frame.get("type") == "channel":  # a channel-mode group's message, relayed
            key = (frame["conversation_id"], frame["last_seq"])
            self.duplicates += key in self.receipts
            self.receipts.setdefault(key, now)
        elif frame.get("type") == "error":
            self.errors.append(str(frame))

    async def read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self.ws:
                self.take(raw, time.time())
        except ConnectionClosed:
            pass
        except Exception as exc:
            self.errors.append(repr(exc))
        self.closed = f"code {self.ws.close_code} {self.ws.close_reason!r}"


class ClientProcess:
    """Holds many sockets; answers one JSON line per command read from stdin."""

    def __init__(self, url: str):
        self.url = url
        self.socks: dict[int, Sock] = {}

    async def open_one(self, idx: int, token: str, sem: asyncio.Semaphore) -> str | None:
        from websockets.asyncio.client import connect

        async with sem:
            try:
                ws = await connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    ping_interval=None,
                    open_timeout=60,
                    close_timeout=5,
                    max_size=None,
                )
            except Exception as exc:
                return f"connect: {exc!r}"
            sock = Sock(ws)
            try:
                sock.take(await asyncio.wait_for(ws.recv(), 60), time.time())
            except Exception as exc:
                await ws.close()
                return f"first frame: {exc!r}"
            if sock.errors:
                await ws.close()
                return sock.errors[0]
            sock.task = asyncio.create_task(sock.read())
            self.socks[idx] = sock
            return None

    async def handle(self, cmd: dict) -> dict:
        op = cmd["cmd"]
        if op == "open":
            sem = asyncio.Semaphore(cmd["concurrency"])
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(self.open_one(idx, token, sem) for idx, token in cmd["sockets"])
            )
            failed = [[idx, r] for (idx, _), r in zip(cmd["sockets"], results, strict=True) if r]
            deflate = sum(
                1
                for s in self.socks.values()
                if "permessage-deflate"
                in (s.ws.response.headers.get("Sec-WebSocket-Extensions") or "")
            )
            reasons: dict[str, int] = {}
            for _, r in failed:
                reasons[r[:160]] = reasons.get(r[:160], 0) + 1
            return {
                "opened": len(cmd["sockets"]) - len(failed),
                "failed_idx": [idx for idx, _ in failed],
                "reasons": reasons,
                "seconds": time.perf_counter() - t0,
                "deflate": deflate,
            }
        if op == "close":
            socks = [self.socks.pop(i) for i in cmd["idx"] if i in self.socks]
            await asyncio.gather(*(s.ws.close() for s in socks), return_exceptions=True)
            return {"closed": len(socks)}
        if op == "count":
            cid, seqs = cmd["conversation_id"], set(cmd["seqs"])
            n = sum(1 for s in self.socks.values() for c, q in s.receipts if c == cid and q in seqs)
            return {"received": n}
        if op == "receipts":
            cid, seqs = cmd["conversation_id"], set(cmd["seqs"])
            return {
                "receipts": {
                    idx: {q: t for (c, q), t in s.receipts.items() if c == cid and q in seqs}
                    for idx, s in self.socks.items()
                },
                "duplicates": sum(s.duplicates for s in self.socks.values()),
                "closed": {idx: s.closed for idx, s in self.socks.items() if s.closed},
                "errors": [e for s in self.socks.values() for e in s.errors][:20],
            }
        if op == "ping":
            live = [s for s in self.socks.values() if s.closed is None]
            await asyncio.gather(
                *(s.ws.send('{"type":"ping"}') for s in live), return_exceptions=True
            )
            return {"pinged": len(live)}
        if op == "status":
            return {
                "open": sum(1 for s in self.socks.values() if s.closed is None),
                "open_idx": [i for i, s in self.socks.items() if s.closed is None],
                "closed": {idx: s.closed for idx, s in self.socks.items() if s.closed},
                "rss_kb": rss_kb(os.getpid()),
            }
        if op == "quit":
            await asyncio.gather(
                *(s.ws.close() for s in self.socks.values()), return_exceptions=True
            )
            return {"bye": True}
        return {"error": f"unknown command {op!r}"}


async def client_loop(url: str) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    client = ClientProcess(url)
    while (line := await commands.get()) is not None:
        cmd = json.loads(line)
        try:
            reply = await client.handle(cmd)
        except Exception as exc:
            reply = {"error": repr(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd["cmd"] == "quit":
            return


# ---- processes seen from the bench -------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return -1


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Server(common.ServedApp):
    """One uvicorn process serving ``imcore.asgi`` in its own process group; always stopped
    by :meth:`stop`."""

    server_name = "uvicorn"

    def __init__(self):
        self.port = common.free_port()
        # Lives as long as the server (closed in stop()).
        self.log = tempfile.NamedTemporaryFile(prefix="imcore-bench-push-", suffix=".log")  # noqa: SIM115
        self.args = [
            "--port",
            str(self.port),
            "--ws-ping-interval",
            "20",
            "--ws-ping-timeout",
            "20",
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "imcore.asgi:application", *self.args],
            cwd=common.ROOT,
            env={**os.environ, **common.ENV},
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.description = (
            f"one uvicorn process `uvicorn imcore.asgi:application {' '.join(self.args)}`"
        )

    def log_errors(self) -> dict:
        """Tracebacks in the server's log so far, by the exception that ended each (the last
        one of a chain)."""
        chained = ("During handling of the above exception", "The above exception was")
        errors: dict[str, int] = {}
        lines = [x for x in Path(self.log.name).read_text(errors="replace").splitlines() if x]
        in_traceback = False
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                in_traceback = True
            elif in_traceback and not line.startswith((" ", *chained)):
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                if not nxt.startswith(chained):
                    name = line.split(":", 1)[0]
                    errors[name] = errors.get(name, 0) + 1
                in_traceback = False
        return errors

    def stop(self) -> None:
        if self.proc.poll() is None:
            common.stop(self.proc)
        self.log.close()


class Client:
    """A client process and the replies it writes, one JSON line per command."""

    def __init__(self, url: str):
        self.log = tempfile.NamedTemporaryFile(prefix="imcore-bench-push-client-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client", url],
            cwd=common.ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict:
        try:
            r = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"client {self.proc.pid} did not answer in {timeout:g} s") from None
        if r is None:
            raise RuntimeError(f"client {self.proc.pid} exited:\n{self.log_tail()}")
        if "error" in r:
            raise RuntimeError(f"client {self.proc.pid}: {r['error']}")
        return r

    def log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.send({"cmd": "quit"})
                self.proc.wait(15)
        if self.proc.poll() is None:
            common.stop(self.proc)
        self.log.close()


def ask_all(clients: list[Client], cmds: list[dict], timeout: float) -> list[dict]:
    """Send each client its command, then wait for every reply (the clients work at once)."""
    for c, cmd in zip(clients, cmds, strict=True):
        c.send(cmd)
    deadline = time.monotonic() + timeout
    return [c.reply(max(deadline - time.monotonic(), 0.1)) for c in clients]


class LogCount(logging.Handler):
    """Counts the records of a logger instead of printing them (a traceback for each failed
    poke); keeps the first message."""

    def __init__(self, name: str, level: int):
        super().__init__(level)
        self.count = 0
        self.first: str | None = None
        log = logging.getLogger(name)
        log.setLevel(min(log.getEffectiveLevel(), level))
        log.addHandler(self)
        log.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            exc = record.exc_info[1] if record.exc_info else None
            self.first = record.getMessage() + (f": {exc!r}" if exc else "")

    def take(self) -> tuple[int, str | None]:
        out = (self.count, self.first)
        self.count, self.first = 0, None
        return out


# ---- data ----------------------------------------------------------------------------------


def reset_data() -> None:
    """Empty the benchmark's tables and its Redis database (db 8 of ``common.ENV``). Unlike
    ``common.reset_data`` the broker is left alone: nothing of this run waits there."""
    from django.db import connection

    from counters.redis import get_redis

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE imcore_message, imcore_membership, imcore_device, imcore_conversation, "
            "imcore_user_groups, imcore_user_user_permissions, django_admin_log, imcore_user "
            "RESTART IDENTITY CASCADE"
        )
    client = get_redis()
    db = client.connection_pool.connection_kwargs.get("db")
    if db != 8:
        raise RuntimeError(f"the benchmark's Redis is db {db}, not 8: not flushing it")
    client.flushdb()


def setup(n_users: int, members: int) -> dict:
    """``n_users`` users with one device each; the first ``members`` in one group, created
    with ``create_user`` and logged in with ``device_login``. The others only hold idle
    sockets: bulk-inserted, with the token hash ``device_login`` would store."""
    import secrets

    from django.contrib.auth.hashers import make_password
    from django.test import override_settings

    from counters.services import counters_reconcile
    from imcore import services
    from imcore.celery import app
    from imcore.models import Device, User

    t0 = time.perf_counter()
    reset_data()
    fast = override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])
    fast.enable()
    app.conf.task_always_eager = True
    try:
        users = [
            User.objects.create_user(username=f"push{i}", password=PASSWORD) for i in range(members)
        ]
        ids = [u.pk for u in users]
        conversation, _ = services.conversation_create(
            creator=users[0], kind="group", member_ids=ids, title="push bench"
        )
        counters_reconcile(user_ids=ids)  # every member's counters loaded
        tokens = []
        for i, u in enumerate(users):
            _, token = services.device_login(
                username=u.username, password=PASSWORD, device_id=f"bench-{i}", platform="web"
            )
            tokens.append(token)
    finally:
        app.conf.task_always_eager = False
        fast.disable()
    login_s = time.perf_counter() - t0
    unusable = make_password(None)
    extra = User.objects.bulk_create(
        User(username=f"push{i}", password=unusable) for i in range(members, n_users)
    )
    extra_tokens = [secrets.token_urlsafe(32) for _ in extra]
    Device.objects.bulk_create(
        Device(
            user=u,
            device_id=f"bench-{i}",
            platform="web",
            token_hash=services.token_hash(token),
        )
        for i, (u, token) in enumerate(zip(extra, extra_tokens, strict=True), start=members)
    )
    return {
        "sender": users[0],
        "conversation": conversation,
        "tokens": tokens + extra_tokens,
        "setup_s": time.perf_counter() - t0,
        "login_s": login_s,
    }


# ---- 1. idle sockets -----------------------------------------------------------------------


def server_snapshot(server: Server, idle_s: float) -> dict:
    """Idle ``idle_s`` seconds: the server's CPU over them, then its RSS, threads and fds."""
    cpu0 = common.group_cpu_seconds(server.proc)
    t0 = time.perf_counter()
    time.sleep(idle_s)
    cpu = common.group_cpu_seconds(server.proc) - cpu0
    wall = time.perf_counter() - t0
    pid = server.proc.pid
    return {
        "rss_kb": rss_kb(pid),
        "idle_cpu_pct": 100 * cpu / wall if wall > 0.5 else None,
        "threads": proc_status(pid, "Threads"),
        "fds": fd_count(pid),
    }


def after_close(server: Server, sockets: int) -> dict:
    """How long the server stays busy with the disconnects (until a second of under 10 % of
    a core, at most 30 s), then its RSS."""
    t0 = time.perf_counter()
    busy = 0.0
    while time.perf_counter() - t0 < 30:
        cpu0 = common.group_cpu_seconds(server.proc)
        time.sleep(1)
        if common.group_cpu_seconds(server.proc) - cpu0 < 0.1:
            break
        busy = time.perf_counter() - t0
    return {"sockets": sockets, "busy_s": busy, **server_snapshot(server, 0)}


def still_online(idx: range) -> int:
    """Devices ``bench-<i>`` whose presence Redis still holds (their socket closed)."""
    from imcore.models import Device
    from offline.store import presence_online

    devices = dict(
        Device.objects.filter(device_id__in=[f"bench-{i}" for i in idx]).values_list(
            "pk", "user_id"
        )
    )
    online = presence_online(set(devices.values()))
    return sum(1 for pk, uid in devices.items() if pk in online.get(uid, set()))


def open_sockets(clients: list[Client], tokens: list[str], idx: list[int], args) -> dict:
    """Open the sockets of devices ``idx`` (device i goes to client i % len(clients)), then
    retry those that failed once, with ``--retry-concurrency`` handshakes in flight."""

    def attempt(which: list[int], concurrency: int) -> list[dict]:
        parts = [[[i, tokens[i]] for i in which if i % len(clients) == k] for k in clients_k]
        return ask_all(
            clients,
            [{"cmd": "open", "sockets": p, "concurrency": concurrency} for p in parts],
            timeout=max(600, len(which)),
        )

    clients_k = range(len(clients))
    t0 = time.perf_counter()
    first = attempt(list(idx), args.concurrency)
    seconds = time.perf_counter() - t0
    failed = [i for r in first for i in r["failed_idx"]]
    reasons: dict[str, int] = {}
    for r in first:
        for reason, n in r["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    retry: list[dict] = []
    if failed:
        time.sleep(1)
        retry = attempt(failed, args.retry_concurrency)
    still = [i for r in retry for i in r["failed_idx"]]
    return {
        "seconds": seconds,  # the first attempt
        "opened": len(idx) - len(still),
        "failed_first": len(failed),
        "failed": len(still),
        "reasons_first": reasons,
        "reasons_retry": {k: v for r in retry for k, v in r["reasons"].items()},
        "deflate": sum(r["deflate"] for r in (retry or first)),
    }


def measure_idle(server: Server, clients: list[Client], tokens: list[str], args) -> dict:
    steps = []
    held = 0
    base = None
    stopped = None
    for n in args.steps:
        if n > len(tokens):
            stopped = f"step {n} is above the {len(tokens)} devices set up"
            break
        opened = {"seconds": 0.0, "opened": 0, "failed_first": 0, "failed": 0, "deflate": 0}
        if n > held:
            opened = open_sockets(clients, tokens, list(range(held, n)), args)
        status = ask_all(clients, [{"cmd": "status"}] * len(clients), 60)
        open_now = sum(s["open"] for s in status)
        snap = server_snapshot(server, args.idle_seconds if n else min(args.idle_seconds, 3))
        if base is None:
            base = snap["rss_kb"]
        step = {
            "sockets": n,
            "open": open_now,
            **opened,
            **snap,
            "rss_delta_kb": snap["rss_kb"] - base,
            "kb_per_socket": (snap["rss_kb"] - base) / n if n else None,
            "client_rss_kb": [s["rss_kb"] for s in status],
        }
        steps.append(step)
        held = max(held, n)
        per_s = n - (steps[-2]["sockets"] if len(steps) > 1 else 0)
        say(
            f"  {n} sockets: opened {opened['opened']} in {opened['seconds']:.1f} s "
            f"({per_s / opened['seconds'] if opened['seconds'] else 0:.0f}/s), "
            f"{opened['failed_first']} failed ({opened['failed']} after a retry), {open_now} "
            f"open; server RSS {snap['rss_kb'] / 1024:.0f} MiB, idle CPU "
            f"{snap['idle_cpu_pct']:.1f} %"
        )
        for reason, k in opened.get("reasons_first", {}).items():
            say(f"    {k} x {reason}")
        if opened["failed"] or open_now != n:
            stopped = (
                f"step {n}: {opened['failed']} sockets failed twice, {open_now} of {n} open "
                f"({opened.get('reasons_retry')})"
            )
            break
        if opened["seconds"] > args.slow_step:
            stopped = f"step {n} took {opened['seconds']:.0f} s (> --slow-step {args.slow_step:g})"
            break
    return {"steps": steps, "held": held, "stopped": stopped}


# ---- 2. delivery latency -------------------------------------------------------------------


def send_messages(
    data: dict, clients: list[Client], args, mode: str, run: int, messages: int
) -> dict:
    """Send ``messages`` messages ``--interval`` s apart; unless mode is "celery", apply the
    pipeline in this process after each. Wait for every delivery (at most ``--settle`` s after
    the last send, or until nothing arrived for ``--quiet`` s). If some are missing, every
    device sends a ``ping`` frame (the server catches it up): what arrives then was in the
    store but its poke never came; it is counted apart, not in the latencies."""
    from delivery.pipeline import delivery_drain
    from imcore import services

    cid = data["conversation"].pk
    commits: dict[int, float] = {}
    send_ms, drain_ms = [], []
    server = data["server"]
    cpu0 = common.group_cpu_seconds(server.proc)
    start = time.perf_counter()
    for k in range(messages):
        delay = start + k * args.interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        message, _ = services.message_send(
            sender=data["sender"],
            conversation=data["conversation"],
            body=f"push {mode} {run} {k}",
            client_msg_id=f"push-{mode}-{run}-{k}",
        )
        commits[message.seq] = time.time()
        t1 = time.perf_counter()
        send_ms.append((t1 - t0) * 1000)
        if mode.startswith("drain"):
            delivery_drain()
            drain_ms.append((time.perf_counter() - t1) * 1000)
    send_s = time.perf_counter() - start
    sent_at = time.monotonic()
    seqs = sorted(commits)
    expected = len(seqs) * args.members
    received = wait_for(clients, cid, seqs, expected, args.settle, args.quiet)
    waited_s = time.monotonic() - sent_at
    pinged_at = None
    if received < expected:
        pinged_at = time.time()
        ask_all(clients, [{"cmd": "ping"}] * len(clients), 60)
        wait_for(clients, cid, seqs, expected, args.settle, args.quiet)
    server_cpu = common.group_cpu_seconds(server.proc) - cpu0
    poke_failures, poke_error = data["poke_log"].take()
    # channels_redis drops a message for a channel whose Redis list is full (INFO record)
    over_capacity, over_capacity_first = data["capacity_log"].take()
    replies = ask_all(
        clients, [{"cmd": "receipts", "conversation_id": cid, "seqs": seqs}] * len(clients), 120
    )
    latencies: list[float] = []
    per_message: dict[int, list[float]] = {s: [] for s in seqs}
    devices = recovered = 0
    for r in replies:
        for stamps in r["receipts"].values():
            devices += 1
            for seq, t in stamps.items():
                if pinged_at is not None and t >= pinged_at:
                    recovered += 1
                    continue
                ms = (t - commits[int(seq)]) * 1000
                latencies.append(ms)
                per_message[int(seq)].append(ms)
    return {
        "mode": mode,
        "messages": len(seqs),
        "devices": devices,
        "expected": expected,
        "delivered": len(latencies),
        "missing": expected - len(latencies),
        "recovered_by_ping": recovered,
        "waited_s": waited_s,
        "missing_by_message": {s: args.members - len(v) for s, v in per_message.items()},
        "duplicates": sum(r["duplicates"] for r in replies),
        "closed": sum(len(r["closed"]) for r in replies),
        "errors": [e for r in replies for e in r["errors"]][:10],
        "p50_ms": common.percentile(latencies, 50),
        "p99_ms": common.percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "min_ms": min(latencies, default=float("nan")),
        "first_ms": [min(v) if v else None for v in per_message.values()],
        "last_ms": [max(v) if v else None for v in per_message.values()],
        "send_s": send_s,
        "send_ms": send_ms,
        "drain_ms": drain_ms,
        "server_cpu_s": server_cpu,
        "poke_failures": poke_failures,  # live_poke calls that failed in this process
        "poke_error": poke_error,
        "group_sends_over_capacity": over_capacity,  # in this process
        "over_capacity_first": over_capacity_first,
        "latencies_ms": latencies,
    }


def wait_for(
    clients: list[Client], cid: int, seqs: list[int], expected: int, cap: float, quiet: float
) -> int:
    """Poll the clients until ``expected`` deliveries arrived, ``cap`` s passed, or nothing
    arrived for ``quiet`` s; returns how many arrived."""
    deadline = time.monotonic() + cap
    received, progress = 0, (-1, time.monotonic())
    while time.monotonic() < deadline:
        received = sum(
            r["received"]
            for r in ask_all(
                clients,
                [{"cmd": "count", "conversation_id": cid, "seqs": seqs}] * len(clients),
                60,
            )
        )
        if received >= expected:
            break
        if received != progress[0]:
            progress = (received, time.monotonic())
        elif time.monotonic() - progress[1] >= quiet:
            break  # nothing arrived for a while: what is missing stays missing
        time.sleep(0.25)
    return received


def measure_latency(
    data: dict, clients: list[Client], args, mode: str, runs: int, messages: int
) -> list[dict]:
    out = []
    for run in range(runs):
        r = send_messages(data, clients, args, mode, run, messages)
        out.append(r)
        say(
            f"  {mode} run {run + 1}: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
            f"max {r['max_ms']:.0f} ms; {r['missing']} of {r['expected']} missing; sent in "
            f"{r['send_s']:.1f} s"
            + (f"; {r['poke_failures']} failed pokes" if r["poke_failures"] else "")
        )
    return out


def with_celery(data, clients, args) -> list[dict]:
    """The pipeline as deployed: a worker (prefork, 2 processes) and beat with the Timer."""
    beat_file = f"/tmp/imcore-bench-push-beat-{os.getpid()}"
    worker = beat = None
    try:
        worker = common.start_worker()
        beat = common.celery("beat", "--schedule", beat_file)
        time.sleep(2.5)  # let beat tick once and the worker settle before measuring
        return measure_latency(data, clients, args, "celery", args.runs, args.messages)
    finally:
        for p in (beat, worker):
            if p is not None:
                common.stop(p)
        for f in glob.glob(f"{beat_file}*"):
            with contextlib.suppress(OSError):
                os.unlink(f)


# ---- report --------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def latency_row(name: str, runs: list[dict]) -> str:
    pooled = [ms for r in runs for ms in r["latencies_ms"]]
    missing = sum(r["missing"] for r in runs)
    expected = sum(r["expected"] for r in runs)
    drain = [ms for r in runs for ms in r["drain_ms"]]
    pokes = (
        f"{sum(r['poke_failures'] for r in runs)} / "
        f"{sum(r['group_sends_over_capacity'] for r in runs)}"
        if drain
        else "(in the worker)"
    )
    if pooled:
        figures = (
            f"{spread([r['p50_ms'] for r in runs])} | {spread([r['p99_ms'] for r in runs])} | "
            f"{spread([r['max_ms'] for r in runs])} | {common.percentile(pooled, 50):.0f} / "
            f"{common.percentile(pooled, 99):.0f} / {max(pooled):.0f} | "
            f"{median([x for r in runs for x in r['first_ms']]):.0f} / "
            f"{median([x for r in runs for x in r['last_ms']]):.0f} | "
        )
    else:
        figures = "- | - | - | - | - | "  # nothing was delivered
    return (
        f"| {name} | {len(runs)} x {runs[0]['messages']} x {runs[0]['devices']:,} | "
        + figures
        + (
            f"{missing:,} of {expected:,} ({sum(r['recovered_by_ping'] for r in runs):,}) | "
            f"{sum(r['duplicates'] for r in runs)} | "
            f"{pokes} | {spread([r['send_s'] for r in runs], '{:.1f}')} | "
            f"{median([x for r in runs for x in r['send_ms']]):.1f} | "
            f"{f'{median(drain):.0f}' if drain else '-'} | "
            f"{median([r['server_cpu_s'] for r in runs]):.1f} |"
        )
    )


def tables(res: dict, args) -> list[str]:
    from django.conf import settings

    idle = res["idle"]
    lines = [
        "### 1. Idle authenticated sockets on one uvicorn process",
        "",
        "| sockets | opened in s (sockets/s) | failed (after a retry) | server RSS MiB "
        "| RSS growth MiB "
        "| KiB / socket | server CPU idle, % of a core | threads | fds | client RSS MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    prev = 0
    for s in idle["steps"]:
        new = s["sockets"] - prev
        rate = f" ({new / s['seconds']:.0f})" if s["seconds"] else ""
        lines.append(
            f"| {s['sockets']:,} | {s['seconds']:.1f}{rate} | {s['failed_first']} "
            f"({s['failed']}) | "
            f"{s['rss_kb'] / 1024:.0f} | {s['rss_delta_kb'] / 1024:.0f} | "
            f"{s['kb_per_socket']:.0f} | {s['idle_cpu_pct']:.1f} | {s['threads']} | {s['fds']:,} | "
            f"{' + '.join(f'{kb / 1024:.0f}' for kb in s['client_rss_kb'])} |"
            if s["sockets"]
            else f"| 0 | - | - | {s['rss_kb'] / 1024:.0f} | 0 | - | {s['idle_cpu_pct']:.1f} | "
            f"{s['threads']} | {s['fds']:,} | "
            f"{' + '.join(f'{kb / 1024:.0f}' for kb in s['client_rss_kb'])} |"
        )
        prev = s["sockets"]
    reasons = [
        f"step {s['sockets']:,}: {k} x `{reason}`"
        for s in idle["steps"]
        for reason, k in s.get("reasons_first", {}).items()
    ]
    if reasons:
        lines += ["", "Failed handshakes (first attempt): " + "; ".join(reasons) + "."]
    reopened = res.get("latency_sockets_reopened")
    if reopened:
        lines += [
            "",
            f"Before item 2, {reopened['opened']:,} members' sockets were reopened "
            f"({reopened['failed_first']} failed once, {reopened['failed']} twice).",
        ]
    after = res.get("after_close")
    lines += [
        "",
        f"One server process held {idle['held']:,} idle sockets"
        + (f"; stopped: {idle['stopped']}." if idle["stopped"] else "; every step passed.")
        + f" permessage-deflate negotiated on {res['deflate']:,} of them. "
        f"Idle CPU: the server's user+system time over {args.idle_seconds:g} s of idling right "
        "after the step (3 s at 0 sockets), in % of one core: one full period of the server's "
        f"pings (every 20 s) and presence refreshes (every {settings.PRESENCE_TTL_S / 3:g} s) "
        "of every socket. RSS per socket = growth since 0 sockets / sockets. Opened in: from "
        "the first handshake of the step to the first frame of its last socket.",
    ]
    if after:
        lines += [
            "",
            f"After closing back to {after['sockets']:,} sockets: the server was busy with the "
            f"disconnects for {after['busy_s']:.0f} s (1-s samples above 10 % of a core); "
            f"RSS then {after['rss_kb'] / 1024:.0f} MiB. Devices of the closed sockets still "
            f"online in Redis (presence) then: {after['still_online']:,} (their presence "
            f"expires within PRESENCE_TTL_S, {settings.PRESENCE_TTL_S:g} s).",
        ]

    def errors_between(before: dict | None, after: dict | None) -> str:
        diff = {k: n - (before or {}).get(k, 0) for k, n in (after or {}).items()}
        return ", ".join(f"{n:,} x {k}" for k, n in diff.items() if n) or "none"

    lines += [
        "",
        "Tracebacks in the server's log (errors, or warnings logged with one): during the "
        "steps, "
        f"{errors_between(None, res.get('server_errors_steps'))}; while "
        f"{idle['held'] - args.members if idle['held'] > args.members else 0:,} sockets "
        f"closed, {errors_between(res.get('server_errors_steps'), res.get('server_errors_idle'))}.",
    ]
    lat = res["latency"]
    lines += [
        "",
        f"### 2. Delivery latency: commit → frame at the device, {args.members:,} devices "
        f"online in one group, messages {args.interval:g} s apart (a drain variant sends the "
        "next one once its drain returned, if later)",
        "",
        "| pipeline | runs x messages x devices | p50 ms | p99 ms | max ms "
        "| pooled p50 / p99 / max ms | first / last device per message, median ms "
        "| missing deliveries (of them, delivered after a ping) | duplicates "
        "| failed `live_poke` calls / `group_send`s over "
        "capacity, here "
        "| sending took s | message_send ms | drain ms | server CPU s / run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    names = {
        "drain": "`delivery_drain()` after each send, in the bench process (no Timer)",
        "celery": "Celery worker (2 processes) + beat, Timer "
        f"{settings.COUNTERS_FLUSH_INTERVAL:g} s",
    }
    for mode, runs in lat.items():
        lines.append(latency_row(names[mode], runs))
    lines += [
        "",
        "Latency = the client's `time.time()` when the frame holding the message's entry "
        "arrived minus `time.time()` right after `message_send` returned (its transaction "
        "committed), over every (message, device) pair, the sender's own device included. "
        "p50/p99/max: median of the runs' values (min..max); pooled: over every pair of every "
        "run. First / last device: per message, the earliest and the latest delivery. "
        "Missing: pairs not delivered when the wait ended: at most "
        f"{args.settle:g} s after the last send, or once nothing had arrived for "
        f"{args.quiet:g} s; then every device sent a `ping` frame (the server catches it up "
        "from the store): deliveries that arrived then had their entry stored but no poke "
        "reached the device; they are left out of the latencies. Failed `live_poke` calls: "
        "warnings `offline.live` logged in this "
        "process (a drain pokes in two calls, one per half of the batch's users); over "
        "capacity: `group_send`s of this process for which channels_redis logged channels over "
        "capacity (the message was dropped for them). Tracebacks in the server's log during "
        f"item 2: {errors_between(res.get('server_errors_idle'), res.get('server_errors_all'))}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 1000, 2000, 4000],
        help="idle sockets after each step (comma-separated, rising)",
    )
    parser.add_argument("--members", type=int, default=1000, help="devices online in item 2")
    parser.add_argument("--messages", type=int, default=20, help="messages per latency run")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between messages")
    parser.add_argument("--runs", type=int, default=2, help="latency runs per pipeline")
    parser.add_argument("--settle", type=float, default=20, help="wait at most after the last send")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=20,
        help="idle window after each step: 20 s = one server ping and presence refresh of "
        "every socket (3 s at 0 sockets)",
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes per client")
    parser.add_argument(
        "--retry-concurrency", type=int, default=10, help="handshakes per client on a retry"
    )
    parser.add_argument("--slow-step", type=float, default=90, help="stop the steps past this")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery variant")
    parser.add_argument(
        "--quiet", type=float, default=3, help="stop waiting once nothing arrived for this long"
    )
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_loop(args.client))
        return
    # A kill unwinds like an error: every process of the run is still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    with common.broker_stopped_after():
        run(args, started)


def code_state() -> dict:
    """The commit, and the files outside bench/ that differ from it (with their mtimes)."""

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=common.ROOT, capture_output=True, text=True
        ).stdout.rstrip("\n")

    changed = sorted(
        line[3:] for line in git("status", "--porcelain", "--", ".", ":(exclude)bench").splitlines()
    )
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "changed": {
            f: (common.ROOT / f).stat().st_mtime if (common.ROOT / f).exists() else None
            for f in changed
        },
    }


def run(args, started: float) -> None:
    code = code_state()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server and clients inherit
    common.setup_django()
    steps = sorted(set(args.steps) | {0})
    args.steps = steps
    n_users = max(max(steps), args.members)
    say(f"setting up {n_users:,} users and devices…")
    data = setup(n_users, args.members)
    data["poke_log"] = LogCount("offline.live", logging.WARNING)
    data["capacity_log"] = LogCount("channels_redis.core", logging.INFO)
    say(f"  set up in {data['setup_s']:.0f} s (logins {data['login_s']:.0f} s)")
    from django.db import connection

    connection.close()  # not held open across the server's start
    server = Server()
    data["server"] = server
    clients: list[Client] = []
    res: dict = {}
    try:
        server.wait_ready()
        machine = common.machine()
        url = f"ws://127.0.0.1:{server.port}/ws/v1/sync"
        clients = [Client(url) for _ in range(args.clients)]
        say("1. idle sockets")
        res["idle"] = measure_idle(server, clients, data["tokens"], args)
        held = res["idle"]["held"]
        res["server_errors_steps"] = server.log_errors()
        if held > args.members:
            ask_all(
                clients,
                [{"cmd": "close", "idx": [i for i in range(args.members, held)]} for _ in clients],
                120,
            )
            res["after_close"] = after_close(server, args.members)
            res["after_close"]["still_online"] = still_online(range(args.members, held))
        status = ask_all(clients, [{"cmd": "status"}] * len(clients), 60)
        missing = sorted(set(range(args.members)) - {i for s in status for i in s["open_idx"]})
        if missing:  # the members' sockets a failed step left closed, or a step never opened
            extra = open_sockets(clients, data["tokens"], missing, args)
            res["latency_sockets_reopened"] = extra
            if extra["failed"]:
                raise RuntimeError(f"could not open the latency sockets: {extra['reasons_retry']}")
        res["server_errors_idle"] = server.log_errors()
        status = ask_all(clients, [{"cmd": "status"}] * len(clients), 60)
        res["deflate"] = max(s["deflate"] for s in res["idle"]["steps"]) if held else 0
        online = sum(s["open"] for s in status)
        if online != args.members:
            raise RuntimeError(f"{online} sockets open for the latency runs, not {args.members}")
        say(f"2. latency, {online} devices online")
        res["latency"] = {
            "drain": measure_latency(data, clients, args, "drain", args.runs, args.messages)
        }
        if not args.no_celery:
            res["latency"]["celery"] = with_celery(data, clients, args)
        res["server_errors_all"] = server.log_errors()
        res["server_log_tail"] = server.log_tail()[-2000:]
    finally:
        for c in clients:
            c.stop()
        server.stop()
    elapsed = time.perf_counter() - started
    now = datetime.datetime.now()
    code_after = code_state()
    code_note = (
        f"Code: commit {code['commit']} ({code['subject']})"
        + (f", with uncommitted changes to {', '.join(code['changed'])}" if code["changed"] else "")
        + (
            ". WARNING: the code changed during the run (now "
            f"{code_after['commit']}, {', '.join(code_after['changed']) or 'clean'}): the "
            "processes started later may run other code."
            if code_after != code
            else "; unchanged during the run."
        )
    )
    lines = [
        f"# Push benchmark (live sync over WebSocket), {now:%Y-%m-%d %H:%M}, "
        f"{socket.gethostname()}",
        "",
        f"Machine: {machine}.",
        f"Server: {server.description} (uvicorn's WebSocket implementation: websockets-sansio); "
        f"{args.clients} client processes (`websockets.asyncio.client`), up to "
        f"{args.concurrency} handshakes in flight each. Set-up ({n_users:,} users and devices): "
        f"{data['setup_s']:.0f} s. Run took {elapsed:.0f} s.",
        code_note,
        "",
    ]
    lines += tables(res, args)
    for runs in res["latency"].values():
        for r in runs:
            r["p90_ms"] = common.percentile(r.pop("latencies_ms"), 90)
    data = {
        "at": now.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": machine,
        "server": server.description,
        "args": vars(args),
        "elapsed_s": elapsed,
        "code": code,
        "code_after": code_after,
        "setup_s": data["setup_s"],
        **res,
    }
    common.write_results("push", "\n".join(lines), data)


if __name__ == "__main__":
    main()
