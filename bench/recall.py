"""``make bench-recall``: a recall beside a send (issue 15) in a group of ``--members``, channel
mode and pipeline: Redis commands (inside scripts too) and ms until every member's count shows
it (each then checked); the pipeline's send with an in-process flush (in service: + Timer)."""

import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common
from bench.storm import COUNTERS_PORT, calls, make_group  # Django set up by its import
from counters.selectors import counters_get
from delivery.pipeline import delivery_drain
from imcore import services
from imcore.models import User

QUICK = "--members 200"


def run(path: str, members: int) -> list:
    common.reset_data()
    ids = common.make_users(members, f"recall-{path}")
    cid, sender = make_group(path, ids).conversation_id, User.objects.get(pk=ids[0])
    row = [path, f"{members:,}"]

    def send(i: int) -> None:
        services.message_send(sender=sender, conversation=cid, body="x", client_msg_id=f"r{i}")
        delivery_drain()  # (channel mode: nothing to drain)

    send(0)  # a first message; the timed send is the second, the recall takes it back
    recall = lambda: services.message_recall(actor=sender, conversation_id=cid, seq=2)  # noqa: E731
    for what, call in [("send", lambda: send(1)), ("recall", recall)]:
        redis.Redis(port=COUNTERS_PORT).config_resetstat()
        started = time.perf_counter()
        call()
        ms = (time.perf_counter() - started) * 1000
        common.record(f"{path} {what} ms", [ms])
        row += [f"{sum(calls(COUNTERS_PORT).values()):,}", f"{ms:,.1f}"]
    wrong = [u for u in ids[1:] if counters_get(user_id=u).conversations[cid] != 1]
    assert not wrong, f"{len(wrong)} members do not show the recall"
    return row


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
