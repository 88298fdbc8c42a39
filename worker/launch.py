"""``ps-launch``: one server and K workers as separate local processes, for one command.

The server binds a port the OS picks and writes it to a ready file; the workers are told
that endpoint. Output of every child is streamed with its role prefix. If any child fails,
the others are stopped and ``ps-launch`` exits non-zero; Ctrl-C stops every child cleanly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Sequence

from common.config import JobFields, LaunchConfig, check_eval_data, parse_config, to_argv
from common.errors import ConfigError
from common.logs import setup_logging
from common.options import EVAL_LOG

log = logging.getLogger("launch")

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
JOB_OPTIONS = [f.name for f in dataclasses.fields(JobFields)]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Children get SIGTERM if the launcher dies (Linux), so nothing is left running."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """One child process with its output streamed, line by line, under a prefix."""

    def __init__(self, name: str, argv: list[str], passthrough: bool = False) -> None:
        self.name = name
        self.argv = argv
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        out = None if passthrough else subprocess.PIPE
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     env=env, preexec_fn=_die_with_parent, text=True, errors="replace")
        self.thread = None
        if self.proc.stdout is not None:
            self.thread = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
            self.thread.start()

    def _pump(self, stream: IO[str]) -> None:
        tag = f"[{self.name}]"
        for line in stream:
            sys.stderr.write(line if tag in line else f"{tag} {line}")
            sys.stderr.flush()

    def stop(self) -> None:
        """SIGTERM, wait a little, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def join_output(self) -> None:
        """Wait until all of the child's output has been written."""
        if self.thread is not None:
            self.thread.join(timeout=5)


class _ServerRefused(RuntimeError):
    """The server exited before listening (its log says why); a configuration error (2) stays 2."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the server exited with status {code} before listening (its log above says why)")
        self.code = code


def _wait_ready(server: Child, ready: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists() and ready.read_text().strip():
            return ready.read_text().strip()
        if server.proc.poll() is not None:
            raise _ServerRefused(server.proc.returncode)
        time.sleep(0.05)
    raise TimeoutError(f"the server did not report its endpoint within {READY_TIMEOUT_S:.0f}s")


def server_argv(cfg: LaunchConfig, ready: Path, ckpt: str) -> list[str]:
    """Command line of the server: every server option ``ps-launch`` has, and those it sets itself.

    The server options are :meth:`LaunchConfig.server_options` (all of ``ServerConfig``'s but
    :data:`common.config.LAUNCHER_OMITS`), so a new server option reaches the server unlisted here.
    """
    server = cfg.server_config(bind="tcp://127.0.0.1:0", ready_file=str(ready), checkpoint_dir=ckpt,
                               metrics_log=cfg.metrics_log or os.path.join(ckpt, "metrics.jsonl"))
    return [sys.executable, "-m", "ps", *to_argv(server, [*cfg.server_options(), "bind", "ready_file"])]


def worker_argv(cfg: LaunchConfig, endpoint: str, rank: int, world: int, ckpt: str | None = None) -> list[str]:
    """Command line of worker ``rank`` (its ``--state-dir`` beside the server's checkpoints, in ``ckpt``).

    With ``--eval-every`` and no ``--eval-log``, the worker logs its held-out evaluations to
    ``ckpt/eval.jsonl``.
    """
    if cfg.eval_every and cfg.eval_log is None and ckpt is not None:
        cfg = dataclasses.replace(cfg, eval_log=os.path.join(ckpt, EVAL_LOG))
    argv = [sys.executable, "-m", "worker", "--server", endpoint, "--rank", str(rank),
            "--world-size", str(world), *to_argv(cfg, JOB_OPTIONS)]
    if ckpt is not None:
        argv += ["--state-dir", os.path.join(ckpt, "worker-state")]
    return argv


def pipeline_plan(cfg: LaunchConfig) -> LaunchConfig:
    """Pipeline mode: choose the layer ranges once (measuring if asked) for every stage to share."""
    from worker.pipeline.runtime import resolve_partition

    part = resolve_partition(cfg, cfg.replicas)
    log.info("%s", part.describe())
    return dataclasses.replace(cfg, partition=part.text)


def worker_name(cfg: LaunchConfig, rank: int) -> str:
    """The prefix of a worker's output: ``worker k``, or ``worker k stage s`` in pipeline mode."""
    if cfg.mode == "pipeline" and cfg.stages:
        return f"worker {rank} stage {rank % cfg.stages}"
    return f"worker {rank}"


def run(cfg: LaunchConfig) -> int:
    """Start the server and the workers, supervise them, and return the exit status."""
    ckpt = cfg.checkpoint_dir or os.path.join("runs", time.strftime("launch-%Y%m%d-%H%M%S"))
    if cfg.mode == "pipeline":
        try:
            cfg = pipeline_plan(cfg)
        except ConfigError as e:
            log.error("%s", e)
            return 2
    world = cfg.workers
    assert world is not None
    shows_progress = cfg.stages - 1 if cfg.mode == "pipeline" and cfg.stages else 0  # the last stage has the loss
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="zmqps-launch-") as tmp:
        ready = Path(tmp) / "endpoint"
        os.makedirs(ckpt, exist_ok=True)
        try:
            server = Child("server", server_argv(cfg, ready, ckpt))
            children.append(server)
            endpoint = _wait_ready(server, ready)
            log.info("server at %s; starting %d worker(s); checkpoints in %s", endpoint, world, ckpt)
            tty = sys.stderr.isatty()
            for rank in range(world):
                children.append(Child(worker_name(cfg, rank), worker_argv(cfg, endpoint, rank, world, ckpt),
                                      passthrough=(rank == shows_progress and tty)))
            code = _supervise(children)
            if code == 0 and cfg.example:
                _report_example(cfg.example, ckpt)
            elif code == 0 and cfg.model is None and cfg.data is None:
                _next_steps(cfg.metrics_log or os.path.join(ckpt, "metrics.jsonl"))
            return code
        except KeyboardInterrupt:
            log.warning("interrupted: stopping every process")
            return 130
        except _Terminated:
            log.warning("terminated: stopping every process")
            return 143
        except _ServerRefused as e:
            log.error("%s", e)
            return 2 if e.code == 2 else 1
        except (RuntimeError, TimeoutError) as e:
            log.error("%s", e)
            return 1
        finally:
            for child in reversed(children):
                child.stop()
            for child in children:
                child.join_output()


def _supervise(children: list[Child]) -> int:
    server, workers = children[0], children[1:]
    while True:
        for child in workers:
            code = child.proc.poll()
            if code not in (None, 0):
                log.error("%s exited with status %d: stopping the others", child.name, code)
                return 1
        if server.proc.poll() not in (None, 0):
            log.error("the server exited with status %d: stopping the workers", server.proc.returncode)
            return 1
        if all(c.proc.poll() == 0 for c in workers):
            break
        time.sleep(0.1)
    try:
        code = server.proc.wait(READY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.error("the workers finished but the server did not exit within %.0fs", READY_TIMEOUT_S)
        return 1
    if code == 0:
        log.info("job finished: every process exited 0")
    return code


def _report_example(name: str, ckpt: str) -> None:
    """Log what the example's ``evaluate`` says of the final θ (e.g. held-out accuracy)."""
    from safetensors.torch import load_file

    from worker.examples import load_example

    theta = load_file(os.path.join(ckpt, "final.safetensors"))
    for metric, value in load_example(name).evaluate(theta).items():
        log.info("example %s: %s %.4f", name, metric, value)


def _losses(metrics_log: str) -> tuple[float, float] | None:
    """The server's first and last loss in a metrics log (None if it holds none)."""
    losses = []
    try:
        with open(metrics_log, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("ev") == "update" and isinstance(rec.get("loss"), (int, float)):
                    losses.append(float(rec["loss"]))
    except OSError:
        return None
    return (losses[0], losses[-1]) if losses else None


def _next_steps(metrics_log: str) -> None:
    """After the default job: why its loss does not fall, and what to run next."""
    seen = _losses(metrics_log)
    trend = "" if seen is None else f" (here {seen[0]:.3g} at the first step, {seen[1]:.3g} at the last)"
    log.info("the default job fits nn.Linear(10, 1) to random targets: there is nothing to learn, so its loss "
             "stays near 1%s. Next: ps-launch --example digits trains an MLP that learns (about 97%% held-out "
             "accuracy); --model MODULE:FACTORY --data MODULE:FACTORY trains your own (README: 'Your model')", trend)


class _Terminated(Exception):
    """SIGTERM arrived (``kill``, ``systemctl stop``): stop every child, exit 143."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Terminated()


def _catch_stop_signals() -> None:
    """Stop on Ctrl-C and SIGTERM however the launcher was started.

    A shell starts a background job (``&``, ``nohup``) with SIGINT ignored, and a child inherits
    that; the launcher would then never see Ctrl-C (or a supervisor's SIGINT). Its own handlers
    are installed whatever it inherited.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ps-launch``."""
    description = "run a zmqps server and K workers as local processes"
    try:
        cfg = parse_config(LaunchConfig, argv, prog="ps-launch", description=description)
        if cfg.example:  # its presets sit between the config file and the defaults
            from worker.examples import load_example

            cfg = parse_config(LaunchConfig, argv, prog="ps-launch", description=description,
                               defaults=load_example(cfg.example).PRESETS)
        check_eval_data(cfg)
    except ConfigError as e:
        sys.stderr.write(f"ps-launch: error: {e}\n")
        return 2
    setup_logging(cfg.log_level, "launch")
    _catch_stop_signals()
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
