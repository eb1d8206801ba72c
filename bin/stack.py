"""`make run`'s process manager: ``honcho start`` (the Procfile, output prefixed by process)
with every process kept in honcho's own process group, so the stack stops as one.

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
import signal
import sys
import threading
from pathlib import Path

from honcho import command, manager, process
from honcho.compat import ProcessManager

STOP_TIMEOUT_S = float(os.environ.get("STACK_STOP_TIMEOUT_S", "20"))


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
    sys.exit(command.main(["start", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
