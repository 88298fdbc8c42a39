"""A fork server for integration tests: real processes without paying for ``import torch`` each time.

Starting ``python -m worker`` costs seconds of CPU (importing torch) before it does anything;
a pipeline test starts up to seven such processes. The fork server is one process that has
imported torch, pyzmq and every zmqps module once - and done nothing else: no tensor math (so
no OpenMP thread pool), no ZeroMQ context, no threads. For each request it forks a child
that starts a new session, sends its output to a log file, and runs the same entry point
the console script runs (``ps.cli.main``, ``worker.cli.main``). The children are ordinary
processes talking over real TCP ZeroMQ sockets; they can be SIGKILLed like any other.

Protocol (lines on the server's stdin/stdout): request ``{"token", "entry", "args", "log",
"env"}`` as JSON; replies ``pid <token> <pid>``; and ``exit <pid> <status>`` when a child ends
(the fork server reaps its children; status is the exit code, or -signal).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.procs import ROOT, child_env

ENTRIES = {"ps": "ps.cli", "worker": "worker.cli"}


class ForkedChild:
    """A child of the fork server; the same interface as :class:`tests.procs.Child`."""

    def __init__(self, server: "ForkServer", name: str, pid: int, log: Path) -> None:
        self.server, self.name, self.pid, self.log = server, name, pid, log

    def poll(self) -> int | None:
        """The exit status, or None while running."""
        return self.server.status(self.pid)

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the child's output."""
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        """Exit status; raises AssertionError (with the log) if still running after ``timeout``."""
        code = self.server.wait(self.pid, timeout)
        if code is None:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.output()}")
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child's process group."""
        if self.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM, two seconds' grace, SIGKILL."""
        if self.poll() is None:
            self.kill(signal.SIGTERM)
            if self.server.wait(self.pid, 2) is None:
                self.kill(signal.SIGKILL)
                self.server.wait(self.pid, 5)


class ForkServer:
    """The test side: starts the fork server and asks it for children."""

    def __init__(self, timeout: float = 120.0) -> None:
        env = child_env({"OMP_NUM_THREADS": "1"})
        self.proc = subprocess.Popen([sys.executable, "-c", "from tests.forkserver import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT,
                                     text=True, start_new_session=True)
        self._cond = threading.Condition()
        self._exits: dict[int, int] = {}
        self._pids: dict[str, int] = {}
        self._ready = False
        self._n = 0
        threading.Thread(target=self._read, daemon=True).start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self.proc.poll() is not None, timeout):
                raise AssertionError(f"the fork server did not start within {timeout}s")
        if not self._ready:
            raise AssertionError(f"the fork server exited with status {self.proc.returncode}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            with self._cond:
                if parts == ["ready"]:
                    self._ready = True
                elif len(parts) == 3 and parts[0] == "pid":
                    self._pids[parts[1]] = int(parts[2])
                elif len(parts) == 3 and parts[0] == "exit":
                    self._exits[int(parts[1])] = int(parts[2])
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def spawn(self, name: str, entry: str, args: list[str], log: Path, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> ForkedChild:
        """Fork a child running ``entry`` (``ps`` or ``worker``) with ``args``; output to ``log``."""
        assert entry in ENTRIES, entry
        self._n += 1
        token = f"t{self._n}"
        req = {"token": token, "entry": entry, "args": list(args), "log": str(log), "env": env or {}}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        with self._cond:
            if not self._cond.wait_for(lambda: token in self._pids, timeout):
                raise AssertionError(f"the fork server did not start {name} within {timeout}s")
            pid = self._pids.pop(token)
        return ForkedChild(self, name, pid, log)

    def status(self, pid: int) -> int | None:
        """A child's exit status, or None while it runs."""
        with self._cond:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float) -> int | None:
        """Wait up to ``timeout`` for a child to end; its status, or None."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self.proc.poll() is not None, timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        """Stop the fork server (children are stopped by their owners)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---------------------------------------------------------------------- the fork server itself
def _preload() -> None:
    """Import everything a child needs, touching no thread pool, context or socket."""
    import importlib

    import torch
    import torch.optim  # noqa: F401
    import torch._dynamo  # noqa: F401  - torch.optim imports it lazily on the first optimizer (seconds)
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  - autograd.backward imports it lazily

    for mod in ("ps.cli", "ps.server", "worker.cli", "worker.runtime", "worker.pipeline.runtime",
                "safetensors.torch", "tests.jobs", "tests.pipeline_jobs"):
        importlib.import_module(mod)
    assert torch is not None


def _run_child(req: dict[str, Any]) -> None:  # pragma: no cover - runs in the forked child
    code = 1
    try:
        os.setsid()
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(req["env"])
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        module = __import__(ENTRIES[req["entry"]], fromlist=["main"])
        sys.argv = [req["entry"], *req["args"]]
        code = module.main(req["args"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve() -> None:  # pragma: no cover - the fork server's main loop
    """Preload, then fork children on request and report their exits, until stdin closes.

    When stdin closes (the test process ended), children still running get SIGTERM, then
    SIGKILL after five seconds.
    """
    _preload()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    buf = b""
    open_ = True
    children: set[int] = set()
    kill_at: float | None = None
    while open_ or children:
        readable, _, _ = select.select([0] if open_ else [], [], [], 0.05)
        if readable:
            data = os.read(0, 65536)
            if not data:
                open_ = False
                kill_at = time.monotonic() + 5
                _signal_all(children, signal.SIGTERM)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run_child(req)
                children.add(pid)
                out.write(f"pid {req['token']} {pid}\n")
                out.flush()
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            out.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
            out.flush()
        if not open_:
            if kill_at is not None and time.monotonic() > kill_at:
                _signal_all(children, signal.SIGKILL)
                kill_at = None
            time.sleep(0.05)
    out.flush()
    os._exit(0)  # skip the interpreter's (slow) teardown of torch


def _signal_all(pids: set[int], sig: int) -> None:  # pragma: no cover - fork server
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
