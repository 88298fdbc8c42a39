"""CurveZMQ end to end: the authorized job is exact; an unknown key, a plaintext client and a
tampered message are refused and logged, and none of them gets θ or changes it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from safetensors.torch import load_file

from common.security import load_public, split_endpoint
from tests import pipeline_jobs
from tests.faultjob import SERVER, WORLD, assert_final, error_lines, expected, fork_server, fork_worker
from tests.pipeline_run import endpoint, start_server
from tests.reference_pipeline import replay_pipeline
from tests.tamper import TamperProxy

pytestmark = pytest.mark.timeout(300)

KEYGEN = Path(sys.executable).parent / "ps-keygen"


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """Run the ``ps-keygen`` console script; return (public, secret) paths."""
    assert KEYGEN.exists(), "ps-keygen is not installed: run make setup"
    out = subprocess.run([str(KEYGEN), str(directory), name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    assert out.stdout.split() == [str(public), str(secret)]
    assert secret.stat().st_mode & 0o077 == 0  # the secret is readable by its owner only
    return public, secret


def test_curve_job_is_exact_and_intruders_are_refused(forkserver, procs, tmp_path):
    keys, rogue_dir = tmp_path / "keys", tmp_path / "rogue"
    server_pub, server_sec = keygen(keys, "server")
    secrets = [keygen(keys, f"worker{r}")[1] for r in range(WORLD)]
    rogue_pub, rogue_sec = keygen(rogue_dir, "rogue")
    server, ep = fork_server(forkserver, procs, *SERVER, "--curve-secret-key", str(server_sec),
                             "--curve-authorized-keys", str(keys))
    plain_ep, advertised = split_endpoint(ep)
    assert advertised == load_public(server_pub)  # the endpoint carries the server's key
    curve = ("--curve-server-key", str(server_pub))
    # intruders first: were they let in, they would take the ranks of the real workers
    unknown = fork_worker(forkserver, procs, plain_ep, 0, *curve, "--curve-secret-key", str(rogue_sec))
    plaintext = fork_worker(forkserver, procs, plain_ep, 1)
    host, port = plain_ep[len("tcp://"):].rsplit(":", 1)
    with TamperProxy((host, int(port))) as proxy:
        w0 = fork_worker(forkserver, procs, plain_ep, 0, *curve, "--curve-secret-key", str(secrets[0]))
        w1 = fork_worker(forkserver, procs, f"tcp://127.0.0.1:{proxy.port}", 1, *curve,
                          "--curve-secret-key", str(secrets[1]))
        for intruder in (unknown, plaintext):
            assert intruder.wait(120) == 1, intruder.output()
            (line,) = error_lines(intruder)
            assert "AuthenticationError" in line and plain_ep in line and "register of step 0" in line, line
        procs.wait_ok([w0, w1, server], timeout=200)
        assert proxy.tampered.is_set()
    assert_final(tmp_path / "ckpt", expected())  # the same θ as without CURVE
    log = server.log.read_text()
    assert re.search(rf"refused CURVE key {re.escape(rogue_pub.read_text().split('public-key = ')[1][1:13])}"
                     rf" from 127\.0\.0\.1.*not among the authorized keys", log), log
    # the plaintext client: the server sees the mechanism mismatch, or the client hang up first
    assert re.search(r"refused a connection to tcp://\S+ from (127\.0\.0\.1:\d+|an unknown address): (it does not speak CURVE|"
                     r"the client hung up during the handshake)", log), log
    assert re.search(r"refused a connection to .*: a message failed CURVE authentication", log), log
    # the tampered message was lost with its connection: worker 1 sent it again on the new one
    assert re.search(r"sending \w+ of step \d+ again \(the connection was re-established\)", w1.log.read_text())


def test_pipeline_peer_links_use_curve_and_the_job_is_exact(forkserver, procs, tmp_path):
    """Two stages over CURVE: each stage's inbox is a CURVE server whose key travels in the endpoint
    the server hands out; the stages reach each other only through those links."""
    keys = tmp_path / "keys"
    server_pub, server_sec = keygen(keys, "server")
    secrets = [keygen(keys, f"stage{r}")[1] for r in range(2)]
    job = start_server(forkserver, procs, "curve-pipe", 2, ["--lr", "0.05", "--curve-secret-key", str(server_sec),
                                                            "--curve-authorized-keys", str(keys)])
    ep = endpoint(job)
    for r in range(2):
        argv = ["--server", ep, "--rank", str(r), "--world-size", "2", "--timeout", "60", "--mode", "pipeline",
                "--progress", "off", "--device", "cpu", "--stages", "2", "--partition", "0:1,1:2",
                "--microbatches", "4", "--model", "tests.pipeline_jobs:seed_pipe64",
                "--data", "tests.pipeline_jobs:data246", "--batch-size", "60", "--epochs", "1", "--seed", "3",
                "--curve-server-key", str(server_pub), "--curve-secret-key", str(secrets[r])]
        child = forkserver.spawn(f"stage {r}", "worker", argv, procs.tmp / f"curve-pipe-{r}.log")
        procs.children.append(child)  # type: ignore[arg-type]
        job.stages.append(child)
    procs.wait_ok([*job.stages, job.server], timeout=150)  # type: ignore[list-item]
    want = replay_pipeline(pipeline_jobs.seed_pipe64, pipeline_jobs.data246, batch=60, epochs=1, seed=3, lr=0.05)
    got = load_file(str(job.ckpt / "final.safetensors"))
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-9, k
    logs = [c.output(tail=10**6) for c in job.stages]
    assert all("CURVE on" in text and re.search(r"peer inbox tcp://\S+#curve=[0-9a-f]{64}", text) for text in logs)
    assert "refused" not in job.server.output(tail=10**6)


def test_keygen_force_writes_a_secret_only_its_owner_reads(tmp_path):
    """``ps-keygen --force`` over a world-readable secret leaves a 0600 one (it used to keep the mode)."""
    from common.keygen import main as keygen_main

    assert keygen_main([str(tmp_path), "w"]) == 0
    secret = tmp_path / "w.key_secret"
    os.chmod(secret, 0o644)
    assert keygen_main([str(tmp_path), "w", "--force"]) == 0
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "w.key").st_mode) == 0o644
