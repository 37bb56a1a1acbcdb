"""Processes that end when the process that started them ends, so that nothing orphaned keeps writing outputs.

A stage started by ``dvc repro`` must not outlive a killed ``dvc`` (a new ``dvc repro`` would check out the same
paths while the orphan still writes them), and the worker processes of a stage (dataset generation, evaluation
envs) must not outlive a killed stage. On Linux the kernel delivers a signal to a process when its parent dies
(``prctl(PR_SET_PDEATHSIG)``); elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; exit at once if it already has.

    Returns whether the request took effect (False off Linux or without libc). Call it first thing in a child.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols (libc); find_library runs ldconfig
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request: the signal will never come
        os.kill(os.getpid(), sig)
    return True
