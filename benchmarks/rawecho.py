"""Child entry point: a raw ZeroMQ ROUTER that answers every request with the same frames.

``python -m benchmarks.rawecho READY_FILE``: binds ``tcp://127.0.0.1:*``, writes the
endpoint to READY_FILE, and echoes multipart messages (zero-copy) until it gets an empty one.
"""

from __future__ import annotations

import sys

import zmq


def main(ready: str, io_threads: int = 1) -> None:
    ctx = zmq.Context(io_threads=io_threads)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    with open(ready, "w") as f:
        f.write(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while True:
        if not sock.poll(600_000):
            return  # nobody came: give up rather than hang
        frames = sock.recv_multipart(copy=False)
        if len(frames) <= 2 and frames[-1].bytes == b"":
            sock.send_multipart([frames[0], b""])
            return
        sock.send_multipart(frames, copy=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
