"""The cost of a recall beside a send (issue 15), in a group of ``--members`` (5,000) in
channel mode and on the aggregation pipeline: Redis commands (scripts' inner commands
included) and ms until every member's count shows it (a recall's writes are done when the
call returns; every member is then checked). The pipeline's send is timed with an in-process
flush: in service its count shows within the Timer interval plus that flush.

    python bench/recall.py [--members 5000] [--paths channel,pipeline]
"""

import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common
from bench.storm import COUNTERS_PORT, calls, make_group

QUICK = "--members 200"


def measure(name: str, fn) -> tuple[float, int]:
    """(ms, Redis commands) of ``fn()``; the ms recorded as ``name``."""
    redis.Redis(port=COUNTERS_PORT).config_resetstat()
    started = time.perf_counter()
    fn()
    ms = (time.perf_counter() - started) * 1000
    common.record(name, [ms])
    return ms, sum(calls(COUNTERS_PORT).values())


def run(path: str, members: int) -> list:
    from counters.selectors import counters_get
    from delivery.pipeline import delivery_drain
    from imcore import services
    from imcore.models import User

    common.reset_data()
    group = make_group(path, common.make_users(members, f"recall-{path}"))
    sender, cid = User.objects.get(pk=group.sender_id), group.conversation_id

    def send(i: int):
        services.message_send(sender=sender, conversation=cid, body="x", client_msg_id=f"r{i}")
        delivery_drain()  # (channel mode: nothing to drain)

    send(0)
    send_ms, send_cmds = measure(f"{path} send ms", lambda: send(1))
    recall = lambda: services.message_recall(actor=sender, conversation_id=cid, seq=2)  # noqa: E731
    recall_ms, recall_cmds = measure(f"{path} recall ms", recall)
    ids = User.objects.filter(username__startswith="recall-").values_list("pk", flat=True)
    wrong = [u for u in ids if u != sender.pk and counters_get(user_id=u).conversations[cid] != 1]
    assert not wrong, f"{len(wrong)} members do not show the recall"
    return [path, f"{members:,}", f"{send_cmds:,}", f"{send_ms:,.1f}", f"{recall_cmds:,}",
            f"{recall_ms:,.1f}"]  # fmt: skip


def main() -> None:
    args = common.parse(__doc__, QUICK, members=5000, paths="channel,pipeline")
    with common.section():
        machine = common.machine()
        rows = [run(path, args.members) for path in args.paths.split(",")]
    head = ["path", "members", "send: Redis cmds", "send: ms to visible", "recall: Redis cmds",
            "recall: ms to visible"]  # fmt: skip
    lines = [*common.header("A recall beside a send", machine), *common.table(head, rows)]
    common.write_results("recall", "\n".join(lines), {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
