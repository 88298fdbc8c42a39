"""Atomic checkpoints in safetensors: θ, optimizer state, versions and membership.

A checkpoint is one file ``ckpt-<step>.safetensors``: tensors ``param/<name>`` (θ) and
``optim/<index>/<slot>`` (optimizer state), plus a JSON metadata record (``zmqps`` key) with
the step, per-key versions, optimizer hyper-parameters, membership, which keys are buffers and
the other names of tied tensors (``aliases``). ``final.safetensors`` is the model's whole
``state_dict()`` (parameters, buffers, every name of a tied tensor), by state_dict name, for
users; :func:`load_state_dict` reads either kind of file as one. Every file is written to a temporary name,
fsynced, renamed into place and the directory fsynced, so a crash never leaves a torn file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import torch

from common.partition import base_of
from ps import stfile

log = logging.getLogger(__name__)

FORMAT = "zmqps-checkpoint-1"
KEEP = 3  # newest checkpoints kept on disk
_NAME = re.compile(r"^ckpt-(\d{9,})\.safetensors$")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, write)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary next to ``path``, fsync it, rename it into place, fsync the directory.

    A write that fails (a full disk, a read-only directory) removes its temporary and raises.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_tensors(path: Path, tensors: Mapping[str, Sequence[torch.Tensor]], metadata: dict[str, str]) -> None:
    """A safetensors file, atomically; streamed from the tensors' memory ([Note: streamed files])."""
    _atomic(path, lambda tmp: stfile.write_file(tmp, tensors, metadata))


def with_aliases(params: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``params`` plus an entry per alias of a tied tensor (the same tensor under its other name).

    A key split into pieces (``NAME#i/n``, ``common.partition``) gets its alias's pieces.
    """
    out = dict(params)
    if not aliases:
        return out
    by_base: dict[str, list[str]] = {}
    for alias, base in aliases.items():
        by_base.setdefault(base, []).append(alias)
    for key, t in params.items():
        base, _, _ = base_of(key)
        for alias in by_base.get(base, ()):
            out[alias + key[len(base):]] = t
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` from ``final.safetensors`` or a ``ckpt-*.safetensors``.

    For ``model.load_state_dict(load_state_dict(path))`` (``strict=True`` works): every
    parameter and buffer, and each tied tensor under every one of its names.
    """
    tensors, header = stfile.read(path)
    if header.get("format") != FORMAT:
        return tensors
    params, _, record = _parse(path, tensors, header)
    return with_aliases(params, record.get("aliases") or {})


def save_final(directory: str | Path, params: Mapping[str, Sequence[torch.Tensor]], step: int | None = None) -> Path:
    """Write ``final.safetensors`` (θ by state_dict name); return its path.

    ``params`` maps each name to the tensor's parts along dim 0 (one part for a whole tensor;
    see ``common.partition.piece_groups``): each part is written from its own memory.
    ``step`` (θ's version) goes into the metadata: it tells a later server that the job in
    the folder finished at that step (``ps.jobdir``).
    """
    path = Path(directory) / "final.safetensors"
    meta = {"format": "zmqps-final-1"}
    if step is not None:
        meta["step"] = str(step)
    _write_tensors(path, params, meta)
    return path


def checkpoint_contents(step: int, params: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any],
                        meta: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (by reference, nothing copied) and the metadata of ``ckpt-<step>``."""
    tensors = {f"param/{k}": v for k, v in params.items()}
    slots: dict[str, dict[str, Any]] = {}
    for idx, state in optimizer_state["state"].items():
        for slot, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{slot}"] = value
            else:
                slots.setdefault(str(idx), {})[slot] = value
    record = {"step": step, "param_groups": optimizer_state["param_groups"], "scalar_state": slots, **meta}
    return tensors, {"format": FORMAT, "zmqps": json.dumps(record)}


def step_of(path: Path) -> int:
    """The step of a ``ckpt-<step>.safetensors`` file, from its name."""
    m = _NAME.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint file")
    return int(m.group(1))


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where ``ckpt-<step>`` lives."""
    return Path(directory) / f"ckpt-{step:09d}.safetensors"


def write_checkpoint(directory: str | Path, step: int, write: Callable[[BinaryIO], None]) -> Path:
    """``write`` the file of ``ckpt-<step>`` atomically, then prune all but the newest :data:`KEEP`."""
    path = checkpoint_path(directory, step)

    def to(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    _atomic(path, to)
    for old in sorted(p for p in Path(directory).iterdir() if _NAME.match(p.name))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def save_checkpoint(directory: str | Path, step: int, params: Mapping[str, torch.Tensor],
                    optimizer_state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write ``ckpt-<step>.safetensors`` now (atomically) and prune all but the newest :data:`KEEP`."""
    tensors, metadata = checkpoint_contents(step, params, optimizer_state, meta)
    return write_checkpoint(directory, step, lambda f: stfile.write(f, {k: [v] for k, v in tensors.items()}, metadata))


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and prove a file can be written, synced and removed there.

    Raises:
        OSError: the directory cannot be created or written (read-only, no permission, full).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    probe = d / f".probe-{os.getpid()}.tmp"  # a crash leaves it to remove_temporaries
    write_atomic(probe, b"zmqps")
    probe.unlink()


def remove_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files a crash mid-write left behind (never a finished file); return them."""
    d = Path(directory)
    if not d.is_dir():
        return []
    stale = [p for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoints(directory: str | Path) -> list[Path]:
    """Every ``ckpt-*.safetensors`` in ``directory``, newest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), reverse=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest ``ckpt-*.safetensors`` in ``directory``, or None."""
    found = checkpoints(directory)
    return found[0] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: (θ, optimizer state_dict, metadata record).

    Each tensor is read into its own fresh memory, nothing else is held ([Note: streamed files]).
    Raises ValueError naming the file when it is not a readable zmqps checkpoint.
    """
    tensors, header = stfile.read(path)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a zmqps checkpoint (format {header.get('format')!r})")
    return _parse(path, tensors, header)


def _parse(path: str | Path, tensors: dict[str, torch.Tensor], header: Mapping[str, str]
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """θ, the optimizer's state_dict and the record of a checkpoint file's contents."""
    try:
        record = json.loads(header["zmqps"])
        params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, idx, slot = k.split("/", 2)
                state.setdefault(int(idx), {})[slot] = v
        for idx, slots in record.pop("scalar_state").items():
            state.setdefault(int(idx), {}).update(slots)
        optimizer_state = {"state": state, "param_groups": record.pop("param_groups")}
        int(record["step"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: a damaged zmqps checkpoint record: {type(e).__name__}: {e}") from None
    return params, optimizer_state, record
