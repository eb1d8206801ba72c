"""Shared set-up of the benchmarks: their own PostgreSQL database and Redis (a second
redis-server on its own port serves as the broker, so each side's commands are counted
apart), real Celery processes, and a description of the machine."""

import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def setup_django() -> None:
    os.environ.update(ENV)
    sys.path.insert(0, str(ROOT))
    start_broker()
    db = ENV["DATABASE_URL"].rsplit("/", 1)[1]
    exists = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-Atc",
            f"select 1 from pg_database where datname='{db}'",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not exists:
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", db], check=True)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def start_broker() -> None:
    ping = ["redis-cli", "-p", str(BROKER_PORT), "ping"]
    if subprocess.run(ping, capture_output=True).returncode == 0:
        return
    subprocess.run(
        [
            "redis-server",
            "--port",
            str(BROKER_PORT),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
    )
    for _ in range(50):
        if subprocess.run(ping, capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("the benchmark broker did not start")


def broker_up() -> bool:
    ping = ["redis-cli", "-p", str(BROKER_PORT), "ping"]
    return subprocess.run(ping, capture_output=True).returncode == 0


@contextlib.contextmanager
def broker_stopped_after():
    """At the end (an error or a kill included), stop the broker if this run started it
    (``setup_django()`` does when none is up): nothing else uses it."""
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


def reset_data() -> None:
    """Empty the benchmark's tables and Redis databases."""
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
    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()


def celery(*args: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "imcore", *args, "--loglevel", "WARNING"],
        cwd=ROOT,
        env={**os.environ, **ENV, **{k: str(v) for k, v in env.items()}},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_worker(concurrency: int = 2, **env) -> subprocess.Popen:
    from imcore.celery import app

    proc = celery(
        "worker",
        "--queues",
        "default,counters",
        "--concurrency",
        str(concurrency),
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        f"bench-{os.getpid()}@%h",
        **env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with app.connection_for_write() as conn:
            if app.control.ping(timeout=0.5, connection=conn):
                return proc
    raise RuntimeError("the benchmark worker did not start")


def worker_task_counts() -> dict[str, int]:
    from imcore.celery import app

    with app.connection_for_write() as conn:
        stats = app.control.inspect(timeout=2, connection=conn).stats() or {}
    totals: dict[str, int] = {}
    for worker in stats.values():
        for name, n in worker.get("total", {}).items():
            totals[name] = totals.get(name, 0) + n
    return totals


def group_cpu_seconds(proc: subprocess.Popen) -> float:
    """User+system CPU of every live process in ``proc``'s process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == proc.pid:  # field 5 of stat: the process group
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def redis_info(port: int = 6379) -> dict:
    import redis

    return redis.Redis(port=port).info("all")


# Commands of the benchmark's own observer and bookkeeping, left out of the counts.
NOT_COUNTED = {"cmdstat_hmget", "cmdstat_info", "cmdstat_config|resetstat", "cmdstat_llen"}


def commands_total(info: dict) -> int:
    """Commands the server executed, including those run inside Lua scripts."""
    return sum(
        v["calls"] for k, v in info.items() if k.startswith("cmdstat_") and k not in NOT_COUNTED
    )


def redis_cpu(info: dict) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def machine() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("show server_version")
        pg = cursor.fetchone()[0]
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB, "
        f"Redis {redis_info()['redis_version']}, PostgreSQL {pg.split()[0]}, "
        f"Python {platform.python_version()}, {shutil.which('redis-server') and 'local services'}"
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class ServedApp:
    """A web server process the benchmarks started: ``self.proc``, ``self.port``,
    ``self.log`` (its output file) and ``self.server_name`` set by the subclass."""

    server_name = "server"

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the API answers (401 for an unauthenticated sync call)."""
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.server_name} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/api/v1/sync")
                if conn.getresponse().status == 401:
                    conn.close()
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"{self.server_name} did not answer in {timeout:g} s:\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median (min..max)`` of several runs, or the one value when they all agree."""
    if not values:
        return "n/a"
    if min(values) == max(values):
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


RESULTS = ROOT / "bench" / "results"


def results_stem(name: str) -> Path:
    """``bench/results/<name>-<date>-<host>`` (``<date>-<host>`` for the whole ``make bench``)."""
    prefix = f"{name}-" if name else ""
    # make bench sets BENCH_DATE once, so a run past midnight keeps one date for its sections.
    day = os.environ.get("BENCH_DATE") or datetime.date.today().isoformat()
    return RESULTS / f"{prefix}{day}-{socket.gethostname()}"


def write_results(name: str, markdown: str, data: dict) -> Path:
    """Write ``<stem>.md`` and ``<stem>.json``, print the markdown; returns the stem.

    Every benchmark script ends with this, so ``bench/all.py`` (``make bench``) can gather the
    sections of one run from the files they wrote."""
    stem = results_stem(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(markdown.rstrip() + "\n")
    Path(f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(markdown)
    print(f"\nWritten: {stem}.md and .json")
    return stem
