"""A free loopback TCP port, for the children ops starts (servers of tests, benchmarks, ops.up).

The port is handed to a child that binds it seconds later (after its imports), so "free now" is
not enough. Two things took such a port in that window (CI, stop 23: a trainer's bind failed with
EADDRINUSE under xdist):
- anything that binds port 0 or connects out: the kernel draws those from its ephemeral range
  (/proc/sys/net/ipv4/ip_local_port_range), so the ports here lie below it, where it never lands;
- another process of ours choosing the same port: every process draws from one counter in a file
  under the temp folder, taken under an exclusive lock, so no two hand out the same port until
  the range (about 12,000 ports) wraps.
A port something already holds (a system service, a child still up from an earlier draw) is
skipped: each candidate is bound once before it is handed out.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

LOWEST = 20000  # below: well-known and registered services more often listen
# one per user: another user's file may not be ours to write
COUNTER_FILE = Path(tempfile.gettempdir()) / f"storefront-free-port.{os.getuid()}.counter"


def ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def next_ticket(counter: Path | None = None) -> int:
    """The shared counter's value, incremented for the next caller (any process on this host).
    `counter` names another sequence (tests/test_up.py draws its port offsets from one)."""
    fd = os.open(counter or COUNTER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 32, 0)
        try:
            n = int(raw.decode() or 0)
        except ValueError:  # a torn or foreign file: start over, the bind check still guards
            n = 0
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(n + 1).encode(), 0)
        return n
    finally:
        os.close(fd)  # releases the lock


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing holds now, that neither the kernel nor another caller will hand out next."""
    low = ephemeral_low()
    if low - LOWEST < 1000:  # a kernel whose ephemeral range starts very low: no room below it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    span = low - LOWEST
    for _ in range(span):
        port = LOWEST + next_ticket() % span
        if _bindable(port):
            return port
    raise RuntimeError(f"no free loopback port in {LOWEST}-{low - 1}")
