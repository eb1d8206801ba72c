"""``make bench-cluster``: the S1 storm (one group, 10 messages/s, aggregation pipeline; storm.py's
processes) and the send path (``message_send``, two members), on the single Redis, then on a
local 3-master cluster in the same run: per node commands/s and CPU per message (INFO)."""

import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("", "bin")]
import redis_cluster
from django.conf import settings

from bench import common, storm

QUICK = "--members 200 --seconds 2 --sends 50"  # --quick: smoke sizes


def snapshot(ports: list[int]) -> dict[int, tuple[int, float]]:
    infos = {p: common.redis_info(p) for p in ports}
    return {p: (common.commands_total(i), common.redis_cpu(i)) for p, i in infos.items()}


def per_node(before, after, seconds: float, n: int) -> list[dict]:
    delta = {p: (after[p][0] - c, after[p][1] - u) for p, (c, u) in before.items()}
    return [{"port": p, "cmds_per_s": c / seconds, "cmds_per_msg": c / n,
             "cpu_ms_per_msg": u * 1e3 / n} for p, (c, u) in delta.items()]  # fmt: skip


def run(store: str, ports: list[int], args) -> dict:
    common.reset_data()
    s1 = storm.make_group("pipeline", common.make_users(args.members, f"{store}-s1"))
    pair = storm.make_group("pipeline", common.make_users(2, f"{store}-pair"), reconcile=False)
    out = {"store": store}
    with storm.stack("pipeline", senders=1) as (procs, pool):
        before, cpu0, t0 = snapshot(ports), procs.cpu(), time.time()
        work = ([(s1.conversation_id, s1.sender_id)], 10, args.seconds, time.perf_counter() + 0.3)
        [(sent, sender_cpu)] = pool.starmap(storm.send, [(*work, False)])
        common.drain(storm.DRAIN_TIMEOUT_S)
        time.sleep(1.5)  # the last batch's apply
        window, n = time.time() - t0, len(sent)
        out["storm"] = {
            "messages": n, "nodes": per_node(before, snapshot(ports), window, n),
            "worker_cpu_ms_per_msg": (procs.cpu() - cpu0) * 1000 / n,
            "sender_cpu_ms_per_msg": sender_cpu * 1000 / n,
        }  # fmt: skip
    before, cpu0, t0 = snapshot(ports), time.process_time(), time.time()
    common.send_messages(pair.conversation_id, [pair.sender_id], args.sends, "p")
    window = time.time() - t0
    out["send"] = {
        "messages": args.sends, "per_s": args.sends / window,
        "nodes": per_node(before, snapshot(ports), window, args.sends),
        "process_cpu_ms_per_msg": (time.process_time() - cpu0) * 1000 / args.sends,
    }  # fmt: skip
    return out


def main() -> None:
    args = common.parse(__doc__, QUICK, members=5000, seconds=10.0, sends=300, ports="7141-7143")
    with common.section():
        machine = common.machine()
        results = [run("single", [storm.COUNTERS_PORT], args)]
        cluster = redis_cluster.LocalCluster(redis_cluster._ports(args.ports))
        try:
            cluster.start()
            settings.REDIS_CLUSTER_NODES = cluster.nodes.split(",")
            os.environ["REDIS_CLUSTER_NODES"] = cluster.nodes  # the worker and the senders
            results.append(run("cluster", cluster.ports, args))
        finally:
            cluster.stop()
    head = ["store", "node", "commands/s", "commands / msg", "Redis CPU ms / msg"]
    lines = common.header("Redis Cluster beside a single Redis", machine, "Broker not counted.")
    for part, title in [
        ("storm", f"S1 storm: {args.members:,} members, 10 msg/s, {args.seconds:g} s, pipeline"),
        ("send", "Send path: `message_send`, two-member group"),
    ]:
        rows = [[r["store"], n["port"], f"{n['cmds_per_s']:,.0f}", f"{n['cmds_per_msg']:,.1f}",
                 f"{n['cpu_ms_per_msg']:.3f}"]
                for r in results for n in r[part]["nodes"]]  # fmt: skip
        lines += common.table(head, rows, title)
    lines += [f"- {r['store']}: S1 worker CPU {r['storm']['worker_cpu_ms_per_msg']:.1f} ms/msg, "
              f"sender {r['storm']['sender_cpu_ms_per_msg']:.1f} ms/msg; send path "
              f"{r['send']['per_s']:.0f} sends/s, {r['send']['process_cpu_ms_per_msg']:.2f} ms "
              "CPU/send" for r in results]  # fmt: skip
    common.write_results("cluster", "\n".join(lines), {"results": results, "args": vars(args)})


if __name__ == "__main__":
    main()
