"""``make bench-push``: live sync over ``/ws/v1/sync`` on one uvicorn process: idle sockets (RSS,
idle CPU), then commit -> frame latency at ``--members`` devices of a group (pipeline drained
here or by Celery; channel mode); ``websockets`` clients in spawned processes (:class:`Holders`)."""

import asyncio
import contextlib
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.protocol import State

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

common.django_setup()  # the imports below need Django's settings

from delivery.pipeline import delivery_drain
from imcore import services
from imcore.models import User

QUICK = "--runs 1 --members 100 --messages 3 --steps 0,100,200 --idle-seconds 3"  # smoke sizes


class Holder:
    """Many sockets in one asyncio loop; each stamps when a message's frame arrives."""

    def __init__(self, url: str):
        self.url, self.socks, self.receipts, self.duplicates, self.tasks = url, {}, {}, 0, set()

    async def open(self, sockets: list, concurrency: int) -> dict:
        sem, reasons = asyncio.Semaphore(concurrency), {}

        async def one(idx: int, token: str) -> None:
            async with sem:
                try:
                    auth = {"Authorization": f"Bearer {token}"}
                    ws = await connect(self.url, additional_headers=auth, ping_interval=None,
                                       open_timeout=60, max_size=None)  # fmt: skip
                    self.take(idx, await asyncio.wait_for(ws.recv(), 60))
                except Exception as exc:
                    reasons.setdefault(repr(exc)[:160], []).append(idx)
                    return
                self.socks[idx] = ws
                self.tasks.add(asyncio.create_task(self.read(idx, ws)))

        await asyncio.gather(*(one(idx, token) for idx, token in sockets))
        return {"failed": [i for idxs in reasons.values() for i in idxs], "reasons": reasons}

    def take(self, idx: int, raw) -> None:
        frame, now = json.loads(raw), time.time()
        keys = [(e["conversation_id"], e["seq"]) for e in frame.get("entries", ())
                if frame["type"] == "sync" and e["type"] == "message"]  # fmt: skip
        if frame.get("type") == "channel":  # a channel-mode group's message, relayed
            keys = [(frame["conversation_id"], frame["last_seq"])]
        for key in keys:
            mine = self.receipts.setdefault(key, {})
            self.duplicates += idx in mine
            mine.setdefault(idx, now)

    async def read(self, idx: int, ws) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                self.take(idx, raw)

    async def close(self, idx: list[int]) -> dict:
        socks = [self.socks.pop(i) for i in idx if i in self.socks]
        await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)
        return {}

    async def status(self) -> dict:
        live = [i for i, ws in self.socks.items() if ws.state is State.OPEN]
        return {"open": live, "duplicates": self.duplicates}

    async def stamps(self, cid: int, seqs: list[int]) -> dict:
        return {"stamps": {s: self.receipts.get((cid, s), {}) for s in seqs}}


def holder_main(url: str, pipe) -> None:
    async def serve() -> None:
        holder, loop = Holder(url), asyncio.get_running_loop()
        while (cmd := await loop.run_in_executor(None, pipe.recv)) is not None:
            pipe.send(await getattr(holder, cmd[0])(**cmd[1]))  # (method, its keywords)
        await holder.close(list(holder.socks))

    asyncio.run(serve())


class Holders:
    """``n`` holder processes; device ``i`` goes to holder ``i % n``."""

    def __init__(self, port: int, n: int):
        ctx = multiprocessing.get_context("spawn")
        self.pipes = [ctx.Pipe() for _ in range(n)]
        url = f"ws://127.0.0.1:{port}/ws/v1/sync"
        self.procs = [ctx.Process(target=holder_main, args=(url, b)) for _, b in self.pipes]
        for p in self.procs:
            p.start()

    def ask(self, name: str, per: list[dict] | None = None, **kwargs) -> list[dict]:
        for k, (a, _) in enumerate(self.pipes):
            a.send((name, per[k] if per else kwargs))
        return [a.recv() for a, _ in self.pipes]

    def open(self, tokens: list[str], idx, concurrency: int, retry: int = 10) -> dict:
        """Open devices ``idx``; retry those that failed once, ``retry`` handshakes at a time."""
        n, t0 = len(self.pipes), time.perf_counter()

        def attempt(which: list[int], c: int) -> list[dict]:
            parts = [[(i, tokens[i]) for i in which if i % n == k] for k in range(n)]
            return self.ask("open", [{"sockets": p, "concurrency": c} for p in parts])

        first, seconds = attempt(list(idx), concurrency), time.perf_counter() - t0
        failed = [i for r in first for i in r["failed"]]
        still = [i for r in attempt(failed, retry) for i in r["failed"]] if failed else []
        reasons = {k: len(v) for r in first for k, v in r["reasons"].items()}
        return {"seconds": seconds, "opened": len(idx) - len(still), "failed_first": len(failed),
                "failed": len(still), "reasons": reasons}  # fmt: skip

    def stop(self) -> None:
        for (a, _), p in zip(self.pipes, self.procs, strict=True):
            with contextlib.suppress(OSError):
                a.send(None)
            p.join(15)
            p.kill()


def setup(n_users: int, members: int) -> dict:
    """``n_users`` users with one device each; the first ``members`` in a group on the
    pipeline (and, after the idle steps, in one in channel mode)."""
    common.reset_data(broker=False)
    ids = common.make_users(n_users, "push")
    tokens = [d.token for d in common.make_devices(ids)]
    groups = {"pipeline": common.make_group(ids[:members], "push", channel=False)}
    return {"sender": User.objects.get(pk=ids[0]), "groups": groups, "tokens": tokens,
            "members": members, "ids": ids[:members]}  # fmt: skip


SERVER = f"{common.UVICORN} --log-level warning"


def measure_idle(server, holders: Holders, tokens: list[str], args) -> list[dict]:
    """Open sockets up to each step, then idle: the server's CPU over the idle window (the
    first, at 0 sockets, at most 3 s), then its RSS."""
    steps, none = [], {"seconds": 0.0, "opened": 0, "failed_first": 0, "failed": 0, "reasons": {}}
    for n in args.steps:
        held = steps[-1]["sockets"] if steps else 0
        opened = holders.open(tokens, range(held, n), args.concurrency) if n > held else none
        status, cpu0, t0 = holders.ask("status"), server.cpu(), time.perf_counter()
        time.sleep(args.idle_seconds if n else min(args.idle_seconds, 3))
        cpu, rss = server.cpu() - cpu0, server.rss()
        steps.append({
            "sockets": n, "open": sum(len(s["open"]) for s in status), **opened, "rss": rss,
            "idle_cpu_pct": 100 * cpu / (time.perf_counter() - t0),
            "kb_per_socket": (rss - steps[0]["rss"]) / 1024 / n if n else None,
        })  # fmt: skip
        print(f"  {n} sockets: server RSS {rss / 2**20:.0f} MiB", flush=True)
        if opened["failed"] or steps[-1]["open"] != n or opened["seconds"] > args.slow_step:
            break
    return steps


def latency(data, holders, server, messages: int, interval: float, drain=False, channel=False):
    """Send ``messages`` messages ``interval`` s apart to the pipeline's group (each drained
    here with ``drain``) or the channel-mode one; wait until every device got each, or nothing
    arrived for 3 s (at most 20 s)."""
    conversation = data["groups"]["channel" if channel else "pipeline"]
    cid, commits, send_ms, drain_ms = conversation.pk, {}, [], []
    dup0 = sum(r["duplicates"] for r in holders.ask("status"))
    cpu0, start, tag = server.cpu(), time.perf_counter(), time.monotonic_ns()
    for k in range(messages):
        time.sleep(max(0.0, start + k * interval - time.perf_counter()))
        t0 = time.perf_counter()
        message = {"sender": data["sender"], "body": f"push {k}", "client_msg_id": f"p{tag}-{k}"}
        commits[services.message_send(conversation=conversation, **message)[0].seq] = time.time()
        send_ms.append(((t1 := time.perf_counter()) - t0) * 1000)
        if drain:
            delivery_drain()
            drain_ms.append((time.perf_counter() - t1) * 1000)
    expected, seqs = len(commits) * data["members"], sorted(commits)
    deadline, last, got = time.monotonic() + 20, (-1, time.monotonic()), 0
    while time.monotonic() < deadline and got < expected and time.monotonic() - last[1] <= 3:
        replies = holders.ask("stamps", cid=cid, seqs=seqs)
        got = sum(len(v) for r in replies for v in r["stamps"].values())
        last = (got, time.monotonic()) if got != last[0] else last
        time.sleep(0.25)
    stamps = [(s, t) for r in replies for s, v in r["stamps"].items() for t in v.values()]
    lat = [(t - commits[s]) * 1000 for s, t in stamps]
    print(f"  latency p99 {common.percentile(lat, 99):.0f} ms", flush=True)
    return {
        "messages": len(seqs), "expected": expected, "missing": expected - len(lat),
        "duplicates": sum(r["duplicates"] for r in holders.ask("status")) - dup0,
        "p50_ms": common.percentile(lat, 50), "p99_ms": common.percentile(lat, 99),
        "max_ms": max(lat, default=float("nan")), "send_ms": common.median(send_ms),
        "drain_ms": common.median(drain_ms) if drain else None, "server_cpu_s": server.cpu() - cpu0,
    }  # fmt: skip


IDLE_HEAD = ["sockets", "opened in s", "failed (after a retry)", "server RSS MiB", "KiB / socket",
             "server CPU idle, % of a core"]  # fmt: skip
LATENCY_HEAD = ["path", "runs x messages", "p50 ms", "p99 ms", "max ms", "missing", "duplicates",
                "message_send ms", "drain ms", "server CPU s / run"]  # fmt: skip


def report(steps: list[dict], lat: dict, args) -> list[str]:
    rows = [
        [f"{s['sockets']:,}", f"{s['seconds']:.1f}", f"{s['failed_first']} ({s['failed']})",
         f"{s['rss'] / 2**20:.0f}", f"{s['kb_per_socket']:.0f}" if s["sockets"] else "-",
         f"{s['idle_cpu_pct']:.1f}"]
        for s in steps
    ]  # fmt: skip
    reasons = "; ".join(f"{n} x `{k}`" for s in steps for k, n in s["reasons"].items())
    lines = common.table(
        IDLE_HEAD, rows, "1. Idle authenticated sockets on one uvicorn process",
        f"Idle CPU over {args.idle_seconds:g} s after each step; KiB / socket: RSS growth since 0 "
        "sockets / sockets." + (f" Failed handshakes: {reasons}." if reasons else ""),
    )  # fmt: skip
    rows = [
        [name, f"{len(rs)} x {rs[0]['messages']}",
         *(common.spread(f"{name} {k[:-3]} ms", [r[k] for r in rs], "{:.0f}")
           for k in ("p50_ms", "p99_ms", "max_ms")),
         f"{sum(r['missing'] for r in rs):,} of {sum(r['expected'] for r in rs):,}",
         sum(r["duplicates"] for r in rs),
         *(common.spread(f"{name} {k.replace('_', ' ')}", [r[k] for r in rs])
           for k in ("send_ms", "drain_ms", "server_cpu_s"))]
        for name, rs in lat.items()
    ]  # fmt: skip
    title = (f"2. Delivery latency: commit → frame at the device, {args.members:,} devices online "
             f"in one group, messages {args.interval:g} s apart")  # fmt: skip
    return lines + common.table(LATENCY_HEAD, rows, title)


def plot(steps: list[dict]) -> str:
    fig, axes = common.figure("push", "Memory of idle WebSockets, one uvicorn process", 2)
    panels = [("rss", 2**20, "server RSS (MiB)"), ("kb_per_socket", 1, "RSS growth / socket (KiB)")]
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        xy = [(s["sockets"], s[key] / scale) for s in steps if s[key] is not None]
        ax.plot(*zip(*xy, strict=True), marker="o", label=label)
        ax.set(xlabel="idle authenticated sockets (count)", ylabel=label, ylim=(0, None))
    return common.save_figure(fig, "push")


def main() -> None:
    args = common.parse(
        __doc__, QUICK, steps=[0, 1000, 2000, 4000], members=(1000, "devices online, latency"),
        messages=(20, "messages per latency run"), interval=(0.5, "seconds between messages"),
        runs=(3, "latency runs per pipeline"), idle_seconds=(20.0, "idle window a step"),
        clients=(2, "socket holder processes"), concurrency=(100, "handshakes per holder"),
        slow_step=(90.0, "stop the steps past this"), no_celery=(False, "no Celery variant"),
    )  # fmt: skip
    args.steps, lat = sorted(set(args.steps) | {0}), {}
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the holders inherit it
    with common.section():
        machine = common.machine()
        data = setup(max(*args.steps, args.members), args.members)
        with common.stack({"server": SERVER}) as server:
            holders = Holders(server.port, args.clients)
            try:
                steps = measure_idle(server, holders, data["tokens"], args)
                # the members' sockets (re)opened once they are in the channel-mode group too
                holders.ask("close", idx=list(range(steps[-1]["sockets"])))
                data["groups"]["channel"] = common.make_group(data["ids"], "push channel", True)
                holders.open(data["tokens"], range(args.members), args.concurrency)
                run = (data, holders, server, args.messages, args.interval)
                ways = {"pipeline, drained after each send here": {"drain": True},
                        "channel mode (the send's own relay)": {"channel": True},
                        "pipeline, Celery worker + beat (Timer)": {}}  # fmt: skip
                for name, how in list(ways.items())[: 2 if args.no_celery else 3]:
                    worker = common.stack(common.WORKER, http=False)  # drains the third's pipeline
                    with contextlib.nullcontext() if how else worker:
                        lat[name] = [latency(*run, **how) for _ in range(args.runs)]
            finally:
                holders.stop()
    lines = common.header("Push: live sync over WebSocket", machine, f"Server: `{SERVER}`.")
    lines += [*report(steps, lat, args), plot(steps)]
    data = {"args": vars(args), "idle": steps, "latency": lat}
    common.write_results("push", "\n".join(lines), data)


if __name__ == "__main__":
    main()
