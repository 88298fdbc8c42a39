"""Several hosts on one machine: network namespaces on a bridge, each host's link rate-limited.

Every host is a namespace with one veth (``eth0``) whose peer (``pN``) sits on a bridge in a
separate "switch" namespace; nothing is added to the root namespace. Addresses are
10.231.X.Y/24, X random per lab. A host given a rate gets a ``tc`` token-bucket filter
(``tbf``; this kernel has no ``netem``) on both directions of its cable: on the egress of its
own ``eth0`` (what it sends) and on the egress of the switch-side ``pN`` (what it receives).

[Note: lab names] Every namespace is named ``zqlab-<pid>-<tag>-<role>``, the pid being the
process that made the lab. A lab is deleted by its context manager, by an ``atexit`` hook, and,
when its process was killed before either ran, by :func:`cleanup_stale`, which deletes the
namespaces of every ``zqlab-`` lab whose process is gone and nothing else (other tools' and
other engineers' namespaces have other names).

``python -m benchmarks.netlab cleanup`` runs :func:`cleanup_stale`; ``python -m benchmarks.netlab
probe RATE`` measures the TCP throughput of a two-host lab at ``RATE``, both ways.
``tests/netns.py`` re-exports :class:`Lab` and :func:`netns_available` for the multi-host tests.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

PREFIX = "zqlab-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")
_OPEN: "weakref.WeakSet[Lab]" = weakref.WeakSet()
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=20)


def _tc(*args: str, ns: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True, capture_output=True, text=True,
                          timeout=20)


def netns_available() -> tuple[bool, str]:
    """Whether this process can create namespaces and veth pairs (root + iproute2)."""
    if shutil.which("ip") is None:
        return False, "iproute2 (ip) is not installed"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    name = f"zqprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1", ns=name)
        return True, ""
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return False, f"cannot create namespaces: {getattr(e, 'stderr', '') or e}"
    finally:
        _ip("netns", "del", name, check=False)


def rate_bits(rate: str) -> float:
    """Bits per second of a ``tc`` rate such as ``100mbit`` or ``1gbit``.

    Raises:
        ValueError: not a number followed by bit, kbit, mbit or gbit.
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?bit)", rate.strip().lower())
    if not m:
        raise ValueError(f"not a tc rate (e.g. 100mbit, 1gbit): {rate!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def tbf_args(rate: str) -> list[str]:
    """``tc qdisc`` arguments of a token bucket of ``rate``: 4 ms of burst (≥ 32 KiB), 50 ms of queue."""
    burst = max(32 * 1024, int(rate_bits(rate) / 8 * 0.004))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


class Lab:
    """Hosts in namespaces on one bridge. Use as a context manager; everything is deleted on exit.

    Args:
        hosts: host names, in order (``lab.addr[name]`` is the host's address).
        rates: ``tc`` rate of a host's link (``"100mbit"``), both directions; hosts not named
            (or no ``rates``) are not limited.
    """

    def __init__(self, hosts: Sequence[str], rates: Mapping[str, str] | None = None) -> None:
        self.tag = f"{os.getpid()}-{random.randrange(1 << 16):04x}"
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.subnet = random.randrange(2, 250)
        self.ns: dict[str, str] = {}
        self.addr: dict[str, str] = {}
        self.rates: dict[str, str] = dict(rates or {})
        self._port: dict[str, str] = {}
        self._hosts = list(hosts)
        self._made: list[str] = []  # every namespace added, in order, even one not yet set up
        for rate in self.rates.values():
            rate_bits(rate)

    def __enter__(self) -> "Lab":
        _OPEN.add(self)
        try:
            self._add_ns(self.switch)
            _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("link", "set", "br0", "up", ns=self.switch)
            for i, host in enumerate(self._hosts):
                self._add_host(i, host)
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        self._made.append(name)
        _ip("netns", "add", name)

    def _add_host(self, i: int, host: str) -> None:
        ns, port = f"{PREFIX}{self.tag}-h{i}", f"p{i}"
        self._add_ns(ns)
        _ip("link", "add", "eth0", "type", "veth", "peer", "name", port, ns=ns)
        _ip("link", "set", port, "netns", self.switch, ns=ns)
        _ip("link", "set", port, "master", "br0", ns=self.switch)
        _ip("link", "set", port, "up", ns=self.switch)
        addr = f"10.231.{self.subnet}.{10 + i}"
        _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        self.ns[host], self.addr[host], self._port[host] = ns, addr, port
        rate = self.rates.get(host)
        if rate:
            _tc("qdisc", "add", "dev", "eth0", "root", *tbf_args(rate), ns=ns)  # what the host sends
            _tc("qdisc", "add", "dev", port, "root", *tbf_args(rate), ns=self.switch)  # what it receives

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace of the lab (their interfaces and qdiscs go with them)."""
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made.clear()
        self.ns.clear()
        _OPEN.discard(self)

    def namespaces(self) -> list[str]:
        """The names of every namespace this lab made (the switch's last)."""
        return [*self.ns.values(), self.switch] if self._made else []

    def wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def link(self, host: str, up: bool) -> None:
        """Plug ``host``'s cable in (``up``) or pull it out (a partition)."""
        _ip("link", "set", self._port[host], "up" if up else "down", ns=self.switch)

    def hosts(self) -> Iterator[str]:
        """Host names in creation order."""
        return iter(self._hosts)

    def qdiscs(self, host: str) -> tuple[str, str]:
        """``tc qdisc show`` of the host's ``eth0`` and of its switch-side port (for checks and logs)."""
        out = _tc("qdisc", "show", "dev", "eth0", ns=self.ns[host]).stdout.strip()
        return out, _tc("qdisc", "show", "dev", self._port[host], ns=self.switch).stdout.strip()

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes each host's ``eth0`` has sent and received so far: ``{host: {"tx": n, "rx": n}}``."""
        out = {}
        for host, ns in self.ns.items():
            stats = json.loads(_ip("-s", "-j", "link", "show", "dev", "eth0", ns=ns).stdout)[0]["stats64"]
            out[host] = {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}
        return out


def lab_namespaces() -> list[str]:
    """Names of every ``zqlab-`` namespace on this machine, whoever made it."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def cleanup_stale() -> list[str]:
    """Delete the namespaces of labs whose process is gone ([Note: lab names]); return their names."""
    gone = []
    for ns in lab_namespaces():
        m = _NAME.match(ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
            gone.append(ns)
    if gone:
        log.info("deleted %d namespace(s) of stale labs: %s", len(gone), " ".join(gone))
    return gone


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_OPEN):
        lab.close()


def main(argv: Sequence[str]) -> int:
    """``cleanup`` or ``probe RATE``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if argv[:1] == ["cleanup"]:
        log.info("%d stale namespace(s) deleted", len(cleanup_stale()))
        return 0
    if len(argv) == 2 and argv[0] == "probe":
        from benchmarks.linkprobe import measure

        with Lab(["a", "b"], {"a": argv[1], "b": argv[1]}) as lab:
            log.info("tbf %s: a -> b %.1f Mbit/s, b -> a %.1f Mbit/s", argv[1], measure(lab, "a", "b"),
                     measure(lab, "b", "a"))
        return 0
    sys.stderr.write("usage: python -m benchmarks.netlab cleanup | probe RATE\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
