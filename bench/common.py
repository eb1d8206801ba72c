"""What the sections share: their database, Redis and broker (a redis-server of its own), seed
data, processes (bin/stack.py, measured with psutil), flags, statistics and machine metadata
(pyperf), the load tools' runs, the result files (markdown, JSON, pyperf JSON, PNG plots)."""

import argparse
import contextlib
import datetime
import functools
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyperf
import redis
import requests
from honcho.environ import parse_procfile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BROKER_PORT = int(os.environ.get("BENCH_BROKER_PORT", "6390"))
ENV = {
    "DJANGO_SETTINGS_MODULE": "imcore.settings",
    "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/imcore_bench"),
    "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8"),
    "CELERY_BROKER_URL": f"redis://127.0.0.1:{BROKER_PORT}/0",
    "COUNTERS_RECONCILE_INTERVAL_S": "0",
    "LOG_LEVEL": "WARNING",
}  # fmt: skip
# Commands of the benchmark's own observer and bookkeeping, left out of the counts.
NOT_COUNTED = {"cmdstat_hmget", "cmdstat_info", "cmdstat_config|resetstat", "cmdstat_llen"}
# uvicorn on the stack's port, with the Procfile's pings (push's server; send's ``asgi``).
UVICORN = ("uvicorn imcore.asgi:application --host 127.0.0.1 --port $IMCORE_PORT "
           "--ws-ping-interval 20 --ws-ping-timeout 20")  # fmt: skip
# The benchmark's own Celery worker (prefork, 2 processes, both queues) and beat (Procfile form).
WORKER = {
    "worker": "celery -A imcore worker --queues default,counters --concurrency 2 --without-gossip "
    "--without-mingle --loglevel WARNING",
    "beat": f"celery -A imcore beat --schedule {tempfile.gettempdir()}/imcore-bench-beat-"
    f"{os.getpid()} --loglevel WARNING",
}  # fmt: skip


def django_setup() -> None:
    """Django on the benchmark's database and Redis, nothing started (a section's imports)."""
    os.environ.update(ENV)
    sys.path.insert(0, str(ROOT))
    __import__("django").setup()


def wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in {timeout:g} s")
        time.sleep(0.2)


def broker_up() -> bool:
    ping = ["redis-cli", "-p", str(BROKER_PORT), "ping"]
    return subprocess.run(ping, capture_output=True).returncode == 0


@contextlib.contextmanager
def section():
    """A section's run: SIGTERM exits (so ``finally`` blocks stop what they started), the broker
    and the database up and migrated; the broker stopped at the end if this run started it."""
    from django.core.management import call_command

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    django_setup()
    started = not broker_up()
    if started:
        server = f"redis-server --port {BROKER_PORT} --bind 127.0.0.1 --daemonize yes"
        subprocess.run([*server.split(), "--save", "", "--appendonly", "no"], check=True)
        wait_for(broker_up, 5, "the benchmark broker")
    db = ENV["DATABASE_URL"].rsplit("/", 1)[1]  # createdb fails when it exists: that is fine
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", db], capture_output=True)
    call_command("migrate", verbosity=0)
    try:
        yield
    finally:
        if started:
            subprocess.run(["redis-cli", "-p", str(BROKER_PORT), "shutdown", "nosave"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_data(broker: bool = True) -> None:
    """Empty the benchmark's tables and its Redis database (and the broker's)."""
    from django.db import connection

    from counters.redis import get_redis
    from imcore.celery import app

    tables = "message membership device conversation user_groups user_user_permissions user"
    with connection.cursor() as cursor:
        names = ", ".join(f"imcore_{t}" for t in tables.split())
        cursor.execute(f"TRUNCATE {names}, django_admin_log RESTART IDENTITY CASCADE")
    get_redis().flushdb()
    if broker:
        with app.connection_for_write() as conn:
            conn.default_channel.client.flushdb()


def make_users(n: int, tag: str) -> list[int]:
    """``n`` users without a usable password, bulk-inserted; their ids."""
    from django.contrib.auth.hashers import make_password

    from imcore.models import User

    users = (User(username=f"{tag}-{i}", password=make_password(None)) for i in range(n))
    return [u.pk for u in User.objects.bulk_create(users, batch_size=5000)]


def make_devices(user_ids: list[int], **fields) -> list:
    """A device each, bulk-inserted with the token hash a login would store; ``token`` on each."""
    from imcore.models import Device as Model
    from imcore.services import token_hash

    tokens = [secrets.token_urlsafe(32) for _ in user_ids]
    rows = Model.objects.bulk_create(
        Model(user_id=u, device_id=f"bench-{u}", platform="web", token_hash=token_hash(t), **fields)
        for u, t in zip(user_ids, tokens, strict=True)
    )
    for device, token in zip(rows, tokens, strict=True):
        device.token = token
    return rows


def make_group(ids: list[int], title: str, channel: bool | None = None, reconcile: bool = True):
    """A group of ``ids`` (the first creates it), in channel mode or not (None: as the settings
    say), every member's counters loaded from PostgreSQL unless ``reconcile`` is off."""
    from django.conf import settings

    from counters.services import counters_reconcile
    from imcore import services
    from imcore.models import User

    before = settings.LARGE_GROUP_MIN_MEMBERS
    if channel is not None:
        settings.LARGE_GROUP_MIN_MEMBERS = 2 if channel else 10**9
    first = User.objects.get(pk=ids[0])
    new = services.conversation_create(creator=first, kind="group", member_ids=ids, title=title)[0]
    settings.LARGE_GROUP_MIN_MEMBERS = before
    if reconcile:
        counters_reconcile(user_ids=ids)
    return new


def send_messages(conversation_id: int, sender_ids: list[int], n: int, tag: str) -> None:
    """``n`` messages through ``message_send``, the senders in turn."""
    from imcore import services
    from imcore.models import Conversation, User

    conv = Conversation.objects.get(pk=conversation_id)
    senders = [User.objects.get(pk=uid) for uid in sender_ids]
    for i in range(n):
        body = f"{tag} message {i}: " + "lorem ipsum dolor sit amet " * 2
        sender, cmid = senders[i % len(senders)], f"{tag}-{conversation_id}-{i}"
        services.message_send(sender=sender, conversation=conv, body=body, client_msg_id=cmid)


def drain(timeout: float = 60) -> None:
    """Until the counter pipeline and the broker's queues are empty; raises past ``timeout``."""
    from delivery.pipeline import shard_lengths
    from imcore.celery import app

    with app.connection_for_write() as conn:
        broker = conn.default_channel.client
        empty = lambda: not sum(shard_lengths()) + broker.llen("default") + broker.llen("counters")  # noqa: E731
        wait_for(empty, timeout, "the queues' drain")


class stack:  # a class used as a function: ``with common.stack(entries) as running``
    """Procfile entries run by ``bin/stack.py`` (honcho's Manager, as ``make run``) on a free
    ``$IMCORE_PORT``, from the ``with`` until its end, ready once they answer (then ``settle``
    s); :meth:`cpu` and :meth:`rss` cover its programs (psutil), honcho left out."""

    def __init__(
        self, entries: dict[str, str], http: bool = True, settle: float = 0, root=ROOT, **env
    ):
        self.entries, self.http, self.settle, self.env, self.root = entries, http, settle, env, root
        self.port, self.names = free_port(), list(entries)

    def __enter__(self) -> "stack":
        self.procfile = tempfile.NamedTemporaryFile("w", suffix=".procfile")
        self.procfile.writelines(
            f"{k}: exec {v.removeprefix('exec ')}\n" for k, v in self.entries.items()
        )
        self.procfile.flush()
        self.log = tempfile.NamedTemporaryFile(prefix="imcore-bench-", suffix=".log")
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        env = self.env | {"IMCORE_HOST": "127.0.0.1", "IMCORE_PORT": self.port, "PATH": path}
        self.proc = psutil.Popen(
            [sys.executable, "bin/stack.py", "--no-colour", "-f", self.procfile.name],
            cwd=self.root,
            env={**os.environ, **ENV, **{k: str(v) for k, v in env.items()}},
            start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(self.ready, 90, f"bin/stack.py {self.names}")
        except BaseException:
            self.stop()
            raise
        time.sleep(self.settle)
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def ready(self) -> bool:
        """The API answers 401 on the port (``http``), uvicorn of a ``ws`` entry is up, a
        ``worker`` answers a ping."""
        from imcore.celery import app

        if self.proc.poll() is not None:
            raise RuntimeError(f"bin/stack.py {self.names} exited:\n{self.text()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            url = f"http://127.0.0.1:{self.port}/api/v1/unread"
            return (
                (not self.http or requests.get(url, timeout=5).status_code == 401)
                and ("ws" not in self.names or "startup complete" in self.text())
                and ("worker" not in self.names or bool(app.control.ping(timeout=1)))
            )
        return False

    def programs(self) -> list[psutil.Process]:
        """The stack's processes, bin/stack.py and honcho's forks of it left out."""
        with contextlib.suppress(psutil.Error):
            everyone = self.proc.children(recursive=True)
            return [p for p in everyone if "bin/stack.py" not in " ".join(p.cmdline())]
        return []

    def cpu(self) -> float:
        return cpu_of(*self.programs())

    def rss(self) -> int:
        return int(sum(p.memory_info().rss for p in self.programs() if p.is_running()))

    def stop(self) -> str:
        """SIGTERM to bin/stack.py (it stops the programs, SIGKILL after 20 s), SIGKILL to the
        group after 40 s; the output."""
        with contextlib.suppress(psutil.Error, subprocess.TimeoutExpired):
            self.proc.terminate()
            self.proc.wait(40)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        with self.log, self.procfile:
            self.output = self.text()
        return self.output


def procfile(*names: str, root: Path = ROOT) -> dict[str, str]:
    """The Procfile's entries ``names``, read by honcho's parser."""
    entries = parse_procfile((root / "Procfile").read_text()).processes
    return {name: entries[name] for name in names}


def run_tool(argv: str, pattern: str, **env) -> str:
    """Run a load tool (wrk, pgbench, redis-benchmark); the last match of ``pattern``'s group in
    its output, which is raised with when nothing matches."""
    out = subprocess.run(argv.split(), capture_output=True, text=True, env={**os.environ, **env})
    if found := re.findall(pattern, out.stdout, re.M):
        return found[-1]
    raise RuntimeError(f"{argv}:\n{out.stdout}\n{out.stderr}")


def cpu_of(*processes: psutil.Process) -> float:
    """User+system CPU seconds of the processes, each with the children it reaped; the gone
    ones left out."""
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:4])
    return total


def redis_info(port: int | None = None) -> dict:
    return (redis.Redis(port=port) if port else redis.Redis.from_url(ENV["REDIS_URL"])).info("all")


def commands_total(info: dict) -> int:
    """Commands the server executed, including those run inside Lua scripts."""
    counted = [k for k in info if k.startswith("cmdstat_") and k not in NOT_COUNTED]
    return sum(info[k]["calls"] for k in counted)


def redis_cpu(info: dict) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def parse(doc: str, quick: str, **options) -> argparse.Namespace:
    """The section's flags, ``name=default`` or ``name=(default, help)``: the default's type (a
    list: comma-separated), ``False``: a switch. ``--quick`` stands for ``quick`` (smoke sizes,
    one run each, not for comparison), put before the command line's own flags, which win."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke sizes: {quick or 'each'}")
    for name, spec in options.items():
        default, *about = spec if isinstance(spec, tuple) else (spec,)
        flag, help = "--" + name.replace("_", "-"), "; ".join([*about, "default: %(default)s"])
        if default is False:
            parser.add_argument(flag, action="store_true", help=about[0] if about else None)
        else:
            kind = type(default[0] if isinstance(default, list) else default)
            each = lambda text, k=kind: [k(x) for x in text.split(",") if x]  # noqa: E731
            kind = each if isinstance(default, list) else kind
            parser.add_argument(flag, type=kind, default=default, help=help)
    argv = sys.argv[1:]
    return parser.parse_args([*quick.split(), *argv] if "--quick" in argv else argv)


SUITE: dict[str, pyperf.Benchmark] = {}  # this section's, written to <stem>.pyperf.json


@functools.cache
def metadata() -> dict:
    """The machine as pyperf describes it (CPU model and count, host, Python, platform, load)."""
    run = pyperf.Run([1.0], metadata={"name": "machine"})  # collect_metadata: pyperf's own
    return pyperf.Benchmark([run]).get_metadata()


def record(name: str, values) -> pyperf.Benchmark | None:
    """A pyperf Benchmark of ``values`` (one run each; a name ending in `` ms`` is kept in
    seconds), in the section's suite; None when a value is not positive (pyperf's rule)."""
    values, ms = [float(v) for v in values if v is not None], name.endswith(" ms")
    if not values or min(values) <= 0:
        return None
    meta, k = {**metadata(), "name": name, "unit": "second" if ms else "integer"}, 1000 if ms else 1
    runs = [pyperf.Run([v / k], metadata=meta, collect_metadata=False) for v in values]
    SUITE[name] = bench = pyperf.Benchmark(runs)
    return bench


def median(values, name: str = "") -> float:
    """The median (pyperf's, recorded as ``name`` when given)."""
    values = [v for v in values if v is not None]
    if bench := record(name, values) if name else None:
        return bench.median() * (1000 if name.endswith(" ms") else 1)
    return statistics.median(values) if values else float("nan")


def spread(name: str, values, fmt: str = "{:.1f}") -> str:
    """``median (min..max)`` of several runs (recorded as ``name``), or the one value when
    they all agree."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mid, low, high = (fmt.format(v) for v in (median(values, name), min(values), max(values)))
    return mid if low == high else f"{mid} ({low}..{high})"


def percentile(values, q: float) -> float:
    import numpy  # here: its BLAS threads in every process would hang forked pools

    return float(numpy.percentile(values, q, method="nearest")) if len(values) else float("nan")


def machine() -> str:
    """The machine (pyperf's metadata, psutil's memory) and the servers' versions."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("show server_version")
        pg = cursor.fetchone()[0].split()[0]
    m, memory = metadata(), psutil.virtual_memory().total / 2**30
    return (f"{m['hostname']}: {m['cpu_count']} cores ({m['cpu_model_name']}), {memory:.0f} GiB, "
            f"Python {m['python_version'].split()[0]}, Redis {redis_info()['redis_version']}, "
            f"PostgreSQL {pg}, local services")  # fmt: skip


def header(title: str, machine_text: str, *notes: str) -> list[str]:
    """The H1, the machine and the code (the commit, and files outside bench/ it differs in)."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    changed = git("diff", "HEAD", "--name-only", "--", ".", ":(exclude)bench").splitlines()
    local = f", with local changes to {', '.join(changed)}" if changed else ""
    when = f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {socket.gethostname()}"
    code = f"Code: {git('rev-parse', '--short', 'HEAD') or 'not a git checkout'}{local}."
    return [f"# {title}, {when}", "", f"Machine: {machine_text}. {code}", *notes, ""]


def table(head: list[str], rows: list[list], title: str = "", *notes: str) -> list[str]:
    """A markdown table (the first column left-aligned, the others right), under ``## title``
    when given, a short line of ``notes`` after it."""
    return [
        *([f"## {title}", ""] if title else []),
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 1),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        *(["", " ".join(notes)] if notes else []),
        "",
    ]


def results_stem(name: str) -> Path:
    """``bench/results/<name>-<date>-<host>`` (``<date>-<host>`` for the whole ``make bench``,
    which sets BENCH_DATE once, so a run past midnight keeps one date for its sections)."""
    day = os.environ.get("BENCH_DATE") or datetime.date.today().isoformat()
    return RESULTS / f"{name}{'-' if name else ''}{day}-{socket.gethostname()}"


def figure(name: str, title: str, panels: int = 1, size=(7, 4.5)):
    """A matplotlib figure whose title names the machine; :func:`save_figure` writes it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(panels, 1, figsize=(size[0], size[1] * panels), squeeze=False)
    fig.suptitle(f"{title}\n{machine()}", fontsize=9)
    return fig, list(axes[:, 0])


def save_figure(fig, name: str) -> str:
    """Write ``<stem>.png``; returns the markdown that shows it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    png = Path(f"{results_stem(name)}.png")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    return f"![{fig._suptitle.get_text().splitlines()[0]}]({png.name})"


def write_results(name: str, markdown: str, data: dict) -> Path:
    """Write ``<stem>.md``, ``.json`` and (pyperf's) ``.pyperf.json``, print the markdown;
    returns the stem. ``bench/all.py`` gathers a run's sections from these files."""
    stem = results_stem(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(markdown.rstrip() + "\n")
    Path(f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    if SUITE:
        pyperf.BenchmarkSuite(list(SUITE.values())).dump(f"{stem}.pyperf.json", replace=True)
    print(markdown, f"\nWritten: {stem}.md, .json" + (" and .pyperf.json" if SUITE else ""))
    return stem
