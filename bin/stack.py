"""`make run`'s process manager: ``honcho start`` (the Procfile, output prefixed by process)
with every process kept in honcho's own process group, so the stack stops as one.

The web front is three Procfile processes on one port (``IMCORE_HOST``:``IMCORE_PORT``):
nginx routes ``/ws/`` to uvicorn (``ws``, the WebSocket), serves ``/static/`` from disk and
passes the rest to uWSGI (``app``, Django over WSGI). Before honcho starts, this writes
nginx's configuration (bin/nginx.conf, filled in) into a run directory of its own, where the
two servers' unix sockets, nginx's pid and temporary files live too; its path is
``IMCORE_RUN_DIR`` in the processes' environment, and it is removed when the stack stops.

Plain honcho starts each Procfile process in a session of its own and stops it with SIGTERM,
then SIGKILL after 5 s, to that session's group. A supervisor that sends SIGTERM to the
stack's group and SIGKILL 3 s later (as ``kill``, systemd, Docker or a CI runner do) killed
honcho before its SIGKILL: a uvicorn master still waiting for a WebSocket to close lived on in
its own session, an orphan holding the port, and the next ``make run`` could not bind. Here:

- the processes stay in this process's group: a signal to the group reaches every one of
  them, their children (uvicorn's workers, Celery's pool) included, and so does a SIGKILL;
- a SIGTERM or SIGINT to this process alone is passed on to every process (the Procfile runs
  each command with ``exec``, so the pid honcho knows is the program, not a shell);
- whatever still runs ``STACK_STOP_TIMEOUT_S`` seconds after the SIGTERM (default 20) is
  killed with SIGKILL, children included. The servers' own graceful timeouts are shorter
  (uvicorn ``--timeout-graceful-shutdown``), so this is the last resort.
"""

import contextlib
import os
import pwd
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path

from honcho import command, manager, process
from honcho.compat import ProcessManager

STOP_TIMEOUT_S = float(os.environ.get("STACK_STOP_TIMEOUT_S", "20"))
ROOT = Path(__file__).resolve().parent.parent
STATIC_ROOT = ROOT / "staticfiles"  # settings.STATIC_ROOT, where `make migrate` collects
NGINX_DIRS = ("/usr/sbin", "/sbin")
RUN_DIR_PREFIX = "imcore-run-"  # not on a user's PATH on Debian


def raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one (Debian gives a user 1,024 of often a
    million), for every process of the stack: nginx, and uvicorn holding the WebSockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def nginx_config(run_dir: Path, host: str, port: str) -> str:
    """bin/nginx.conf for this stack. As root nginx's workers would run as ``nobody``, who
    may not read the run directory or the static files: they run as the stack's user."""
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    # Two per proxied request or WebSocket, within the open-file limit nginx inherits.
    connections = min(8192, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 32)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    text = (ROOT / "bin" / "nginx.conf").read_text()
    for name, value in {
        "USER": user,
        "WORKER_CONNECTIONS": str(connections),
        "RUN_DIR": str(run_dir),
        "LISTEN": listen,
        "STATIC_ROOT": str(STATIC_ROOT),
    }.items():
        text = text.replace(f"@{name}@", value)
    return text


def remove_stale_run_dirs() -> None:
    """Run directories a killed stack left (a SIGKILL gives it no time to remove its own):
    a minute old, with no live nginx (its pid file's process)."""
    for old in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        with contextlib.suppress(OSError, ValueError):
            if old.owner() != pwd.getpwuid(os.geteuid()).pw_name:
                continue
            if time.time() - old.stat().st_mtime < 60:
                continue  # a stack still starting
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int((old / "nginx.pid").read_text()), 0)
                continue  # its nginx lives
            shutil.rmtree(old, ignore_errors=True)


def prepare_run_dir(env: MutableMapping[str, str]) -> Path:
    """A fresh run directory with nginx's configuration for ``IMCORE_HOST``:``IMCORE_PORT``
    of ``env``, where it sets ``IMCORE_RUN_DIR`` and a ``PATH`` that finds nginx for the
    Procfile. The caller removes the directory when the stack has stopped."""
    host = env.get("IMCORE_HOST", "127.0.0.1")
    port = env.get("IMCORE_PORT", "8000")
    remove_stale_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{port}-"))
    (run_dir / "nginx.conf").write_text(nginx_config(run_dir, host, port))
    env["IMCORE_RUN_DIR"] = str(run_dir)
    path = env.get("PATH", "")
    if not shutil.which("nginx", path=path):
        env["PATH"] = os.pathsep.join([path, *NGINX_DIRS])
    return run_dir


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class GroupProcessManager(ProcessManager):
    """Signals a process, not a session: the processes share honcho's group."""

    def terminate(self, pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def kill(self, pid):
        for target in [pid, *_children(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)


class GroupPopen(process.Popen):
    """honcho's Popen without ``start_new_session``."""

    def __init__(self, cmd, **kwargs):
        kwargs["start_new_session"] = False
        super().__init__(cmd, **kwargs)


class GroupProcess(process.Process):
    """A Procfile process started by :class:`GroupPopen`. Its command must ``exec`` the
    program (see the Procfile): the pid honcho signals is then the program's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._child_ctor = GroupPopen


class GroupManager(manager.Manager):
    """honcho's Manager with the processes in its group and a deadline for stopping: honcho
    itself waits ``KILL_WAIT`` only once some process has exited."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._procmgr = GroupProcessManager()
        self._process_ctor = GroupProcess

    def terminate(self):
        if not self._terminating:
            deadline = threading.Timer(STOP_TIMEOUT_S, self.kill)
            deadline.daemon = True
            deadline.start()
        super().terminate()


def main() -> None:
    command.Manager = GroupManager  # what `honcho start` builds
    manager.KILL_WAIT = STOP_TIMEOUT_S
    raise_open_files_limit()
    run_dir = prepare_run_dir(os.environ)
    try:
        command.main(["start", *sys.argv[1:]])
    finally:  # honcho exits with SystemExit, its status kept
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
