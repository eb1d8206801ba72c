"""Real server processes for the stop and fault tests: free ports, private redis-servers the
tests may stop and restart (never the shared one), and the processes a tagged run started."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import ROOT, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:``port``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def uvicorn_command(port: int, *options: str) -> list[str]:
    """The command of a uvicorn process serving ``imcore.asgi`` on 127.0.0.1:``port``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "imcore.asgi:application",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *options,
    ]


@contextlib.contextmanager
def uvicorn_served(*, env: dict[str, str], options: tuple[str, ...] = ()):
    """A uvicorn process (:func:`uvicorn_command`) in the environment ``env`` on a free port,
    stopped on exit; yields the port once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen(
        uvicorn_command(port, *options), cwd=ROOT, env=env, start_new_session=True
    )
    try:
        wait_until(lambda: port_open(port), timeout=30, message="uvicorn did not start")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def port_bindable(port: int) -> bool:
    """A server could listen on 127.0.0.1:``port`` now (with SO_REUSEADDR, as uvicorn does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


class RedisServer:
    """A private ``redis-server`` on a port of its own, which a test may stop and restart.
    ``restart(empty=True)`` comes back with no data; ``stop(save=True)`` keeps the data on disk
    so that the next ``start`` loads it (an outage, not a loss)."""

    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="imcore-redis-")
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        # No retries: redis-py's default (3, backing off) made SHUTDOWN, which the server
        # answers by closing the connection, take 6-12 s, so an outage lasted that much longer.
        return redis.Redis(port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                self.dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )
        wait_until(self._ready, timeout=20, message="the private redis-server did not start")

    def _ready(self) -> bool:
        try:
            return self.client().ping()
        except redis.RedisError:
            return False

    def stop(self, save: bool = False) -> None:
        if self.proc is None:
            return
        if save:
            with contextlib.suppress(redis.RedisError):
                self.client().shutdown(save=True)
        if not save or self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: what it held in memory is gone
        self.proc.wait(10)
        self.proc = None
        if not save:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, "dump.rdb"))

    def restart(self, empty: bool = True) -> None:
        self.stop(save=not empty)
        self.start()

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def tagged_pids(tag: str) -> set[int]:
    """Live (not zombie) processes whose environment holds ``IMCORE_TEST_TAG=<tag>``: every
    process a run started, wherever it was re-parented or whichever group it moved to."""
    needle = f"IMCORE_TEST_TAG={tag}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.add(int(entry.name))
    return found


def describe(pids: set[int]) -> list[str]:
    """``pid pgid sid command`` of each process, for failure messages."""
    lines = []
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            lines.append(f"{pid} pgid={fields[2]} sid={fields[3]} {cmd[:120]}")
    return lines


def kill_tagged(tag: str) -> None:
    """Clean-up after a failed test: SIGKILL whatever a tagged run left behind."""
    for pid in tagged_pids(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
