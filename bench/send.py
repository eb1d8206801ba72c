"""``make bench-send``: the hot API calls over real HTTP, for each server configuration side by
side, against pgbench single-row INSERTs on the same PostgreSQL, in one run on one machine.

Calls (``CALLS``): a send (``POST …/messages``, a unique ``client_msg_id`` per request),
``GET /unread``, a mark-read (``POST …/read``, the same seq again: the whole path, no new
entry), ``GET /conversations`` and ``GET /sync`` of 100 entries. Client *i* is a device of its
own user, sending into its own group of ``--members``. The load is ``wrk`` (one thread and one
keep-alive connection per client); send and unread run at every ``--clients`` count, the other
calls at ``--at`` clients.

Configurations (``--configs``): ``asgi`` is the server before issue 14 (uvicorn, ASGI, 2
workers, its access log on); ``procfile`` is the Procfile's web entries as ``make run`` starts
them (every entry but ``worker``, ``beat`` and ``flower``, with ``IMCORE_PORT`` free). The same
Celery worker and beat (the Procfile's) run under both. Each measurement's pgbench INSERT at
``--at`` clients runs right after its send at ``--at`` clients, so the ratio compares the same
minute of the same machine.

Per measurement: requests/s, p50/p99 (wrk's HdrHistogram, read in the Lua ``done()`` hook),
non-2xx and socket errors, and CPU per request by process (from /proc): the web processes,
the whole PostgreSQL server (its reaped children included), the Celery worker and beat.
Before each, the counter pipeline is drained. Also counted once in-process (Django's test
client): SQL statements and Redis commands of one send.

    python bench/send.py [--configs asgi,procfile] [--clients 1,4,16,64] [--at 16]
                         [--seconds 8] [--warmup 2] [--members 10]

Writes bench/results/send-<date>-<host>.md, .json and .png (requests/s against clients).
Needs ``wrk`` and ``pgbench``.
"""

import argparse
import contextlib
import datetime
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import psutil
from honcho.environ import parse_procfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

BODY = "benchmark message: hello from bench/send.py"
CALLS = {
    "send": "POST …/messages",
    "unread": "GET /unread",
    "read": "POST …/read",
    "conversations": "GET /conversations",
    "sync": "GET /sync (100 entries)",
}
SWEPT = ("send", "unread")  # measured at every client count; the others at --at
ASGI = (
    "uvicorn imcore.asgi:application --host 127.0.0.1 --port $IMCORE_PORT --workers 2 "
    "--ws-ping-interval 20 --ws-ping-timeout 20"
)
CELERY_ENTRIES = ("worker", "beat", "flower")


def procfile() -> dict[str, str]:
    """The Procfile's ``name: command`` entries, read by honcho."""
    entries = parse_procfile((common.ROOT / "Procfile").read_text()).processes
    return {name: command.removeprefix("exec ") for name, command in entries.items()}


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process, of the children it reaped and of its live descendants."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        total = sum(process.cpu_times()[:4])
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(child.cpu_times()[:2])
        return total
    return 0.0


def env(port: int = 0) -> dict[str, str]:
    return {
        **os.environ,
        **common.ENV,
        "IMCORE_HOST": "127.0.0.1",
        "IMCORE_PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }


class Processes:
    """Shell commands, each in a process group of its own; :meth:`cpu` sums their groups."""

    def __init__(self, commands: dict[str, str], port: int = 0):
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix="imcore-bench-send-", suffix=".log")  # noqa: SIM115
        environment, self.run_dir = env(port), None
        if any("IMCORE_RUN_DIR" in command for command in commands.values()):
            # The Procfile's web front (nginx, gunicorn, uvicorn on unix sockets): its run
            # directory and nginx's configuration, written as bin/stack.py does for `make run`.
            self.run_dir = bin_stack().prepare_run_dir(environment)
        self.procs = [
            subprocess.Popen(
                ["/bin/sh", "-c", f"exec {command}"],
                cwd=common.ROOT,
                env=environment,
                start_new_session=True,
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            for command in commands.values()
        ]

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def wait_http(self, timeout: float = 60) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/api/v1/unread")
                if conn.getresponse().status == 401:
                    time.sleep(2)  # every worker process up
                    return
            time.sleep(0.2)
        raise RuntimeError("the server did not answer:\n" + Path(self.log.name).read_text()[-3000:])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                common.stop(p)
        self.log.close()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def bin_stack():
    """bin/stack.py as a module (it writes the web front's run directory)."""
    spec = importlib.util.spec_from_file_location("imcore_bin_stack", common.ROOT / "bin/stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- data ----------------------------------------------------------------------------------


def seed(clients: int, members: int, sync_clients: int) -> list[dict]:
    """A user per client, its device token and its own group; the first ``sync_clients``
    users hold 101 sync entries past ``since``. Every user's counters are loaded."""
    import secrets

    from django.contrib.auth.hashers import make_password

    from counters.services import counters_reconcile
    from delivery.pipeline import delivery_drain
    from imcore import services
    from imcore.models import Device, User
    from offline import store

    common.reset_data()
    unusable = make_password(None)
    users = User.objects.bulk_create(
        User(username=f"u{i}-{j}", password=unusable)
        for i in range(clients)
        for j in range(members)
    )
    out = []
    for i in range(clients):
        sender, *others = users[i * members : (i + 1) * members]
        token = secrets.token_urlsafe(32)
        Device.objects.create(
            user=sender, device_id="bench", platform="web", token_hash=services.token_hash(token)
        )
        conversation, _ = services.conversation_create(
            creator=sender, kind="group", member_ids=[u.pk for u in others], title=f"g{i}"
        )
        out.append({"user": sender, "token": token, "cid": conversation.pk})
    for c in out[:sync_clients]:
        for n in range(101):
            services.message_send(
                sender=c["user"], conversation=conversation_of(c), body=BODY, client_msg_id=f"s{n}"
            )
    delivery_drain(timeout=120)
    counters_reconcile(user_ids=[u.pk for u in users])
    for c in out:
        c["since"] = max(store.latest_version(c["user"].pk) - 100, 0)
    return out


def conversation_of(client: dict):
    from imcore.models import Conversation

    return Conversation.objects.get(pk=client["cid"])


def per_send_counts(client: dict) -> dict:
    """SQL statements and Redis commands of one send through Django's test client."""
    import redis
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    calls = []
    original = redis.Redis.execute_command

    def counted(self, *args, **kwargs):
        calls.append(str(args[0]))
        return original(self, *args, **kwargs)

    http = Client()
    path = f"/api/v1/conversations/{client['cid']}/messages"
    body = f'{{"body": "{BODY}", "client_msg_id": "counted"}}'
    redis.Redis.execute_command = counted
    try:
        with CaptureQueriesContext(connection) as queries:
            response = http.post(
                path,
                body,
                content_type="application/json",
                headers={"Authorization": f"Bearer {client['token']}"},
            )
    finally:
        redis.Redis.execute_command = original
    assert response.status_code == 201, response.content
    return {"sql": [statement(q["sql"]) for q in queries.captured_queries], "redis": calls}


def statement(sql: str) -> str:
    """``UPDATE imcore_conversation``: a statement's verb and first table."""
    table = re.search(r"\b(imcore_\w+)", sql.replace('"', ""))
    return " ".join(filter(None, [sql.split()[0], table and table.group(1)]))


# ---- load ----------------------------------------------------------------------------------

WRK_LUA = r"""
local clients = { %(clients)s }
local call, tag, text = "%(call)s", "%(tag)s", "%(body)s"
local threads, count = {}, 0
function setup(thread)
  count = count + 1
  thread:set("index", count)
  table.insert(threads, thread)
end
function init(args)
  c = clients[(index - 1) %% #clients + 1]
  headers = { ["Authorization"] = "Bearer " .. c[1], ["Content-Type"] = "application/json" }
  n, ok, bad = 0, 0, 0
end
function request()
  n = n + 1
  if call == "send" then
    return wrk.format("POST", "/api/v1/conversations/" .. c[2] .. "/messages", headers,
      '{"body":"' .. text .. '","client_msg_id":"' .. tag .. "-" .. index .. "-" .. n .. '"}')
  elseif call == "read" then
    return wrk.format("POST", "/api/v1/conversations/" .. c[2] .. "/read", headers, '{"seq":1}')
  elseif call == "sync" then
    return wrk.format("GET", "/api/v1/sync?limit=100&since=" .. c[3], headers)
  end
  return wrk.format("GET", "/api/v1/" .. call, headers)
end
function response(status, headers, body)
  if status >= 200 and status < 300 then ok = ok + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local ok_all, bad_all = 0, 0
  for _, t in ipairs(threads) do
    ok_all = ok_all + t:get("ok")
    bad_all = bad_all + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format("BENCH %%d %%d %%d %%d %%d %%d\n", summary.duration, ok_all, bad_all,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk(port: int, clients: list[dict], call: str, seconds: float, tag: str) -> dict:
    lua_clients = ", ".join(f'{{"{c["token"]}", {c["cid"]}, {c["since"]}}}' for c in clients)
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(WRK_LUA % {"clients": lua_clients, "call": call, "tag": tag, "body": BODY})
        lua.flush()
        n = len(clients)
        out = subprocess.run(
            [
                "wrk",
                f"-t{n}",
                f"-c{n}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                lua.name,
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
        )
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed:\n{out.stdout}\n{out.stderr}")
    duration_us, ok, bad, socket_errors, p50, p99 = map(int, line.split()[1:])
    return {
        "rate": ok / (duration_us / 1e6),
        "ok": ok,
        "errors": bad + socket_errors,
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
    }


def postmaster_pid() -> int:
    """The PostgreSQL server's main process: the parent of this session's backend."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return psutil.Process(cursor.fetchone()[0]).ppid()


def measure(port, clients, call, args, web: Processes, celery: Processes, tag: str, pm: int):
    from delivery.pipeline import shard_lengths

    wrk(port, clients, call, args.warmup, f"w{tag}")
    deadline = time.monotonic() + 60
    while sum(shard_lengths()) and time.monotonic() < deadline:
        time.sleep(0.2)
    before = (web.cpu(), cpu_seconds(pm), celery.cpu())
    result = wrk(port, clients, call, args.seconds, tag)
    after = (web.cpu(), cpu_seconds(pm), celery.cpu())
    done = max(result["ok"], 1)
    sides = ("web", "postgres", "celery")
    cpu = {k: (b - a) * 1000 / done for k, a, b in zip(sides, before, after, strict=True)}
    return {**result, "clients": len(clients), "cpu_ms": {**cpu, "total": sum(cpu.values())}}


# ---- pgbench -------------------------------------------------------------------------------


def pgbench_insert(clients: int, seconds: float) -> dict:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_message")
        cursor.execute("CREATE TABLE bench_message (LIKE imcore_message INCLUDING ALL)")
        cursor.execute("CREATE SEQUENCE IF NOT EXISTS bench_message_seq")
        cursor.execute("SELECT min(id) FROM imcore_conversation")
        cid = cursor.fetchone()[0]
        cursor.execute("SELECT min(id) FROM imcore_user")
        uid = cursor.fetchone()[0]
    url = urllib.parse.urlsplit(common.ENV["DATABASE_URL"])
    script = (
        "INSERT INTO bench_message (conversation_id, seq, sender_id, client_msg_id, body, "
        f"created_at, mentions, mention_all) VALUES ({cid}, nextval('bench_message_seq'), {uid}, "
        f"'pg-' || currval('bench_message_seq'), '{BODY}', now(), '{{}}', false) RETURNING id;\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(script)
        f.flush()
        out = subprocess.run(
            [
                "pgbench",
                "-h",
                url.hostname or "127.0.0.1",
                "-p",
                str(url.port or 5432),
                "-U",
                url.username or "postgres",
                "-n",
                "-M",
                "simple",
                "-c",
                str(clients),
                "-j",
                str(min(clients, os.cpu_count() or 1)),
                "-T",
                str(int(seconds)),
                "-f",
                f.name,
                url.path.lstrip("/"),
            ],
            capture_output=True,
            text=True,
        )
    tps = re.search(r"tps = ([\d.]+)", out.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
    if tps is None:
        raise RuntimeError(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    return {"rate": float(tps.group(1)), "latency_ms": float(lat.group(1)) if lat else None}


# ---- the run -------------------------------------------------------------------------------


def configs(names: list[str]) -> dict[str, dict[str, str]]:
    web = {k: v for k, v in procfile().items() if k not in CELERY_ENTRIES}
    known = {"asgi": {"web": ASGI}, "procfile": web}
    return {name: known[name] for name in names}


def run(args) -> dict:
    common.setup_django()
    from django.db import connection

    print("seeding…", flush=True)
    clients = seed(max(args.clients), args.members, args.at)
    counts = per_send_counts(clients[-1])
    machine = common.machine()
    pm = postmaster_pid()
    connection.close()
    entries = procfile()
    celery = Processes({k: entries[k] for k in ("worker", "beat")})
    results: dict[str, list[dict]] = {}
    pg: list[dict] = []
    try:
        for name, commands in configs(args.configs).items():
            port = common.free_port()
            web = Processes(commands, port)
            try:
                web.wait_http()
                rows = results.setdefault(name, [])
                for call in CALLS:
                    for n in args.clients if call in SWEPT else [args.at]:
                        tag = f"{name}-{call}-{n}-{time.monotonic_ns()}"
                        row = measure(port, clients[:n], call, args, web, celery, tag, pm)
                        rows.append({"call": call, **row})
                        print(
                            f"  {name:9} {call:13} {n:3} clients: {row['rate']:8.0f}/s "
                            f"p99 {row['p99_ms']:6.1f} ms, {row['cpu_ms']['total']:.2f} ms CPU",
                            flush=True,
                        )
                        if call == "send" and n == args.at:
                            pg.append(pgbench_insert(n, args.seconds))
                            connection.close()
                            print(
                                f"  pgbench INSERT {n} clients: {pg[-1]['rate']:8.0f}/s", flush=True
                            )
            finally:
                web.stop()
    finally:
        celery.stop()
    return {
        "machine": machine,
        "configs": configs(args.configs),
        "per_send": counts,
        "results": results,
        "pgbench_insert": pg,
    }


def markdown(args, report: dict) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"# Hot API calls over HTTP, {now}, {socket.gethostname()}",
        "",
        f"Machine: {report['machine']}. Load: wrk, one thread and one keep-alive connection "
        f"per client, {args.seconds} s after {args.warmup} s of warm-up; pgbench `-M simple` "
        f"single-row INSERT at {args.at} clients right after each configuration's send at "
        f"{args.at}.",
        "",
        "Configurations: "
        + "; ".join(
            f"`{name}`: " + ", ".join(f"{k}: `{v}`" for k, v in cmds.items())
            for name, cmds in report["configs"].items()
        ),
        "",
        "| configuration | call | clients | requests/s | p50 ms | p99 ms | errors "
        "| CPU ms / request: web / PostgreSQL / Celery / total | / pgbench INSERT |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for (name, rows), pg in zip(report["results"].items(), report["pgbench_insert"], strict=False):
        for r in rows:
            c = r["cpu_ms"]
            ratio = (
                f"{r['rate'] / pg['rate']:.3f}"
                if r["call"] == "send" and r["clients"] == args.at
                else ""
            )
            lines.append(
                f"| {name} | {CALLS[r['call']]} | {r['clients']} | {r['rate']:,.0f} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                f"{c['web']:.2f} / {c['postgres']:.2f} / {c['celery']:.2f} / "
                f"{c['total']:.2f} | {ratio} |"
            )
    for name, pg in zip(report["results"], report["pgbench_insert"], strict=False):
        lines.append(f"\npgbench single-row INSERT beside `{name}`: {pg['rate']:,.0f} tx/s.")
    per = report["per_send"]
    lines += [
        "",
        f"One send (Django's test client, in-process): {len(per['sql'])} SQL statements "
        f"({'; '.join(per['sql'])}), {len(per['redis'])} Redis commands "
        f"({', '.join(per['redis'])}).",
        "",
        f"![requests/s against clients]({common.results_stem('send').name}.png)",
    ]
    return "\n".join(lines)


def plot(args, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SWEPT), figsize=(10, 4))
    for ax, call in zip(axes, SWEPT, strict=True):
        for name, rows in report["results"].items():
            points = [(r["clients"], r["rate"]) for r in rows if r["call"] == call]
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(title=CALLS[call], xlabel="clients", ylabel="requests/s", xscale="log")
        ax.set_xticks(args.clients, [str(c) for c in args.clients])
        ax.legend()
    fig.suptitle(f"requests/s against clients ({socket.gethostname()})")
    fig.tight_layout()
    fig.savefig(f"{common.results_stem('send')}.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="asgi,procfile")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--at", type=int, default=16, help="clients of the other calls")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1, help="(kept for make bench; one run)")
    args = parser.parse_args()
    args.configs = args.configs.split(",")
    args.clients = sorted({int(c) for c in args.clients.split(",")} | {args.at})
    for tool in ("wrk", "pgbench"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (make bench-tools installs it)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with common.broker_stopped_after():
        report = run(args)
    plot(args, report)
    common.write_results("send", markdown(args, report), report)


if __name__ == "__main__":
    main()
