"""``make bench-storm``: scenario S1 (one 5,000-member group, 10 messages a second) with each
counter write path (per-message fan-out, the aggregation pipeline, celery-batches), several
times in interleaved order on one machine; then, once, more and more such groups until the
pipeline no longer keeps up.

Each path gets the same real processes: one Celery worker (prefork, 2 processes) started with
``DELIVERY_WRITE_PATH`` set, so it is configured as ``imcore.settings`` decides for that path
(for ``batches``: the prefetch that lets celery-batches fill its buffer), plus Celery beat (the
Timer) for the pipeline; messages are sent through ``message_send`` (the service behind the
API) by sender threads pacing themselves to the target rate. An observer polls one member's
counter hash to time each message from its commit to its count showing.

    python bench/storm.py [--members 5000] [--rate 10] [--seconds 20] [--runs 3]
                          [--paths fanout,pipeline,batches] [--step-seconds 10]
                          [--max-groups 64] [--no-ceiling]
"""

import argparse
import datetime
import json
import os
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

# The Redis server of the counters (and sync entries): its INFO is what the figures count.
COUNTERS_PORT = urlsplit(common.ENV["REDIS_URL"]).port or 6379


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


def held(mode: str, broker: redis.Redis, own: dict[str, int]) -> tuple[int, int]:
    """What the write path holds now: (the pipeline's stream events, waiting or read and
    unacknowledged, or for the Celery paths the task messages in the broker, waiting in the
    ``counters`` queue or delivered and unacknowledged: prefetched, in celery-batches' buffer,
    or running; shard locks held by a running aggregator). ``own`` counts the commands this
    sends, which the figures leave out (LLEN is left out by ``common.NOT_COUNTED``)."""
    from django.conf import settings

    from counters.redis import get_redis
    from delivery import keys

    if mode == "pipeline":
        shards = range(settings.COUNTERS_SHARDS)
        pipe = get_redis().pipeline(transaction=False)
        for shard in shards:
            pipe.xlen(keys.shard_stream(shard))
        pipe.exists(*[keys.shard_lock(shard) for shard in shards])
        *lengths, locks = pipe.execute()
        own["counters"] += len(shards) + 1
        return sum(lengths), locks
    pipe = broker.pipeline(transaction=False)
    pipe.llen("counters")
    pipe.hlen("unacked")
    own["broker"] += 1
    return sum(pipe.execute()), 0


def sample_queue(mode: str, peak: list[int], own: dict[str, int], stop: threading.Event) -> None:
    """The peak of what the write path holds (see :func:`held`)."""
    from imcore.celery import app

    with app.connection_for_write() as conn:
        while not stop.is_set():
            peak[0] = max(peak[0], held(mode, conn.default_channel.client, own)[0])
            time.sleep(0.05)


def worker_stats() -> tuple[dict[str, int], int]:
    """(tasks each worker ran, by name, summed; the workers' prefetch count, summed)."""
    from imcore.celery import app

    with app.connection_for_write() as conn:
        # One worker runs: return on its reply, so the count's window is the measured one.
        stats = app.control.inspect(timeout=2, connection=conn, limit=1).stats() or {}
    totals: dict[str, int] = {}
    for worker in stats.values():
        for name, n in worker.get("total", {}).items():
            totals[name] = totals.get(name, 0) + n
    prefetch = sum(int(w.get("prefetch_count") or 0) for w in stats.values())
    return totals, prefetch


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

    from counters.redis import get_redis
    from delivery import keys
    from imcore.celery import app

    settings.DELIVERY_WRITE_PATH = mode
    env = {"DELIVERY_WRITE_PATH": mode}
    worker = common.start_worker(**env)
    beat = (
        common.celery("beat", "--schedule", f"/tmp/imcore-bench-beat-{os.getpid()}", **env)
        if mode == "pipeline"
        else None
    )
    time.sleep(2.5)  # let beat tick once and the worker settle before measuring
    tasks0, prefetch = worker_stats()
    cpu0 = common.group_cpu_seconds(worker) + (common.group_cpu_seconds(beat) if beat else 0)
    for port in (COUNTERS_PORT, common.BROKER_PORT):
        redis.Redis(port=port).config_resetstat()
    counters_redis = common.redis_info(COUNTERS_PORT)
    broker_redis = common.redis_info(common.BROKER_PORT)
    redis_cpu0 = common.redis_cpu(counters_redis) + common.redis_cpu(broker_redis)
    self_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    stop, peak, sent, own = threading.Event(), [0], [0], {"counters": 0, "broker": 0}
    threads = [
        threading.Thread(target=observe, args=(groups, stop), daemon=True),
        threading.Thread(target=sample_queue, args=(mode, peak, own, stop), daemon=True),
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
    drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < drain_deadline and any(
        len(g.seen) < len(g.commits) or not set(g.commits) <= set(g.seen) for g in groups
    ):
        time.sleep(0.01)
    drained_after = time.perf_counter() - started - send_elapsed
    stop.set()
    for t in threads:
        t.join()
    # The observed member has seen every message; the rest of the last batches (the other
    # members, the sync entries, the acks) may still run: wait for the path to hold nothing,
    # so the figures include that work and stopping the worker interrupts none of it.
    with app.connection_for_write() as conn:
        while time.monotonic() < drain_deadline and any(
            held(mode, conn.default_channel.client, own)
        ):
            time.sleep(0.05)
    idle_after = time.perf_counter() - started - send_elapsed
    tasks1, _ = worker_stats()
    cpu_workers = (
        common.group_cpu_seconds(worker) + (common.group_cpu_seconds(beat) if beat else 0) - cpu0
    )
    counters_info = common.redis_info(COUNTERS_PORT)
    broker_info = common.redis_info(common.BROKER_PORT)
    self_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    common.stop(worker)
    if beat:
        common.stop(beat)
    messages = sent[0]
    latencies = [g.seen[s] - c for g in groups for s, c in g.commits.items() if s in g.seen]
    evalsha = counters_info.get("cmdstat_evalsha", {}).get("calls", 0)
    totals = get_redis().hgetall(keys.METRICS_TOTALS)
    flushes = [json.loads(f) for f in get_redis().lrange(keys.METRICS_FLUSHES, 0, -1)]
    tasks = {name: n - tasks0.get(name, 0) for name, n in tasks1.items() if n - tasks0.get(name, 0)}
    if mode == "batches":
        # celery-batches runs the buffered requests itself, outside the worker's task
        # bookkeeping: its runs are the flushes the task recorded.
        tasks["counters.batch_message (batch runs)"] = int(totals.get("flushes", 0))
    counter_tasks = sum(n for name, n in tasks.items() if name.startswith("counters."))
    return {
        "mode": mode,
        "groups": len(groups),
        "messages": messages,
        "target_rate": rate * len(groups),
        "rate": messages / send_elapsed,
        "counters_cmds_per_msg": (common.commands_total(counters_info) - own["counters"])
        / messages,
        "evalsha_per_msg": evalsha / messages,
        "broker_cmds_per_msg": (common.commands_total(broker_info) - own["broker"]) / messages,
        "tasks_per_msg": counter_tasks / messages,
        "other_tasks_per_msg": (sum(tasks.values()) - counter_tasks) / messages,
        "tasks": tasks,
        "prefetch": prefetch,
        # counter-script calls on members (the sender's own mark-read is one per message)
        "writes_per_s": (evalsha - messages) / (send_elapsed + drained_after),
        "p50_ms": common.percentile(latencies, 50) * 1000,
        "p99_ms": common.percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "unseen": sum(len(g.commits) - len(g.seen.keys() & g.commits.keys()) for g in groups),
        "drain_s": drained_after,
        "idle_s": idle_after,
        "peak_queue": peak[0],
        "cpu_workers_s": cpu_workers,
        "cpu_redis_s": common.redis_cpu(counters_info) + common.redis_cpu(broker_info) - redis_cpu0,
        "cpu_sender_s": (self_cpu1.ru_utime + self_cpu1.ru_stime)
        - (self_cpu0.ru_utime + self_cpu0.ru_stime),
        "flushes": int(totals.get("flushes", 0)),
        # the applied batches (pipeline: aggregator batches; celery-batches: batch runs)
        "flush_events": common.median([f["events_in"] for f in flushes]),
        "flush_ms": common.median([f["duration_ms"] for f in flushes]),
        "flush_age_max_ms": max((f["batch_age_ms"] for f in flushes), default=float("nan")),
        "ratio": float(totals.get("logical_updates", 0))
        / max(float(totals.get("writes_out", 1)), 1),
    }


PATHS = {"fanout": "per-message fan-out", "pipeline": "pipeline", "batches": "celery-batches"}
QUEUE_EVENTS = {"fanout": "1 task", "pipeline": "1 stream event", "batches": "1 task (buffered)"}
DRAIN_TIMEOUT_S = 120


def med(runs: list[dict], key: str, fmt: str) -> str:
    return fmt.format(common.median([r[key] for r in runs]))


def spread(runs: list[dict], key: str, fmt: str = "{:.0f}") -> str:
    return common.spread([r[key] for r in runs], fmt)


S1_ROWS = [
    (
        "messages / s sustained (target)",
        lambda rs: f"{med(rs, 'rate', '{:.1f}')} ({rs[0]['target_rate']:.0f})",
    ),
    ("Celery task runs / message (counters.*)", lambda rs: med(rs, "tasks_per_msg", "{:.2f}")),
    ("queue events / message", lambda rs: QUEUE_EVENTS[rs[0]["mode"]]),
    (
        "counter + sync script calls (EVALSHA) / message",
        lambda rs: med(rs, "evalsha_per_msg", "{:,.0f}"),
    ),
    (
        "Redis commands executed / message, counters + sync",
        lambda rs: med(rs, "counters_cmds_per_msg", "{:,.0f}"),
    ),
    ("Redis commands / message, broker", lambda rs: med(rs, "broker_cmds_per_msg", "{:.1f}")),
    ("counter writes / s", lambda rs: med(rs, "writes_per_s", "{:,.0f}")),
    (
        "logical updates per counter write",
        lambda rs: "1" if rs[0]["mode"] == "fanout" else med(rs, "ratio", "{:.1f}"),
    ),
    ("commit → badge p50 (ms)", lambda rs: spread(rs, "p50_ms")),
    ("commit → badge p99 (ms)", lambda rs: spread(rs, "p99_ms")),
    (
        "observed member caught up after the last send (s)",
        lambda rs: spread(rs, "drain_s", "{:.1f}"),
    ),
    ("all work done after the last send (s)", lambda rs: spread(rs, "idle_s", "{:.1f}")),
    (
        "batches applied: messages each / ms each / oldest wait max ms",
        lambda rs: (
            "n/a"
            if rs[0]["mode"] == "fanout"
            else f"{med(rs, 'flush_events', '{:.0f}')} / {med(rs, 'flush_ms', '{:,.0f}')} / "
            f"{med(rs, 'flush_age_max_ms', '{:,.0f}')}"
        ),
    ),
    ("messages never seen", lambda rs: spread(rs, "unseen")),
    ("peak queue length (see below)", lambda rs: med(rs, "peak_queue", "{:.0f}")),
    ("worker prefetch (messages)", lambda rs: med(rs, "prefetch", "{:.0f}")),
    (
        "CPU s: workers+beat / Redis / sender",
        lambda rs: (
            f"{med(rs, 'cpu_workers_s', '{:.1f}')} / {med(rs, 'cpu_redis_s', '{:.1f}')}"
            f" / {med(rs, 'cpu_sender_s', '{:.1f}')}"
        ),
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
    parser.add_argument("--runs", type=int, default=3, help="S1 runs per write path")
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"write paths for S1, comma-separated, among {', '.join(PATHS)}",
    )
    parser.add_argument("--step-seconds", type=float, default=10)
    parser.add_argument("--max-groups", type=int, default=64)
    parser.add_argument("--no-ceiling", action="store_true")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - set(PATHS) or args.runs < 1:
        parser.error(f"--paths takes some of {', '.join(PATHS)}; --runs at least 1")
    began, at = time.perf_counter(), datetime.datetime.now()
    common.setup_django()
    from django.conf import settings

    machine = common.machine()
    lines = [
        f"# Storm benchmark, {at:%Y-%m-%d %H:%M}, {socket.gethostname()}",
        "",
        f"Machine: {machine}.",
        f"S1: 1 group of {args.members:,} members, {args.rate:g} messages/s for "
        f"{args.seconds:g} s; 1 Celery worker (prefork, 2 processes); strategy "
        f"`{settings.COUNTERS_STRATEGY}`; pipeline: {settings.COUNTERS_SHARDS} shards, Timer "
        f"{settings.COUNTERS_FLUSH_INTERVAL:g} s, threshold {settings.COUNTERS_FLUSH_THRESHOLD}; "
        f"celery-batches: flush every {settings.COUNTERS_BATCHES_FLUSH_EVERY} messages or "
        f"{settings.COUNTERS_FLUSH_INTERVAL:g} s.",
        "",
    ]
    print("\n".join(lines), flush=True)
    results: dict[str, list[dict]] = {p: [] for p in paths}
    for n in range(args.runs):
        for mode in paths:  # interleaved, so a slow spell of the machine hits every path
            groups = make_groups(1, args.members)
            r = run(mode, groups, args.rate, args.seconds)
            results[mode].append(r)
            print(
                f"  run {n + 1}/{args.runs} {mode}: p50 {r['p50_ms']:.0f} ms, p99 "
                f"{r['p99_ms']:.0f} ms, unseen {r['unseen']}, tasks {r['tasks']}",
                flush=True,
            )
    runs_note = "median of 1 run" if args.runs == 1 else f"median of {args.runs} runs"
    table = [
        f"| S1 ({runs_note}) | " + " | ".join(PATHS[p] for p in paths) + " |",
        "| --- |" + " ---: |" * len(paths),
    ]
    for name, fmt in S1_ROWS:
        table.append(f"| {name} | " + " | ".join(fmt(results[p]) for p in paths) + " |")
    lines += [
        *table,
        "",
        f"Each cell is the {runs_note} (S1 ran for each path in turn, "
        f"{' → '.join(paths)}, {args.runs} time(s)); latencies and times after the last "
        "send show median (min..max). Peak queue length: the pipeline's stream events "
        "(waiting or read and unacknowledged); for the Celery paths the task messages in the "
        "broker, waiting in the `counters` queue or delivered to the worker and unacknowledged "
        "(prefetched, in celery-batches' buffer, or in a running batch). All work done: "
        "until the path holds nothing (every batch or task acknowledged); the figures include "
        "the work until then. Batches applied: the median batch's messages and duration, and "
        "the longest a message waited for its batch (from the flushes both paths record). "
        "Celery task runs count the worker's `counters.*` tasks; celery-batches' batch runs "
        "are counted from the flushes it recorded (the worker's own task counts leave them "
        "out)."
        + other_tasks_note(results)
        + " Redis commands and CPU are the whole servers' (INFO): anything else using Redis "
        f"on {COUNTERS_PORT} during a run is counted too.",
        "",
        *observations(results, settings.COUNTERS_FLUSH_INTERVAL),
    ]
    data = {
        "at": at.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": machine,
        "args": vars(args),
        "s1": {p: {"runs": rs, "median": medians(rs)} for p, rs in results.items()},
    }
    if not args.no_ceiling:
        ceiling = [
            "Ceiling search (pipeline only, one pass):",
            "",
            "| groups | msgs/s (target) | p50 / p99 ms | drain s | peak queue |"
            " writes/s | keeps up |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        print("\n".join(ceiling), flush=True)
        best, n, steps = 0, 1, []
        while n <= args.max_groups:
            r = run("pipeline", make_groups(n, args.members), args.rate, args.step_seconds)
            steps.append(r)
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
            + f"; {args.step_seconds:g} s a step, one pass."
        )
        print("\n" + verdict)
        lines += [*ceiling, "", verdict, ""]
        data["ceiling"] = {"steps": steps, "best_groups": best}
    elapsed = time.perf_counter() - began
    lines.append(f"Total run time: {elapsed / 60:.1f} min ({elapsed:.0f} s).")
    data["elapsed_s"] = elapsed
    common.write_results("storm", "\n".join(lines), data)


def medians(runs: list[dict]) -> dict:
    return {
        k: common.median([r[k] for r in runs])
        for k, v in runs[0].items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def observations(results: dict[str, list[dict]], interval: float) -> list[str]:
    """Notes on figures that would look wrong without an explanation."""
    notes = []
    for mode, runs in results.items():
        if any(r["unseen"] or r["idle_s"] >= DRAIN_TIMEOUT_S for r in runs):
            notes.append(
                f"{PATHS[mode]}: the work was not done {DRAIN_TIMEOUT_S} s after the last send "
                "in some run(s); its figures stop there (messages never seen, CPU and commands "
                "left out)."
            )
    batches = results.get("batches")
    if batches and common.median([r["flush_age_max_ms"] for r in batches]) > 3000 * interval:
        notes.append(
            "celery-batches: messages waited up to "
            f"{common.median([r['flush_age_max_ms'] for r in batches]) / 1000:.1f} s for their "
            f"batch. It cuts a batch every {interval:g} s (or every COUNTERS_BATCHES_FLUSH_EVERY "
            "messages) whatever is already waiting, and each batch costs a counter and an "
            "entries call per member however few messages it folds; when a batch takes longer "
            "than the interval times the worker's processes, batches queue in the pool (two "
            "run at once, writing the same members) and the wait grows until the storm ends. "
            "The pipeline's one aggregator per shard reads everything queued instead, so its "
            "batches grow and their number falls when it is behind."
        )
    return [line for n in notes for line in (n, "")]


def other_tasks_note(results: dict[str, list[dict]]) -> str:
    """Tasks the worker ran besides the write path's (beat's schedule in the pipeline runs)."""
    parts = []
    for mode, runs in results.items():
        names = sorted({n for r in runs for n in r["tasks"] if not n.startswith("counters.")})
        if names:
            per_msg = common.median([r["other_tasks_per_msg"] for r in runs])
            parts.append(f"{PATHS[mode]}: {', '.join(names)} ({per_msg:.2f} / message)")
    return (" Other tasks the worker ran, not counted: " + "; ".join(parts) + ".") if parts else ""


if __name__ == "__main__":
    main()
