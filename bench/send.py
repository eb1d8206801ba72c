"""``bench/send.py``: the send path (``POST /api/v1/conversations/{id}/messages``) over real
HTTP, beside what the same PostgreSQL does alone, in one run on one machine.

The stack is started as ``make run`` starts it: the Procfile's ``web`` command (uvicorn,
``WEB_CONCURRENCY`` workers, 2 by default), ``worker`` and ``beat`` (not flower), each
through ``sh -c`` as honcho runs them, with ``IMCORE_PORT`` set to a free port and the
benchmark's database, Redis and broker (``bench/common.py``: ``BENCH_DATABASE_URL``,
``BENCH_REDIS_URL``, ``BENCH_BROKER_PORT``). ``--web-env KEY=VALUE`` adds settings to the
web process only (``DATABASE_POOL_MAX=0`` measures it without the connection pool).

Rows, each measured for ``--seconds`` after ``--warmup`` seconds of the same load:

1. HTTP send, one group per client: ``wrk`` (C, LuaJIT) with one thread and one keep-alive
   connection per client; client *i* is a device of its own user sending into its own group
   of ``--members``, so no two clients wait for the same conversation's seq row. Each request
   has a unique ``client_msg_id`` (``<run tag>-<client>-<n>``).
2. HTTP send, all clients in one group: the same, every client a member of one group, so
   every send waits for that conversation's row lock (``UPDATE … last_seq + 1``).
3. pgbench single-row INSERT: ``pgbench`` with as many clients, as long, TCP to 127.0.0.1 as
   the app, ``-M simple`` (Django's psycopg binds client-side), one autocommit
   ``INSERT … RETURNING id`` per transaction into ``bench_message`` (``LIKE imcore_message
   INCLUDING ALL`` plus its two foreign keys, seq from a sequence so the unique indexes
   hold): the database's limit for storing a message row with one commit.
4. pgbench, the request's SQL: the statements one HTTP send runs (counted below), in the
   same order: the token, membership and ``client_msg_id`` look-ups, then BEGIN, the seq
   bump ``UPDATE … RETURNING``, the INSERT, the read-pointer UPDATE, COMMIT; one group per
   client. HTTP against this row is what Python, HTTP and Redis add to the database's work.
5. The same with ``pgbench -C``: a new session per transaction (plus the ``SET TIME ZONE``
   Django runs on a new session), what each send would cost the database without a
   connection pool (under ASGI each request runs in a thread of its own, and Django's
   connections belong to a thread). Its latency is each client's cycle (the time between
   its consecutive completions), since pgbench's log leaves the session set-up out.

Runs interleave (HTTP, pgbench, HTTP, pgbench, pgbench) so both sides see the same machine;
every figure is the median (min..max) of ``--runs``; the ratios to row 3 are taken within
each run. Before each measurement the counter pipeline's queues are drained (the worker's
aggregation would otherwise eat into it). Latency percentiles: wrk's HdrHistogram (read in
the Lua ``done()`` hook); pgbench's per-transaction log (``-l``), computed here.

Checks: non-2xx responses and socket errors (counted by the Lua ``response()`` hook and
wrk's summary), the messages PostgreSQL holds with the run's ``client_msg_id`` prefix
against wrk's 2xx (a request in flight when wrk stops is answered to nobody but stored: at
most one per connection), pgbench's processed transactions against its log and the rows
inserted, ratios above 1 and p99 below p50; each failure is listed under the tables.

Per request, from /proc and pg_stat_database: CPU of the uvicorn and Celery process groups,
of the whole PostgreSQL server (postmaster, its children, and the children it reaped: the
short-lived per-request backends are counted), of the load generator (RUSAGE_CHILDREN); the
benchmark database's new sessions, and other databases' commits (someone else's load on a
shared server). SQL statements and Redis commands of one send are counted once in this
process (Django's CaptureQueriesContext, a wrapper around redis-py) around
``services.message_send`` and around the whole API call (django.test.Client), which is also
timed there: Django's CPU per send without a server.

    python bench/send.py [--runs 3] [--clients 16] [--seconds 10] [--warmup 2] [--members 10]
                         [--web-env KEY=VALUE ...]

Writes bench/results/send-<date>-<host>.md and .json. Stops uvicorn, the worker and beat
(and the broker redis-server when this run started it) on the way out, errors included.
Needs ``wrk`` (``apt-get install -y wrk``) and ``pgbench``.
"""

import argparse
import collections
import contextlib
import datetime
import glob
import itertools
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

BODY = "benchmark message: hello from bench/send.py"
PG_SETTINGS = (
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "commit_delay",
    "full_page_writes",
    "shared_buffers",
    "max_connections",
)
ROWS = {
    "http_own": "HTTP send, one group per client",
    "http_shared": "HTTP send, all clients in one group",
    "pg_insert": "pgbench single-row INSERT",
    "pg_request": "pgbench, the request's SQL (3 SELECTs + send transaction)",
    "pg_request_connect": "pgbench, the request's SQL, a new session each (`-C`)",
}
# HTTP and pgbench alternate within a run.
ORDER = ("http_own", "pg_insert", "http_shared", "pg_request", "pg_request_connect")
HTTP_ROWS = ("http_own", "http_shared")


# ---- the stack, as the Procfile says -------------------------------------------------------


def procfile() -> dict[str, str]:
    """``name: command`` lines of the Procfile."""
    entries = {}
    for line in (common.ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def shown_command(pid: int) -> str:
    """The command line a process runs, the interpreter left out (``uvicorn …``)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    if Path(argv[0]).name.startswith("python") and len(argv) > 1:
        argv = argv[1:]
    return " ".join([Path(argv[0]).name, *argv[1:]])


class Process(common.ServedApp):
    """One Procfile entry run by ``sh -c 'exec <command>'`` in its own process group, its
    output in a temporary log."""

    def __init__(self, name: str, command: str, env: dict[str, str], port: int = 0):
        self.server_name = name
        self.port = port
        # Lives as long as the process (closed in stop()).
        self.log = tempfile.NamedTemporaryFile(prefix=f"imcore-bench-send-{name}-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {command.removeprefix('exec ')}"],
            cwd=common.ROOT,
            env=env,
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def cpu(self) -> float:
        return common.group_cpu_seconds(self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            common.stop(self.proc)
        self.log.close()


class Stack:
    """web + worker + beat from the Procfile; :meth:`stop` stops all three."""

    def __init__(self, web_env: dict[str, str]):
        entries = procfile()
        self.port = common.free_port()
        env = {
            **os.environ,
            **common.ENV,
            "IMCORE_HOST": "127.0.0.1",
            "IMCORE_PORT": str(self.port),
            # `make run` puts the venv first on PATH for honcho.
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        self.web_env = web_env  # --web-env: settings of the web process only
        self.processes: list[Process] = []
        for name in ("web", "worker", "beat"):
            if name == "web":
                self.processes.append(
                    Process(name, entries[name], {**env, **self.web_env}, self.port)
                )
            else:
                self.processes.append(Process(name, entries[name], env))
        self.web, self.worker, self.beat = self.processes

    def wait_ready(self) -> None:
        self.web.wait_ready()
        self.wait_web_workers()
        self.wait_celery_worker()

    def wait_web_workers(self, timeout: float = 60) -> None:
        """Until every uvicorn worker process (``--workers`` of the command it runs) has
        started its application."""
        argv = self.web_command().split()
        workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.web.log_tail().count("Application startup complete") >= workers:
                return
            time.sleep(0.2)
        raise RuntimeError(f"uvicorn workers did not all start:\n{self.web.log_tail()}")

    def wait_celery_worker(self, timeout: float = 60) -> None:
        from imcore.celery import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker.proc.poll() is not None:
                raise RuntimeError(f"the Celery worker exited:\n{self.worker.log_tail()}")
            with app.connection_for_write() as conn:
                if app.control.ping(timeout=0.5, connection=conn):
                    return
        raise RuntimeError(f"the Celery worker did not answer:\n{self.worker.log_tail()}")

    def web_command(self) -> str:
        env = "".join(f"{k}={v} " for k, v in self.web_env.items())
        return env + shown_command(self.web.proc.pid)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


# ---- data ----------------------------------------------------------------------------------


@dataclass
class Sender:
    user_id: int
    token: str
    conversation_id: int


@dataclass
class Seed:
    own: list[Sender]  # client i in its own group
    shared: list[Sender]  # every client in one group
    request_sql: list[Sender]  # client i alone in a group of its own, for pgbench rows 4-5
    seconds: float = 0.0


def consecutive(ids: list[int], what: str) -> int:
    """The first id; pgbench addresses client i's row as ``first + :client_id``."""
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise RuntimeError(f"{what} ids are not consecutive: {ids}")
    return ids[0]


def seed(clients: int, members: int) -> Seed:
    """Users, one device (bearer token) per sender, the groups; every user's counters loaded
    in Redis as in production (a send then never rebuilds them)."""
    import secrets

    from django.contrib.auth.hashers import make_password

    from counters.services import counters_reconcile
    from imcore import services
    from imcore.models import Device, User

    started = time.perf_counter()
    common.reset_data()
    unusable = make_password(None)
    senders = User.objects.bulk_create(
        User(username=f"sender{i}", password=unusable) for i in range(clients)
    )
    others = User.objects.bulk_create(
        User(username=f"member{i}-{j}", password=unusable)
        for i in range(clients)
        for j in range(members - 1)
    )
    consecutive([u.pk for u in senders], "sender")
    tokens = []
    for user in senders:
        # What services.device_login stores: only the token's SHA-256.
        token = secrets.token_urlsafe(32)
        Device.objects.create(
            user=user, device_id="bench", platform="web", token_hash=services.token_hash(token)
        )
        tokens.append(token)

    def group(creator, member_ids, title):
        conversation, _ = services.conversation_create(
            creator=creator, kind="group", member_ids=member_ids, title=title
        )
        return conversation.pk

    own = [
        group(s, [u.pk for u in others[i * (members - 1) : (i + 1) * (members - 1)]], f"own {i}")
        for i, s in enumerate(senders)
    ]
    padding = [u.pk for u in others[: max(0, members - clients)]]
    shared = group(senders[0], [s.pk for s in senders] + padding, "shared")
    alone = [group(s, [], f"pgbench {i}") for i, s in enumerate(senders)]
    consecutive(own, "conversation")
    consecutive(alone, "conversation")
    counters_reconcile(user_ids=[u.pk for u in senders + others])
    return Seed(
        own=[Sender(s.pk, t, c) for s, t, c in zip(senders, tokens, own, strict=True)],
        shared=[Sender(s.pk, t, shared) for s, t in zip(senders, tokens, strict=True)],
        request_sql=[Sender(s.pk, t, c) for s, t, c in zip(senders, tokens, alone, strict=True)],
        seconds=time.perf_counter() - started,
    )


def messages_tagged(prefix: str, table: str = "imcore_message") -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table} WHERE client_msg_id LIKE %s", [prefix + "%"])
        return cursor.fetchone()[0]


def settled_count(prefix: str, timeout: float = 10) -> int:
    """The tagged messages once the count stops moving (sends still finishing)."""
    last = messages_tagged(prefix)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = messages_tagged(prefix)
        if now == last:
            return now
        last = now
    return last


def drain(timeout: float = 60) -> float:
    """Wait until the counter pipeline's queues are empty; returns the seconds waited."""
    from delivery.pipeline import shard_lengths

    started = time.monotonic()
    while sum(shard_lengths()) and time.monotonic() - started < timeout:
        time.sleep(0.2)
    return time.monotonic() - started


# ---- what one send runs: SQL statements and Redis commands -------------------------------


@contextlib.contextmanager
def redis_counted():
    """Round trips and commands of every redis-py client in this process, by server port."""
    import redis
    import redis.client

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    execute_command = redis.Redis.execute_command
    pipeline_execute = redis.client.Pipeline.execute

    def port(client) -> str:
        return str(client.connection_pool.connection_kwargs.get("port"))

    def counted_command(self, *args, **kwargs):
        counts[port(self)]["round trips"] += 1
        counts[port(self)][str(args[0]).upper()] += 1
        return execute_command(self, *args, **kwargs)

    def counted_pipeline(self, *args, **kwargs):
        counts[port(self)]["round trips"] += 1
        for command in self.command_stack:
            counts[port(self)][str(command[0][0]).upper()] += 1
        return pipeline_execute(self, *args, **kwargs)

    redis.Redis.execute_command = counted_command
    redis.client.Pipeline.execute = counted_pipeline
    try:
        yield counts
    finally:
        redis.Redis.execute_command = execute_command
        redis.client.Pipeline.execute = pipeline_execute


def statement(sql: str) -> str:
    """``VERB table [⋈ joined …]`` of one SQL statement."""
    verb = sql.split(None, 1)[0].upper()
    if verb == "SELECT":
        tables = re.findall(r'(?:FROM|JOIN) "(\w+)"', sql)
        return "SELECT " + " ⋈ ".join(dict.fromkeys(tables))
    if verb == "INSERT":
        return "INSERT " + re.search(r'INTO "?(\w+)', sql).group(1)
    if verb == "UPDATE":
        return "UPDATE " + re.search(r'UPDATE "?(\w+)', sql).group(1)
    return verb


def server_timezone() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT reset_val FROM pg_settings WHERE name = 'TimeZone'")
        return cursor.fetchone()[0]


def session_setup_sql() -> list[str]:
    """What Django runs on each new PostgreSQL session before the request's statements
    (``SET TIME ZONE`` when the server's default differs from Django's; it runs on a raw
    cursor, so CaptureQueriesContext does not see it)."""
    from django.db import connection

    wanted = connection.timezone_name
    return [f"SET TIME ZONE '{wanted}'"] if wanted and server_timezone() != wanted else []


def sql_and_redis(sender: Sender) -> dict:
    """Statements and Redis commands of one send: the service alone, and the whole API call
    (token, membership, service) through Django's test client. A first send of each warms
    up what a process loads once."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from imcore import services
    from imcore.models import Conversation, User

    user = User.objects.get(pk=sender.user_id)
    conversation = Conversation.objects.get(pk=sender.conversation_id)
    http = Client(headers={"Authorization": f"Bearer {sender.token}"})
    path = f"/api/v1/conversations/{sender.conversation_id}/messages"
    result = {}
    for n in range(2):
        with CaptureQueriesContext(connection) as queries, redis_counted() as commands:
            services.message_send(
                sender=user, conversation=conversation, body=BODY, client_msg_id=f"count-s{n}"
            )
        result["service"] = queries.captured_queries, commands
        with CaptureQueriesContext(connection) as queries, redis_counted() as commands:
            test_client_send(http, path, f"count-a{n}")
        result["api"] = queries.captured_queries, commands
    result["cpu_ms"] = api_call_cpu_ms(http, path)
    counters_port = str(urllib.parse.urlsplit(common.ENV["REDIS_URL"]).port or 6379)
    out = {
        "cpu_ms": result.pop("cpu_ms"),
        "session_setup": session_setup_sql(),
        "server_timezone": server_timezone(),
    }
    for scope, (queries, commands) in result.items():
        out[scope] = {
            "statements": [statement(q["sql"]) for q in queries],
            "sql": [q["sql"] for q in queries],
            "redis": {
                ("counters" if p == counters_port else f"port {p}"): dict(c)
                for p, c in commands.items()
            },
        }
    return out


def test_client_send(http, path: str, client_msg_id: str) -> None:
    """One send through Django's test client; anything but 201 stops the benchmark."""
    response = http.post(
        path, {"body": BODY, "client_msg_id": client_msg_id}, content_type="application/json"
    )
    if response.status_code != 201:
        raise RuntimeError(f"in-process send answered {response.status_code}: {response}")


def api_call_cpu_ms(http, path: str, calls: int = 100) -> float:
    """CPU ms of this process per send through Django's test client (no HTTP server, no
    thread per request), with this process's database settings."""
    started = time.process_time()
    for n in range(calls):
        test_client_send(http, path, f"count-t{n}-{time.time_ns()}")
    return 1000 * (time.process_time() - started) / calls


# ---- CPU and database counters ----------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (field 3), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def postmaster_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(proc_stat(cursor.fetchone()[0])[1])  # the backend's parent


def postgres_cpu(postmaster: int) -> float:
    """User+system CPU of the whole PostgreSQL server: the postmaster, its live children
    (backends, walwriter, checkpointer, …) and, through the postmaster's cutime/cstime, every
    child it reaped. Short-lived backends (a session per request) are counted too."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        fields = proc_stat(pid)
        if fields is None:
            continue
        if pid == postmaster:
            total += sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
        elif int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def db_counters() -> dict:
    """Sessions and commits of each database on the server (pg_stat_database)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT datname, sessions, xact_commit FROM pg_stat_database WHERE datname IS NOT NULL"
        )
        return {db: (int(sessions), int(commits)) for db, sessions, commits in cursor.fetchall()}


def db_deltas(start: dict, end: dict) -> dict[str, int]:
    """Sessions and commits of the benchmark's database between two readings, and the
    commits of every other database (someone else's load during the measurement; a database
    created or dropped meanwhile is left out)."""
    mine = db_params()["db"]
    others = [end[db][1] - start[db][1] for db in start.keys() & end.keys() if db != mine]
    return {
        "sessions": end[mine][0] - start[mine][0],
        "commits": end[mine][1] - start[mine][1],
        "other_commits": sum(max(0, n) for n in others),
    }


class Window:
    """CPU seconds of each side and the database's counters over one measurement."""

    def __init__(self, stack: "Stack", postmaster: int):
        self.stack, self.postmaster = stack, postmaster

    def read(self) -> dict[str, float]:
        return {
            "web": self.stack.web.cpu(),
            "celery": self.stack.worker.cpu() + self.stack.beat.cpu(),
            "postgres": postgres_cpu(self.postmaster),
            "load": children_cpu(),
        }

    def __enter__(self):
        self.start_cpu = self.read()
        self.start_db = db_counters()
        return self

    def __exit__(self, *exc):
        end = self.read()
        self.cpu_s = {k: end[k] - self.start_cpu[k] for k in end}

    def db(self) -> dict[str, int]:
        """Counter deltas since the start; call once the sends have settled (a backend's
        counts reach pg_stat_database when its transaction ends or it exits)."""
        return db_deltas(self.start_db, db_counters())


# ---- HTTP load: wrk ------------------------------------------------------------------------

WRK_LUA = r"""
-- Written by bench/send.py. One thread = one connection = one client (a sender's device
-- and its conversation). response() counts 2xx and others; done() prints the figures.
local clients = { %(clients)s }
local tag = "%(tag)s"
local text = "%(body)s"
local threads = {}
local count = 0

function setup(thread)
  count = count + 1
  thread:set("index", count)
  table.insert(threads, thread)
end

function init(args)
  local c = clients[(index - 1) %% #clients + 1]
  path = "/api/v1/conversations/" .. c[2] .. "/messages"
  request_headers = { ["Authorization"] = "Bearer " .. c[1],
                      ["Content-Type"] = "application/json" }
  n, ok, bad, first_bad = 0, 0, 0, ""
end

function request()
  n = n + 1
  local body = '{"body":"' .. text .. '","client_msg_id":"' .. tag .. "-" .. index .. "-"
               .. n .. '"}'
  return wrk.format("POST", path, request_headers, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    bad = bad + 1
    if first_bad == "" then
      first_bad = status .. " " .. string.sub(string.gsub(body or "", "%%s+", " "), 1, 300)
    end
  end
end

function done(summary, latency, requests)
  local ok_all, bad_all, first = 0, 0, ""
  for _, t in ipairs(threads) do
    ok_all = ok_all + t:get("ok")
    bad_all = bad_all + t:get("bad")
    if first == "" then first = t:get("first_bad") end
  end
  local e = summary.errors
  local lines = {
    "duration_us " .. summary.duration, "responses " .. summary.requests,
    "ok " .. ok_all, "non2xx " .. bad_all,
    "connect_errors " .. e.connect, "read_errors " .. e.read, "write_errors " .. e.write,
    "timeouts " .. e.timeout,
    "p50_us " .. latency:percentile(50), "p90_us " .. latency:percentile(90),
    "p99_us " .. latency:percentile(99), "max_us " .. latency.max,
    "mean_us " .. latency.mean, "first_bad " .. first,
  }
  for _, line in ipairs(lines) do io.write("BENCH " .. line .. "\n") end
end
"""


def wrk_script(senders: list[Sender], tag: str) -> str:
    clients = ", ".join(f'{{"{s.token}", {s.conversation_id}}}' for s in senders)
    return WRK_LUA % {"clients": clients, "tag": tag, "body": BODY}


def run_wrk(port: int, senders: list[Sender], seconds: int, tag: str) -> dict:
    """wrk with one thread and one connection per sender for ``seconds``; its figures."""
    with tempfile.NamedTemporaryFile("w", prefix="imcore-bench-send-", suffix=".lua") as lua:
        lua.write(wrk_script(senders, tag))
        lua.flush()
        n = len(senders)
        done = subprocess.run(
            [
                "wrk",
                f"-t{n}",
                f"-c{n}",
                f"-d{seconds}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                lua.name,
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
        )
    figures = {}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            key, _, value = line[6:].partition(" ")
            figures[key] = value if key == "first_bad" else float(value)
    if done.returncode != 0 or "ok" not in figures:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    figures["stdout"] = done.stdout
    return figures


def measure_http(stack: Stack, senders: list[Sender], args, tag: str, postmaster: int) -> dict:
    run_wrk(stack.port, senders, args.warmup, f"w{tag}")
    drained = drain()
    with Window(stack, postmaster) as window:
        w = run_wrk(stack.port, senders, args.seconds, tag)
    stored = settled_count(f"{tag}-")
    seconds = w["duration_us"] / 1e6
    socket_errors = sum(
        int(w[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return {
        "clients": len(senders),
        "seconds": seconds,
        "done": int(w["ok"]),
        "rate": w["ok"] / seconds,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "errors": int(w["non2xx"]) + socket_errors,
        "non2xx": int(w["non2xx"]),
        "socket_errors": socket_errors,
        "first_error": w["first_bad"],
        "stored": stored,
        "in_flight_at_stop": stored - int(w["ok"]),
        "drain_before_s": drained,
        "cpu_s": window.cpu_s,
        "db": window.db(),
        "wrk_stdout": w["stdout"],
    }


# ---- the database alone: pgbench -----------------------------------------------------------


def db_params() -> dict:
    url = urllib.parse.urlsplit(common.ENV["DATABASE_URL"])
    return {
        "host": url.hostname or "127.0.0.1",
        "port": str(url.port or 5432),
        "user": urllib.parse.unquote(url.username or "postgres"),
        "password": urllib.parse.unquote(url.password or ""),
        "db": url.path.lstrip("/"),
    }


def create_bench_table() -> None:
    """``bench_message``: imcore_message's columns, defaults, identity, checks and indexes,
    its two foreign keys, and a sequence for seq (one seq per row, so the unique indexes
    hold whatever the conversation)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_message")
        cursor.execute("DROP SEQUENCE IF EXISTS bench_message_seq")
        cursor.execute("CREATE TABLE bench_message (LIKE imcore_message INCLUDING ALL)")
        cursor.execute(
            "ALTER TABLE bench_message "
            "ADD FOREIGN KEY (conversation_id) REFERENCES imcore_conversation (id), "
            "ADD FOREIGN KEY (sender_id) REFERENCES imcore_user (id)"
        )
        cursor.execute("CREATE SEQUENCE bench_message_seq")


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def pgbench_insert_script() -> str:
    return f"""\\set conversation :first_conversation + :client_id
\\set sender :first_sender + :client_id
INSERT INTO bench_message (conversation_id, seq, sender_id, client_msg_id, body, created_at) \
VALUES (:conversation, nextval('bench_message_seq'), :sender, \
'pg-' || currval('bench_message_seq'), {sql_literal(BODY)}, now()) RETURNING id;
"""


def pgbench_request_script(token_hash: str, session_setup: list[str]) -> str:
    """What one HTTP send runs, as Django sends it (see the statements counted in-process):
    ``session_setup`` (what Django runs on a new session, for ``-C``), the token look-up (one
    token for every client: an index look-up costs the same), the active membership with its
    conversation, the client_msg_id replay look-up, then the send's transaction."""
    setup = "".join(f"{sql};\n" for sql in session_setup)
    return f"""\\set conversation :first_conversation + :client_id
\\set sender :first_sender + :client_id
\\set n random(1, 1000000000000)
{setup}SELECT d.*, u.* FROM imcore_device d INNER JOIN imcore_user u ON d.user_id = u.id \
WHERE d.token_hash = {sql_literal(token_hash)} ORDER BY d.id ASC LIMIT 1;
SELECT m.*, c.* FROM imcore_membership m INNER JOIN imcore_conversation c \
ON m.conversation_id = c.id WHERE m.conversation_id = :conversation AND m.left_at IS NULL \
AND m.user_id = :sender ORDER BY m.id ASC LIMIT 1;
SELECT * FROM imcore_message WHERE client_msg_id = 'pgtx-' || :n AND sender_id = :sender \
ORDER BY id ASC LIMIT 1;
BEGIN;
UPDATE imcore_conversation SET last_seq = last_seq + 1, last_message_at = clock_timestamp() \
WHERE id = :conversation RETURNING last_seq \\gset
INSERT INTO imcore_message (conversation_id, seq, sender_id, client_msg_id, body, created_at) \
VALUES (:conversation, :last_seq, :sender, 'pgtx-' || :conversation || '-' || :last_seq, \
{sql_literal(BODY)}, now()) RETURNING id;
UPDATE imcore_membership SET last_read_seq = GREATEST(last_read_seq, :last_seq) \
WHERE conversation_id = :conversation AND user_id = :sender;
COMMIT;
"""


def pgbench_threads(clients: int) -> int:
    return max(1, min(clients, os.cpu_count() or 1))


def run_pgbench(
    script: str, senders: list[Sender], seconds: int, connect: bool, attempts: int = 6
) -> dict:
    """:func:`pgbench_once`, again after a pause when PostgreSQL refused its connections
    (its ``max_connections`` are shared with whatever else runs on this server)."""
    for attempt in range(1, attempts + 1):
        try:
            result = pgbench_once(script, senders, seconds, connect)
            result["attempts"] = attempt
            return result
        except PgbenchNoConnections:
            if attempt == attempts:
                raise
            print("    PostgreSQL has no connections left; retrying in 5 s", flush=True)
            time.sleep(5)
    raise AssertionError("unreachable")


class PgbenchNoConnections(RuntimeError):
    pass


def pgbench_once(script: str, senders: list[Sender], seconds: int, connect: bool) -> dict:
    """pgbench ``-c len(senders)`` for ``seconds`` (``-C`` with ``connect``: a new session
    per transaction): its summary and, from the per-transaction log, each transaction's
    latency and each client's cycles (time between its consecutive completions: with
    ``-C`` the log's latency leaves the session's set-up out, the cycle holds it)."""
    p = db_params()
    with tempfile.TemporaryDirectory(prefix="imcore-bench-send-") as tmp:
        script_path = Path(tmp) / "script.sql"
        script_path.write_text(script)
        prefix = Path(tmp) / "tx"
        n = len(senders)
        done = subprocess.run(
            [
                "pgbench",
                "-h",
                p["host"],
                "-p",
                p["port"],
                "-U",
                p["user"],
                "-n",
                "-M",
                "simple",
                "-c",
                str(n),
                "-j",
                str(pgbench_threads(n)),
                "-T",
                str(seconds),
                "-D",
                f"first_conversation={senders[0].conversation_id}",
                "-D",
                f"first_sender={senders[0].user_id}",
                *(["-C"] if connect else []),
                "-f",
                str(script_path),
                "-l",
                "--log-prefix",
                str(prefix),
                p["db"],
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **({"PGPASSWORD": p["password"]} if p["password"] else {})},
        )
        latencies, failed = [], 0
        completions = collections.defaultdict(list)  # client -> completion times, µs
        for log in glob.glob(f"{prefix}.*"):
            for line in Path(log).read_text().splitlines():
                fields = line.split()
                if len(fields) < 6:
                    continue
                if fields[2].isdigit():
                    latencies.append(int(fields[2]) / 1000)
                    completions[fields[0]].append(int(fields[4]) * 1_000_000 + int(fields[5]))
                else:
                    failed += 1
        cycles = [
            (b - a) / 1000
            for times in completions.values()
            for a, b in itertools.pairwise(sorted(times))
        ]
    out = done.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+)", out)
    if processed is None or tps is None:
        if "too many clients" in done.stderr:
            raise PgbenchNoConnections(done.stderr)
        raise RuntimeError(f"pgbench failed ({done.returncode}):\n{out}\n{done.stderr}")
    failed_summary = re.search(r"number of failed transactions: (\d+)", out)
    aborted = len(re.findall(r"client \d+ aborted", done.stderr))
    return {
        "processed": int(processed.group(1)),
        "tps": float(tps.group(1)),
        "latencies_ms": latencies,
        "cycles_ms": cycles,
        "failed": max(failed, int(failed_summary.group(1)) if failed_summary else 0),
        "aborted_clients": aborted,
        "returncode": done.returncode,
        "stdout": out,
        "stderr": done.stderr[-2000:],
    }


def pgbench_workload(kind: str, seed_: Seed) -> tuple[list[Sender], str, str, str]:
    """Clients, script, and the table and client_msg_id prefix of the rows it inserts."""
    from imcore.services import token_hash

    if kind == "pg_insert":
        return seed_.own, pgbench_insert_script(), "bench_message", "pg-"
    senders = seed_.request_sql
    setup = session_setup_sql() if kind == "pg_request_connect" else []
    script = pgbench_request_script(token_hash(senders[0].token), setup)
    return senders, script, "imcore_message", "pgtx-"


def measure_pgbench(kind: str, stack: Stack, seed_: Seed, args, postmaster: int) -> dict:
    senders, script, table, prefix = pgbench_workload(kind, seed_)
    connect = kind == "pg_request_connect"
    try:
        run_pgbench(script, senders, args.warmup, connect)
        drained = drain()
        before = messages_tagged(prefix, table)
        with Window(stack, postmaster) as window:
            b = run_pgbench(script, senders, args.seconds, connect)
    except PgbenchNoConnections as exc:
        return refused(len(senders), args, exc)
    latencies = b["cycles_ms"] if connect else b["latencies_ms"]
    stored = messages_tagged(prefix, table) - before
    errors = b["failed"] + b["aborted_clients"] + (1 if b["returncode"] else 0)
    return {
        "clients": len(senders),
        "threads": pgbench_threads(len(senders)),
        "seconds": float(args.seconds),
        "done": b["processed"],
        "rate": b["tps"],
        "p50_ms": common.percentile(latencies, 50),
        "p99_ms": common.percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "latency": "cycle (set-up included)" if connect else "transaction (pgbench log)",
        "logged": len(b["latencies_ms"]),
        "errors": errors,
        "first_error": b["stderr"].strip().splitlines()[0] if errors and b["stderr"] else "",
        "stored": stored,
        "drain_before_s": drained,
        "attempts": b["attempts"],
        "cpu_s": window.cpu_s,
        "db": window.db(),
        "pgbench_stdout": b["stdout"],
    }


def refused(clients: int, args, exc: Exception) -> dict:
    """A pgbench measurement PostgreSQL refused the connections for, every attempt."""
    return {
        "clients": clients,
        "seconds": float(args.seconds),
        "done": 0,
        "rate": float("nan"),
        "p50_ms": float("nan"),
        "p99_ms": float("nan"),
        "errors": 1,
        "first_error": str(exc).strip().splitlines()[0],
        "stored": 0,
        "logged": 0,
        "cpu_s": {},
        "db": {"sessions": 0, "commits": 0, "other_commits": 0},
    }


# ---- the run -------------------------------------------------------------------------------


def pg_settings() -> dict[str, str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", [list(PG_SETTINGS)]
        )
        return {name: f"{setting}{unit or ''}" for name, setting, unit in cursor.fetchall()}


def check_connections(clients: int) -> None:
    """pgbench opens one connection per client beside the app's: fail early if they cannot."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('max_connections')::int, count(*) FROM pg_stat_activity"
        )
        limit, used = cursor.fetchone()
    if used + clients + 20 > limit:
        raise RuntimeError(
            f"PostgreSQL allows {limit} connections, {used} are open: not enough for "
            f"{clients} pgbench clients beside the app"
        )


def measure_all(args, stack: Stack, seed_: Seed) -> dict[str, list[dict]]:
    postmaster = postmaster_pid()
    results: dict[str, list[dict]] = {key: [] for key in ROWS}
    stamp = datetime.datetime.now().strftime("%H%M%S")
    for run in range(1, args.runs + 1):
        for key in ORDER:
            print(f"  run {run}/{args.runs}: {ROWS[key]}…", flush=True)
            if key in HTTP_ROWS:
                senders = seed_.own if key == "http_own" else seed_.shared
                tag = f"{stamp}r{run}{'o' if key == 'http_own' else 's'}"
                r = measure_http(stack, senders, args, tag, postmaster)
            else:
                r = measure_pgbench(key, stack, seed_, args, postmaster)
            print(
                f"    {r['rate']:.0f}/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                f"errors {r['errors']}" + (f" ({r['first_error']})" if r["errors"] else ""),
                flush=True,
            )
            results[key].append(r)
    return results


def ratios(results: dict[str, list[dict]], key: str) -> list[float]:
    """Rate of ``key`` over pgbench INSERT's, within each run."""
    return [
        r["rate"] / base["rate"]
        for r, base in zip(results[key], results["pg_insert"], strict=True)
        if base["rate"]
    ]


def checks(results: dict[str, list[dict]], clients: int) -> list[str]:
    """What makes a figure wrong or odd, one line each; empty when all is well."""
    found = []
    for key, runs in results.items():
        for i, r in enumerate(runs, 1):
            where = f"{ROWS[key]}, run {i}"
            if r["errors"]:
                found.append(f"{where}: {r['errors']} errors (first: {r['first_error']!r})")
            if r["p99_ms"] < r["p50_ms"]:
                found.append(f"{where}: p99 {r['p99_ms']:.1f} ms below p50 {r['p50_ms']:.1f} ms")
            if key in HTTP_ROWS:
                if not 0 <= r["in_flight_at_stop"] <= clients:
                    found.append(
                        f"{where}: PostgreSQL holds {r['stored']} messages of the run, wrk saw "
                        f"{r['done']} 2xx (expected 0..{clients} more: one in flight per "
                        "connection at the stop)"
                    )
            elif r["stored"] != r["done"] or r["logged"] != r["done"]:
                found.append(
                    f"{where}: pgbench processed {r['done']} transactions, logged "
                    f"{r['logged']}, the table gained {r['stored']} rows"
                )
        if key != "pg_insert":
            for i, ratio in enumerate(ratios(results, key), 1):
                if ratio > 1:
                    found.append(f"{ROWS[key]}, run {i}: {ratio:.2f} times pgbench INSERT's rate")
    return found


def per_request(runs: list[dict]) -> dict[str, list[float]]:
    """Per run: CPU ms per request (transaction) of each side and in total, cores busy,
    PostgreSQL sessions opened per request, and other databases' commits per second."""
    out: dict[str, list[float]] = collections.defaultdict(list)
    for r in runs:
        n = r["done"] or float("nan")
        for side, seconds in r["cpu_s"].items():
            out[side].append(1000 * seconds / n)
        total = sum(r["cpu_s"].values())
        out["total"].append(1000 * total / n)
        out["cores"].append(total / r["seconds"])
        out["sessions"].append(r["db"]["sessions"] / n)
        out["commits_per_s"].append(r["db"]["commits"] / r["seconds"])
        out["other_commits"].append(r["db"]["other_commits"] / r["seconds"])
    return out


def clean(values: list[float]) -> list[float]:
    """Without the NaNs of measurements that could not run."""
    return [v for v in values if v == v]


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return common.spread(clean(values), fmt)


def summary_table(results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| | clients | requests (transactions) / s | p50 ms | p99 ms | errors "
        "| rate / pgbench INSERT rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in ROWS.items():
        runs = results[key]
        ratio = "1" if key == "pg_insert" else spread(ratios(results, key), "{:.3f}")
        lines.append(
            f"| {label} | {runs[0]['clients']} "
            f"| {spread([r['rate'] for r in runs], '{:,.0f}')} "
            f"| {spread([r['p50_ms'] for r in runs])} "
            f"| {spread([r['p99_ms'] for r in runs])} "
            f"| {sum(r['errors'] for r in runs)} | {ratio} |"
        )
    return lines


def cpu_table(results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| per request (transaction) | CPU ms: uvicorn | PostgreSQL | Celery worker + beat "
        "| wrk / pgbench | total | cores busy | PostgreSQL sessions opened "
        "| other databases' commits / s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in ROWS.items():
        c = per_request(results[key])
        cells = [
            spread(c[side], "{:.2f}")
            for side in ("web", "postgres", "celery", "load", "total", "cores", "sessions")
        ]
        cells.append(spread(c["other_commits"], "{:,.0f}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def redis_summary(redis_counts: dict) -> str:
    parts = []
    for server, counts in redis_counts.items():
        commands = ", ".join(f"{n} {c}" for c, n in counts.items() if c != "round trips")
        parts.append(f"{counts.get('round trips', 0)} round trips to {server} ({commands})")
    return "; ".join(parts) or "none"


def where_the_time_goes(results, counted: dict) -> list[str]:
    api, service = counted["api"], counted["service"]
    control = {"BEGIN", "COMMIT", "ROLLBACK"}
    writes = [s for s in service["statements"] if s.split()[0] in {"INSERT", "UPDATE"}]
    setup = counted["session_setup"]
    http, shared, request_sql, connect, insert = (
        medians(results[key])
        for key in ("http_own", "http_shared", "pg_request", "pg_request_connect", "pg_insert")
    )
    django = counted["cpu_ms"]
    sessions_dominate = connect["postgres"] > 2 * request_sql["postgres"]
    return [
        f"What one send does: {len(api['statements'])} round trips to PostgreSQL over HTTP ("
        + ", ".join(f"`{s}`" for s in api["statements"])
        + f"): {len([s for s in api['statements'] if s not in control])} SQL statements, "
        f"{len([s for s in service['statements'] if s not in control])} of them in "
        f"`services.message_send` with its {len(writes)} writes in one transaction"
        + (
            ", plus, first on each new session, "
            + ", ".join(f"`{q}`" for q in setup)
            + f" (Django's set-up: the server's TimeZone is {counted['server_timezone']})"
            if setup
            else ""
        )
        + "; and Redis: "
        + redis_summary(api["redis"])
        + ". The other members' counters and sync entries are written later by the Celery "
        "aggregator.",
        "",
        f"Where the time goes (one group per client): {http['total']:.2f} ms of CPU per send "
        f"on {http['cores']:.2f} busy cores: uvicorn {http['web']:.2f} ms, PostgreSQL "
        f"{http['postgres']:.2f} ms, Celery {http['celery']:.2f} ms, wrk {http['load']:.2f} ms; "
        f"Django alone (test client in this process, no server) {django:.2f} ms, which leaves "
        f"{http['web'] - django:.2f} ms per send to the ASGI side: uvicorn, the hand-over of "
        "each request to a thread and back, the access log. The same SQL from pgbench costs "
        f"PostgreSQL {request_sql['postgres']:.2f} ms per request, a bare INSERT "
        f"{insert['postgres']:.2f} ms, and "
        f"{connect['postgres']:.2f} ms with a new session per request (`-C`). "
        + sessions_sentence(http["sessions"], sessions_dominate)
        + " "
        + contention_sentence(results, http, shared)
        + (
            f" PostgreSQL's CPU is the whole server's, and other databases committed "
            f"{http['other_commits']:,.0f} transactions/s meanwhile: part of it is theirs."
            if http["other_commits"] > 0.05 * http["commits_per_s"]
            else ""
        ),
    ]


def medians(runs: list[dict]) -> collections.defaultdict:
    """Median of each per-request figure (NaN for a figure no run has)."""
    figures = {k: common.median(clean(v)) for k, v in per_request(runs).items()}
    return collections.defaultdict(lambda: float("nan"), figures)


def contention_sentence(results, own: dict, shared: dict) -> str:
    """One shared group against a group per client."""
    own_rates, shared_rates = ([r["rate"] for r in results[key]] for key in HTTP_ROWS)
    own_rate, shared_rate = common.median(clean(own_rates)), common.median(clean(shared_rates))
    overlap = (
        "; the runs' ranges overlap"
        if min(shared_rates) <= max(own_rates) and min(own_rates) <= max(shared_rates)
        else ""
    )
    if shared_rate >= own_rate:
        return (
            f"All clients in one group send no slower ({shared_rate:,.0f}/s against "
            f"{own_rate:,.0f}/s{overlap}): at this rate the CPU, not the seq row's lock (held "
            "from the UPDATE to the COMMIT), sets the pace, and the aggregator folds one "
            "conversation for its members instead of one per client for ten members each "
            f"(Celery {shared['celery']:.2f} against {own['celery']:.2f} ms of CPU per send)."
        )
    return (
        f"All clients in one group send {1 - shared_rate / own_rate:.0%} slower "
        f"({shared_rate:,.0f}/s against {own_rate:,.0f}/s{overlap}): every send waits for the "
        "seq row's lock, held from the UPDATE to the COMMIT."
    )


def sessions_sentence(sessions: float, sessions_dominate: bool) -> str:
    """Whether the sends opened a PostgreSQL session each (no pool under ASGI) or not."""
    why = (
        "under ASGI each request runs in a thread of its own, and Django's connections belong "
        "to a thread"
    )
    if sessions > 0.5:
        return (
            f"Each send opened {sessions:.2f} PostgreSQL sessions ({why}; the Celery tasks' "
            "sessions included)"
            + (
                ": starting a backend per request is most of PostgreSQL's share."
                if sessions_dominate
                else "."
            )
        )
    return (
        f"The sends opened {sessions:.2f} PostgreSQL sessions each (the Celery tasks' "
        f"included): the pool keeps sessions open; without it, {why}, so each request would "
        "open one, as the `-C` row does."
    )


def db_connections() -> str:
    """How this process's Django settings connect to PostgreSQL (the worker's and beat's;
    the web process's unless --web-env changes them)."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    pool = db.get("OPTIONS", {}).get("pool")
    if pool:
        size = pool.get("max_size", "default") if isinstance(pool, dict) else "default"
        return f"a connection pool per process (psycopg_pool, max_size {size})"
    return f"no pool, CONN_MAX_AGE={db.get('CONN_MAX_AGE')}"


def markdown(args, report: dict) -> str:
    r = report
    lines = [
        f"# Send-path benchmark, {r['now']:%Y-%m-%d %H:%M}, {socket.gethostname()}",
        "",
        f"Machine: {r['machine']}.",
        "",
        f"Server: `{r['server']}` (the Procfile's `web`), with its `worker` and `beat`; "
        f"database connections: {r['db_connections']}"
        + (
            " (the web process: " + " ".join(f"{k}={v}" for k, v in args.web_env.items()) + ")"
            if args.web_env
            else ""
        )
        + ".",
        "",
        f"Load: wrk, {args.clients} threads x 1 keep-alive connection; pgbench `-c "
        f"{args.clients} -j {pgbench_threads(args.clients)} -M simple` over TCP to 127.0.0.1. "
        "PostgreSQL: "
        + ", ".join(f"{k}={v}" for k, v in r["postgres"].items())
        + " (both sides pay the same commit).",
        "",
        f"Median of {args.runs} runs of {args.seconds} s (min..max), each after "
        f"{args.warmup} s of warm-up, HTTP and pgbench interleaved. Set-up took "
        f"{r['seed_s']:.0f} s, the whole run {r['elapsed_s']:.0f} s.",
        "",
        *summary_table(r["results"]),
        "",
        *where_the_time_goes(r["results"], r["per_send"]),
        "",
        *cpu_table(r["results"]),
        "",
        "PostgreSQL CPU is the whole server's (the postmaster and all its processes, exited "
        "ones included): it holds other databases' load too, shown in the last column.",
        "",
        "Messages PostgreSQL holds against wrk's 2xx, per HTTP run: "
        + "; ".join(
            f"{ROWS[key].removeprefix('HTTP send, ')}: "
            + ", ".join(f"{x['done']} → {x['stored']}" for x in r["results"][key])
            for key in HTTP_ROWS
        )
        + " (the difference: the request each connection had in flight when wrk stopped, "
        "stored but answered to nobody).",
        "",
        "Checks (no errors, messages stored = 2xx + at most one in flight per connection, "
        "rows = pgbench transactions, ratios ≤ 1, p99 ≥ p50): "
        + ("all passed." if not r["checks"] else ""),
        *(f"- {line}" for line in r["checks"]),
    ]
    return "\n".join(lines)


def run(args, started: float) -> None:
    common.setup_django()
    from django.db import connection

    check_connections(args.clients)
    print("seeding…", flush=True)
    seed_ = seed(args.clients, args.members)
    create_bench_table()
    counted = sql_and_redis(seed_.own[0])
    print(f"  seeded in {seed_.seconds:.1f} s", flush=True)
    machine = common.machine()
    pg = pg_settings()
    connection.close()  # not held open across the servers' start
    stack = Stack(args.web_env)
    try:
        stack.wait_ready()
        stack_command = stack.web_command()
        print(f"serving: {stack_command}", flush=True)
        results = measure_all(args, stack, seed_)
    finally:
        stack.stop()
    now = datetime.datetime.now()
    report = {
        "now": now,
        "host": socket.gethostname(),
        "machine": machine,
        "server": stack_command,
        "args": vars(args),
        "postgres": pg,
        "db_connections": db_connections(),
        "elapsed_s": time.perf_counter() - started,
        "seed_s": seed_.seconds,
        "per_send": counted,
        "checks": checks(results, args.clients),
        "results": results,
    }
    common.write_results("send", markdown(args, report), report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measurements of each row")
    parser.add_argument("--clients", type=int, default=16, help="concurrent connections")
    parser.add_argument("--seconds", type=int, default=10, help="length of each measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each")
    parser.add_argument("--members", type=int, default=10, help="members of each own group")
    parser.add_argument(
        "--web-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the web process only, e.g. DATABASE_POOL_MAX=0 (repeatable)",
    )
    args = parser.parse_args()
    args.web_env = dict(item.split("=", 1) for item in args.web_env)
    for tool in ("wrk", "pgbench"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (apt-get install -y {tool} / postgresql-client)")
    # A kill unwinds like an error: the stack and the broker are still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    with common.broker_stopped_after():
        run(args, started)


if __name__ == "__main__":
    main()
