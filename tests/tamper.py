"""A man in the middle: a TCP proxy that flips one bit of one CURVE message from client to server.

It reads the client's ZMTP stream frame by frame (a 64-byte greeting, passed on as it comes since
each side waits for part of the other's, then frames of a flags
byte, a 1- or 8-byte size and a body) and, in connection number ``victim`` (in accept order),
flips the last byte of the body of the ``message``-th CURVE ``MESSAGE`` command: a bit of an
encrypted message, after the handshake, as an attacker on the wire would. Everything else
passes untouched.
"""

from __future__ import annotations

import socket
import threading

GREETING = 64
CURVE_MESSAGE = b"\x07MESSAGE"


class TamperProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; use as a context manager."""

    def __init__(self, target: tuple[str, int], message: int = 10, victim: int = 1) -> None:
        self.target = target
        self.message = message
        self.victim = victim
        self.tampered = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = [self._listener]
        self._accepted = 0
        self._closed = False

    def __enter__(self) -> "TamperProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                return
            self._accepted += 1
            self._socks += [client, server]
            tamper = self._accepted == self.victim
            threading.Thread(target=self._pump, args=(client, server, tamper), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, tamper: bool) -> None:
        buf = bytearray()
        greeting = GREETING  # greeting bytes still to pass (each side waits for the other's, byte-exact)
        seen = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not tamper or self.tampered.is_set():
                    dst.sendall(bytes(buf) + data)
                    buf.clear()
                    continue
                buf += data
                out = bytearray(buf[:greeting])
                del buf[:greeting]
                greeting -= len(out)
                while not greeting and len(buf) >= 2:
                    head = 9 if buf[0] & 0x02 else 2
                    if len(buf) < head:
                        break
                    size = int.from_bytes(buf[1:9], "big") if head == 9 else buf[1]
                    if len(buf) < head + size:
                        break
                    frame = buf[:head + size]
                    del buf[:head + size]
                    if frame[head:head + len(CURVE_MESSAGE)] == CURVE_MESSAGE and not self.tampered.is_set():
                        seen += 1
                        if seen == self.message:
                            frame[-1] ^= 0x01
                            self.tampered.set()
                    out += frame
                dst.sendall(bytes(out))
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
