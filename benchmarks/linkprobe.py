"""TCP throughput between two lab hosts: is a ``tbf`` rate what the link really carries?

``python -m benchmarks.linkprobe recv --bind ADDR:PORT`` accepts one connection, reads until
the sender closes and prints ``{"bytes": n, "seconds": s}`` (first to last byte);
``python -m benchmarks.linkprobe send --to ADDR:PORT --bytes N`` sends N bytes.
:func:`measure` runs the pair in two hosts of a :class:`benchmarks.netlab.Lab`.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

from benchmarks.netlab import Lab, rate_bits

PORT = 5201  # inside the lab's receiving namespace: nothing else listens there
CHUNK = 1 << 20


def _recv(bind: str) -> None:
    host, port = bind.rsplit(":", 1)
    with socket.create_server((host, int(port))) as srv:
        srv.settimeout(60)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(60)
            n, first, last = 0, 0.0, 0.0
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                if not n:
                    first = time.perf_counter()
                n += len(data)
                last = time.perf_counter()
    sys.stdout.write(json.dumps({"bytes": n, "seconds": last - first}) + "\n")


def _send(to: str, nbytes: int) -> None:
    host, port = to.rsplit(":", 1)
    buf = b"\0" * CHUNK
    with socket.create_connection((host, int(port)), timeout=60) as s:
        left = nbytes
        while left > 0:
            s.sendall(buf[:min(left, CHUNK)])
            left -= CHUNK


def measure(lab: Lab, src: str, dst: str, seconds: float = 2.0, python: str = sys.executable) -> float:
    """Mbit/s of one TCP stream from ``src`` to ``dst``, about ``seconds`` long at the link's rate."""
    rate = lab.rates.get(src) or lab.rates.get(dst) or "1gbit"
    nbytes = int(rate_bits(rate) / 8 * seconds)
    endpoint = f"{lab.addr[dst]}:{PORT}"
    recv = subprocess.Popen(lab.wrap(dst, [python, "-m", "benchmarks.linkprobe", "recv", "--bind", endpoint]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        if recv.stdout.readline().strip() != "ready":
            raise RuntimeError("the link probe's receiver did not start")
        subprocess.run(lab.wrap(src, [python, "-m", "benchmarks.linkprobe", "send", "--to", endpoint,
                                      "--bytes", str(nbytes)]), check=True, timeout=120)
        out, _ = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    got = json.loads(out.strip().splitlines()[-1])
    return 8 * got["bytes"] / got["seconds"] / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.linkprobe", description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["recv", "send"])
    ap.add_argument("--bind", default="")
    ap.add_argument("--to", default="")
    ap.add_argument("--bytes", type=int, default=0)
    a = ap.parse_args(argv)
    if a.role == "recv":
        _recv(a.bind)
    else:
        _send(a.to, a.bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
