"""``make bench-send``: the hot API calls over real HTTP (wrk, a Lua script giving each client
its token), side by side: the code and server from before issue 14 (``before``), today's code
on that server (``asgi``), today's code behind nginx with granian as the WSGI server (the
Procfile's web front before uWSGI: ``granian``) and the Procfile's web front (``procfile``);
CPU per request by process (psutil), against pgbench single-row INSERTs."""

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

common.django_setup()  # the imports below need Django's settings
import redis
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from redis.client import Pipeline

from counters.services import counters_reconcile
from delivery.pipeline import delivery_drain
from imcore import services
from offline import store

QUICK = "--clients 1,16 --seconds 3 --warmup 1 --rounds 1"  # --quick: smoke sizes, one run each

BODY = "benchmark message: hello from bench/send.py"
CALLS = {"send": "POST …/messages", "unread": "GET /unread", "read": "POST …/read",
         "conversations": "GET /conversations", "sync": "GET /sync (100 entries)"}  # fmt: skip
SWEPT = ("send", "unread")  # measured at every client count; the others at --at
ASGI = f"{common.UVICORN} --workers 2"
# Configurations served from an earlier commit's tree (a git worktree, today's libraries), as
# its Procfile served them. ``before``: the last commit before issue 14's first change (uvicorn,
# 2 workers, the access log). ``granian``: the last commit with granian as the Procfile's
# `app` (2 workers of 2 threads behind nginx); its code is today's but for the server.
BEFORE = "c6741c692fc2a879029322b215114ad0836cf826"
GRANIAN = "4fab9319905666f42723280731a30b0fe35d1c38"
TREES = {"before": (BEFORE, ("web",)), "granian": (GRANIAN, ("web", "app", "ws"))}


@contextlib.contextmanager
def tree_of(commit: str):
    """A worktree of ``commit`` (None where the clone does not hold it), removed after."""
    git = ["git", "-C", str(common.ROOT)]
    with tempfile.TemporaryDirectory(prefix="imcore-tree-") as tmp:
        tree = Path(tmp) / "tree"
        added = subprocess.run([*git, "worktree", "add", "--detach", str(tree), commit],
                               capture_output=True).returncode == 0  # fmt: skip
        try:
            yield tree if added else None
        finally:
            if added:
                subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


def seed(clients: int, members: int, sync_clients: int) -> list[dict]:
    """A user per client with a device token and its own group; the first ``sync_clients``
    hold 101 sync entries (their ``since`` is set before the sync rows:
    :func:`sync_from_last_100`). Every user's counters are loaded."""
    common.reset_data()
    ids = common.make_users(clients * members, "u")
    out = []
    for i, device in enumerate(common.make_devices(ids[::members])):
        group = common.make_group(ids[i * members : (i + 1) * members], f"g{i}", reconcile=False)
        for n in range(101 if i < sync_clients else 0):
            message = {"sender": group.created_by, "body": BODY, "client_msg_id": f"s{n}"}
            services.message_send(conversation=group, **message)
        out.append({"user": device.user_id, "token": device.token, "cid": group.pk, "since": 0})
    delivery_drain(timeout=120)
    counters_reconcile(user_ids=ids)
    return out


def sync_from_last_100(clients: list[dict]) -> None:
    """Each client's ``since``: its user's latest version less 100, so that ``GET /sync`` answers
    a page of 100 entries. Set again just before the sync rows: the sends measured before them
    write entries too, and past ``OFFLINE_MAX_ENTRIES`` the store trims the old ones, so a
    ``since`` set at the seeding would get the gap answer (a snapshot) instead of a page."""
    for c in clients:
        c["since"] = max(store.latest_version(c["user"]) - 100, 0)
        page = store.read_page(user_id=c["user"], device_pk=0, since=c["since"], limit=100)
        if page.status == "gap" or len(page.entries) < 100:
            raise RuntimeError(f"user {c['user']}: no page of 100 entries after {c['since']}")


def per_send_counts(client: dict) -> dict:
    """SQL statements and Redis round trips of three sends in a row through Django's test
    client: the ``first`` reads the token's device from PostgreSQL and caches it in Redis, the
    ``second`` reads it from Redis into the process's copy (``imcore.tracked``), the ``third``
    costs what every later send costs."""
    calls, command, pipeline = [], redis.Redis.execute_command, Pipeline._execute_pipeline

    def counted(self, *args, **kwargs):  # a command on its own: a round trip
        calls.append(str(args[0]))
        return command(self, *args, **kwargs)

    def counted_pipeline(self, connection, commands, raise_on_error):  # a round trip too
        calls.append(" + ".join(str(c[0][0]) for c in commands))
        return pipeline(self, connection, commands, raise_on_error)

    path, auth = f"/api/v1/conversations/{client['cid']}/messages", f"Bearer {client['token']}"
    counts = {}
    with (
        mock.patch.object(redis.Redis, "execute_command", counted),
        mock.patch.object(Pipeline, "_execute_pipeline", counted_pipeline),
    ):
        for send in ("first", "second", "third"):
            calls.clear()
            body = {"body": BODY, "client_msg_id": f"counted-{send}"}
            with CaptureQueriesContext(connection) as queries:
                response = Client().post(
                    path, body, "application/json", headers={"Authorization": auth}
                )
            assert response.status_code == 201, response.content
            counts[send] = {
                "sql": [statement(q["sql"]) for q in queries.captured_queries],
                "redis": list(calls),
            }
    return counts


def statement(sql: str) -> str:
    """``UPDATE imcore_conversation``: a statement's verb and first table."""
    table = re.search(r"\b(imcore_\w+)", sql.replace('"', ""))
    return " ".join(filter(None, [sql.split()[0], table and table.group(1)]))


def wrk(port: int, clients: list[dict], call: str, seconds: float, tag: str) -> dict:
    """wrk with bench/send.lua, a thread and a connection per client."""
    each = ";".join(f"{c['token']},{c['cid']},{c['since']}" for c in clients)
    env = {"BENCH_CALL": call, "BENCH_TAG": tag, "BENCH_BODY": BODY, "BENCH_CLIENTS": each}
    n, url, lua = len(clients), f"http://127.0.0.1:{port}", Path(__file__).with_suffix(".lua")
    argv = f"wrk -t{n} -c{n} -d{max(1, round(seconds))}s --timeout 10s -s {lua} {url}"
    duration_us, ok, errors, p50, p99 = map(
        int, common.run_tool(argv, r"^BENCH (.*)", **env).split()
    )
    rate = ok / (duration_us / 1e6)
    return {"rate": rate, "ok": ok, "errors": errors, "p50_ms": p50 / 1000, "p99_ms": p99 / 1000}


def pgbench_insert(clients: int, seconds: float) -> float:
    """pgbench ``-M simple``: single-row INSERTs into a copy of the message table."""
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_message")
        cursor.execute("CREATE TABLE bench_message (LIKE imcore_message INCLUDING ALL)")
        cursor.execute("CREATE SEQUENCE IF NOT EXISTS bench_message_seq")
        cursor.execute("SELECT min(c.id), min(u.id) FROM imcore_conversation c, imcore_user u")
        cid, uid = cursor.fetchone()
    connection.close()
    url = urllib.parse.urlsplit(common.ENV["DATABASE_URL"])
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(
            "INSERT INTO bench_message (conversation_id, seq, sender_id, client_msg_id, body, "
            f"created_at, mentions, mention_all) VALUES ({cid}, nextval('bench_message_seq'), "
            f"{uid}, 'pg-' || currval('bench_message_seq'), '{BODY}', now(), '{{}}', false) "
            "RETURNING id;\n"
        )
        f.flush()
        argv = (
            f"pgbench -h {url.hostname} -p {url.port or 5432} -U {url.username or 'postgres'} -n "
            f"-M simple -c {clients} -j {min(clients, common.psutil.cpu_count())} "
            f"-T {int(seconds)} -f {f.name} {url.path.lstrip('/')}"
        )
        tps = common.run_tool(argv, r"tps = ([\d.]+)")
    # Dropped at once: left behind, its 100,000 rows or more would be autovacuumed within the
    # minute, in the middle of the next configuration's row.
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE bench_message")
        cursor.execute("DROP SEQUENCE bench_message_seq")
    connection.close()
    print(f"  pgbench INSERT: {tps} tx/s", flush=True)
    return float(tps)


def measure(port, clients, call, args, procs: dict, tag: str) -> dict:
    """wrk's warm-up, the queues drained, then the timed wrk with each side's CPU."""
    wrk(port, clients, call, args.warmup, f"w{tag}")
    common.drain()
    before = {side: cpu() for side, cpu in procs.items()}
    result = wrk(port, clients, call, args.seconds, tag)
    ms = {side: (cpu() - before[side]) * 1000 / max(result["ok"], 1) for side, cpu in procs.items()}
    return {**result, "call": call, "clients": len(clients), "cpu_ms": ms}


def run(args) -> dict:
    clients = seed(max(args.clients), args.members, args.at)
    counts, machine = per_send_counts(clients[-1]), common.machine()
    with connection.cursor() as cursor:  # PostgreSQL's main process: this backend's parent
        cursor.execute("SELECT pg_backend_pid()")
        pm = common.psutil.Process(cursor.fetchone()[0]).parent()
    known = {"asgi": {"web": ASGI}, "procfile": common.procfile("web", "app", "ws")}
    postgres = lambda: common.cpu_of(pm, *pm.children(recursive=True))  # noqa: E731
    with contextlib.ExitStack() as started:
        celery = started.enter_context(common.stack(common.procfile("worker", "beat"), http=False))
        roots = {}
        for name, (commit, entries) in TREES.items():
            if name not in args.configs:
                continue
            if (tree := started.enter_context(tree_of(commit))) is not None:
                known[name], roots[name] = common.procfile(*entries, root=tree), tree
            else:
                print(f"  {name}: commit {commit[:7]} is not in this clone; left out", flush=True)
        # Every configuration's stack is up at once (idle while another is measured), so each
        # row is measured beside the others' rows of the same call: the host's speed drifts.
        webs = {
            name: started.enter_context(
                common.stack(known[name], settle=2, root=roots.get(name, common.ROOT))
            )
            for name in args.configs
            if name in known
        }
        results: dict[str, list[dict]] = {name: [] for name in webs}
        for call in CALLS:
            if call == "sync":  # after the sends' entries are in, so a page, not a gap
                common.drain()
                sync_from_last_100(clients[: args.at])
            for n in args.clients if call in SWEPT else [args.at]:
                ratio = call == "send" and n == args.at
                rounds: dict[str, list[dict]] = {name: [] for name in webs}
                # The send against pgbench: --rounds rounds, each configuration's send and then
                # its pgbench in turn; the row is the round with the median ratio.
                for _ in range(args.rounds if ratio else 1):
                    for name, web in webs.items():
                        procs = {"web": web.cpu, "postgres": postgres, "celery": celery.cpu}
                        tag = f"{name}-{call}-{n}-{time.monotonic_ns()}"
                        row = measure(web.port, clients[:n], call, args, procs, tag)
                        print(f"  {name} {call} {n}: {row['rate']:.0f}/s", flush=True)
                        if ratio:
                            row["pgbench"] = pgbench_insert(n, args.seconds)
                            row["ratio"] = row["rate"] / row["pgbench"]
                        rounds[name].append(row)
                for name, rows in rounds.items():
                    row = sorted(rows, key=lambda r: r.get("ratio", 0))[len(rows) // 2]
                    if ratio:
                        row["ratios"] = [r["ratio"] for r in rows]
                    results[name].append(row)
    configs = {k: known[k] for k in results}
    return {"machine": machine, "configs": configs, "per_send": counts, "results": results}


def markdown(args, report: dict, plot: str) -> str:
    lines = common.header(
        "Hot API calls over HTTP", report["machine"],
        f"wrk, a thread and a keep-alive connection per client, {args.seconds:g} s after "
        f"{args.warmup:g} s of warm-up. `before`: commit {BEFORE[:7]} (before issue 14) with its "
        f"Procfile's web; `asgi`: today's code on `{ASGI}`; `granian`: commit {GRANIAN[:7]}'s "
        "Procfile web, app, ws (nginx, granian: today's code, the WSGI server before uWSGI); "
        f"`procfile`: the Procfile's web, app, ws. The send at {args.at} clients: {args.rounds} "
        "rounds, each configuration's send then pgbench in turn, the round with the median ratio "
        "shown.",
    )  # fmt: skip
    rows = []
    for name, results in report["results"].items():
        for r in results:
            c, ratios = r["cpu_ms"], r.get("ratios")
            rows.append([
                name, CALLS[r["call"]], r["clients"], f"{r['rate']:,.0f}", f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}", r["errors"],
                " / ".join(f"{v:.2f}" for v in [*c.values(), sum(c.values())]),
                f"**{r['ratio']:.3f}** of {r['pgbench']:,.0f} (rounds: "
                f"{', '.join(f'{x:.3f}' for x in ratios)})" if ratios else "",
            ])  # fmt: skip
    per = report["per_send"]
    lines += common.table(
        ["configuration", "call", "clients", "requests/s", "p50 ms", "p99 ms", "errors",
         "CPU ms / request: web / PostgreSQL / Celery / total",
         "ratio to pgbench single-row INSERT tx/s"], rows, "",
        "Three sends in a row (Django's test client), by the token cache's state: "
        + "; ".join(
            f"the {send}, {len(n['sql'])} SQL statements ({', '.join(n['sql'])}) and "
            f"{len(n['redis'])} Redis round trips ({', '.join(n['redis'])})"
            for send, n in per.items()
        )
        + ".",
    )  # fmt: skip
    return "\n".join([*lines, plot])


def plot(args, report: dict) -> str:
    fig, axes = common.figure("send", "Requests/s against clients", len(SWEPT))
    for ax, call in zip(axes, SWEPT, strict=True):
        for name, rows in report["results"].items():
            points = [(r["clients"], r["rate"]) for r in rows if r["call"] == call]
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(title=CALLS[call], xlabel="clients (wrk connections)", ylabel="requests/s")
        ax.set_xscale("log")
        ax.set_xticks(args.clients, [str(c) for c in args.clients])
    return common.save_figure(fig, "send")


def main() -> None:
    args = common.parse(
        __doc__, QUICK, configs=["before", "asgi", "granian", "procfile"], clients=[1, 4, 16, 64],
        at=(16, "clients of the other calls"), seconds=8.0, warmup=2.0, members=10,
        rounds=(5, "rounds of the send and pgbench at --at clients"),
    )  # fmt: skip
    args.clients = sorted({*args.clients, args.at})
    if missing := [tool for tool in ("wrk", "pgbench") if shutil.which(tool) is None]:
        sys.exit(f"{', '.join(missing)} missing (make bench-tools installs them)")
    with common.section():
        report = run(args)
    common.write_results("send", markdown(args, report, plot(args, report)), report)


if __name__ == "__main__":
    main()
