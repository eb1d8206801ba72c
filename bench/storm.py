"""``make bench-storm``: scenario S1 (one 5,000-member group, 10 messages a second) once with
the per-message fan-out and once with the aggregation pipeline, in one run on one machine;
then more and more such groups until the pipeline no longer keeps up.

Each mode gets the same real processes: one Celery worker (prefork, 2 processes), plus
Celery beat (the Timer) for the pipeline; messages are sent through ``message_send`` (the
service behind the API) by sender threads pacing themselves to the target rate. An observer
polls one member's counter hash to time each message from its commit to its count showing.

    python bench/storm.py [--members 5000] [--rate 10] [--seconds 20]
                          [--step-seconds 10] [--max-groups 64] [--no-ceiling]
"""

import argparse
import datetime
import os
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common


@dataclass
class Group:
    conversation_id: int
    sender_id: int
    observer_id: int
    commits: dict[int, float] = field(default_factory=dict)  # seq -> commit time
    seen: dict[int, float] = field(default_factory=dict)  # seq -> time its count showed


def make_groups(n_groups: int, members: int) -> list[Group]:
    from django.contrib.auth.hashers import make_password

    from counters.services import counters_reconcile
    from imcore import services
    from imcore.models import User

    common.reset_data()
    unusable = make_password(None)
    groups = []
    for g in range(n_groups):
        users = User.objects.bulk_create(
            User(username=f"g{g}-u{i}", password=unusable) for i in range(members)
        )
        ids = [u.pk for u in users]
        conversation, _ = services.conversation_create(
            creator=users[0], kind="group", member_ids=ids, title=f"storm {g}"
        )
        counters_reconcile(user_ids=ids)  # every member's counters loaded, as in production
        groups.append(Group(conversation.pk, ids[0], ids[1]))
    return groups


def observe(groups: list[Group], stop: threading.Event) -> None:
    """Poll each group's observer: when its top reaches a seq, every seq up to it showed."""
    from counters import keys
    from counters.redis import get_redis

    client = get_redis()
    last = [0] * len(groups)
    while not stop.is_set():
        pipe = client.pipeline(transaction=False)
        for g in groups:
            # HMGET, which nothing else sends, so its calls can be left out of the counts.
            pipe.hmget(keys.counters(g.observer_id), [keys.top_field(g.conversation_id)])
        now = time.perf_counter()
        for i, (g, (top,)) in enumerate(zip(groups, pipe.execute(), strict=True)):
            top = int(top or 0)
            for seq in range(last[i] + 1, top + 1):
                g.seen[seq] = now
            last[i] = max(last[i], top)
        time.sleep(0.002)


def sample_queue(mode: str, peak: list[int], stop: threading.Event) -> None:
    from counters import pipeline
    from imcore.celery import app

    with app.connection_for_write() as conn:
        broker = conn.default_channel.client
        while not stop.is_set():
            n = sum(pipeline.shard_lengths()) if mode == "pipeline" else broker.llen("counters")
            peak[0] = max(peak[0], n)
            time.sleep(0.05)


def send(groups: list[Group], rate: float, seconds: float, sent: list[int]) -> None:
    """Send to each of ``groups`` ``rate`` messages a second, evenly spread, for ``seconds``."""
    from django.db import connection

    from imcore import services
    from imcore.models import Conversation, User

    convs = {g.conversation_id: Conversation.objects.get(pk=g.conversation_id) for g in groups}
    senders = {g.sender_id: User.objects.get(pk=g.sender_id) for g in groups}
    start = time.perf_counter()
    schedule = sorted(
        (k / rate + i / (rate * len(groups)), i)
        for i in range(len(groups))
        for k in range(int(rate * seconds))
    )
    for due, i in schedule:
        delay = start + due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        g = groups[i]
        message, _ = services.message_send(
            sender=senders[g.sender_id],
            conversation=convs[g.conversation_id],
            body="storm",
            client_msg_id=f"s-{g.conversation_id}-{len(g.commits)}",
        )
        g.commits[message.seq] = time.perf_counter()
        sent[0] += 1
    connection.close()


def run(mode: str, groups: list[Group], rate: float, seconds: float, senders: int = 4) -> dict:
    from django.conf import settings

    from counters import keys
    from counters.redis import get_redis

    settings.COUNTERS_WRITE_PATH = mode
    env = {"COUNTERS_WRITE_PATH": mode}
    worker = common.start_worker(**env)
    beat = (
        common.celery("beat", "--schedule", f"/tmp/imcore-bench-beat-{os.getpid()}", **env)
        if mode == "pipeline"
        else None
    )
    time.sleep(2.5)  # let beat tick once and the worker settle before measuring
    cpu0 = common.group_cpu_seconds(worker) + (common.group_cpu_seconds(beat) if beat else 0)
    for port in (6379, common.BROKER_PORT):
        redis.Redis(port=port).config_resetstat()
    counters_redis, broker_redis = common.redis_info(), common.redis_info(common.BROKER_PORT)
    redis_cpu0 = common.redis_cpu(counters_redis) + common.redis_cpu(broker_redis)
    self_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    stop, peak, sent = threading.Event(), [0], [0]
    threads = [
        threading.Thread(target=observe, args=(groups, stop), daemon=True),
        threading.Thread(target=sample_queue, args=(mode, peak, stop), daemon=True),
    ]
    for t in threads:
        t.start()
    started = time.perf_counter()
    chunks = [groups[i::senders] for i in range(min(senders, len(groups)))]
    sender_threads = [threading.Thread(target=send, args=(c, rate, seconds, sent)) for c in chunks]
    for t in sender_threads:
        t.start()
    for t in sender_threads:
        t.join()
    send_elapsed = time.perf_counter() - started
    drain_deadline = time.monotonic() + 120
    while time.monotonic() < drain_deadline and any(
        len(g.seen) < len(g.commits) or not set(g.commits) <= set(g.seen) for g in groups
    ):
        time.sleep(0.01)
    drained_after = time.perf_counter() - started - send_elapsed
    stop.set()
    for t in threads:
        t.join()
    tasks = common.worker_task_counts()
    cpu_workers = (
        common.group_cpu_seconds(worker) + (common.group_cpu_seconds(beat) if beat else 0) - cpu0
    )
    counters_info = common.redis_info()
    broker_info = common.redis_info(common.BROKER_PORT)
    self_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    common.stop(worker)
    if beat:
        common.stop(beat)
    messages = sent[0]
    latencies = [g.seen[s] - c for g in groups for s, c in g.commits.items() if s in g.seen]
    evalsha = counters_info.get("cmdstat_evalsha", {}).get("calls", 0)
    totals = get_redis().hgetall(keys.METRICS_TOTALS)
    return {
        "mode": mode,
        "groups": len(groups),
        "messages": messages,
        "target_rate": rate * len(groups),
        "rate": messages / send_elapsed,
        "counters_cmds_per_msg": common.commands_total(counters_info) / messages,
        "evalsha_per_msg": evalsha / messages,
        "broker_cmds_per_msg": common.commands_total(broker_info) / messages,
        "tasks_per_msg": sum(tasks.values()) / messages,
        "tasks": tasks,
        # counter-script calls on members (the sender's own mark-read is one per message)
        "writes_per_s": (evalsha - messages) / (send_elapsed + drained_after),
        "p50_ms": common.percentile(latencies, 50) * 1000,
        "p99_ms": common.percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "unseen": sum(len(g.commits) - len(g.seen.keys() & g.commits.keys()) for g in groups),
        "drain_s": drained_after,
        "peak_queue": peak[0],
        "cpu_workers_s": cpu_workers,
        "cpu_redis_s": common.redis_cpu(counters_info) + common.redis_cpu(broker_info) - redis_cpu0,
        "cpu_sender_s": (self_cpu1.ru_utime + self_cpu1.ru_stime)
        - (self_cpu0.ru_utime + self_cpu0.ru_stime),
        "ratio": float(totals.get("logical_updates", 0))
        / max(float(totals.get("writes_out", 1)), 1),
    }


S1_ROWS = [
    ("messages / s sustained (target)", lambda r: f"{r['rate']:.1f} ({r['target_rate']:.0f})"),
    ("Celery tasks / message", lambda r: f"{r['tasks_per_msg']:.2f}"),
    ("queue events / message", lambda r: "1" if r["mode"] == "pipeline" else "1 task"),
    ("counter script calls (EVALSHA) / message", lambda r: f"{r['evalsha_per_msg']:.0f}"),
    ("Redis commands executed / message, counters", lambda r: f"{r['counters_cmds_per_msg']:.0f}"),
    ("Redis commands / message, broker", lambda r: f"{r['broker_cmds_per_msg']:.1f}"),
    ("counter writes / s", lambda r: f"{r['writes_per_s']:,.0f}"),
    ("commit → badge p50 / p99 (ms)", lambda r: f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}"),
    ("messages never seen", lambda r: str(r["unseen"])),
    ("peak queue length", lambda r: f"{r['peak_queue']}"),
    (
        "CPU s: workers+beat / Redis / sender",
        lambda r: f"{r['cpu_workers_s']:.1f} / {r['cpu_redis_s']:.1f} / {r['cpu_sender_s']:.1f}",
    ),
]


def keeps_up(r: dict, interval: float) -> bool:
    return (
        r["rate"] >= 0.95 * r["target_rate"]
        and r["unseen"] == 0
        and r["drain_s"] <= 2 * interval + 1
        and r["p99_ms"] <= 5000
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=10, help="messages a second per group")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--step-seconds", type=float, default=10)
    parser.add_argument("--max-groups", type=int, default=64)
    parser.add_argument("--no-ceiling", action="store_true")
    args = parser.parse_args()
    common.setup_django()
    from django.conf import settings

    lines = [
        f"# Storm benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, {socket.gethostname()}",
        "",
        f"Machine: {common.machine()}.",
        f"S1: 1 group of {args.members:,} members, {args.rate:g} messages/s for "
        f"{args.seconds:g} s; 1 Celery worker (prefork, 2 processes); strategy "
        f"`{settings.COUNTERS_STRATEGY}`; pipeline: {settings.COUNTERS_SHARDS} shards, Timer "
        f"{settings.COUNTERS_FLUSH_INTERVAL:g} s, threshold {settings.COUNTERS_FLUSH_THRESHOLD}.",
        "",
    ]
    print("\n".join(lines), flush=True)
    results = {}
    for mode in ("fanout", "pipeline"):
        groups = make_groups(1, args.members)
        results[mode] = run(mode, groups, args.rate, args.seconds)
        print(f"  {mode}: done", results[mode]["tasks"], flush=True)
    table = ["| S1 | per-message fan-out | pipeline |", "| --- | ---: | ---: |"]
    for name, fmt in S1_ROWS:
        table.append(f"| {name} | {fmt(results['fanout'])} | {fmt(results['pipeline'])} |")
    lines += [*table, ""]
    print("\n".join(table), flush=True)
    if not args.no_ceiling:
        ceiling = [
            "",
            "| groups | msgs/s (target) | p50 / p99 ms | drain s | peak queue |"
            " writes/s | keeps up |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        print("\n".join(ceiling), flush=True)
        best, n = 0, 1
        while n <= args.max_groups:
            r = run("pipeline", make_groups(n, args.members), args.rate, args.step_seconds)
            ok = keeps_up(r, settings.COUNTERS_FLUSH_INTERVAL)
            row = (
                f"| {n} | {r['rate']:.0f} ({r['target_rate']:.0f}) | {r['p50_ms']:.0f} / "
                f"{r['p99_ms']:.0f} | {r['drain_s']:.1f} | {r['peak_queue']} | "
                f"{r['writes_per_s']:,.0f} | {'yes' if ok else 'no'} |"
            )
            ceiling.append(row)
            print(row, flush=True)
            if not ok:
                break
            best, n = n, n * 2
        verdict = (
            f"Ceiling: the pipeline kept up with {best} group(s) of {args.members:,} "
            f"members at {args.rate:g} messages/s each ({best * args.members * args.rate:,.0f}"
            " logical counter updates/s)"
            + ("" if n <= args.max_groups else f" (stopped at --max-groups {args.max_groups})")
            + "."
        )
        print("\n" + verdict)
        lines += [*ceiling, "", verdict]
    out = Path(
        common.ROOT
        / "bench"
        / "results"
        / f"storm-{datetime.date.today()}-{socket.gethostname()}.md"
    )
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {out.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
