"""Real processes for integration tests: a server and workers, always cleaned up.

Every child logs to its own file under the test's tmp dir; a failure message includes the
tails of those logs. Children get SIGTERM, then SIGKILL, when the test ends, pass or fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent

Wrap = Callable[[list[str]], list[str]]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for children: the repo on PYTHONPATH, no stray PS_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Child:
    """A child process whose output goes to ``log``."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._fh, stderr=subprocess.STDOUT, env=child_env(env),
                                     cwd=cwd or ROOT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the child's output."""
        self._fh.flush()
        return self.log.read_text(errors="replace")[-tail:]

    def wait(self, timeout: float) -> int:
        """Exit status; raises AssertionError (with the log) if still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.output()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child's whole process group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM, two seconds' grace, SIGKILL; then close the log."""
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(5)
        self._fh.close()


class Procs:
    """Starts zmqps processes for one test and stops them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []
        self._n = 0

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Child:
        """Start any command as a tracked child."""
        self._n += 1
        child = Child(name, argv, self.tmp / f"{self._n:02d}-{name.replace(' ', '_')}.log", env, cwd)
        self.children.append(child)
        return child

    def server(self, workers: int, *args: str, ckpt: Path | None = None, env: dict[str, str] | None = None,
               bind: str = "tcp://127.0.0.1:0", timeout: float = 60.0, wrap: Wrap | None = None) -> tuple[Child, str]:
        """Start ``ps-server`` on a free port; return it and the endpoint it reported.

        ``wrap`` rewrites the command line, e.g. to run it in a network namespace (``Lab.wrap``).
        """
        ready = self.tmp / f"ready-{self._n + 1}"
        ckpt = ckpt or self.tmp / "ckpt"
        argv = [sys.executable, "-m", "ps", "--bind", bind, "--workers", str(workers),
                "--ready-file", str(ready), "--checkpoint-dir", str(ckpt), *args]
        child = self.spawn("server", wrap(argv) if wrap else argv, env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists() and ready.read_text().strip():
                return child, ready.read_text().strip()
            if child.proc.poll() is not None:
                raise AssertionError(f"server exited {child.proc.returncode} before listening:\n{child.output()}")
            time.sleep(0.05)
        raise AssertionError(f"server did not report its endpoint in {timeout}s:\n{child.output()}")

    def worker(self, endpoint: str, rank: int, world: int, *args: str,
               env: dict[str, str] | None = None, wrap: Wrap | None = None) -> Child:
        """Start ``ps-worker`` with rank ``rank`` of ``world`` (``wrap``: see :meth:`server`)."""
        argv = [sys.executable, "-m", "worker", "--server", endpoint, "--rank", str(rank),
                "--world-size", str(world), "--timeout", "60", *args]
        return self.spawn(f"worker {rank}", wrap(argv) if wrap else argv, env)

    def wait_ok(self, children: Sequence[Child], timeout: float = 120.0) -> None:
        """Every child exits 0 within ``timeout`` (shared deadline), else fail with their logs."""
        deadline = time.monotonic() + timeout
        for c in children:
            code = c.wait(max(0.1, deadline - time.monotonic()))
            if code != 0:
                logs = "\n".join(f"--- {x.name} ---\n{x.output()}" for x in children)
                raise AssertionError(f"{c.name} exited {code}\n{logs}")

    def cleanup(self) -> None:
        """Stop every child still running."""
        for c in reversed(self.children):
            c.stop()
