"""ops.ports.free_port: the ports the suite's children bind seconds after they are chosen."""
from __future__ import annotations

import socket
import subprocess
import sys

from ops import ports
from ops.ports import LOWEST, ephemeral_low, free_port

DRAW = "from ops.ports import free_port\nprint(' '.join(str(free_port()) for _ in range(60)))"


def test_ports_lie_below_the_kernels_ephemeral_range():
    low = ephemeral_low()
    drawn = [free_port() for _ in range(20)]
    assert all(LOWEST <= p < low for p in drawn), drawn
    assert len(set(drawn)) == 20


def test_processes_drawing_at_once_never_get_the_same_port():
    # what xdist's workers do: each its own process, all drawing while the others do
    procs = [subprocess.Popen([sys.executable, "-c", DRAW], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    drawn = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    every = [port for d in drawn for port in d]
    assert len(every) == 180 and len(set(every)) == 180


def test_a_port_something_holds_is_skipped(tmp_path, monkeypatch):
    counter = tmp_path / "counter"
    monkeypatch.setattr(ports, "COUNTER_FILE", counter)
    with socket.socket() as held:
        held.bind(("127.0.0.1", LOWEST + 7))
        held.listen()
        counter.write_text("7")  # the next draw is the held port
        port = free_port()
        assert port != held.getsockname()[1]
        assert port == LOWEST + 8
    assert counter.read_text() == "9"


def test_a_torn_counter_file_starts_over(tmp_path, monkeypatch):
    counter = tmp_path / "counter"
    monkeypatch.setattr(ports, "COUNTER_FILE", counter)
    counter.write_text("not a number")
    assert free_port() >= LOWEST
    assert int(counter.read_text()) >= 1


def test_the_ephemeral_range_is_read_from_the_kernel_or_assumed(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t60999\n")
    assert ephemeral_low(str(f)) == 40000
    assert ephemeral_low(str(tmp_path / "missing")) == 32768
