"""``make bench-sync``: multi-device sync measured through a real server, in one run on one
machine:

1. catch-up: a device offline for N messages of one small group pulls until ``has_more`` is
   false, with ``limit=SYNC_PAGE_MAX`` and ``limit=200``, cold (no prepared package) and after
   ``offline_prepare_device`` prepared its package;
2. gap: a device behind the store's floor (``since=0``, the user's log went past
   ``OFFLINE_MAX_ENTRIES``) with 50 conversations gets the snapshot, cold and prepared;
3. entry writes of one message to a 5,000-member group (``offline_record_messages``) beside
   the alternative of a PostgreSQL row per user bumped in the message's transaction;
4. PostgreSQL writes per 1,000 acks sent over HTTP, with the periodic ack flush running as
   Celery beat would run it, and with one flush after the last ack.

The server is gunicorn serving ``imcore.wsgi`` (2 workers x 4 threads, as in the Procfile, so
connections are kept alive), wrapped by :func:`counted_wsgi` which only adds an
``X-Bench-SQL`` header with the SQL statements the request ran. Requests go over one
keep-alive ``http.client`` connection, opened before each timed run. The services that
Celery tasks or the pipeline would run (``delivery_drain``, ``offline_prepare_device``,
``offline_flush_acks``) run in this process, timed there; no Celery worker is started.

    python bench/sync.py [--runs 5] [--catchup-messages 1000] [--group-members 4]
                         [--gap-conversations 50] [--gap-messages 20] [--big-group 5000]
                         [--ack-devices 100] [--acks-per-device 10]
                         [--ack-flush-interval S] [--no-sql-count]

Writes bench/results/sync-<date>-<host>.md and .json. Stops gunicorn (and the broker
redis-server when this run started it) on the way out, errors included.
"""

import argparse
import contextlib
import datetime
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

SQL_HEADER = "X-Bench-SQL"
SCRATCH_TABLE = "bench_sync_latest"


# ---- SQL counting (this process and, through the header, the server) ---------------------


@dataclass
class SqlCount:
    """Statements run through one Django connection; ``rows`` = rows the UPDATEs changed."""

    queries: int = 0
    updates: int = 0
    rows: int = 0
    last_seen: int = 0  # UPDATEs that write last_seen_at
    last_seen_rows: int = 0

    def __call__(self, execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        self.queries += 1
        if sql.lstrip()[:6].upper() == "UPDATE":
            rows = max(context["cursor"].rowcount, 0)
            self.updates += 1
            self.rows += rows
            if "last_seen_at" in sql:
                self.last_seen += 1
                self.last_seen_rows += rows
        return result

    def header(self) -> str:
        return f"{self.queries} {self.updates} {self.rows} {self.last_seen} {self.last_seen_rows}"

    @classmethod
    def parse(cls, value: str | None) -> "SqlCount":
        return cls(*(int(v) for v in value.split())) if value else cls()

    def add(self, other: "SqlCount") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@contextlib.contextmanager
def sql_counted():
    from django.db import connection

    count = SqlCount()
    with connection.execute_wrapper(count):
        yield count


def counted_wsgi(environ, start_response):
    """``imcore.wsgi.application``, plus the ``X-Bench-SQL`` header: queries, UPDATE
    statements, rows they changed, last_seen_at UPDATEs and their rows, for this request."""
    from imcore.wsgi import application

    with sql_counted() as count:

        def start(status, headers, exc_info=None):
            return start_response(status, [*headers, (SQL_HEADER, count.header())], exc_info)

        return application(environ, start)


# ---- the server and the client -------------------------------------------------------------


class Server(common.ServedApp):
    """gunicorn in its own process group; always stopped by :meth:`stop`."""

    server_name = "gunicorn"

    def __init__(self, *, count_sql: bool, workers: int = 2, threads: int = 4):
        self.port = common.free_port()
        # Lives as long as the server (closed in stop()).
        self.log = tempfile.NamedTemporaryFile(prefix="imcore-bench-sync-", suffix=".log")  # noqa: SIM115
        app = "bench.sync:counted_wsgi" if count_sql else "imcore.wsgi:application"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                app,
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "--chdir",
                str(common.ROOT),
                "--log-level",
                "warning",
            ],
            cwd=common.ROOT,
            env={**os.environ, **common.ENV},
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.description = f"gunicorn `{app}`, {workers} workers x {threads} threads (gthread)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            common.stop(self.proc)
        self.log.close()


@dataclass
class Reply:
    status: int
    body: bytes
    sql: SqlCount


class Http:
    """One keep-alive connection (a device's), with the round trips counted."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def connect(self) -> None:
        self.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        self.conn.connect()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, token: str, payload: dict | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {token}"}
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            if self.conn is None:
                self.connect()
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return Reply(response.status, data, SqlCount.parse(response.getheader(SQL_HEADER)))
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closed the idle connection: open another one (counted).
                self.close()
                self.reconnects += 1
                if attempt:
                    raise
        raise AssertionError("unreachable")


# ---- data ----------------------------------------------------------------------------------


@dataclass
class Device:
    pk: int
    user_id: int
    token: str


def make_users(prefix: str, n: int) -> list[int]:
    from django.contrib.auth.hashers import make_password

    from imcore.models import User

    unusable = make_password(None)
    users = User.objects.bulk_create(
        User(username=f"{prefix}{i}", password=unusable) for i in range(n)
    )
    return [u.pk for u in users]


def make_devices(user_ids: list[int], prefix: str, **fields) -> list[Device]:
    from imcore.models import Device as DeviceRow
    from imcore.services import token_hash

    tokens = [f"bench-sync-{prefix}-{uid}" for uid in user_ids]
    rows = DeviceRow.objects.bulk_create(
        DeviceRow(
            user_id=uid,
            device_id=f"{prefix}-{uid}",
            platform="ios",
            token_hash=token_hash(token),
            **fields,
        )
        for uid, token in zip(user_ids, tokens, strict=True)
    )
    return [Device(d.pk, d.user_id, t) for d, t in zip(rows, tokens, strict=True)]


def send_messages(conversation_id: int, sender_ids: list[int], n: int, tag: str) -> None:
    from imcore import services
    from imcore.models import Conversation, User

    conversation = Conversation.objects.get(pk=conversation_id)
    senders = [User.objects.get(pk=uid) for uid in sender_ids]
    for i in range(n):
        services.message_send(
            sender=senders[i % len(senders)],
            conversation=conversation,
            body=f"{tag} message {i}: " + "lorem ipsum dolor sit amet " * 2,
            client_msg_id=f"{tag}-{conversation_id}-{i}",
        )


def sync_state(user_id: int) -> dict[str, int]:
    from offline import keys, store

    raw = store.client().hgetall(keys.state(user_id))
    return {k: int(raw[k]) for k in ("cur", "floor", "bound") if k in raw}


def setup(args) -> dict:
    """Every user, conversation, message and device the measurements use."""
    from counters.services import counters_reconcile
    from delivery.pipeline import delivery_drain
    from imcore import services
    from imcore.models import User

    common.reset_data()
    out: dict = {}

    # 1. catch-up: one small group; its second member's device last synced after the join.
    t0 = time.perf_counter()
    ids = make_users("catchup-", args.group_members)
    conversation, _ = services.conversation_create(
        creator=User.objects.get(pk=ids[0]), kind="group", member_ids=ids, title="catch-up"
    )
    counters_reconcile(user_ids=ids)
    reader = ids[1]
    joined = sync_state(reader)["cur"]
    others = [uid for uid in ids if uid != reader]
    send_messages(conversation.pk, others, args.catchup_messages, "catchup")
    delivery_drain()
    out["catchup"] = {
        "device": make_devices([reader], "catchup", acked_version=joined)[0],
        "since": joined,
        "state": sync_state(reader),
        "setup_s": time.perf_counter() - t0,
    }

    # 2. gap: one user in N direct conversations, each with M messages from the other side;
    # more entries than OFFLINE_MAX_ENTRIES, so the floor is above 0 and since=0 is behind it.
    t0 = time.perf_counter()
    gap_user, *partners = make_users("gap-", args.gap_conversations + 1)
    user = User.objects.get(pk=gap_user)
    for partner in partners:
        conversation, _ = services.conversation_create(
            creator=user, kind="direct", member_ids=[partner]
        )
        send_messages(conversation.pk, [partner], args.gap_messages, "gap")
    counters_reconcile(user_ids=[gap_user, *partners])
    delivery_drain()
    state = sync_state(gap_user)
    if state.get("floor", 0) <= 0:
        raise RuntimeError(f"the gap user's floor is not above 0: {state}")
    out["gap"] = {
        "device": make_devices([gap_user], "gap")[0],
        "state": state,
        "setup_s": time.perf_counter() - t0,
    }

    # 3 and 4. one big group (its members are loaded in Redis by their join entries).
    t0 = time.perf_counter()
    big = make_users("big-", args.big_group)
    conversation, _ = services.conversation_create(
        creator=User.objects.get(pk=big[0]), kind="group", member_ids=big, title="big"
    )
    out["big"] = {"conversation_id": conversation.pk, "members": big}
    # Fresh devices for every run of every flush mode: never acked, last seen an hour ago.
    sets = len(ack_intervals(args)) * args.runs
    ack_users = big[1 : 1 + sets * args.ack_devices]
    if len(ack_users) < sets * args.ack_devices:
        raise RuntimeError("--big-group is too small for the ack runs")
    seen = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    devices = make_devices(ack_users, "ack", last_seen_at=seen)
    out["ack"] = {
        "devices": [devices[i * args.ack_devices : (i + 1) * args.ack_devices] for i in range(sets)]
    }
    out["big"]["setup_s"] = time.perf_counter() - t0
    return out


# ---- measurements --------------------------------------------------------------------------


def mark_seen(device_pk: int) -> None:
    """The device was seen just now (it logged in, which also asks for its package), so its
    pulls do not send another prepare task."""
    from django.utils import timezone

    from imcore.models import Device as DeviceRow

    DeviceRow.objects.filter(pk=device_pk).update(last_seen_at=timezone.now())


def drop_prepared(device: Device) -> None:
    from offline import keys, store

    store.client().delete(
        keys.package(device.user_id, device.pk), keys.snapshot(device.user_id, device.pk)
    )


def prepare(device: Device) -> tuple[float, str]:
    from django.db import connection

    from offline.services import offline_prepare_device

    connection.ensure_connection()
    t0 = time.perf_counter()
    what = offline_prepare_device(device_pk=device.pk)
    return time.perf_counter() - t0, what


def pull_until_done(http: Http, device: Device, since: int, limit: int) -> dict:
    """Pull pages until has_more is false; what it took."""
    round_trips = entries = nbytes = missing = conversations = 0
    sql = SqlCount()
    gap = False
    versions: list[int] = []
    t0 = time.perf_counter()
    while True:
        reply = http.request("GET", f"/api/v1/sync?since={since}&limit={limit}", device.token)
        if reply.status != 200:
            raise RuntimeError(f"pull answered {reply.status}: {reply.body[:500]!r}")
        page = json.loads(reply.body)
        round_trips += 1
        nbytes += len(reply.body)
        sql.add(reply.sql)
        entries += len(page["entries"])
        versions += [e["version"] for e in page["entries"]]
        missing += sum(1 for e in page["entries"] if e["type"] == "message" and not e["message"])
        if page["gap"]:
            gap = True
            conversations = len(page["snapshot"]["conversations"])
            since = page["latest_version"]
        elif page["entries"]:
            since = page["entries"][-1]["version"]
        if not page["has_more"]:
            break
    elapsed = time.perf_counter() - t0
    return {
        "ms": elapsed * 1000,
        "round_trips": round_trips,
        "entries": entries,
        "kb": nbytes / 1024,
        "sql": sql.queries,
        "missing_bodies": missing,
        "gap": gap,
        "conversations": conversations,
        "end": since,
        "latest": page["latest_version"],
        "ordered": versions == sorted(set(versions)),
    }


def run_pulls(
    http: Http, device: Device, since: int, limit: int, mode: str, runs: int, warmup: int = 2
) -> dict:
    """``runs`` timed pulls (after ``warmup`` untimed ones), each on a fresh connection, each
    preceded by dropping (cold) or preparing (prepared) the device's package."""
    results, prepares, prepared_as = [], [], set()
    for i in range(warmup + runs):
        drop_prepared(device)
        if mode == "prepared":
            seconds, what = prepare(device)
            prepared_as.add(what)
            if i >= warmup:
                prepares.append(seconds * 1000)
        mark_seen(device.pk)
        http.connect()
        r = pull_until_done(http, device, since, limit)
        if i >= warmup:
            results.append(r)
    return {"runs": results, "prepare_ms": prepares, "prepared_as": sorted(prepared_as)}


def summarize(pulls: dict) -> dict:
    runs = pulls["runs"]
    return {
        "ms": [r["ms"] for r in runs],
        "round_trips": sorted({r["round_trips"] for r in runs}),
        "entries": sorted({r["entries"] for r in runs}),
        "sql": sorted({r["sql"] for r in runs}),
        "kb": common.median([r["kb"] for r in runs]),
        "missing_bodies": max(r["missing_bodies"] for r in runs),
        "ordered": all(r["ordered"] for r in runs),
        "gap": all(r["gap"] for r in runs),
        "conversations": sorted({r["conversations"] for r in runs}),
        "end": sorted({r["end"] for r in runs}),
        "latest": sorted({r["latest"] for r in runs}),
        "prepare_ms": pulls["prepare_ms"],
        "prepared_as": pulls["prepared_as"],
    }


def measure_catchup(http: Http, data: dict, args) -> list[dict]:
    from django.conf import settings

    device, since = data["device"], data["since"]
    n = data["state"]["cur"] - since
    out = []
    for mode in ("cold", "prepared"):
        for limit in (settings.SYNC_PAGE_MAX, 200):
            s = summarize(run_pulls(http, device, since, limit, mode, args.runs))
            s.update(mode=mode, limit=limit, expected_round_trips=-(-n // limit) if n else 1)
            out.append(s)
            print(f"  catch-up {mode} limit={limit}: {common.spread(s['ms'])} ms", flush=True)
    return out


def measure_gap(http: Http, data: dict, args) -> list[dict]:
    from django.conf import settings

    out = []
    for mode in ("cold", "prepared"):
        s = summarize(run_pulls(http, data["device"], 0, settings.SYNC_PAGE_MAX, mode, args.runs))
        s["mode"] = mode
        out.append(s)
        print(f"  gap {mode}: {common.spread(s['ms'])} ms", flush=True)
    return out


def measure_entry_writes(data: dict, args) -> dict:
    """One message to the big group: its 5,000 entries through the offline store, beside
    bumping a PostgreSQL row per member (one statement, or one statement per row)."""
    from django.db import connection, transaction

    from offline import store
    from offline.services import offline_record_messages

    cid, members = data["conversation_id"], data["members"]
    seq = 0

    def record(messages: int = 1) -> float:
        nonlocal seq
        seq += messages
        items = [(uid, [(cid, seq, 0)]) for uid in members]
        t0 = time.perf_counter()
        written = offline_record_messages(items)
        elapsed = time.perf_counter() - t0
        new = sum(last - first + 1 for first, last in written.values())
        if new != len(members) * messages:
            raise RuntimeError(f"{new} entries written for {len(members)} members")
        return elapsed

    record()  # warm-up: every member loaded, scripts cached
    redis_s = [record() for _ in range(args.runs)]
    # S1 folded: the Aggregator's flush of one Timer interval holds 10 messages of the group,
    # and each member's new entries go in one script call.
    redis_fold = [record(10) for _ in range(args.runs)]
    data["seq"] = seq

    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}")
        cursor.execute(
            f"CREATE TABLE {SCRATCH_TABLE} (user_id bigint PRIMARY KEY, latest bigint NOT NULL)"
        )
        cursor.execute(
            f"INSERT INTO {SCRATCH_TABLE} SELECT u, 0 FROM unnest(%s::bigint[]) AS t(u)",
            [members],
        )
        cursor.execute(f"VACUUM ANALYZE {SCRATCH_TABLE}")

    def one_statement() -> float:
        t0 = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {SCRATCH_TABLE} SET latest = latest + 1 WHERE user_id = ANY(%s) "
                "RETURNING user_id, latest",
                [members],
            )
            rows = cursor.fetchall()
        elapsed = time.perf_counter() - t0
        if len(rows) != len(members):
            raise RuntimeError(f"{len(rows)} rows updated for {len(members)} members")
        return elapsed

    def per_row() -> float:
        t0 = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            for uid in members:
                cursor.execute(
                    f"UPDATE {SCRATCH_TABLE} SET latest = latest + 1 WHERE user_id = %s "
                    "RETURNING latest",
                    [uid],
                )
                cursor.fetchone()
        return time.perf_counter() - t0

    try:
        one_statement(), per_row()  # warm-up
        pg_one = [one_statement() for _ in range(args.runs)]
        pg_rows = [per_row() for _ in range(args.runs)]
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}")
    n = len(members)
    pipelines = -(-n // store.PIPELINE_CHUNK)
    rows = [
        (
            "Redis: `offline_record_messages` (Lua append, pipelined)",
            redis_s,
            f"{pipelines + 1} (INFO + {pipelines} pipelines)",
            1,
        ),
        (
            "Redis, 10 messages folded in one flush (per message)",
            [t / 10 for t in redis_fold],
            f"{pipelines + 1} per 10 messages",
            1,
        ),
        ("PostgreSQL: 1 `UPDATE … WHERE user_id = ANY(%s) RETURNING` + commit", pg_one, "3", 1),
        (
            f"PostgreSQL: {n:,} single-row `UPDATE … RETURNING` in 1 transaction",
            pg_rows,
            f"{n + 2:,}",
            1,
        ),
    ]
    result = {
        "members": n,
        "paths": [
            {
                "path": name,
                "ms": [s * 1000 for s in secs],
                "versions_per_s": [n * k / s for s in secs],
                "round_trips": trips,
            }
            for name, secs, trips, k in rows
        ],
    }
    for p in result["paths"]:
        print(f"  {p['path']}: {common.spread(p['ms'])} ms", flush=True)
    return result


def n_tup_upd(table: str) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = %s", [table])
        return int(cursor.fetchone()[0])


def periodic_flush(stop: threading.Event, interval: float, count: SqlCount, calls: list[int]):
    """What Celery beat does with ``offline.flush_acks``: flush every ``interval`` seconds."""
    from django.db import connection

    from offline.services import offline_flush_acks

    try:
        with sql_counted() as mine:
            while not stop.wait(interval):
                calls[0] += 1
                offline_flush_acks()
        count.add(mine)
    finally:
        connection.close()


def ack_intervals(args) -> list[float]:
    """Flush modes of the ack runs: seconds between flushes while acks arrive (0: none)."""
    if args.ack_flush_interval is not None:
        return [args.ack_flush_interval]
    from django.conf import settings

    return [settings.SYNC_ACK_FLUSH_INTERVAL_S, 0.0]


def measure_acks(http: Http, data: dict, big: dict, args) -> dict:
    """Per run, ``--ack-devices`` devices (one per user, never acked, last seen an hour ago)
    each ack ``--acks-per-device`` increasing versions, round-robin over one connection, while
    a thread flushes acks every ``SYNC_ACK_FLUSH_INTERVAL_S`` like Celery beat (mode 1) or
    nothing flushes (mode 2); one last flush after the last ack. Statements and rows are
    counted where they run."""
    from imcore.models import Device as DeviceRow
    from offline.services import offline_flush_acks, offline_record_messages

    # Every acking user gets acks_per_device new entries (the pipeline's bulk writer).
    cid, top = big["conversation_id"], big["seq"] + args.acks_per_device
    users = [d.user_id for devices in data["devices"] for d in devices]
    written = offline_record_messages([(uid, [(cid, top, 0)]) for uid in users])
    table = DeviceRow._meta.db_table
    stat0 = n_tup_upd(table)
    runs = []
    intervals = ack_intervals(args)
    for i, devices in enumerate(data["devices"]):
        interval = intervals[i // args.runs]
        server = SqlCount()
        flushed = SqlCount()
        stop, calls = threading.Event(), [0]
        flusher = None
        if interval > 0:
            flusher = threading.Thread(
                target=periodic_flush, args=(stop, interval, flushed, calls), daemon=True
            )
            flusher.start()
        http.connect()
        sent = 0
        t0 = time.perf_counter()
        try:
            for k in range(args.acks_per_device):
                for d in devices:
                    first, _ = written[d.user_id]
                    reply = http.request(
                        "POST", "/api/v1/sync/ack", d.token, {"version": first + k}
                    )
                    if reply.status != 200:
                        raise RuntimeError(f"ack answered {reply.status}: {reply.body[:300]!r}")
                    sent += 1
                    server.add(reply.sql)
            http_s = time.perf_counter() - t0
        finally:
            stop.set()
            if flusher:
                flusher.join()
        with sql_counted() as last:
            calls[0] += 1
            offline_flush_acks()
        flushed.add(last)
        acked = dict(
            DeviceRow.objects.filter(pk__in=[d.pk for d in devices]).values_list(
                "pk", "acked_version"
            )
        )
        wrong = sum(
            1 for d in devices if acked[d.pk] != written[d.user_id][0] + args.acks_per_device - 1
        )
        runs.append(
            {
                "flush_interval_s": interval,
                "acks": sent,
                "http_ms": http_s * 1000,
                "flush_calls": calls[0],
                "ack_updates": flushed.updates,
                "ack_rows": flushed.rows,
                "last_seen_updates": server.last_seen,
                "last_seen_rows": server.last_seen_rows,
                "other_server_updates": server.updates - server.last_seen,
                "server_queries": server.queries,
                "wrong_acked_version": wrong,
            }
        )
        r = runs[-1]
        print(
            f"  acks (flush every {interval:g} s): {sent} in {http_s:.1f} s; "
            f"{r['ack_updates']} flush UPDATEs "
            f"({r['ack_rows']} rows), {r['last_seen_updates']} last_seen_at UPDATEs in requests",
            flush=True,
        )
    # pg_stat: the counts of the server's backends arrive within about a second of idling.
    expected = sum(r["ack_rows"] + r["last_seen_rows"] for r in runs)
    deadline, delta, previous = time.monotonic() + 15, 0, -1
    while time.monotonic() < deadline:
        delta = n_tup_upd(table) - stat0
        if delta >= expected and delta == previous:
            break
        previous = delta
        time.sleep(1)
    return {"runs": runs, "pg_stat_n_tup_upd": delta}


# ---- report --------------------------------------------------------------------------------


def one(values: list) -> str:
    return " / ".join(str(v) for v in values)


def checks(res: dict, args) -> list[str]:
    """What did not come out as expected (empty: everything did)."""
    problems = []
    n = res["catchup"]["entries_behind"]
    for s in res["catchup"]["results"]:
        name = f"catch-up {s['mode']} limit={s['limit']}"
        if s["entries"] != [n]:
            problems.append(f"{name}: entries {one(s['entries'])}, expected {n}")
        if s["round_trips"] != [s["expected_round_trips"]]:
            problems.append(
                f"{name}: round trips {one(s['round_trips'])}, expected {s['expected_round_trips']}"
            )
        if s["gap"] or s["conversations"] != [0]:
            problems.append(f"{name}: got a gap snapshot")
    for s in res["gap"]["results"]:
        name = f"gap {s['mode']}"
        if not s["gap"] or s["round_trips"] != [1]:
            problems.append(f"{name}: round trips {one(s['round_trips'])}, gap {s['gap']}")
        if s["conversations"] != [args.gap_conversations]:
            problems.append(f"{name}: {one(s['conversations'])} conversations in the snapshot")
    for s in res["catchup"]["results"] + res["gap"]["results"]:
        name = f"{s['mode']} pull"
        if s["missing_bodies"]:
            problems.append(f"{name}: {s['missing_bodies']} message entries without a body")
        if not s["ordered"]:
            problems.append(f"{name}: versions out of order or repeated")
        if s["end"] != s["latest"]:
            problems.append(f"{name}: ended at {one(s['end'])}, latest {one(s['latest'])}")
        if s["mode"] == "prepared" and s["prepared_as"] != ["snapshot" if s["gap"] else "package"]:
            problems.append(f"{name}: prepare_device made {s['prepared_as']}")
    for r in res["acks"]["runs"]:
        if r["wrong_acked_version"]:
            problems.append(f"acks: {r['wrong_acked_version']} devices with a wrong acked_version")
    return problems


def tables(res: dict, args) -> list[str]:
    from django.conf import settings

    lines = []
    catchup = res["catchup"]
    n = catchup["entries_behind"]
    lines += [
        f"### 1. Catch-up: a device {n:,} entries behind ({args.catchup_messages:,} messages "
        f"to a group of {args.group_members})",
        "",
        "| package | limit | round trips (expected) | entries | total ms | ms / round trip "
        "| server SQL queries | response KB | prepare ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in catchup["results"]:
        rt = s["round_trips"][0]
        lines.append(
            f"| {s['mode']} | {s['limit']} | {one(s['round_trips'])} "
            f"({s['expected_round_trips']}) | {one(s['entries'])} | {common.spread(s['ms'])} | "
            f"{common.median(s['ms']) / rt:.1f} | {one(s['sql'])} | {s['kb']:.0f} | "
            f"{common.spread(s['prepare_ms']) if s['prepare_ms'] else '-'} |"
        )
    gap = res["gap"]
    lines += [
        "",
        f"### 2. Gap: since=0 behind the floor ({gap['state']['floor']:,}; latest "
        f"{gap['state']['cur']:,}), {args.gap_conversations} conversations x "
        f"{args.gap_messages} messages",
        "",
        "| snapshot | round trips | conversations | total ms | server SQL queries "
        "| response KB | prepare ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in gap["results"]:
        lines.append(
            f"| {s['mode']} | {one(s['round_trips'])} | {one(s['conversations'])} | "
            f"{common.spread(s['ms'])} | {one(s['sql'])} | {s['kb']:.0f} | "
            f"{common.spread(s['prepare_ms']) if s['prepare_ms'] else '-'} |"
        )
    w = res["writes"]
    lines += [
        "",
        f"### 3. Versions for one message to a {w['members']:,}-member group",
        "",
        "| path | ms / message | versions (entries) / s | round trips to the store |",
        "| --- | ---: | ---: | ---: |",
    ]
    for p in w["paths"]:
        lines.append(
            f"| {p['path']} | {common.spread(p['ms'])} | "
            f"{common.median(p['versions_per_s']):,.0f} | {p['round_trips']} |"
        )
    a = res["acks"]
    runs = a["runs"]
    lines += [
        "",
        f"### 4. PostgreSQL writes per {runs[0]['acks']:,} acks ({args.ack_devices} devices x "
        f"{args.acks_per_device} acks over HTTP, round-robin; fresh devices each run)",
        "",
        "| ack flush | acks sent | HTTP s | flushes run | flush UPDATE statements "
        "(acks + last seen) | rows they updated | UPDATEs from the requests (rows) "
        "| other UPDATEs | server SQL queries |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for interval in dict.fromkeys(r["flush_interval_s"] for r in runs):
        mine = [r for r in runs if r["flush_interval_s"] == interval]

        def col(key: str, fmt: str = "{:.0f}", mine=mine) -> str:
            return common.spread([r[key] for r in mine], fmt)

        flush = (
            f"every {interval:g} s (as beat) + once after"
            if interval > 0
            else "once, after the last ack"
        )
        lines.append(
            f"| {flush} | {col('acks')} | "
            f"{common.spread([r['http_ms'] / 1000 for r in mine], '{:.2f}')}"
            f" | {col('flush_calls')} | {col('ack_updates')} | {col('ack_rows')} | "
            f"{col('last_seen_updates')} ({col('last_seen_rows')}) | "
            f"{col('other_server_updates')} | {col('server_queries')} |"
        )
    lines += [
        "",
        f"pg_stat_user_tables.n_tup_upd of imcore_device over the {len(runs)} runs: "
        f"{a['pg_stat_n_tup_upd']:,} (counted: "
        f"{sum(r['ack_rows'] + r['last_seen_rows'] for r in runs):,} = flush rows + "
        "request rows). Acks and last-seen times both wait in Redis and reach PostgreSQL "
        "with the flush: one UPDATE each per flush.",
    ]
    problems = checks(res, args)
    lines += [
        "",
        "Checks: "
        + (
            "; ".join(problems)
            if problems
            else "every pull ended at "
            "latest_version, in version order, with every message body; every catch-up got all "
            "its entries in the expected round trips; every gap pull got the snapshot of every "
            "conversation; every device's acked_version is its last ack."
        ),
    ]
    lines += [
        "",
        f"Settings: SYNC_PAGE_MAX {settings.SYNC_PAGE_MAX}, OFFLINE_MAX_ENTRIES "
        f"{settings.OFFLINE_MAX_ENTRIES}, OFFLINE_VERSION_STEP {settings.OFFLINE_VERSION_STEP}, "
        f"SYNC_SNAPSHOT_MESSAGES {settings.SYNC_SNAPSHOT_MESSAGES}, SYNC_ACK_FLUSH_INTERVAL_S "
        f"{settings.SYNC_ACK_FLUSH_INTERVAL_S}, SYNC_ACK_FLUSH_THRESHOLD "
        f"{settings.SYNC_ACK_FLUSH_THRESHOLD}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each measurement")
    parser.add_argument("--catchup-messages", type=int, default=1000)
    parser.add_argument("--group-members", type=int, default=4)
    parser.add_argument("--gap-conversations", type=int, default=50)
    parser.add_argument("--gap-messages", type=int, default=20, help="per gap conversation")
    parser.add_argument("--big-group", type=int, default=5000)
    parser.add_argument("--ack-devices", type=int, default=100)
    parser.add_argument("--acks-per-device", type=int, default=10)
    parser.add_argument(
        "--ack-flush-interval",
        type=float,
        default=None,
        help="seconds between ack flushes while acks arrive (0: one flush after the last ack); "
        "default: both SYNC_ACK_FLUSH_INTERVAL_S (as Celery beat) and 0",
    )
    parser.add_argument(
        "--no-sql-count", action="store_true", help="serve imcore.wsgi without the SQL header"
    )
    args = parser.parse_args()
    # A kill unwinds like an error: gunicorn and the broker are still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    with common.broker_stopped_after():
        run(args, started)


def run(args, started: float) -> None:
    common.setup_django()

    print("setting up…", flush=True)
    data = setup(args)
    print(
        f"  set up in {time.perf_counter() - started:.0f} s "
        f"(catch-up {data['catchup']['setup_s']:.0f} s, gap {data['gap']['setup_s']:.0f} s, "
        f"big group {data['big']['setup_s']:.0f} s)",
        flush=True,
    )
    from django.db import connection

    connection.close()  # not held open across the server's start
    server = Server(count_sql=not args.no_sql_count)
    http = Http(server.port)
    try:
        server.wait_ready()
        machine = common.machine()
        res: dict = {}
        res["catchup"] = {
            "entries_behind": data["catchup"]["state"]["cur"] - data["catchup"]["since"],
            "state": data["catchup"]["state"],
            "results": measure_catchup(http, data["catchup"], args),
        }
        res["gap"] = {
            "state": data["gap"]["state"],
            "results": measure_gap(http, data["gap"], args),
        }
        res["writes"] = measure_entry_writes(data["big"], args)
        res["acks"] = measure_acks(http, data["ack"], data["big"], args)
        reconnects = http.reconnects
    finally:
        http.close()
        server.stop()
    elapsed = time.perf_counter() - started
    now = datetime.datetime.now()
    lines = [
        f"# Sync benchmark, {now:%Y-%m-%d %H:%M}, {socket.gethostname()}",
        "",
        f"Machine: {machine}.",
        f"Server: {server.description}; one keep-alive `http.client` connection, opened before "
        f"each timed run ({reconnects} reconnects). Every figure: median of {args.runs} runs "
        "(min..max) after untimed warm-up runs; counts that did not vary are shown once. Run "
        f"took {elapsed:.0f} s.",
        "",
    ]
    lines += tables(res, args)
    data = {
        "at": now.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": machine,
        "server": server.description,
        "args": vars(args),
        "reconnects": reconnects,
        "elapsed_s": elapsed,
        **res,
    }
    common.write_results("sync", "\n".join(lines), data)


if __name__ == "__main__":
    main()
