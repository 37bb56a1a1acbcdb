"""Nothing the coordinator started outlives it, even when it is killed with SIGKILL (Linux).

``python -m stages.cluster_repro`` starts a local Ray instance (GCS, raylet, workers, the dashboard and runtime-env
agents), and, at the end, ``dvc status`` in the workspace. Killed, it takes the GCS and the raylet with it (Ray
ties them to their driver) and the stages die with their Ray worker, but Ray's agents lingered for a minute and
more (measured: still running 60 s after the kill), and a restore in a child process (``dvc repro --pull``, as the
coordinator once ran it) went on checking out files into a workspace where the user may already be running
something else.

:func:`start` launches this file as a small watcher process: it asks the kernel for SIGTERM when the coordinator
dies (``PR_SET_PDEATHSIG``), keeps a list of the coordinator's descendants (pid and start time, refreshed every
``INTERVAL`` s from ``/proc``), and when the coordinator is gone SIGKILLs every listed process that is still the
same process (same start time), then exits. Standard library only; elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

INTERVAL = 0.5


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(name)] = (int(fields[1]), fields[19])
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def watch(coordinator: int) -> None:
    import ctypes

    gone = False

    def on_parent_death(*_):
        nonlocal gone
        gone = True

    signal.signal(signal.SIGTERM, on_parent_death)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the coordinator, which then exits and we follow
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    known: dict[int, str] = {}
    while not gone and os.getppid() == coordinator:
        known.update(_descendants(coordinator, _table()))
        known.pop(os.getpid(), None)
        time.sleep(INTERVAL)
    table = _table()
    for pid in list(known):  # and what they started since the last look (their parents are not killed yet)
        known.update(_descendants(pid, table))
    known.pop(os.getpid(), None)
    for pid, started in known.items():  # still the same process: SIGKILL (start times tell a reused pid apart)
        if table.get(pid, (0, ""))[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start() -> subprocess.Popen | None:
    """The watcher of this process (None where it cannot work)."""
    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())], stdin=subprocess.DEVNULL,
                            close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
