"""Every option of every role, described once: its flag, ``PS_*`` variable, type, help and choices.

The roles (``common.config``) are dataclasses whose fields are these options' names; the
command line, the environment and config files are read for them by ``common.cmdline``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from common.compression.codecs import CODECS
from common.names import Choice, Loss, Optimizer, PipelineSchedule, SyncModel

ENV_PREFIX = "PS_"

EVAL_LOG = "eval.jsonl"
"""``ps-launch``'s held-out log in the checkpoint folder (without ``--eval-log``): a file of the
job there, which ``--resume never`` moves aside with the job's checkpoints ([Note: used folders]
in ``ps/jobdir.py``)."""


@dataclass(frozen=True)
class Option:
    """One user-facing option: flag, value type, help, allowed values and help group.

    An option that picks one of a kind of names (``--optimizer``, ``--sync``, ``--schedule``,
    ``--loss``) gives ``names`` (a :class:`common.names.Choice`) instead of ``choices``: its
    choices and the description of each come from there.
    """

    flag: str
    kind: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    group: str = "general"
    names: type[Choice] | None = None

    def __post_init__(self) -> None:
        if self.names is not None:
            object.__setattr__(self, "choices", self.names.names())

    @property
    def text(self) -> str:
        """The help as ``--help`` and the README show it: with each name's description, if any."""
        return self.help if self.names is None else f"{self.help}: {self.names.describe()}"

    @property
    def env(self) -> str:
        """The ``PS_*`` environment variable for this option."""
        return ENV_PREFIX + self.flag.lstrip("-").upper().replace("-", "_")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


OPTIONS: dict[str, Option] = {
    # server
    "bind": Option("--bind", str, "endpoint the server binds (port 0 lets the OS choose)", group="server"),
    "workers": Option("--workers", int, "number of workers K", group="server"),
    "optimizer": Option("--optimizer", str, "torch.optim optimizer the server applies", names=Optimizer,
                        group="optimizer"),
    "lr": Option("--lr", float, "learning rate", group="optimizer"),
    "clip_grad_norm": Option("--clip-grad-norm", float, "clip the averaged gradient to this total 2-norm "
                             "before each update, as torch.nn.utils.clip_grad_norm_ does after DDP's "
                             "allreduce (bsp: over the whole model; async/ssp: over each push; needs one "
                             "server shard)", group="optimizer"),
    "momentum": Option("--momentum", float, "momentum", group="optimizer"),
    "weight_decay": Option("--weight-decay", float, "weight decay", group="optimizer"),
    "sync": Option("--sync", str, "consistency model", names=SyncModel, group="consistency"),
    "staleness": Option("--staleness", int, "SSP staleness bound S, in steps (clocks)", group="consistency"),
    "inner_steps": Option("--inner-steps", int, "diloco: local steps H each worker takes with --optimizer "
                          "between two exchanges with the server", group="consistency"),
    "outer_lr": Option("--outer-lr", float, "diloco: learning rate of the server's Nesterov SGD on the mean "
                       "change", group="consistency"),
    "outer_momentum": Option("--outer-momentum", float, "diloco: momentum of the server's Nesterov SGD",
                             group="consistency"),
    "outer_delay": Option("--outer-delay", int, "diloco: rounds the outer step reaches the workers late. 0: "
                          "each worker waits for θ_global after every round; 1: it sends its change and starts "
                          "the next round at once, from the last θ_global it holds plus its own change, so the "
                          "exchange runs behind a round of compute (one outer step of staleness)",
                          group="consistency"),
    "checkpoint_dir": Option("--checkpoint-dir", str, "directory for checkpoints and final.safetensors",
                             group="checkpoints"),
    "resume": Option("--resume", str, "a job already in --checkpoint-dir: auto resumes an unfinished one (as "
                     "after a crash) and refuses to start on a finished one; always resumes either (a finished "
                     "job trains further when the workers get more --epochs); never moves its files into "
                     "previous-TIME/ inside the folder and starts a new job", ("auto", "always", "never"),
                     group="checkpoints"),
    "checkpoint_every": Option("--checkpoint-every", int, "checkpoint every N steps, written in the background "
                               "while training goes on (0: only at the end)",
                               group="checkpoints"),
    "ready_file": Option("--ready-file", str, "write the bound endpoint to this file once listening",
                         group="server"),
    "max_message_mb": Option("--max-message-mb", int, "largest message (all its frames together) accepted, "
                             "in MiB", group="server"),
    "max_frame_mb": Option("--max-frame-mb", int, "largest frame a peer may send, in MiB: ZeroMQ drops a "
                           "connection that announces a larger one before reading it (ZMQ_MAXMSGSIZE); "
                           "workers send tensors in pieces of --chunk-mb, and a larger piece is refused "
                           "at REGISTER", group="server"),
    "metrics_port": Option("--metrics-port", int, "serve Prometheus metrics over HTTP on this port "
                           "(0: the OS picks; the URL is logged and in PING replies)", group="metrics"),
    "metrics_bind": Option("--metrics-bind", str, "address the Prometheus endpoint listens on: 127.0.0.1 "
                           "keeps it on this host; 0.0.0.0 lets other hosts scrape it, unauthenticated and "
                           "unencrypted even when CURVE is on", group="metrics"),
    "metrics_log": Option("--metrics-log", str, "append one JSON line per applied update to this file "
                          "(ps-plot turns it into a PNG)", group="metrics"),
    "status_every": Option("--status-every", float, "seconds between the server's one-line status logs",
                           group="metrics"),
    "eval_every": Option("--eval-every", int, "data mode: rank 0 evaluates the job's loss on the held-out "
                         "--eval-data every N steps, before the first step and after the last (0: never)",
                         group="metrics"),
    "eval_data": Option("--eval-data", str, "MODULE:FACTORY returning the held-out map-style dataset of (x, y) "
                        "that --eval-every evaluates", group="metrics"),
    "eval_rows": Option("--eval-rows", int, "evaluate on the first N rows of --eval-data (0: all)",
                        group="metrics"),
    "eval_log": Option("--eval-log", str, "append one JSON line per held-out evaluation to this file "
                       "(ps-plot draws them). A file named here is yours: every job appends to it and "
                       "--resume never leaves it in place (give each job its own); ps-launch's default "
                       "moves aside with the old job", group="metrics"),
    # worker
    "server": Option("--server", str, "server endpoint, e.g. tcp://HOST:5555", group="worker"),
    "rank": Option("--rank", int, "this worker's rank k (data mode: leave it out and the server assigns one)",
                   group="worker"),
    "worker_id": Option("--worker-id", str, "id the server keys an assigned rank by, stable across restarts",
                        group="worker"),
    "world_size": Option("--world-size", int, "number of workers K", group="worker"),
    "state_dir": Option("--state-dir", str, "folder for what only this worker knows (diloco: its inner "
                        "optimizer after each round), so a restarted worker resumes exactly; one per job",
                        group="worker"),
    "mode": Option("--mode", str, "data parallel or pipeline stages", ("data", "pipeline"), group="worker"),
    "model": Option("--model", str, "MODULE:FACTORY returning an nn.Module",
                    group="job"),
    "data": Option("--data", str, "MODULE:FACTORY returning a map-style dataset of (x, y)",
                   group="job"),
    "loss": Option("--loss", str, "loss function", names=Loss, group="job"),
    "epochs": Option("--epochs", int, "epochs", group="job"),
    "batch_size": Option("--batch-size", int, "global batch size B (each worker uses B/K rows)", group="job"),
    "no_shuffle": Option("--no-shuffle", _bool, "keep each shard in order", group="job"),
    "seed": Option("--seed", int, "seed for the model and the data set", group="job"),
    "device": Option("--device", str, "auto, cpu, cuda or cuda:N", group="job"),
    "timeout": Option("--timeout", float, "seconds a call may go without any sign of life from the server "
                      "(it retries and reconnects meanwhile) before it fails", group="worker"),
    "progress": Option("--progress", str, "progress bar: auto (rank 0 on a terminal), on, off",
                       ("auto", "on", "off"), group="worker"),
    # performance (server and worker)
    "shm": Option("--shm", str, "same-host shared-memory fast path for tensors (bsp only; off: always frames)",
                  ("auto", "off"), group="performance"),
    "io_threads": Option("--io-threads", int, "ZeroMQ I/O threads", group="performance"),
    "chunk_mb": Option("--chunk-mb", float, "split tensors into pieces (server keys, frames) of at most this "
                       "many MiB (0: never)", group="performance"),
    "bucket_mb": Option("--bucket-mb", float, "push gradients in buckets of about this many MiB as backward "
                        "produces them (0: one push after backward)", group="performance"),
    "wire_dtype": Option("--wire-dtype", str, "dtype of floating-point gradients on the wire (auto: as computed)",
                         ("auto", "float16", "bfloat16"), group="performance"),
    "compress": Option("--compress", str, "compress pushed tensors (frames, data parallel; pulls of θ stay exact): "
                       + "; ".join(CODECS.values()), group="performance"),
    # pipeline
    "stages": Option("--stages", int, "pipeline: number of stages P", group="pipeline"),
    "replicas": Option("--replicas", int, "pipeline: replicas R of every stage; ps-launch starts P x R "
                       "stage workers (pipeline x data parallel)", group="pipeline"),
    "partition": Option("--partition", str, "pipeline: layer ranges a:b,b:c,... of the nn.Sequential, or auto "
                        "(balance measured forward+backward time) or params (balance parameter count)",
                        group="pipeline"),
    "microbatches": Option("--microbatches", int, "pipeline: microbatches M each batch is split into",
                           group="pipeline"),
    "schedule": Option("--schedule", str, "pipeline schedule", names=PipelineSchedule, group="pipeline"),
    "peer_bind": Option("--peer-bind", str, "pipeline: endpoint this stage binds for its neighbours "
                        "(port 0 lets the OS choose)", group="pipeline"),
    "peer_advertise": Option("--peer-advertise", str, "pipeline: host name neighbours dial when --peer-bind "
                             "is a wildcard address", group="pipeline"),
    "peer_prev": Option("--peer-prev", str, "pipeline: endpoint of the previous stage",
                        group="pipeline"),
    "peer_next": Option("--peer-next", str, "pipeline: endpoint of the next stage",
                        group="pipeline"),
    "stall": Option("--stall", str, "inject jitter: before each step (diloco: each inner step), sleep SECONDS "
                    "with probability P (P:SECONDS; the draw depends on seed, rank and step)", group="testing"),
    # launcher
    "example": Option("--example", str, "run a bundled example job (its model, data and hyper-parameters "
                      "become the defaults)", ("digits", "charlm"), group="job"),
    # faults and recovery
    "on_worker_loss": Option("--on-worker-loss", str, "bsp: when a worker's lease lapses, hold the step until "
                             "its rank returns (wait; the job fails after --rejoin-deadline) or continue with "
                             "the live workers (shrink)", ("wait", "shrink"), group="faults"),
    "nonfinite": Option("--nonfinite", str, "a pushed gradient with NaN or an infinity: apply it as torch.optim "
                        "would (apply), leave that push out of the step's average (skip; bsp only), or refuse it "
                        "with an error that names the rank and step (fail)", ("apply", "skip", "fail"),
                        group="faults"),
    "rejoin_deadline": Option("--rejoin-deadline", float, "seconds a lost (or never registered) worker has to "
                              "come back before the job fails", group="faults"),
    "lease": Option("--lease", float, "seconds without a message or heartbeat after which a worker is lost",
                    group="faults"),
    "heartbeat": Option("--heartbeat", float, "seconds between this worker's heartbeats to the server (0: none)",
                        group="faults"),
    "fault": Option("--fault", str, "testing: stop or kill this process at a point of a step, "
                    "ACTION:POINT:STEP such as stop:after-push:7 (see common/faults.py)", group="testing"),
    # security
    "curve_secret_key": Option("--curve-secret-key", str, "CURVE: this process's certificate "
                               "(NAME.key_secret from ps-keygen)", group="security"),
    "curve_authorized_keys": Option("--curve-authorized-keys", str, "CURVE: directory of the public keys (*.key) "
                                    "allowed to connect (workers: to a stage's peer inbox)",
                                    group="security"),
    "curve_server_key": Option("--curve-server-key", str, "CURVE: the server's public key (SERVER.key)",
                               group="security"),
    # common
    "log_level": Option("--log-level", str, "logging level",
                        ("debug", "info", "warning", "error"), group="general"),
    # every role; read by parse_config itself, not a dataclass field
    "config": Option("--config", str, "TOML file with option values (same keys as the options)",
                     group="general"),
}
CONFIG_ONLY_AT_PARSE = frozenset({"config"})

KNOWN_ENV: frozenset[str] = frozenset(opt.env for opt in OPTIONS.values())
"""Every ``PS_*`` variable some role knows."""
