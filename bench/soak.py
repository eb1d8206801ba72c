"""``make bench-soak``: the Procfile's stack (``bin/stack.py``) under steady locust load
(``bench/locustfile_soak.py``) with idle WebSockets; memory sampled, every send, ``last_seq``
and unread count checked after draining; exits 1 on growth or any failure (README)."""

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common, push

common.django_setup()  # the imports below need Django's settings
import redis
from django.db import connection

from counters.selectors import counters_peek, counters_truth_from_rows, counters_truth_rows
from counters.services import counters_reconcile

QUICK = (  # --quick: smoke sizes, one run each
    "--minutes 1 --probe-seconds 8 --probe-users 4 --users 8 --groups 2 --members 4 "
    "--sockets 20 --sample-seconds 5"
)

LOCUSTFILE = Path(__file__).with_name("locustfile_soak.py")
NAMES = ("web", "app", "ws", "worker", "beat", "flower")  # the Procfile's entries
ROLES = ("nginx", "uwsgi", "granian", "gunicorn", "uvicorn", "spawn_main", "flower", "beat",
         "worker")  # fmt: skip
POOLS = ("uwsgi", "granian", "gunicorn", "worker")  # their workers are children of their own kind


def seed(args) -> tuple[list[dict], list[str], list[int]]:
    """Senders in groups and idle users, a device each; returns the senders' devices, the
    idle tokens, and the ids of every group member."""
    common.reset_data()
    senders = args.users // args.groups
    size = max(args.members, senders)
    ids = common.make_users(args.groups * size + args.sockets, "soak")
    tokens = {d.user_id: d.token for d in common.make_devices(ids)}
    members, devices = ids[: args.groups * size], []
    for g in range(args.groups):
        cid = common.make_group(members[g * size : (g + 1) * size], f"g{g}", reconcile=False).pk
        devices += [{"token": tokens[u], "user_id": u, "conversation": cid}
                    for u in members[g * size : g * size + senders]]  # fmt: skip
    counters_reconcile(user_ids=members)
    return devices, [tokens[u] for u in ids[args.groups * size :]], members


def locust(port: int, data: Path, user: str, users: int, seconds: int, rate: float = 0):
    """Headless locust, ``users`` of class ``user`` for ``seconds`` at ``rate`` requests/s
    in all; its CSV files, log and acknowledged sends (``.acked``) beside ``data``."""
    stem = data.with_suffix("")
    argv = (
        f"-m locust -f {LOCUSTFILE} {user} --headless -u {users} -r {users} -t {seconds}s "
        f"--stop-timeout 30 --host http://127.0.0.1:{port} --csv {stem} --csv-full-history "
        "--only-summary --loglevel WARNING"
    )
    env = {"SOAK_DATA": data, "SOAK_ACKED": f"{stem}.acked", "SOAK_RATE_PER_USER": rate / users}
    with open(f"{stem}.log", "w") as log:
        env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        return subprocess.Popen([sys.executable, *argv.split()], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip


def history(data: Path) -> list[tuple[int, int, int]]:
    """(unix time, requests, failures) so far, each second, from locust's full history."""
    with open(f"{data.with_suffix('')}_stats_history.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    return [(int(r["Timestamp"]), int(r["Total Request Count"]), int(r["Total Failure Count"]))
            for r in rows]  # fmt: skip


def sample(stack: common.stack, sockets: push.Holders, redis_servers: dict) -> dict:
    """Each process's RSS by role and number (``uwsgi child 1``…: a role is the first of ROLES
    its command line holds; a pool's workers are children of their own kind), Redis's
    used_memory, PostgreSQL's sessions on the database, the sockets open, the load."""
    row, found = {"time": time.time()}, {}
    for proc in sorted(stack.programs(), key=lambda p: p.pid):
        with contextlib.suppress(psutil.Error):
            mine, parent = (next((r for r in ROLES if r in " ".join(p.cmdline())), None)
                            for p in (proc, proc.parent()))  # fmt: skip
            if mine and proc.name() not in ("sh", "dash", "bash"):
                role = f"{mine} child" if mine in POOLS and parent == mine else mine
                found.setdefault(role, []).append(proc)
    for role, procs in sorted(found.items()):
        for i, proc in enumerate(procs, 1):
            with contextlib.suppress(psutil.Error):
                row[f"{role} {i} RSS MiB"] = proc.memory_info().rss / 2**20
    for name, server in redis_servers.items():
        row[f"{name} used_memory MiB"] = server.info("memory")["used_memory"] / 2**20
    with connection.cursor() as cursor:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        cursor.execute(f"{sql} AND pid <> pg_backend_pid()")
        row["PostgreSQL connections"] = cursor.fetchone()[0]
    row["sockets open"] = len(sockets.ask("status")[0]["open"])
    return row


def check_data(acked: set[str], member_ids: list[int]) -> dict:
    """Lost sends, conversations whose last_seq is off, users whose Redis counts are off."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT client_msg_id FROM imcore_message")
        stored = {r[0] for r in cursor.fetchall()}
        cursor.execute(
            "SELECT c.id FROM imcore_conversation c LEFT JOIN imcore_message m "
            "ON m.conversation_id = c.id GROUP BY c.id "
            "HAVING c.last_seq <> count(m.id) OR c.last_seq <> coalesce(max(m.seq), 0)"
        )
        seq_off = [r[0] for r in cursor.fetchall()]
    truth = counters_truth_rows(user_ids=member_ids)
    is_off = lambda u: counters_peek(user_id=u) != counters_truth_from_rows(truth[u])  # noqa: E731
    unread_off = [u for u in member_ids if is_off(u)]
    return {"acked": len(acked), "stored": len(stored), "lost": len(acked - stored),
            "last_seq_off": seq_off, "unread_off_users": unread_off}  # fmt: skip


def growth(rows: list[dict], key: str, window: int, limit: float) -> dict:
    """The highest value of the last ``window`` rows against the first of them, in %."""
    rows, before = rows[-1 - window :], rows[: -1 - window]
    if not rows[0].get(key) or any(r.get(key) is None for r in rows):
        return {"series": key, "growth_pct": None, "pass": False}
    top = max(r[key] for r in rows)
    pct = (top - rows[0][key]) / rows[0][key] * 100
    if key == "PostgreSQL connections":  # pools: fail only on a new high in the window
        limit = 0 if top > max((r[key] for r in before), default=0) else float("inf")
    return {"series": key, "growth_pct": pct, "pass": pct <= limit}


def plot(samples: list[dict], series: list[str]) -> str:
    minutes = [(s["time"] - samples[0]["time"]) / 60 for s in samples]
    fig, axes = common.figure("soak", "Soak: memory over time", 3, size=(10, 3.3))
    panels = {"process RSS (MiB)": [k for k in series if "RSS" in k],
              "Redis used_memory (MiB)": [k for k in series if "used_memory" in k],
              "PostgreSQL sessions, idle sockets (count)": series[-2:]}  # fmt: skip
    for ax, (label, keys) in zip(axes, panels.items(), strict=True):
        for key in keys:
            name = key.replace(" RSS MiB", "").replace(" MiB", "")
            ax.plot(minutes, [s.get(key) for s in samples], marker=".", label=name)
        ax.set(ylabel=label, ylim=(0, None), xlabel="time since the soak load started (minutes)")
    axes[2].set_yscale("symlog")
    return common.save_figure(fig, "soak")


def markdown(args, r: dict) -> str:
    short = {k: k.replace(" RSS MiB", "").replace("used_memory ", "") for k in r["series"]}
    c, growth = r["checks"], {g["series"]: g for g in r["growth"]}
    lines = common.header(
        "Soak", r["machine"],
        f"`bin/stack.py` ({', '.join(NAMES)}); probe {r['capacity']:.1f} sends/s; "
        f"{args.minutes} min at {args.load:.0%} of it from {args.users} locust users, "
        f"{args.sockets} idle WebSockets. MiB; requests and errors of the minute before the row; "
        f"last row: the growth over the last {r['window']} min (limit {args.limit_percent:g} %).",
    )  # fmt: skip
    rows = [[i, *(f"{row.get(k, float('nan')):.1f}" if "MiB" in k else row[k] for k in short),
             row["requests"], row["errors"]] for i, row in enumerate(r["minutes"])]  # fmt: skip
    grew = [growth.get(k, {"growth_pct": None, "pass": True}) for k in short]
    rows.append(["growth", *(("n/a" if g["growth_pct"] is None else f"{g['growth_pct']:+.1f} %")
                             + ("" if g["pass"] else " FAIL") for g in grew), "", ""])  # fmt: skip
    lines += common.table(["min", *short.values(), "requests", "errors"], rows)
    lines.append(
        f"\nErrors {r['errors']} of {r['requests']} requests (locust {r['failures']}, sockets "
        f"lost {r['sockets_lost']}, 5xx {r['server_5xx']}, tracebacks {r['tracebacks']}). Sends "
        f"answered {c['acked']}, lost {c['lost']}; last_seq off {len(c['last_seq_off'])}, unread "
        f"off {len(c['unread_off_users'])} users. **{'PASS' if r['pass'] else 'FAIL'}**"
    )
    return "\n".join(lines)


def soak(args, work: Path) -> dict:
    """Seed, start the stack and the sockets, probe, soak, drain, check; the raw results."""
    devices, idle_tokens, member_ids = seed(args)
    env = {"FLOWER_PORT": common.free_port()}
    with common.stack(common.procfile(*NAMES), **env) as stack:
        sockets = push.Holders(stack.port, 1)
        try:
            failures = sockets.open(idle_tokens, range(len(idle_tokens)), 50)["reasons"]
            servers = {"Redis": redis.Redis.from_url(common.ENV["REDIS_URL"]),
                       "broker": redis.Redis(port=common.BROKER_PORT)}  # fmt: skip
            probe, run = work / "probe.json", work / "soak.json"
            probe.write_text(json.dumps({"tag": "probe", "devices": devices}))
            run.write_text(json.dumps({"tag": "soak", "devices": devices}))
            locust(stack.port, probe, "ProbeDevice", args.probe_users, args.probe_seconds).wait()
            hist = history(probe)
            start = next(h for h in hist if h[0] >= hist[0][0] + 5)
            capacity = (hist[-1][1] - start[1]) / max(hist[-1][0] - start[0], 1)
            seconds = args.minutes * 60
            load = locust(stack.port, run, "SoakDevice", args.users, seconds, args.load * capacity)
            t0, samples = time.time(), []
            for k in range(seconds // args.sample_seconds + 1):
                time.sleep(max(0.0, t0 + k * args.sample_seconds - time.time()))
                samples.append(sample(stack, sockets, servers))
            load.wait()
            sockets_open = len(sockets.ask("status")[0]["open"])
        finally:
            sockets.stop()
        common.drain(120)
        acked = {line for f in work.glob("*.acked") for line in f.read_text().split()}
        checks = check_data(acked, member_ids)
    log = stack.output
    return {
        "capacity": capacity, "samples": samples, "history": history(run), "checks": checks,
        "sockets_open": sockets_open, "socket_failures": failures,
        "access_lines": len(re.findall(r'HTTP/1\.1" \d\d\d', log)),
        "server_5xx": len(re.findall(r'HTTP/1\.1" 5\d\d', log)),
        "tracebacks": log.count("Traceback"),
        "first_traceback": log[log.find("Traceback") :][:2000] if "Traceback" in log else None,
    }  # fmt: skip


def main() -> None:
    args = common.parse(
        __doc__, QUICK, minutes=10, load=(0.8, "share of the capacity"), probe_seconds=20,
        probe_users=16, users=(32, "senders (locust users)"), groups=4, sockets=500,
        members=(10, "members of each group"), sample_seconds=(10, "a divisor of 60"),
        window_minutes=5, limit_percent=5.0,
    )  # fmt: skip
    if 60 % args.sample_seconds:
        sys.exit("--sample-seconds takes a divisor of 60")
    with common.section(), tempfile.TemporaryDirectory() as work:
        r = soak(args, Path(work))
    hist, minutes, previous = r["history"], r["samples"][:: 60 // args.sample_seconds], (0, 0)
    for row in minutes:  # requests and failures in the minute up to each row
        now = ([h[1:] for h in hist if h[0] <= row["time"]] or [(0, 0)])[-1]
        row["requests"], row["errors"] = now[0] - previous[0], now[1] - previous[1]
        previous = now
    series = [k for k in r["samples"][-1] if "MiB" in k]
    series += ["PostgreSQL connections", "sockets open"]
    window, c = min(args.window_minutes, args.minutes // 2), r["checks"]
    r["growth"] = [growth(minutes, k, window, args.limit_percent) for k in series[:-1]]
    r["failures"], r["sockets_lost"] = hist[-1][2], args.sockets - r["sockets_open"]
    r["errors"] = r["failures"] + r["sockets_lost"] + r["server_5xx"] + r["tracebacks"]
    bad = c["lost"] or c["last_seq_off"] or c["unread_off_users"] or r["errors"]
    r |= {"machine": common.machine(), "args": vars(args), "series": series, "minutes": minutes,
          "window": window, "requests": hist[-1][1],
          "pass": all(g["pass"] for g in r["growth"]) and not bad}  # fmt: skip
    common.write_results("soak", markdown(args, r) + "\n\n" + plot(r["samples"], series), r)
    sys.exit(0 if r["pass"] else 1)


if __name__ == "__main__":
    main()
