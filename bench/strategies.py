"""``make bench-strategies``: the counter strategies under contention (forked processes count
messages for the same members, seqs interleaved so the truth is known), beside
``redis-benchmark`` INCR and EVALSHA of the ``inc`` script on the same Redis: the limit."""

import itertools
import multiprocessing
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

common.django_setup()  # the imports below need Django's settings
from counters import keys
from counters.redis import get_redis
from counters.scripts import CounterScripts, source
from counters.strategies import STRATEGIES as CLASSES
from counters.strategies import CountersBusy
from counters.transitions import MembershipRow

QUICK = "--runs 1 --seconds 1 --limit-requests 20000"  # --quick: smoke sizes, one run each
FORK = multiprocessing.get_context("fork")
STRATEGIES = ["lua", "watch", "lock", "naive"]
FIRST_USER = 900_000  # member ids of the benchmark's group, away from any real user
BENCH_USER = 990_000  # the redis-benchmark EVALSHA calls' user


def load_members(client, user_ids: list[int], conversations: list[int]) -> None:
    """Empty counters for every member in every conversation, loaded (``ready``)."""
    client.delete(*[keys.counters(u) for u in user_ids], *[keys.counters_lock(u) for u in user_ids])
    rows = [MembershipRow(c, 1, True, False, 0, 0) for c in conversations]
    scripts = CounterScripts(client)
    for u in user_ids:
        scripts.load(u, rows)


def worker(p: int, name: str, args, start_at: float) -> dict:
    """One fan-out process (a pool's, forked): count messages for every member until the
    time is up."""
    strategy = CLASSES[name](get_redis())  # the app's client; its pool reconnects after fork
    user_ids = list(range(FIRST_USER, FIRST_USER + args.members))
    conversations = list(range(1, args.conversations + 1))
    top, updates, busy, k, cpu0 = dict.fromkeys(conversations, 0), 0, 0, 0, time.process_time()
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        cid, seq = conversations[k % len(conversations)], k * args.processes + p + 1
        try:
            strategy.inc_many([(u, [(cid, seq)]) for u in user_ids])
        except CountersBusy:
            busy += 1
            continue
        top[cid], updates, k = seq, updates + len(user_ids), k + 1
    return {"updates": updates, "top": top, "retries": strategy.retries, "busy": busy,
            "wait_s": strategy.wait_seconds, "cpu_s": time.process_time() - cpu0}  # fmt: skip


def drift(client, user_ids: list[int], truth: dict[int, int]) -> dict:
    """How far the hashes are from the truth: members with a wrong unread or badge, the sums
    of their errors."""
    pipe = client.pipeline(transaction=False)
    for u in user_ids:
        pipe.hgetall(keys.counters(u))
    hashes, want_badge = pipe.execute(), sum(truth.values())
    unread = [sum(abs(int(h.get(f"u:{c}", 0)) - truth[c]) for c in truth) for h in hashes]
    badge = [abs(int(h.get("badge", 0)) - want_badge) for h in hashes]
    return {"members_wrong": sum(1 for u, b in zip(unread, badge) if u or b),  # noqa: B905
            "badge_error": sum(badge), "unread_error": sum(unread)}  # fmt: skip


def run_strategy(name: str, args) -> dict:
    """One timed run of ``name`` with ``args.processes`` processes."""
    client, user_ids = get_redis(), list(range(FIRST_USER, FIRST_USER + args.members))
    conversations = list(range(1, args.conversations + 1))
    load_members(client, user_ids, conversations)
    info0, start_at = common.redis_info(), time.time() + 0.5
    # close, join: a terminate can kill a worker holding the queue's lock (make bench hung).
    with FORK.Pool(args.processes, signal.signal, (signal.SIGTERM, signal.SIG_DFL)) as pool:
        out = pool.starmap(worker, [(p, name, args, start_at) for p in range(args.processes)])
        pool.close()
        pool.join()
    info1 = common.redis_info()
    truth = {c: max(r["top"][c] for r in out) for c in conversations}
    total = {k: sum(r[k] for r in out) for k in ("updates", "retries", "wait_s", "busy", "cpu_s")}
    n, commands = total["updates"], common.commands_total(info1) - common.commands_total(info0)
    return {
        "updates": n, "updates_per_s": n / args.seconds, "commands_per_update": commands / n,
        "redis_cpu_pct": 100 * (common.redis_cpu(info1) - common.redis_cpu(info0)) / args.seconds,
        "client_us_per_update": 1e6 * total["cpu_s"] / n, "retries": total["retries"],
        "retries_per_1000": 1000 * total["retries"] / n, "lock_wait_s": total["wait_s"],
        "busy": total["busy"], **drift(client, user_ids, truth),
    }  # fmt: skip


LIMIT_SHAPES = [(50, 1), (50, 32)]  # (clients, pipeline) of redis-benchmark


def run_limits(n: int) -> dict[str, float]:
    """ops/s of redis-benchmark (its CSV) on the same Redis: INCR, and EVALSHA of the ``inc``
    script (the ``lua`` strategy's, one member and conversation a call) with a random seq."""
    client, url = get_redis(), urlparse(common.ENV["REDIS_URL"])
    load_members(client, [BENCH_USER], [1])
    sha = client.script_load(source("inc"))
    target = f"-h {url.hostname} -p {url.port or 6379} --dbnum {url.path.strip('/') or 0}"
    inc = f"EVALSHA {sha} 1 {keys.counters(BENCH_USER)} 1 __rand_int__"
    commands = {"INCR": "INCR bench:incr", "EVALSHA inc": inc}
    out = {}
    for (label, command), (c, p) in itertools.product(commands.items(), LIMIT_SHAPES):
        argv = f"redis-benchmark {target} -c {c} -P {p} -n {n * p} -r 1000000000000 --csv {command}"
        out[f"{label} -c {c} -P {p}"] = float(common.run_tool(argv, r'^"[^"]+","([\d.]+)"'))
    return out


COLUMNS = {  # head: (a run's figure, format); "ratio" is updates/s over the limit's ops/s
    "updates/s": ("updates_per_s", "{:,.0f}"), "ratio to the limit": ("ratio", "{:.3f}"),
    "Redis commands / update": ("commands_per_update", "{:.1f}"),
    "Redis CPU, % of a core": ("redis_cpu_pct", "{:.0f}"),
    "client CPU µs / update": ("client_us_per_update", "{:.1f}"),
    "retries or lock waits / 1,000 updates": ("retries_per_1000", "{:.1f}"),
    "lock wait s": ("lock_wait_s", "{:.1f}"), "members left wrong": ("members_wrong", "{:.0f}"),
    "badge drift (sum of errors)": ("badge_error", "{:,.0f}"),
}  # fmt: skip


def report(runs: list[dict], args, took: float) -> tuple[str, dict]:
    limit_key = f"EVALSHA inc -c {LIMIT_SHAPES[-1][0]} -P {LIMIT_SHAPES[-1][1]}"
    limits = {k: [r["limits"][k] for r in runs] for k in runs[0]["limits"]}
    limit = common.median(limits[limit_key], limit_key)
    data: dict = {"args": vars(args), "limit_key": limit_key, "limits": limits, "strategies": {}}
    rows = []
    for name in args.strategies:
        rs = data["strategies"][name] = [r["strategies"][name] for r in runs]
        rs = [r | {"ratio": r["updates_per_s"] / limit} for r in rs]
        rows.append([f"`{name}`", *(common.spread(f"{name}: {head}", [r[k] for r in rs], fmt)
                                    for head, (k, fmt) in COLUMNS.items())])  # fmt: skip
    lines = common.header(
        "Counter strategies under contention", common.machine(),
        f"{args.processes} processes count messages for the same {args.members} members in "
        f"{args.conversations} conversations, {args.seconds:g} s a run (an update: one member's "
        f"count of one message); median (min..max) of {args.runs} runs; {took:.0f} s in all.",
    )  # fmt: skip
    lines += common.table(["strategy", *COLUMNS], rows)
    rows = [[k + (" (the limit)" if k == limit_key else ""), common.spread(k, v, "{:,.0f}")]
            for k, v in limits.items()]  # fmt: skip
    note = "EVALSHA's random seq mostly takes the script's no-op branch: an upper bound."
    lines += common.table(["redis-benchmark, same Redis, same run", "ops/s"], rows, "", note)
    return "\n".join(lines), data


def main() -> None:
    args = common.parse(
        __doc__, QUICK, runs=3, seconds=5.0, processes=4, members=50, conversations=4,
        limit_requests=(200_000, "redis-benchmark requests per run"), strategies=STRATEGIES,
    )  # fmt: skip
    if set(args.strategies) - set(STRATEGIES):
        sys.exit(f"--strategies takes some of {', '.join(STRATEGIES)}")
    started, runs = time.monotonic(), []
    with common.section():
        for i in range(args.runs):  # the strategies and the limits interleaved
            runs.append({"strategies": {n: run_strategy(n, args) for n in args.strategies},
                         "limits": run_limits(args.limit_requests)})  # fmt: skip
            print(f"run {i + 1}/{args.runs}: {runs[-1]}", file=sys.stderr)
    markdown, data = report(runs, args, time.monotonic() - started)
    data["runs"] = runs
    common.write_results("strategies", markdown, data)


if __name__ == "__main__":
    main()
