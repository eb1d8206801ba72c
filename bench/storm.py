"""``make bench-storm``: a large group's messages through channel mode, the aggregation pipeline
and the per-message fan-out (issue 13): cost per message by group size, commit -> unread
visible, the ceiling in groups (commit -> live delivery is in push.py). README, Benchmarks."""

import contextlib
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter, namedtuple
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

common.django_setup()  # the imports below need Django's settings
from django.conf import settings
from django.db import connections

from counters import keys
from counters.redis import get_redis
from counters.selectors import counters_get
from delivery import keys as delivery_keys
from delivery.pipeline import shard_lengths
from delivery.services import delivery_message_committed
from imcore import services
from imcore.models import Conversation, User

QUICK = (  # --quick: smoke sizes, one run each
    "--sizes 500,5000 --seconds 2 --latency-seconds 3 --members 500 --max-groups 2 "
    "--step-seconds 2 --senders 2"
)

# The Redis server of the counters, sync and channel layer: its INFO is what the figures count.
COUNTERS_PORT = urlsplit(common.ENV["REDIS_URL"]).port or 6379
PATHS = {"channel": "channel mode", "pipeline": "pipeline", "fanout": "fan-out"}
CEILING_STEPS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
DRAIN_TIMEOUT_S = 90
LATENCY_SIZE = 5000  # the size whose runs last --latency-seconds
BUSY = ("user", "nice", "system", "irq", "softirq")  # the machine's (guest is in user already)


Group = namedtuple("Group", "conversation_id sender_id observer_id members")


def make_group(path: str, ids: list[int], reconcile: bool = True) -> Group:
    """A group of ``ids`` (the first sends, the second observes) in the path's mode."""
    conversation = common.make_group(ids, path, path == "channel", reconcile)
    assert (conversation.mode == Conversation.Mode.CHANNEL) == (path == "channel")
    return Group(conversation.pk, ids[0], ids[1], len(ids))


@contextlib.contextmanager
def stack(path: str, senders: int):
    """A Celery worker and beat for ``path``, and ``senders`` sender processes (spawned: a
    forked one would share the parent's pooled PostgreSQL connections); both read the path
    from the environment."""
    path = os.environ["DELIVERY_WRITE_PATH"] = "fanout" if path == "fanout" else "pipeline"
    settings.DELIVERY_WRITE_PATH = path
    with common.stack(common.WORKER, http=False, settle=2.5) as workers:
        pool = multiprocessing.get_context("spawn").Pool(senders)
        try:
            yield workers, pool
        finally:
            pool.terminate()


def calls(port: int) -> Counter:
    """Commands the server ran since its last CONFIG RESETSTAT (inside scripts included), by
    name; the observer's INFO and RESETSTAT left out."""
    own, stats = ("cmdstat_info", "cmdstat_config"), redis.Redis(port=port).info("commandstats")
    return Counter({k: v["calls"] for k, v in stats.items() if not k.startswith(own)})


def read_cost(user_id: int, n: int = 20) -> Counter:
    """Commands one ``counters_get(user_id)`` sends, by name (so the observer's are taken out)."""
    counters_get(user_id=user_id)  # a rebuild, if the hash is not loaded, is not its cost
    before = calls(COUNTERS_PORT)
    for _ in range(n):
        counters_get(user_id=user_id)
    after = calls(COUNTERS_PORT)
    return Counter({k: (after[k] - before.get(k, 0)) / n for k in after if after[k] > before[k]})


def held(own: Counter, own_broker: Counter) -> int:
    """What the write path holds now: the pipeline's stream events (waiting, or read and not
    acknowledged), its shard locks held, and the broker's ``counters`` tasks (waiting, or
    delivered and not acknowledged); the commands it took counted as the observer's own."""
    shards = range(settings.COUNTERS_SHARDS)
    locks = get_redis().exists(*[delivery_keys.shard_lock(n) for n in shards])
    broker = redis.Redis(port=common.BROKER_PORT).pipeline(transaction=False)
    own.update({"cmdstat_xlen": len(shards), "cmdstat_exists": 1})
    own_broker.update({"cmdstat_llen": 1, "cmdstat_hlen": 1})
    return sum(shard_lengths()) + locks + sum(broker.llen("counters").hlen("unacked").execute())


def send(groups: list[tuple[int, int]], rate: float, seconds: float, start: float, direct: bool):
    """In a sender process: ``rate`` messages a second to each (conversation, sender) of
    ``groups``, evenly spread from ``start`` (``time.perf_counter``, shared), through
    ``message_send`` or (``direct``) only what its commit hands over, no PostgreSQL.
    Returns [(conversation, seq, when the call returned)] and its CPU seconds."""
    convs = {c: Conversation.objects.get(pk=c) for c, _ in groups}
    senders = {s: User.objects.get(pk=s) for _, s in groups}
    tops = {c: int(get_redis().hget(keys.channel(c), keys.CHANNEL_TOP) or 0) for c in convs}
    n, cpu0, out = max(1, int(rate * seconds)), time.process_time(), []
    for due, k, i in sorted((k / rate + i / (rate * len(groups)), k, i)
                            for i in range(len(groups)) for k in range(n)):  # fmt: skip
        time.sleep(max(0.0, start + due - time.perf_counter()))
        (cid, sid), conv = groups[i], convs[groups[i][0]]
        if direct:
            seq = tops[cid] = max(tops[cid], conv.last_seq) + 1
            delivery_message_committed(conversation_id=cid, seq=seq, sender_id=sid, mode=conv.mode)
        else:
            message = {"sender": senders[sid], "body": "x", "client_msg_id": f"{start}-{cid}-{k}"}
            seq = services.message_send(conversation=conv, **message)[0].seq
        out.append((cid, seq, time.perf_counter()))
    connections.close_all()
    return out, time.process_time() - cpu0


def measure(path, groups, stack, rate, seconds, senders, direct=False) -> dict:
    """Send for ``seconds``, wait until the observers saw every message and the write path is
    idle; the costs of that whole window."""
    procs, pool = stack
    watch = {g.observer_id: [h.conversation_id for h in groups if h.observer_id == g.observer_id]
             for g in groups}  # fmt: skip
    cost = {u: read_cost(u) for u in watch}
    last = {c: counters_get(user_id=u).conversations.get(c, 0) for u in watch for c in watch[u]}
    seen: dict[tuple[int, int], float] = {}
    own, own_broker, seen_cost, stop = Counter(), Counter(), Counter(), threading.Event()

    def observe() -> None:
        while not stop.is_set():
            for user_id, cids in watch.items():
                counts = counters_get(user_id=user_id).conversations
                now = time.perf_counter()
                seen_cost.update(cost[user_id])
                for c in cids:
                    for seq in range(last[c] + 1, counts.get(c, 0) + 1):
                        seen[c, seq] = now
                    last[c] = max(last[c], counts.get(c, 0))
            time.sleep(0.002)

    ports = (COUNTERS_PORT, common.BROKER_PORT)
    for port in ports:
        redis.Redis(port=port).config_resetstat()
    info0, cpu0 = [common.redis_info(p) for p in ports], [procs.cpu(), psutil.cpu_times()]
    start = time.perf_counter() + 0.3
    chunks = [groups[i::senders] for i in range(min(senders, len(groups)))]
    work = [([(g.conversation_id, g.sender_id) for g in c], rate, seconds, start, direct)
            for c in chunks]  # fmt: skip
    result = pool.starmap_async(send, work, chunksize=1)
    (observer := threading.Thread(target=observe, daemon=True)).start()
    parts, sent_at = result.get(), time.perf_counter()
    commits = {(c, s): t for part, _ in parts for c, s, t in part}
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline and not commits.keys() <= seen.keys():
        time.sleep(0.01)
    stop.set()
    observer.join()
    while time.monotonic() < deadline and held(own, own_broker):  # the rest of the members
        time.sleep(0.05)
    idle, window = time.perf_counter() - sent_at, time.perf_counter() - start
    info1, cpu1 = [common.redis_info(p) for p in ports], [procs.cpu(), psutil.cpu_times()]
    machine = sum(getattr(cpu1[1], k) - getattr(cpu0[1], k) for k in BUSY)
    counted, n = calls(COUNTERS_PORT) - own - seen_cost, len(commits)
    broker = calls(common.BROKER_PORT) - own_broker
    # In channel mode the count is raised inside the send (its on_commit), so it may show
    # before message_send returns: those count as 0 ms.
    latencies = [max(0.0, seen[k] - t) for k, t in commits.items() if k in seen]
    redis_s = sum(common.redis_cpu(b) - common.redis_cpu(a) for a, b in zip(info0, info1))  # noqa: B905
    return {
        "path": path, "groups": len(groups), "members": groups[0].members, "messages": n,
        "target_rate": rate * len(groups), "rate": n / (sent_at - start),
        "cmds_per_msg": sum(counted.values()) / n, "broker_per_msg": sum(broker.values()) / n,
        "evalsha_per_msg": counted["cmdstat_evalsha"] / n,
        "p50_ms": common.percentile(latencies, 50) * 1000, "idle_s": idle,
        "p99_ms": common.percentile(latencies, 99) * 1000, "unseen": n - len(latencies),
        "cpu_workers_s": cpu1[0] - cpu0[0], "cpu_redis_s": redis_s,
        "cpu_senders_s": sum(cpu for _, cpu in parts), "cpu_machine_s": machine,
        "machine_busy": machine / window / psutil.cpu_count(), "window_s": window,
    }  # fmt: skip


def cost_phase(args, paths: list[str]) -> list[dict]:
    """Phase 1 and 2: one group per (size, path); users shared by a size's groups."""
    common.reset_data()
    groups = {}
    for size in args.sizes:
        ids = common.make_users(size, f"s{size}")
        for i, path in enumerate(paths):
            groups[size, path] = make_group(path, ids, reconcile=i == len(paths) - 1)
    runs = []
    for path in paths:
        with stack(path, 1) as running:
            for size in args.sizes:
                seconds = args.latency_seconds if size == LATENCY_SIZE else args.seconds
                if path == "fanout":
                    seconds = min(seconds, max(3, args.fanout_budget // size) / args.rate)
                r = measure(path, [groups[size, path]], running, args.rate, seconds, 1)
                runs.append(r)
                print(f"  {path} {size:,}: {r['cmds_per_msg']:,.1f} cmds/msg", flush=True)
    return runs


def ceiling_phase(args, path: str, interval: float) -> dict[str, list[dict]]:
    """Phase 3 for ``path``: ``message_send``, then (channel mode) ``delivery_message_committed``
    alone, on the same groups; a ramp goes on past p99 > 1 s (up to 5 s), not past queue growth
    or senders behind. Channel-mode groups share their members (a send does no per-member
    work there); the pipeline's have their own."""
    common.reset_data()
    pool = common.make_users(args.members, "pool") if path == "channel" else None
    groups, ramps = [], {}
    with stack(path, args.senders) as running:
        for how in ("send", "direct") if path == "channel" else ("send",):
            ramps[how] = []
            for n in [s for s in CEILING_STEPS if s <= args.max_groups]:
                while len(groups) < n:
                    ids = pool or common.make_users(args.members, f"g{len(groups)}")
                    groups.append(make_group(path, ids, reconcile=pool is None or not groups))
                step = (args.rate, args.step_seconds, args.senders, how == "direct")
                r = measure(path, groups[:n], running, *step)
                r["behind"] = [why for why, bad in [  # why a step did not keep up
                    ("senders behind", r["rate"] < 0.95 * r["target_rate"]),
                    ("queue growth", r["idle_s"] > 2 * interval + 1 or r["unseen"]),
                    ("p99 > 1 s", r["p99_ms"] > 1000)] if bad]  # fmt: skip
                ramps[how].append(r)
                print(f"  {path} {how} ceiling: {ceiling_row(r)}", flush=True)
                if set(r["behind"]) - {"p99 > 1 s"} or r["p99_ms"] > 5000:
                    break
    return ramps


def ceiling_row(r: dict) -> list:
    rest = r["cpu_machine_s"] - r["cpu_senders_s"] - r["cpu_redis_s"] - r["cpu_workers_s"]
    return [
        r["groups"], f"{r['rate']:.0f} ({r['target_rate']:.0f})",
        f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}", f"{r['idle_s']:.1f}",
        " / ".join(f"{r[k]:.1f}" for k in ("cpu_senders_s", "cpu_redis_s", "cpu_workers_s"))
        + f" / {rest:.1f}",
        f"{r['machine_busy']:.0%}", ", ".join(r["behind"]) or "keeps up",
    ]  # fmt: skip


def plot(runs: list[dict], ceiling: dict, members: int) -> str:
    fig, (cost, lat) = common.figure("storm", "Storm: cost per message; latency against groups", 2)
    for path, label in PATHS.items():
        pts = sorted((r["members"], r["cmds_per_msg"]) for r in runs if r["path"] == path)
        if pts:
            cost.plot(*zip(*pts, strict=True), marker="o", label=label)
    cost.set(xscale="log", yscale="log", xlabel="members of the group (count)",
             ylabel="Redis commands per message (count)")  # fmt: skip
    for name, c in ceiling.items():
        for q, style in (("p50_ms", "--"), ("p99_ms", "-")):
            xy = [(r["groups"], r[q]) for r in c["steps"]]
            lat.plot(*zip(*xy, strict=True), style, marker="o", label=f"{name}, {q[:3]}")
    lat.set_xscale("log", base=2)
    lat.set_yscale("symlog", linthresh=1)
    lat.set(xlabel=f"groups of {members:,} members at 10 messages/s each (count)", ylim=(0, None),
            ylabel="commit → unread visible (ms)")  # fmt: skip
    return common.save_figure(fig, "storm")


COST_ROWS = [  # the one-group table: (row, key, format)
    ("messages sent", "messages", "{:,.0f}"),
    ("Redis commands / message (counters, sync, channel layer)", "cmds_per_msg", "{:,.1f}"),
    ("of which script calls (EVALSHA) / message", "evalsha_per_msg", "{:,.1f}"),
    ("broker commands / message", "broker_per_msg", "{:,.1f}"),
    ("commit → unread visible p50 ms", "p50_ms", "{:,.0f}"),
    ("commit → unread visible p99 ms", "p99_ms", "{:,.0f}"),
    ("all work done after the last send, s", "idle_s", "{:.1f}"),
]
CEILING_HEAD = ["groups", "sent/s (target)", "p50 / p99 ms", "idle after s",
                "CPU s: senders / Redis / workers / rest", "machine busy", "verdict"]  # fmt: skip


def main() -> None:
    args = common.parse(
        __doc__, QUICK, sizes=([500, 5000, 50000], "group sizes of phase 1"), no_ceiling=False,
        rate=(10.0, "messages a second per group"), seconds=(3.0, "phase 1 run length"),
        latency_seconds=(10.0, f"run length at {LATENCY_SIZE:,} members"), step_seconds=5.0,
        paths=(list(PATHS), f"among {', '.join(PATHS)}"), max_groups=128,
        fanout_budget=(150_000, "fan-out: messages x members a run"),
        senders=(4, "sender processes in the ceiling"), members=(5000, "members of a group"),
    )  # fmt: skip
    if not (paths := args.paths) or set(paths) - set(PATHS):
        sys.exit(f"--paths takes some of {', '.join(PATHS)}")
    with common.section():
        interval = settings.COUNTERS_FLUSH_INTERVAL
        lines = common.header(
            "Storm: channel mode, pipeline, fan-out", common.machine(),
            f"1 Celery worker (prefork, 2) + beat; {settings.COUNTERS_SHARDS} shards, Timer "
            f"{interval:g} s; in-process `message_send`, {args.rate:g} messages/s per group.",
        )  # fmt: skip
        runs = cost_phase(args, paths)
        by = {(r["path"], r["members"]): r for r in runs}
        rows = [
            [f"{label}: {PATHS[path]}",
             *(fmt.format(by[path, n][key]) if (path, n) in by else "-" for n in args.sizes)]
            for label, key, fmt in COST_ROWS
            for path in paths
        ]  # fmt: skip
        lines += common.table(
            ["path", *(f"{n:,} members" for n in args.sizes)], rows,
            "One group: cost per message and commit → unread visible", "Commands: INFO "
            "commandstats until the write path is idle; latency: a member polls `counters_get`.",
        )  # fmt: skip
        data = {"machine": lines[2], "args": vars(args), "runs": runs, "ceiling": {}}
        for path in [p for p in ("channel", "pipeline") if p in paths and not args.no_ceiling]:
            for how, steps in ceiling_phase(args, path, interval).items():
                name = f"{PATHS[path]}, " + ("message_send" if how == "send" else "committed alone")
                strict, loose = (max((r["groups"] for r in steps if not set(r["behind"]) - ok),
                                     default=0) for ok in (set(), {"p99 > 1 s"}))  # fmt: skip
                data["ceiling"][name] = {"steps": steps, "best": strict, "drains": loose}
                lines += common.table(
                    CEILING_HEAD, [ceiling_row(r) for r in steps], f"Ceiling, {name}: groups of "
                    f"{args.members:,} at {args.rate:g} messages/s, {args.step_seconds:g} s a step",
                    f"Keeps up (p99 ≤ 1 s, no queue growth, senders on time) with {strict} "
                    f"group(s); without queue growth: {loose}.",
                )  # fmt: skip
    lines.append(plot(runs, data["ceiling"], args.members))
    common.write_results("storm", "\n".join(lines), data)


if __name__ == "__main__":
    main()
