"""What the benchmark sections share: their database, Redis and broker (a redis-server of its
own, so each side's commands count apart), processes measured with psutil, flags, statistics,
the machine's description, and the result files (markdown, JSON, matplotlib PNGs)."""

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BROKER_PORT = int(os.environ.get("BENCH_BROKER_PORT", "6390"))
ENV = {
    "DJANGO_SETTINGS_MODULE": "imcore.settings",
    "DATABASE_URL": os.environ.get(
        "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/imcore_bench"
    ),
    "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8"),
    "CELERY_BROKER_URL": f"redis://127.0.0.1:{BROKER_PORT}/0",
    "COUNTERS_RECONCILE_INTERVAL_S": "0",
    "LOG_LEVEL": "WARNING",
}
# Commands of the benchmark's own observer and bookkeeping, left out of the counts.
NOT_COUNTED = {"cmdstat_hmget", "cmdstat_info", "cmdstat_config|resetstat", "cmdstat_llen"}


def django_setup() -> None:
    """Django on the benchmark's database and Redis, nothing started (a section's imports)."""
    os.environ.update(ENV)
    sys.path.insert(0, str(ROOT))
    __import__("django").setup()


def setup_django() -> None:
    """The broker and the database up and migrated."""
    django_setup()
    if not broker_up():
        server = f"redis-server --port {BROKER_PORT} --bind 127.0.0.1 --daemonize yes"
        subprocess.run([*server.split(), "--save", "", "--appendonly", "no"], check=True)
        wait_for(broker_up, 5, "the benchmark broker")
    # createdb fails when the database exists: that is fine.
    db = ENV["DATABASE_URL"].rsplit("/", 1)[1]
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", db], capture_output=True)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def broker_up() -> bool:
    ping = ["redis-cli", "-p", str(BROKER_PORT), "ping"]
    return subprocess.run(ping, capture_output=True).returncode == 0


def wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout:g} s")
        time.sleep(0.2)


@contextlib.contextmanager
def broker_stopped_after():
    """Stop the broker at the end (an error or a kill included) if this run started it."""
    was_up = broker_up()
    try:
        yield
    finally:
        if not was_up and broker_up():
            import redis

            with contextlib.suppress(redis.ConnectionError):
                redis.Redis(port=BROKER_PORT).shutdown(nosave=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_data(broker: bool = True) -> None:
    """Empty the benchmark's tables and its Redis database (and the broker's)."""
    from django.db import connection

    from counters.redis import get_redis
    from imcore.celery import app

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE imcore_message, imcore_membership, imcore_device, imcore_conversation, "
            "imcore_user_groups, imcore_user_user_permissions, django_admin_log, imcore_user "
            "RESTART IDENTITY CASCADE"
        )
    get_redis().flushdb()
    if broker:
        with app.connection_for_write() as conn:
            conn.default_channel.client.flushdb()


def make_users(n: int, tag: str) -> list[int]:
    """``n`` users without a usable password, bulk-inserted; their ids."""
    from django.contrib.auth.hashers import make_password

    from imcore.models import User

    unusable = make_password(None)
    users = (User(username=f"{tag}-{i}", password=unusable) for i in range(n))
    return [u.pk for u in User.objects.bulk_create(users, batch_size=5000)]


Device = namedtuple("Device", "pk user_id token")


def make_devices(user_ids: list[int], **fields) -> list[Device]:
    """A device each, bulk-inserted with the token hash a login would store."""
    import secrets

    from imcore import models
    from imcore.services import token_hash

    tokens = [secrets.token_urlsafe(32) for _ in user_ids]
    rows = models.Device.objects.bulk_create(
        models.Device(
            user_id=u, device_id=f"bench-{u}", platform="web", token_hash=token_hash(t), **fields
        )
        for u, t in zip(user_ids, tokens, strict=True)
    )
    return [Device(d.pk, d.user_id, t) for d, t in zip(rows, tokens, strict=True)]


class Proc:
    """A command in a session of its own, its output in a temporary log; :meth:`cpu` and
    :meth:`rss` cover it and its descendants (psutil), :meth:`stop` the whole group."""

    def __init__(self, argv: list[str], port: int = 0, **env):
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix="imcore-bench-", suffix=".log")  # noqa: SIM115
        self.proc = psutil.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **ENV, **{k: str(v) for k, v in env.items()}},
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def tree(self) -> list[psutil.Process]:
        return tree(self.proc)

    def cpu(self) -> float:
        return cpu_of(self.proc)

    def rss(self) -> int:
        """Bytes resident, the whole tree."""
        return int(tree_sum(self.proc, lambda p: p.memory_info().rss))

    def wait_http(self, settle: float = 0, timeout: float = 60) -> None:
        """Until the API answers 401 (unauthenticated) on ``self.port``, then ``settle`` s."""
        import requests

        def ready() -> bool:
            if self.proc.poll() is not None:
                tail = Path(self.log.name).read_text(errors="replace")[-4000:]
                raise RuntimeError(f"{self.proc.args} exited:\n{tail}")
            with contextlib.suppress(requests.RequestException):
                url = f"http://127.0.0.1:{self.port}/api/v1/unread"
                return requests.get(url, timeout=5).status_code == 401
            return False

        wait_for(ready, timeout, f"{self.proc.args[:3]}")
        time.sleep(settle)

    def stop(self, group: bool = True) -> str:
        """SIGTERM to the group (or the process alone), SIGKILL to the group after 30 s;
        returns the output."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15) if group else self.proc.terminate()
            try:
                self.proc.wait(30)
            except psutil.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        with self.log:
            return Path(self.log.name).read_text(errors="replace")


def server(argv: str) -> Proc:
    """``argv`` (``{port}`` in it: a free port) once its API answers."""
    port = free_port()
    proc = Proc(argv.format(port=port, python=sys.executable).split(), port)
    proc.wait_http()
    return proc


def start_worker(**env) -> list[Proc]:
    """A Celery worker (prefork, 2 processes) on both queues and beat; once it answers."""
    from imcore.celery import app

    celery = f"{sys.executable} -m celery -A imcore"  # then the command, then its options
    schedule = f"{tempfile.gettempdir()}/imcore-bench-beat-{os.getpid()}"
    procs = [
        Proc(f"{celery} worker --queues default,counters --concurrency 2 --without-gossip "
             "--without-mingle --loglevel WARNING".split(), **env),
        Proc(f"{celery} beat --schedule {schedule} --loglevel WARNING".split(), **env),
    ]  # fmt: skip
    with app.connection_for_write() as conn:
        wait_for(lambda: app.control.ping(timeout=0.5, connection=conn), 60, "the Celery worker")
    time.sleep(2.5)  # let beat tick once and the worker settle
    return procs


def postmaster() -> psutil.Process:
    """The PostgreSQL server's main process: the parent of this session's backend."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return psutil.Process(cursor.fetchone()[0]).parent()


def tree(process: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [process, *process.children(recursive=True)]
    return []


def tree_sum(process: psutil.Process, measure) -> float:
    """``measure`` summed over a process and its live descendants (the gone ones left out)."""
    total = 0.0
    for p in tree(process):
        with contextlib.suppress(psutil.Error):
            total += measure(p)
    return total


def cpu_of(process: psutil.Process) -> float:
    """User+system CPU seconds of a process tree, each with the children it reaped."""
    return tree_sum(process, lambda p: sum(p.cpu_times()[:4]))


def redis_info(port: int | None = None) -> dict:
    import redis

    return (redis.Redis(port=port) if port else redis.Redis.from_url(ENV["REDIS_URL"])).info("all")


def commands_total(info: dict) -> int:
    """Commands the server executed, including those run inside Lua scripts."""
    return sum(
        v["calls"] for k, v in info.items() if k.startswith("cmdstat_") and k not in NOT_COUNTED
    )


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
            continue
        kind = type(default)
        if kind is list:
            kind = list_of(type(default[0]))
        parser.add_argument(flag, type=kind, default=default, help=help)
    argv = sys.argv[1:]
    return parser.parse_args([*quick.split(), *argv] if "--quick" in argv else argv)


def list_of(item: type):
    return lambda text: [item(x) for x in text.split(",") if x]


@contextlib.contextmanager
def section():
    """A section's run: SIGTERM exits (so ``finally`` blocks stop what they started), the broker
    and the database up and migrated, the broker stopped at the end if this run started it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with broker_stopped_after():
        setup_django()
        yield


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values, fmt: str = "{:.1f}") -> str:
    """``median (min..max)`` of several runs, or the one value when they all agree."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if min(values) == max(values):
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def percentile(values, q: float) -> float:
    import numpy

    return float(numpy.percentile(values, q, method="nearest")) if len(values) else float("nan")


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else platform.processor()


def machine() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("show server_version")
        pg = cursor.fetchone()[0].split()[0]
    cpu = cpu_model()
    return (
        f"{psutil.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Redis {redis_info()['redis_version']}, PostgreSQL {pg}, "
        f"Python {platform.python_version()}, local services"
    )


def code_state() -> dict:
    """The commit, and the files outside bench/ that differ from it."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()

    changed = git("status", "--porcelain", "-uno", "--", ".", ":(exclude)bench").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "changed": sorted(line[3:] for line in changed),
    }


def header(title: str, machine_text: str, *notes: str) -> list[str]:
    code = code_state()
    local = f", with local changes to {', '.join(code['changed'])}" if code["changed"] else ""
    return [
        f"# {title}, {datetime.datetime.now():%Y-%m-%d %H:%M}, {socket.gethostname()}",
        "",
        f"Machine: {machine_text}. Code: {code['commit']} ({code['subject']}){local}.",
        *notes,
        "",
    ]


def table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table; the first column left-aligned, the others right."""
    return [
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 1),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def results_stem(name: str) -> Path:
    """``bench/results/<name>-<date>-<host>`` (``<date>-<host>`` for the whole ``make bench``)."""
    prefix = f"{name}-" if name else ""
    # make bench sets BENCH_DATE once, so a run past midnight keeps one date for its sections.
    day = os.environ.get("BENCH_DATE") or datetime.date.today().isoformat()
    return RESULTS / f"{prefix}{day}-{socket.gethostname()}"


def figure(name: str, title: str, panels: int = 1, size=(7, 4.5)):
    """A matplotlib figure whose title names the machine; :func:`save_figure` writes it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(panels, 1, figsize=(size[0], size[1] * panels), squeeze=False)
    memory = psutil.virtual_memory().total / 2**30
    host = f"{socket.gethostname()}: {psutil.cpu_count()} cores, {memory:.0f} GiB, {cpu_model()}"
    fig.suptitle(f"{title}\n{host}", fontsize=10)
    return fig, list(axes[:, 0])


def save_figure(fig, name: str, suffix: str = "") -> str:
    """Write ``<stem><suffix>.png``; returns the markdown that shows it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    png = Path(f"{results_stem(name)}{suffix}.png")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    return f"![{fig._suptitle.get_text().splitlines()[0]}]({png.name})"


def write_results(name: str, markdown: str, data: dict) -> Path:
    """Write ``<stem>.md`` and ``<stem>.json`` and print the markdown; returns the stem. Every
    section ends with this, so ``bench/all.py`` gathers a run's sections from the files."""
    stem = results_stem(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(markdown.rstrip() + "\n")
    Path(f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(markdown)
    print(f"\nWritten: {stem}.md and .json")
    return stem
