"""CurveZMQ for every zmqps link: certificates, per-socket settings, and the guard that admits peers.

Keys are ZeroMQ certificate files (``ps-keygen DIR NAME`` writes ``DIR/NAME.key``, the public
half, and ``DIR/NAME.key_secret``, both halves). A process's CURVE settings are one
:class:`Curve`; the socket functions of :mod:`common.transport` apply them:

* a bound socket (the server's ROUTER, a pipeline stage's inbox) is a CURVE server with the
  process's own key pair. A :class:`Guard` thread per ZeroMQ context answers the ZAP requests
  (only public keys found in the authorized directory get in) and watches the socket's
  handshakes, so a refused key, a plaintext client or a message that fails authentication
  (tampered in flight) is logged with the peer's address;
* a connecting socket is a CURVE client with the process's key pair and the server's public key.

[Note: the process default] The command-line tools call :func:`configure` once; every socket
made through :mod:`common.transport` in that process then uses CURVE unless told otherwise, so
pipeline peer links get it without extra plumbing. A bound socket advertises its public key in
the endpoint it returns (``tcp://host:port#curve=<hex>``); :func:`split_endpoint` takes it back
out where a peer connects, so an endpoint passed around (through the server, to a neighbour
stage) carries the key to check the peer against.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from common.errors import ConfigError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zmqps"
KEY_MARK = "#curve="
UNKNOWN_PEER = "an unknown address"
LOG_EVERY_S = 10.0  # the same refusal of the same host, for the same reason, is logged at most this often


@dataclass(frozen=True)
class Curve:
    """One process's CURVE settings (keys in Z85, as in the certificate files).

    Attributes:
        public: this process's public key.
        secret: this process's secret key.
        server_key: the public key of the server this process connects to (clients).
        authorized: client public keys a bound socket admits; None admits any key (encryption
            without authentication; never the default of a command-line tool).
    """

    public: bytes
    secret: bytes = field(repr=False)
    server_key: bytes | None = None
    authorized: frozenset[bytes] | None = None

    @classmethod
    def for_server(cls, secret_file: str, authorized_dir: str) -> "Curve":
        """Settings of ``ps-server --curve-secret-key FILE --curve-authorized-keys DIR``."""
        public, secret = load_keypair(secret_file)
        return cls(public, secret, None, load_authorized(authorized_dir))

    @classmethod
    def for_worker(cls, secret_file: str, server_key_file: str, authorized_dir: str | None = None) -> "Curve":
        """Settings of ``ps-worker --curve-secret-key FILE --curve-server-key FILE``.

        ``authorized_dir`` (default: the directory holding the server's key, where
        ``ps-keygen`` put every certificate) lists the peers a stage's inbox admits.
        """
        public, secret = load_keypair(secret_file)
        server = load_public(server_key_file)
        directory = authorized_dir or str(Path(server_key_file).resolve().parent)
        return cls(public, secret, server, load_authorized(directory))


# ---------------------------------------------------------------------------- certificate files
def keygen(directory: str | os.PathLike[str], name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` and ``DIR/NAME.key_secret`` (mode 0600); return their paths.

    Raises:
        ConfigError: a bad name, or the files exist and ``force`` is False.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"certificate name must be a plain file name, got {name!r}")
    d = Path(directory)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise ConfigError(f"{public} or {secret} already exists (pass --force to replace it)")
    d.mkdir(parents=True, exist_ok=True)
    for path in (public, secret):  # --force: new files, not new bytes in an old file with its old mode
        path.unlink(missing_ok=True)
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate; ConfigError if unreadable or public only."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CURVE certificate {path}: {e}") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key (give the .key_secret file, not the .key)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The public key in a certificate file (``.key`` or ``.key_secret``)."""
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CURVE public key {path}: {e}") from None


def load_authorized(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """The public keys of every ``*.key`` file in ``directory``; ConfigError if it has none."""
    try:
        keys = frozenset(zmq.auth.load_certificates(directory))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the authorized CURVE keys in {directory}: {e}") from None
    if not keys:
        raise ConfigError(f"no public keys (*.key files) in {directory}")
    return keys


def fingerprint(key: bytes) -> str:
    """A short printable form of a Z85 public key for logs."""
    return key.decode(errors="replace")[:12]


# ---------------------------------------------------------------------------- the process default
_default: Curve | None = None


def configure(curve: Curve | None) -> None:
    """Set the CURVE settings every socket of this process uses by default (None: plaintext)."""
    global _default
    _default = curve
    if curve is not None:
        log.info("CURVE on: public key %s", fingerprint(curve.public))


def default() -> Curve | None:
    """The settings given to :func:`configure`, or None."""
    return _default


# ---------------------------------------------------------------------------- endpoints
def advertise(endpoint: str, public: bytes) -> str:
    """``endpoint`` with ``public`` appended (``tcp://host:port#curve=<hex>``)."""
    return f"{endpoint}{KEY_MARK}{z85.decode(public).hex()}"


def split_endpoint(endpoint: str) -> tuple[str, bytes | None]:
    """(the endpoint ZeroMQ understands, the server key it advertises or None)."""
    plain, mark, key = endpoint.partition(KEY_MARK)
    if not mark:
        return endpoint, None
    try:
        raw = bytes.fromhex(key)
        if len(raw) != 32:
            raise ValueError("not 32 bytes")
    except ValueError as e:
        raise ConfigError(f"bad CURVE key in endpoint {endpoint!r}: {e}") from None
    return plain, z85.encode(raw)


# ---------------------------------------------------------------------------- sockets
def apply_server(sock: zmq.Socket, curve: Curve) -> None:
    """Make ``sock`` a CURVE server with this process's key pair (before bind)."""
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN


def apply_client(sock: zmq.Socket, curve: Curve, server_key: bytes | None) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is ``server_key`` (before connect)."""
    key = server_key or curve.server_key
    if key is None:
        raise ConfigError("CURVE is on but the peer's public key is unknown "
                          "(give --curve-server-key, or an endpoint that advertises its key)")
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_serverkey = key


# ---------------------------------------------------------------------------- the guard
_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it does not speak CURVE (a plaintext client?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a message failed CURVE authentication (tampered, or the wrong "
                                           "server key): connection dropped",
}
_WATCHED = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_MONITOR_STOPPED)


def _peer_of(fd: int) -> str:
    """``host:port`` of the TCP peer on ``fd`` (a duplicate is inspected), or "an unknown address" when
    the connection is already gone (a fast refusal can beat the monitor thread to it)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            host, port = s.getpeername()[:2]
            return f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        return UNKNOWN_PEER


class Guard(threading.Thread):
    """Answers ZAP requests for one context and logs every refused handshake.

    Started by :func:`ensure_guard` before the first CURVE server socket of a context binds.
    """

    def __init__(self, ctx: zmq.Context, authorized: frozenset[bytes] | None) -> None:
        super().__init__(name="zmqps-guard", daemon=True)
        self.ctx = ctx
        self.authorized = authorized
        self.refused = 0
        self._new: queue.Queue[tuple[str, str]] = queue.Queue()
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._last_log: dict[tuple[str, str, str], float] = {}
        self._n = 0

    def start_and_wait(self) -> None:
        """Start the thread and wait until the ZAP endpoint is bound."""
        self.start()
        self._ready.wait(10)
        if self._error is not None:
            raise ConfigError(f"cannot start the CURVE authenticator: {self._error}")

    def watch(self, sock: zmq.Socket, label: str) -> None:
        """Log refused handshakes on ``sock`` (a bound CURVE server), labelled ``label``."""
        self._n += 1
        addr = f"inproc://zmqps-guard-{id(self)}-{self._n}"
        sock.monitor(addr, _WATCHED)
        self._new.put((addr, label))

    def stop(self) -> None:
        """Ask the thread to end (it closes its sockets)."""
        self._halt.set()

    def _note(self, what: str, peer: str, detail: str) -> None:
        self.refused += 1
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        key = (what, host, detail)
        if now - self._last_log.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[key] = now
            log.warning("refused %s from %s: %s", what, peer, detail)

    def run(self) -> None:
        zap = None
        monitors: dict[zmq.Socket, tuple[str, dict[int, str], list[str]]] = {}
        try:
            zap = self.ctx.socket(zmq.REP)
            zap.linger = 0
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self._error = e
            self._ready.set()
            if zap is not None:
                zap.close(0)
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                while not self._new.empty():
                    addr, label = self._new.get()
                    mon = self.ctx.socket(zmq.PAIR)
                    mon.linger = 0
                    mon.connect(addr)
                    monitors[mon] = (label, {}, [])
                    poller.register(mon, zmq.POLLIN)
                for sock, _ in poller.poll(100):
                    if sock is zap:
                        self._answer(zap)
                    elif not self._event(sock, *monitors[sock]):
                        poller.unregister(sock)
                        monitors.pop(sock)
                        sock.close(0)
        except zmq.ContextTerminated:
            pass
        finally:
            zap.close(0)
            for mon in monitors:
                mon.close(0)

    def _answer(self, zap: zmq.Socket) -> None:
        frames = zap.recv_multipart()
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        key = z85.encode(creds[0]) if mechanism == b"CURVE" and creds and len(creds[0]) == 32 else b""
        ok = self.authorized is None or key in self.authorized
        if not ok:
            self._note("CURVE key " + (fingerprint(key) if key else mechanism.decode(errors="replace")),
                       address.decode(errors="replace"), "not among the authorized keys")
        zap.send_multipart([version, request_id, b"200" if ok else b"400",
                            b"OK" if ok else b"key not authorized", key if ok else b"", b""])

    def _event(self, mon: zmq.Socket, label: str, peers: dict[int, str], failed: list[str]) -> bool:
        """Handle one monitor event; False once the watched socket is gone."""
        ev = parse_monitor_message(mon.recv_multipart())
        kind, value = int(ev["event"]), int(ev["value"])
        if kind == zmq.EVENT_MONITOR_STOPPED:
            return False
        if kind == zmq.EVENT_ACCEPTED:
            peers[value] = _peer_of(value)
        elif kind == zmq.EVENT_DISCONNECTED:
            peer = peers.pop(value, UNKNOWN_PEER)
            if failed:
                self._note(f"a connection to {label}", peer, failed.pop())
                failed.clear()
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            # Also a message of an established session (tampered): its connection may be dropped
            # only much later, after other connections' failures, so pairing this with the next
            # DISCONNECTED could name the wrong peer or lose it; noted now, without the address.
            self._note(f"a connection to {label}", UNKNOWN_PEER, _PROTOCOL_REASONS[value])
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            failed.append(_PROTOCOL_REASONS.get(value, f"ZMTP protocol error {value:#x}"))
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            failed.append("the client hung up during the handshake (it does not speak CURVE, or has the wrong "
                          f"server key; errno {value})")
        # HANDSHAKE_FAILED_AUTH was already logged by _answer, with the key
        return True


_guards: "weakref.WeakKeyDictionary[zmq.Context, Guard]" = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def ensure_guard(ctx: zmq.Context, curve: Curve) -> Guard:
    """The running :class:`Guard` of ``ctx``, started on first use with ``curve.authorized``."""
    with _guards_lock:
        guard = _guards.get(ctx)
        if guard is None or not guard.is_alive():
            guard = Guard(ctx, curve.authorized)
            guard.start_and_wait()
            _guards[ctx] = guard
        elif guard.authorized != curve.authorized:
            raise ConfigError("one ZeroMQ context cannot admit two different sets of CURVE keys")
        return guard
