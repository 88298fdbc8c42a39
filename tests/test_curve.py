"""CurveZMQ end to end: the authorized job is exact; an unknown key, a plaintext client and a
tampered message are refused and logged, and none of them gets θ or changes it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.security import load_public, split_endpoint
from tests.faultjob import JOB, SERVER, WORLD, assert_final, error_lines, expected
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


def test_curve_job_is_exact_and_intruders_are_refused(procs, tmp_path):
    keys, rogue_dir = tmp_path / "keys", tmp_path / "rogue"
    server_pub, server_sec = keygen(keys, "server")
    secrets = [keygen(keys, f"worker{r}")[1] for r in range(WORLD)]
    rogue_pub, rogue_sec = keygen(rogue_dir, "rogue")
    server, ep = procs.server(WORLD, *SERVER, "--curve-secret-key", str(server_sec),
                              "--curve-authorized-keys", str(keys))
    plain_ep, advertised = split_endpoint(ep)
    assert advertised == load_public(server_pub)  # the endpoint carries the server's key
    curve = ("--curve-server-key", str(server_pub))
    # intruders first: were they let in, they would take the ranks of the real workers
    unknown = procs.worker(plain_ep, 0, WORLD, *JOB, *curve, "--curve-secret-key", str(rogue_sec))
    plaintext = procs.worker(plain_ep, 1, WORLD, *JOB)
    host, port = plain_ep[len("tcp://"):].rsplit(":", 1)
    with TamperProxy((host, int(port))) as proxy:
        w0 = procs.worker(plain_ep, 0, WORLD, *JOB, *curve, "--curve-secret-key", str(secrets[0]))
        w1 = procs.worker(f"tcp://127.0.0.1:{proxy.port}", 1, WORLD, *JOB, *curve,
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
