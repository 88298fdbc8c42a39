"""Several hosts on one machine: network namespaces joined by a bridge (a test lab).

Every host is a namespace with one veth whose peer sits on a bridge in a separate
"switch" namespace; nothing is added to the root namespace. Addresses are 10.231.X.Y/24
with X random per lab. :meth:`Lab.link` takes a host's cable out and puts it back, for
partition tests. Use :func:`netns_available` to skip where namespaces cannot be made.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from typing import Iterator, Sequence


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=20)


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


class Lab:
    """Hosts in namespaces on one bridge. Use as a context manager; everything is deleted on exit."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
        self.switch = f"zq{self.tag}sw"
        self.subnet = random.randrange(2, 250)
        self.ns: dict[str, str] = {}
        self.addr: dict[str, str] = {}
        self._port: dict[str, str] = {}
        self._hosts = list(hosts)

    def __enter__(self) -> "Lab":
        try:
            _ip("netns", "add", self.switch)
            _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("link", "set", "br0", "up", ns=self.switch)
            for i, host in enumerate(self._hosts):
                ns = f"zq{self.tag}h{i}"
                port = f"p{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", "eth0", "type", "veth", "peer", "name", port, ns=ns)
                _ip("link", "set", port, "netns", self.switch, ns=ns)
                _ip("link", "set", port, "master", "br0", ns=self.switch)
                _ip("link", "set", port, "up", ns=self.switch)
                addr = f"10.231.{self.subnet}.{10 + i}"
                _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
                _ip("link", "set", "eth0", "up", ns=ns)
                _ip("link", "set", "lo", "up", ns=ns)
                self.ns[host], self.addr[host], self._port[host] = ns, addr, port
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace of the lab (their interfaces go with them)."""
        for ns in [*self.ns.values(), self.switch]:
            _ip("netns", "del", ns, check=False)
        self.ns.clear()

    def wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def link(self, host: str, up: bool) -> None:
        """Plug ``host``'s cable in (``up``) or pull it out (a partition)."""
        _ip("link", "set", self._port[host], "up" if up else "down", ns=self.switch)

    def hosts(self) -> Iterator[str]:
        """Host names in creation order."""
        return iter(self._hosts)
