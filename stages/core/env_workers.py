"""Environment groups in worker processes: fresh interpreters talking over socket pairs, started before the caller
builds its own envs, killed with their parent; optionally video processes that replay and render episodes.

:class:`Backend` steps every group at once (group 0 in this process or in a worker, the others in workers).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path

from stages.core.env_group import EnvGroup


def _serve(conn, group: EnvGroup) -> None:
    """Answer (command, payload) messages for ``group`` until 'close' or the parent goes away."""
    while True:
        command, payload = conn.recv()
        if command == "close":
            return
        if command == "reset":
            conn.send(("ok", group.reset(payload)))
        elif command == "run":
            conn.send(("ok", group.run_chunks(payload)))
        elif command == "replay":
            conn.send(("ok", group.replay(*payload)))
        else:
            conn.send(("error", f"unknown command {command!r}"))


def _worker_entry(fd: int) -> None:
    """Entry point of a worker process: receive its configuration on ``fd``, build the envs, serve commands.

    It first asks the kernel to kill it when its parent dies (a killed stage leaves no env process behind).
    """
    from stages.core.parent_watch import die_with_parent

    die_with_parent()
    os.environ.setdefault("MUJOCO_GL", "egl")
    conn = Connection(fd)
    group = None
    try:
        env_id, count, render_size, env_kwargs, fast_env, shadow_size = conn.recv()
        group = EnvGroup(env_id, count, render_size, env_kwargs, fast_env, shadow_size)
        conn.send(("ok", group.spaces()))
        _serve(conn, group)
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:  # noqa: BLE001 -- any failure is reported to the parent, which raises it
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if group is not None:
            group.close()
        conn.close()


_WORKER_CODE = "import sys; from stages.core.env_workers import _worker_entry; _worker_entry(int(sys.argv[1]))"


def _start_worker(config: tuple) -> tuple[Connection, subprocess.Popen]:
    """Start a worker process running :func:`_worker_entry` on one end of a socket pair; send it ``config``.

    A fresh interpreter (not multiprocessing's spawn, which re-imports the caller's ``__main__``) that imports this
    very copy of the package, so a worker never pays for the caller's imports.
    """
    parent_sock, child_sock = socket.socketpair()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),),
            env=env,
        )
    finally:
        child_sock.close()
    conn = Connection(parent_sock.detach())
    conn.send(config)
    return conn, proc


def _stop_workers(conns: list[Connection], procs: list[subprocess.Popen]) -> None:
    """Ask workers to close, wait for them, and terminate any that do not exit.

    Our ends are closed right after the request (a worker still reads it), so a worker blocked sending a reply
    nobody will read (a video after an error) fails at once instead of holding up the wait.
    """
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(("close", None))
        conn.close()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=5)


class Backend:
    """Environment groups stepped concurrently: group 0 in this process (``local``) or in a worker process, groups
    1.. in worker processes; optionally worker processes that only replay and render video episodes.

    Workers are started first (before this process builds its own envs); their readiness is only awaited by
    :meth:`wait_ready` (called by the first command, or for the spaces when no group is local), so the caller can
    do other start-up work -- import and compile its policy -- meanwhile.
    """

    def __init__(
        self,
        env_id: str,
        counts: list[int],
        render_size: tuple[int, int],
        env_kwargs: dict,
        fast_env: bool,
        shadow_size: int | None,
        local: bool = True,
        renderers: int = 0,
    ):
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen] = []
        self.broken = False
        self.offset = 1 if local else 0  # group w runs in worker process w - offset (conns, procs)
        self.local: EnvGroup | None = None
        self.renderers: list[list] = []  # video processes: [connection, process, start-up message read]
        self._spaces: dict | None = None
        self._finalizer = weakref.finalize(self, _stop_workers, self.conns, self.procs)
        try:
            for count in counts[self.offset :]:  # start the workers first: they build their envs while we work
                conn, proc = _start_worker((env_id, count, render_size, env_kwargs, fast_env, shadow_size))
                self.conns.append(conn)
                self.procs.append(proc)
            for _ in range(renderers):  # after the stepping workers, so they do not delay them
                conn, proc = _start_worker((env_id, 1, render_size, env_kwargs, fast_env, shadow_size))
                self.conns.append(conn)
                self.procs.append(proc)
                self.renderers.append([conn, proc, False])
            if local:
                self.local = EnvGroup(env_id, counts[0], render_size, env_kwargs, fast_env, shadow_size)
                self._spaces = self.local.spaces()
        except BaseException:
            self.close()
            raise
        self._pending = list(range(self.offset, len(counts)))

    def wait_ready(self) -> None:
        """Wait until every worker has built its environments (raising a worker's start-up error)."""
        try:
            while self._pending:
                self._check_spaces(self._receive(self._pending[0]))
                self._pending.pop(0)
        except BaseException:
            self.broken = True
            raise

    def _check_spaces(self, spaces: dict) -> None:
        if self._spaces is None:
            self._spaces = spaces
        elif spaces != self._spaces:
            raise RuntimeError(f"rollout worker envs differ from the others: {spaces} != {self._spaces}")

    def _receive(self, worker: int):
        return self._receive_on(self.conns[worker - self.offset], self.procs[worker - self.offset], f"{worker}")

    @staticmethod
    def _receive_on(conn: Connection, proc: subprocess.Popen, name: str):
        try:
            status, payload = conn.recv()
        except EOFError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            raise RuntimeError(
                f"rollout worker {name} died (exit code {proc.returncode}); see its output above"
            ) from None
        if status != "ok":
            raise RuntimeError(f"rollout worker {name} failed:\n{payload}")
        return payload

    def spaces(self) -> dict:
        """Observation and action spaces of the envs (waits for the workers when no group is local)."""
        if self._spaces is None:
            self.wait_ready()
        return self._spaces

    def spaces_known(self) -> bool:
        return self._spaces is not None

    def call(self, command: str, per_worker: list[list]) -> list[list]:
        """Run ``command`` with each group's items: remote groups first (sent), then the local one, then collect.

        Any failure here leaves replies in flight or envs mid-chunk, so the backend is marked broken.
        """
        if self.broken:
            raise RuntimeError("an earlier environment step failed; close this Evaluator and make a new one")
        self.wait_ready()
        try:
            busy = [w for w in range(self.offset, len(per_worker)) if per_worker[w]]
            for w in busy:
                self.conns[w - self.offset].send((command, per_worker[w]))
            results: list[list] = [[] for _ in per_worker]
            if self.local is not None and per_worker[0]:
                method = self.local.reset if command == "reset" else self.local.run_chunks
                results[0] = method(per_worker[0])
            for w in busy:
                results[w] = self._receive(w)
        except BaseException:
            self.broken = True
            raise
        return results

    # -- video processes: requests are sent at once, replies collected when they are there (or at the end) -------
    def send_replay(self, seed: int, limit: int, frame_skip: int, chunks: list) -> None:
        """Ask the video processes to replay an episode, each rendering its share of the frames."""
        for part, (conn, _, _) in enumerate(self.renderers):
            conn.send(("replay", (seed, limit, frame_skip, chunks, part, len(self.renderers))))

    def replay_ready(self) -> bool:
        """Whether every video process's reply to the oldest request can be read without waiting."""
        for i, (conn, _, ready) in enumerate(self.renderers):
            if not ready:
                if not conn.poll():
                    return False
                self._renderer_started(i)
            if not conn.poll():
                return False
        return True

    def _renderer_started(self, i: int) -> None:
        """Read video process i's start-up message (the spaces of its env), which comes before its replies."""
        conn, proc, _ = self.renderers[i]
        self._check_spaces(self._receive_on(conn, proc, f"(video {i})"))
        self.renderers[i][2] = True

    def receive_replay(self) -> tuple:
        """The oldest replay, its parts put together: (return, steps taken, done, success, last observation,
        frames); waits for it."""
        try:
            parts = []
            for i, (conn, proc, ready) in enumerate(self.renderers):
                if not ready:
                    self._renderer_started(i)
                parts.append(self._receive_on(conn, proc, f"(video {i})"))
        except BaseException:
            self.broken = True
            raise
        n, frames = len(parts), [None] * sum(len(part[-1]) for part in parts)
        for i, part in enumerate(parts):
            frames[i::n] = part[-1]
        return (*parts[0][:-1], frames)

    def close(self) -> None:
        self._finalizer()
        if getattr(self, "local", None) is not None:
            self.local.close()
            self.local = None
