"""docker/ without a Docker engine: the healthcheck CLI against real servers, and the images,
compose file, Prometheus config and Grafana dashboard checked against the code they run.

- `python -m shared.healthcheck` as a real process against in-process servers: SERVING -> 0;
  NOT_SERVING, unknown service, unreachable, hung, bad arguments -> 1; mTLS; the target from
  STOREFRONT_PORT (what the images' HEALTHCHECK uses).
- compose's healthchecks run as written against an in-process trainer and fraud service on a
  registry laid out like the shared volume.
- every `python -m` command in the Dockerfiles and compose imports from only what the images
  copy, and its settings class accepts the flags and STOREFRONT_* variables it is given.
- the images install requirements.lock (--no-deps); the GPU image swaps only onnxruntime.
- every metric and label the dashboard queries is one the code exports.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared import healthcheck
from shared.registry import ModelRegistry
from shared.settings import BaseSettings
from tests import server_harness
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
VOLUME = "/var/lib/storefront"
DOMAIN_SERVICES = ("fraud", "recommender", "pricing")


# ---------------------------------------------------------------- parsing helpers

def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def instructions(path: Path, name: str, stage: str = "last") -> list[str]:
    """Arguments of every `name` instruction (of the last stage only when stage == 'last')."""
    items = dockerfile(path)
    if stage == "last":
        start = max(i for i, (ins, _) in enumerate(items) if ins == "FROM")
        items = items[start:]
    return [rest for ins, rest in items if ins == name]


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"not exec form: {rest}"
    return json.loads(rest)


def env_of(path: Path) -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE pairs; values referring to other variables kept as text)."""
    env = {}
    for rest in instructions(path, "ENV"):
        for pair in shlex.split(rest):
            key, sep, value = pair.partition("=")
            assert sep, f"{path.name}: ENV {pair!r} is not KEY=VALUE"
            env[key] = value
    return env


def arg_defaults(path: Path) -> dict[str, str]:
    out = {}
    for ins, rest in dockerfile(path):
        if ins == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            out[k] = v
    return out


def image_command(path: Path) -> list[str]:
    """What `docker run IMAGE` runs: ENTRYPOINT + CMD."""
    (entry,), (cmd,) = instructions(path, "ENTRYPOINT"), instructions(path, "CMD")
    return exec_form(entry) + exec_form(cmd)


def image_healthcheck(path: Path) -> list[str]:
    (rest,) = instructions(path, "HEALTHCHECK")
    _, sep, cmd = rest.partition("CMD ")
    assert sep, rest
    return exec_form(cmd)


def compose() -> dict:
    with open(DOCKER / "compose.yaml") as f:
        return yaml.safe_load(f)


def storefront_services(c: dict) -> dict[str, dict]:
    """The compose services built from this repository's images."""
    return {name: s for name, s in c["services"].items() if "build" in s}


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a compose service's short-syntax volumes."""
    out = []
    for v in service.get("volumes", []):
        parts = v.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def mount_of(service: dict, path: str) -> tuple[str, str, bool] | None:
    """The mount a container path lives on (the deepest one), or None (the image's own layer)."""
    best = None
    for m in mounts(service):
        if path == m[1] or path.startswith(m[1].rstrip("/") + "/"):
            if best is None or len(m[1]) > len(best[1]):
                best = m
    return best


def healthcheck_commands(test: list[str] | str) -> list[list[str]]:
    """The commands of a compose healthcheck test (CMD list, or CMD-SHELL joined with &&)."""
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if test[0] == "CMD":
        return [test[1:]]
    assert test[0] == "CMD-SHELL", test
    commands, cur = [], []
    for tok in shlex.split(test[1]):
        if tok == "&&":
            commands.append(cur)
            cur = []
        else:
            assert tok not in ("||", ";", "|"), f"keep healthchecks to `a && b`: {test[1]}"
            cur.append(tok)
    return commands + [cur]


def settings_class(argv: list[str]) -> tuple[type[BaseSettings], list[str]]:
    """The settings class of `python -m ARGV...` and the flags it gets."""
    module, rest = argv[0], list(argv[1:])
    if module == "trainer":
        sub = rest.pop(0) if rest and not rest[0].startswith("-") else "serve"
        assert sub == "serve", f"`python -m trainer {sub}` is not a server"
        from trainer.service import TrainerSettings

        return TrainerSettings, rest
    mod = importlib.import_module(module)
    found = [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, BaseSettings)
             and c.__module__ == mod.__name__]
    assert len(found) == 1, f"{module}: expected one settings class, found {found}"
    return found[0], rest


def load_settings(argv: list[str], env: dict[str, str]):
    cls, flags = settings_class(argv)
    try:
        return cls.load(flags, env=env)
    except SystemExit as e:  # argparse error: a bad flag or environment value
        raise AssertionError(f"`python -m {' '.join(argv)}` refuses its flags/environment ({e})") from None


def setting_env_names(cls: type[BaseSettings]) -> set[str]:
    return {cls.env_name(f.name) for f in dataclasses.fields(cls)}


def service_env(name: str) -> dict[str, str]:
    """A compose service's environment as the process sees it: image ENV, then compose's."""
    s = compose()["services"][name]
    env = env_of(DOCKER / s["build"]["context"] / s["build"]["dockerfile"])
    env.update({k: str(v) for k, v in (s.get("environment") or {}).items()})
    return env


# ---------------------------------------------------------------- healthcheck CLI

async def run_healthcheck(*args: str, env: dict[str, str] | None = None,
                          timeout: float = 30.0) -> tuple[int, str, float]:
    """`python -m shared.healthcheck ARGS` as a real process (the server runs on this event loop)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STOREFRONT_")}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.healthcheck", *args, cwd=ROOT, env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), time.monotonic() - t0


@pytest.fixture
def published(registry, model_files, linear_signature):
    registry.publish("linear", model_files["v_a"], linear_signature)
    return registry


async def test_serving_server_exits_0(published):
    async with server_harness.running(server_harness.settings(registry_dir=str(published.root))) as (app, _, _):
        code, out, _ = await run_healthcheck(app.address)
        assert (code, out) == (0, "SERVING\n")
        code, out, _ = await run_healthcheck(app.address, "--service", "inference.GRPCInferenceService")
        assert (code, out) == (0, "SERVING\n")
        code, out, _ = await run_healthcheck(app.address, "--service", "no.such.Service")
        assert code == 1 and out.startswith("NOT_FOUND") and out.count("\n") == 1


async def test_not_serving_server_exits_1(registry):
    # No version in the registry yet: the server runs, its health says NOT_SERVING.
    async with server_harness.running(server_harness.settings(registry_dir=str(registry.root))) as (app, _, _):
        code, out, _ = await run_healthcheck(app.address, "--timeout", "3")
        assert (code, out) == (1, "NOT_SERVING\n")


async def test_draining_server_exits_1(published):
    app = server_harness.make_app(server_harness.settings(registry_dir=str(published.root), grace_s=2.0))
    await app.start()
    assert (await run_healthcheck(app.address))[0] == 0
    await app.health.enter_graceful_shutdown()  # what stop() does first on SIGTERM
    try:
        code, out, _ = await run_healthcheck(app.address)
        assert (code, out) == (1, "NOT_SERVING\n")
    finally:
        await app.stop()


async def test_unreachable_exits_1():
    code, out, elapsed = await run_healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert code == 1 and out.startswith("UNAVAILABLE") and out.count("\n") == 1
    assert elapsed < 10


async def test_hung_server_exits_1_within_the_timeout():
    import socket

    with socket.socket() as s:  # accepts TCP connections (backlog) but never speaks HTTP/2
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        code, out, elapsed = await run_healthcheck(f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "1")
    assert code == 1 and out.startswith(("DEADLINE_EXCEEDED", "UNAVAILABLE")), out
    assert elapsed < 8


async def test_target_from_the_environment(published):
    """The images' HEALTHCHECK passes no target: 127.0.0.1:$STOREFRONT_PORT."""
    s = server_harness.settings(registry_dir=str(published.root), host="0.0.0.0")
    async with server_harness.running(s) as (app, _, _):
        code, out, _ = await run_healthcheck(env={"STOREFRONT_HOST": "0.0.0.0", "STOREFRONT_PORT": str(app.port)})
        assert (code, out) == (0, "SERVING\n")
    code, out, _ = await run_healthcheck()
    assert code == 1 and "STOREFRONT_PORT" in out


@pytest.mark.parametrize("args", [["--bogus"], ["127.0.0.1:1", "--timeout", "x"], ["127.0.0.1:1", "--timeout", "0"],
                                  ["127.0.0.1:1", "--tls-cert", "c.pem"]])
async def test_bad_arguments_exit_1_not_2(args):
    code, out, _ = await run_healthcheck(*args)  # Docker reserves exit code 2
    assert code == 1 and out.startswith("error:")


def test_default_target():
    assert healthcheck.default_target({}) is None
    assert healthcheck.default_target({"STOREFRONT_PORT": "50051"}) == "127.0.0.1:50051"
    assert healthcheck.default_target({"STOREFRONT_PORT": "50051", "STOREFRONT_HOST": "0.0.0.0"}) == "127.0.0.1:50051"
    assert healthcheck.default_target({"STOREFRONT_PORT": "50051", "STOREFRONT_HOST": "[::]"}) == "127.0.0.1:50051"
    assert healthcheck.default_target({"STOREFRONT_PORT": "7", "STOREFRONT_HOST": "10.0.0.5"}) == "10.0.0.5:7"
    assert healthcheck.default_target({"STOREFRONT_PORT": "7", "STOREFRONT_HOST": "::1"}) == "[::1]:7"


async def test_mutual_tls(published, certs):
    s = server_harness.settings(registry_dir=str(published.root), tls_cert=str(certs / "server.pem"),
                                tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"))
    async with server_harness.running(s) as (app, _, _):
        tls = ["--tls-ca", str(certs / "ca.pem")]
        client = ["--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")]
        assert (await run_healthcheck(app.address, *tls, *client))[:2] == (0, "SERVING\n")
        assert (await run_healthcheck(f"localhost:{app.port}", "--server-name", "localhost", *tls, *client))[0] == 0
        assert (await run_healthcheck(app.address, *tls, "--timeout", "2"))[0] == 1  # no client certificate
        assert (await run_healthcheck(app.address, "--timeout", "2"))[0] == 1  # plaintext
        code, out, _ = await run_healthcheck(app.address, "--tls-ca", str(certs / "missing.pem"))
        assert code == 1 and out.startswith("error:")


# ---------------------------------------------------------------- compose healthchecks, live

@pytest.fixture(scope="module")
def volume_root(tmp_path_factory) -> Path:
    """A folder laid out like the images' /var/lib/storefront after the trainer's first start:
    registry/ with a real first model of every domain, trainer/ with their checkpoints."""
    from tests.suite_fixtures import bootstrap_small_suite

    root = tmp_path_factory.mktemp("storefront")
    bootstrap_small_suite(root)
    return root


async def test_compose_healthchecks_pass_against_the_real_processes(volume_root):
    """The trainer's and every service's healthchecks, exactly as compose runs them, against
    in-process apps built from the settings compose gives them (paths moved from the volume to
    a tmp folder)."""
    c = compose()
    apps = {}
    try:
        for name in ("trainer", *DOMAIN_SERVICES):
            s = c["services"][name]
            env = service_env(name)
            env = {k: v.replace(VOLUME, str(volume_root)) for k, v in env.items()}
            env.update(STOREFRONT_PORT="0", STOREFRONT_METRICS_PORT="0", STOREFRONT_HOST="127.0.0.1",
                       STOREFRONT_LOG_FORMAT="text")
            if name != "trainer":  # no trainer at trainer:50050 here; the feedback client is tested elsewhere
                env["STOREFRONT_TRAINER_TARGET"] = ""
            settings = load_settings(s["command"], env)
            module = "trainer.service" if s["command"][0] == "trainer" else s["command"][0]
            app = importlib.import_module(module).make_app(settings)
            await app.start()
            apps[name] = app
        for name, app in apps.items():
            for cmd in healthcheck_commands(c["services"][name]["healthcheck"]["test"]):
                if cmd[:3] == ["python", "-m", "shared.healthcheck"]:
                    args = healthcheck.parser().parse_args(cmd[3:])
                    cmd = [a if a != args.target else app.address for a in cmd[3:]]
                    code, out, _ = await run_healthcheck(*cmd)
                else:
                    proc = await asyncio.create_subprocess_exec(
                        *[a.replace(VOLUME, str(volume_root)) for a in cmd])
                    code, out = await proc.wait(), ""
                assert code == 0, f"{name}: {cmd} -> {code} {out}"
    finally:
        for app in apps.values():
            await app.stop()


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_runs_python_m_with_a_default_server(kind):
    path = DOCKERFILES[kind]
    entry = exec_form(instructions(path, "ENTRYPOINT")[0])
    assert entry == ["python", "-m"], entry
    argv = image_command(path)[2:]
    load_settings(argv, env_of(path))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_healthcheck_is_shared_healthcheck(kind):
    cmd = image_healthcheck(DOCKERFILES[kind])
    assert cmd[:3] == ["python", "-m", "shared.healthcheck"]
    args = healthcheck.parser().parse_args(cmd[3:])
    assert args.target is None, "the image serves several processes: the target comes from STOREFRONT_PORT"
    assert instructions(DOCKERFILES[kind], "WORKDIR") == ["/app"]
    assert env_of(DOCKERFILES[kind])["PYTHONPATH"] == "/app"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_environment_names_real_settings(kind):
    """Every STOREFRONT_* variable an image sets is a setting some process reads, and parses."""
    from services.fraud.main import FraudSettings
    from trainer.service import TrainerSettings

    env = env_of(DOCKERFILES[kind])
    ours = {k: v for k, v in env.items() if k.startswith("STOREFRONT_")}
    known = setting_env_names(TrainerSettings) | setting_env_names(FraudSettings)
    assert set(ours) <= known, f"unknown settings: {sorted(set(ours) - known)}"
    for cls in (TrainerSettings, FraudSettings):
        s = cls.load([], env=env)
        assert s.host == "0.0.0.0"
        assert s.registry_dir.startswith(VOLUME + "/")
    assert TrainerSettings.load([], env=env).workdir.startswith(VOLUME + "/")
    fraud = FraudSettings.load([], env=env)
    assert fraud.trt_cache_dir.startswith(VOLUME + "/")
    if kind == "gpu":
        assert fraud.providers == "auto"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_state_lives_on_the_volume_and_runs_as_non_root(kind):
    path = DOCKERFILES[kind]
    assert [json.loads(v) if v.startswith("[") else [v] for v in instructions(path, "VOLUME")] == [[VOLUME]]
    (user,) = instructions(path, "USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    runs = " ".join(instructions(path, "RUN"))
    # Relative defaults (var/spool/<domain>, ...) resolve onto the volume; the volume belongs to the user.
    assert f"ln -s {VOLUME} /app/var" in runs
    assert re.search(rf"chown -R {re.escape(user)}:\S+ {VOLUME}", runs), runs


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_copies_everything_its_commands_import(kind, tmp_path):
    """Copy exactly what the image copies, then import every `python -m` module it or compose runs
    (and the lazily imported server modules) from there alone."""
    path = DOCKERFILES[kind]
    ignore = (ROOT / ".dockerignore").read_text().split()
    sources = []
    for rest in instructions(path, "COPY"):
        if rest.startswith("--from="):
            continue
        *srcs, dest = rest.split()
        for src in srcs:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert f"!{src.rstrip('/')}" in ignore, f"COPY {src}: excluded by .dockerignore"
            sources.append((src, dest))
    app = tmp_path / "app"
    app.mkdir()
    for src, dest in sources:
        if src == "requirements.lock":
            continue
        target = app / Path(dest).relative_to(".") if not dest.startswith("/") else None
        assert target is not None, f"COPY {src} {dest}: expected a path relative to WORKDIR /app"
        shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
    modules = {image_command(path)[2], image_healthcheck(path)[2]}
    for s in storefront_services(compose()).values():
        modules.add(s["command"][0])
        for cmd in healthcheck_commands(s["healthcheck"]["test"]):
            if cmd[:2] == ["python", "-m"]:
                modules.add(cmd[2])
    modules |= {"trainer.__main__", "trainer.service", "trainer.bootstrap", "trainer.replay",
                "shared.registry.__main__", "shared.serve_onnx"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "STOREFRONT_"))}
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\nprint('ok')"
    r = subprocess.run([sys.executable, "-c", code, *sorted(modules)], cwd=app, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _pip_install(path: Path) -> str:
    runs = [r for r in instructions(path, "RUN", stage="all") if "pip install" in r]
    assert len(runs) == 1, runs
    return runs[0]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_cpu_image_installs_requirements_lock():
    path = DOCKERFILES["cpu"]
    copies = [r.split() for r in instructions(path, "COPY", stage="all") if r.split()[0] == "requirements.lock"]
    assert len(copies) == 1
    lock_in_image = copies[0][1]
    cmd = _pip_install(path)
    tokens = shlex.split(cmd.split("&&")[0])
    assert "--no-deps" in tokens
    assert tokens[tokens.index("-r") + 1] == lock_in_image
    assert "--extra-index-url" in tokens and tokens[tokens.index("--extra-index-url") + 1] == \
        "https://download.pytorch.org/whl/cpu"
    # The lock names the direct dependencies at the same versions, torch among them (CPU build from that index).
    lock = _lock()
    for line in (ROOT / "requirements.in").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert lock.get(re.sub(r"[-_.]+", "-", name).lower()) == version, line
    assert "torch" in lock and "onnxruntime" in lock and "onnxruntime-gpu" not in lock
    assert (ROOT / "requirements.lock").read_text().count("\nonnxruntime==") == 1
    # The image's Python is the project's.
    assert arg_defaults(path)["PYTHON_IMAGE"].startswith("python:3.11")
    assert 'requires-python = ">=3.11,<3.12"' in (ROOT / "pyproject.toml").read_text()


def test_gpu_image_installs_the_lock_with_onnxruntime_gpu_and_tensorrt():
    path = DOCKERFILES["gpu"]
    cmd = _pip_install(path)
    args = arg_defaults(path)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:12.") and "cudnn-runtime" in args["CUDA_IMAGE"]
    assert "python3.11" in " ".join(instructions(path, "RUN", stage="all"))
    # The lock minus onnxruntime (and nothing else), plus onnxruntime-gpu and TensorRT, pinned.
    m = re.search(r"grep -v -i '\^onnxruntime==' (\S+) > (\S+)", cmd)
    assert m, cmd
    lock_in_image, gpu_reqs = m.groups()
    assert any(r.split()[:2] == ["requirements.lock", lock_in_image] for r in instructions(path, "COPY", stage="all"))
    lock_text = (ROOT / "requirements.lock").read_text()
    kept = [ln for ln in lock_text.splitlines() if not re.match(r"^onnxruntime==", ln, re.I)]
    assert len(kept) == len(lock_text.splitlines()) - 1
    assert f"-r {gpu_reqs}" in cmd and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "https://download.pytorch.org/whl/cpu" in cmd and "https://pypi.nvidia.com" in cmd
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in cmd
    assert '"tensorrt-${TRT_CUDA}-libs==${TRT_VERSION}"' in cmd
    ort_gpu, ort = args["ORT_GPU_VERSION"].split("."), _lock()["onnxruntime"].split(".")
    assert len(ort_gpu) == 3 and ort_gpu[0] == ort[0] and 20 <= int(ort_gpu[1]) <= int(ort[1])
    assert re.fullmatch(r"10\.\d+\.\d+\.\d+", args["TRT_VERSION"])  # ONNX Runtime links libnvinfer.so.10
    assert args["TRT_CUDA"] == "cu12"
    env = env_of(path)
    assert "site-packages/tensorrt_libs" in env["LD_LIBRARY_PATH"]
    assert env["STOREFRONT_PROVIDERS"] == "auto" and env["STOREFRONT_TRT_CACHE_DIR"].startswith(VOLUME + "/")


def test_dockerignore_keeps_local_state_out():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "whitelist: ignore everything, then name what the images copy"
    assert not any(ln.lstrip("!").startswith((".venv", "var", ".git", "tests")) for ln in lines if ln.startswith("!"))


# ---------------------------------------------------------------- compose

def test_compose_services():
    c = compose()
    assert set(c["services"]) == {"trainer", "fraud", "recommender", "pricing", "prometheus", "grafana"}
    for name, s in storefront_services(c).items():
        assert (DOCKER / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"], name
        assert s["image"] == c["services"]["trainer"]["image"], "one image for every process"
    for name in DOMAIN_SERVICES:
        assert c["services"][name]["depends_on"] == {"trainer": {"condition": "service_healthy"}}, name
    assert set(load_settings(c["services"]["trainer"]["command"], service_env("trainer")).domain_list) == set(DOMAIN_SERVICES)


def test_the_recommender_catalog_journal_is_shared_with_the_trainer():
    """Items upserted while serving are journaled by the recommender and read by the trainer."""
    c = compose()
    trainer = load_settings(c["services"]["trainer"]["command"], service_env("trainer"))
    reco = load_settings(c["services"]["recommender"]["command"], service_env("recommender"))
    assert trainer.catalog_path == reco.catalog_path
    folder = str(Path(reco.catalog_path).parent)
    t_mount, r_mount = mount_of(c["services"]["trainer"], folder), mount_of(c["services"]["recommender"], folder)
    assert t_mount and r_mount and t_mount[0] == r_mount[0] and not r_mount[2]


def test_compose_commands_accept_their_settings():
    c = compose()
    trainer = load_settings(c["services"]["trainer"]["command"], service_env("trainer"))
    for name, s in storefront_services(c).items():
        env = service_env(name)
        ours = {k for k in env if k.startswith("STOREFRONT_")}
        cls, _ = settings_class(s["command"])
        # Image variables may belong to another process; compose's own must be this one's.
        own = {k for k in (s.get("environment") or {}) if k.startswith("STOREFRONT_")}
        assert own <= setting_env_names(cls), f"{name}: unknown settings {sorted(own - setting_env_names(cls))}"
        assert ours
        settings = load_settings(s["command"], env)
        assert settings.host == "0.0.0.0"
        assert settings.port == int(env["STOREFRONT_PORT"])
        published = [p.rsplit(":", 1)[-1] for p in s.get("ports", [])]
        assert str(settings.port) in published, f"{name}: gRPC port {settings.port} not published"
        # The registry: one named volume; the trainer writes it, services only read it.
        reg = mount_of(s, settings.registry_dir)
        assert reg is not None and reg[1] == settings.registry_dir and not reg[0].startswith((".", "/")), name
        assert reg[0] == mount_of(c["services"]["trainer"], trainer.registry_dir)[0]
        if name == "trainer":
            assert not reg[2]
            work = mount_of(s, settings.workdir)
            assert work is not None and not work[2] and work[0] != reg[0], "event log on its own volume"
        else:
            assert reg[2], f"{name}: mount the registry read-only"
            host, _, port = settings.trainer_target.rpartition(":")
            assert (host, int(port)) == ("trainer", trainer.port), settings.trainer_target
            for path in (settings.spool_dir, settings.trt_cache_dir):
                m = mount_of(s, path)
                assert m is not None and not m[2] and m[0] != reg[0], f"{name}: {path} needs its own writable volume"


@pytest.mark.parametrize("name", DOMAIN_SERVICES)
def test_gpu_override_runs_the_domain_services_on_the_gpu_image(name):
    base = compose()
    with open(DOCKER / "compose.gpu.yaml") as f:
        over = yaml.safe_load(f)
    assert set(over["services"]) == set(DOMAIN_SERVICES)
    svc = over["services"][name]
    assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILES["gpu"]
    assert svc["image"] != base["services"][name]["image"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    env = env_of(DOCKERFILES["gpu"])
    env.update({k: str(v) for k, v in base["services"][name]["environment"].items()})
    env.update({k: str(v) for k, v in svc["environment"].items()})
    settings = load_settings(base["services"][name]["command"], env)
    assert settings.providers == "auto" and settings.trt_fp16 is False
    m = mount_of(base["services"][name], settings.trt_cache_dir)
    assert m is not None and not m[2], "TensorRT engines persist on the service's writable volume"


def test_compose_healthchecks_ask_the_right_server():
    c = compose()
    for name, s in storefront_services(c).items():
        settings = load_settings(s["command"], service_env(name))
        cmds = healthcheck_commands(s["healthcheck"]["test"])
        hc = [cmd for cmd in cmds if cmd[:3] == ["python", "-m", "shared.healthcheck"]]
        assert len(hc) == 1, cmds
        args = healthcheck.parser().parse_args(hc[0][3:])
        assert args.target == f"127.0.0.1:{settings.port}"
        if args.service:  # a service the server really registers (the live test checks the answer)
            from google.protobuf import descriptor_pool

            from protos.feedback.v1 import feedback_pb2  # noqa: F401
            from protos.fraud.v1 import fraud_pb2  # noqa: F401
            from protos.pricing.v1 import pricing_pb2  # noqa: F401
            from protos.recommender.v1 import recommender_pb2  # noqa: F401

            descriptor_pool.Default().FindServiceByName(args.service)
        for cmd in cmds:
            if cmd[:2] == ["test", "-s"]:  # the trainer: healthy once the first model is published
                reg = ModelRegistry(settings.registry_dir)
                assert cmd[2] in {str(reg.pointer_path(d)) for d in settings.domain_list}, cmd


def test_prometheus_scrapes_every_metrics_port():
    c = compose()
    with open(DOCKER / "prometheus.yml") as f:
        prom = yaml.safe_load(f)
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name, s in storefront_services(c).items():
        settings = load_settings(s["command"], service_env(name))
        assert settings.resolved_metrics_port == settings.port + 1000
        expected.add(f"{name}:{settings.resolved_metrics_port}")
    assert targets == expected
    p = c["services"]["prometheus"]
    assert ("./prometheus.yml", "/etc/prometheus/prometheus.yml", True) in mounts(p)
    assert "--config.file=/etc/prometheus/prometheus.yml" in p["command"]


def test_grafana_is_provisioned_with_the_dashboard():
    c = compose()
    g = c["services"]["grafana"]
    ms = mounts(g)
    for src, _, _ in ms:
        if src.startswith("."):
            assert (DOCKER / src).exists(), src
    dash_target = next(t for s, t, _ in ms if s == "./grafana/dashboard.json")
    provisioning = {t: DOCKER / s for s, t, _ in ms if t.startswith("/etc/grafana/provisioning/")}
    ds_dir = provisioning["/etc/grafana/provisioning/datasources"]
    db_dir = provisioning["/etc/grafana/provisioning/dashboards"]
    (ds_file,) = ds_dir.glob("*.yaml")
    (db_file,) = db_dir.glob("*.yaml")
    ds = yaml.safe_load(ds_file.read_text())["datasources"]
    (prom,) = [d for d in ds if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(db_file.read_text())["providers"]
    assert any(p["options"]["path"] == str(Path(dash_target).parent) for p in providers)
    dash = json.loads((DOCKER / "grafana" / "dashboard.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {prom["uid"]}


# ---------------------------------------------------------------- dashboard vs the code's metrics

def exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """Every series name the processes export -> (family, its labels), from prometheus_client's registry."""
    from prometheus_client import REGISTRY

    from shared.metrics import RequestStats

    for m in ("shared.metrics", "shared.feedback", "trainer.collector", "trainer.joiner", "trainer.service",
              "services.fraud.main", "services.recommender.main", "services.pricing.main"):
        importlib.import_module(m)
    out: dict[str, tuple[str, set[str]]] = {}
    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, RequestStats):  # labels come with its series: describe a fresh one
            fresh = RequestStats()
            fresh.series("m", "c")
            families = list(fresh.collect())
        else:
            families = list(collector.collect())
        for fam in families:
            if not fam.name.startswith("storefront_"):
                continue
            labels = set(getattr(collector, "_labelnames", ()))
            for sample in fam.samples:
                labels |= set(sample.labels)
            labels.discard("le")
            suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                        "histogram": ["_bucket", "_count", "_sum", "_created"],
                        "summary": ["", "_count", "_sum", "_created"], "info": ["_info"]}[fam.type]
            for suffix in suffixes:
                out[fam.name + suffix] = (fam.name, labels | ({"le"} if suffix == "_bucket" else set()))
    return out


def defined_metric_names() -> set[str]:
    """Metric names written in the code (prometheus_client constructors), found by grep."""
    pat = re.compile(r"(?:Counter|Gauge|Histogram|Summary|Info|MetricFamily)\(\s*\"(storefront_[a-z0-9_]+)\"")
    names = set()
    for d in ("shared", "trainer", "services"):
        for f in (ROOT / d).rglob("*.py"):
            names |= set(pat.findall(f.read_text()))
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((DOCKER / "grafana" / "dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_panels_are_well_formed():
    dash = json.loads((DOCKER / "grafana" / "dashboard.json").read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            e = t["expr"]
            assert e.count("(") == e.count(")") and e.count("{") == e.count("}") and e.count("[") == e.count("]"), e


def test_every_metric_in_the_dashboard_exists():
    exported = exported_metrics()
    defined = defined_metric_names()
    families = {fam for fam, _ in exported.values()}
    # grep and the registry agree on what the code defines (Counter names lose _total in the registry).
    assert {re.sub(r"_total$", "", n) for n in defined} == families
    queries = dashboard_queries()
    used = set()
    for title, expr in queries:
        names = set(re.findall(r"\bstorefront_[a-z0-9_]+", expr))
        assert names, f"{title}: queries no storefront metric: {expr}"
        unknown = names - set(exported)
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the code"
        used |= names
        labels = set().union(*(exported[n][1] for n in names)) | {"job", "instance", "service"}
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels, f"{title}: label {label!r} not on {sorted(names)}"
        for matchers in re.findall(r"\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels, f"{title}: label {label!r} not on {sorted(names)}"
    wanted = {
        "storefront_requests_total", "storefront_request_latency_seconds_bucket", "storefront_batch_size_bucket",
        "storefront_queue_depth", "storefront_requests_dropped_total", "storefront_model_info",
        "storefront_model_reloads_total", "storefront_feedback_buffered", "storefront_feedback_spooled_total",
        "storefront_feedback_sent_total", "storefront_feedback_dropped_total", "storefront_trainer_records_total",
        "storefront_trainer_joined_total", "storefront_trainer_rounds_total", "storefront_trainer_drift",
        "storefront_trainer_trained_rows",
    }
    assert wanted <= used, f"dashboard misses {sorted(wanted - used)}"


def test_quantile_panels_use_histogram_buckets_by_le():
    for title, expr in dashboard_queries():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \(le\b", expr), f"{title}: {expr}"


# ---------------------------------------------------------------- scaled overlay (issue 14)

class _ComposeLoader(yaml.SafeLoader):
    """safe_load plus compose's merge tags: `!reset` (drop the base's value) and `!override`
    (replace it instead of merging), each kept as a (tag, value) pair."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _tag, lambda loader, node, tag=_tag: (tag, loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
                                              else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
                                              else loader.construct_scalar(node)))


def scaled() -> tuple[dict, dict]:
    """(the overlay as written, compose.yaml with the overlay merged as compose merges them: maps
    key by key, `!reset` dropped, `!override` replacing, anything else replaced)."""
    with open(DOCKER / "compose.scaled.yaml") as f:
        over = yaml.load(f, Loader=_ComposeLoader)
    merged = compose()
    for name, svc in over["services"].items():
        out = dict(merged["services"].get(name, {}))
        for key, value in svc.items():
            if isinstance(value, tuple) and value[0] == "!reset":
                out.pop(key, None)
            elif isinstance(value, tuple):
                out[key] = value[1]
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
        merged["services"][name] = out
    merged["volumes"] = {**merged["volumes"], **over.get("volumes", {})}
    return over, merged


def scaled_env(merged: dict, name: str) -> dict[str, str]:
    s = merged["services"][name]
    env = env_of(DOCKER / s["build"]["context"] / s["build"]["dockerfile"])
    env.update({k: str(v) for k, v in (s.get("environment") or {}).items()})
    return env


def volume_source(service: dict, path: str) -> tuple[str | None, bool]:
    """(named volume or None for an anonymous one, read_only) of the mount path lives on."""
    best = None
    for v in service.get("volumes", []):
        parts = v.split(":")
        source, target, ro = (None, parts[0], False) if len(parts) == 1 else (parts[0], parts[1], "ro" in parts[2:])
        if (path == target or path.startswith(target.rstrip("/") + "/")) and (best is None or len(target) > len(best[1])):
            best = (source, target, ro)
    assert best is not None, f"{path} is on no volume"
    return best[0], best[2]


def test_scaled_overlay_runs_two_of_everything_on_redis():
    from shared.channels import target_hosts
    from shared.redis_conn import check_redis_url

    over, merged = scaled()
    assert set(over["services"]) == {"redis", "trainer", *DOMAIN_SERVICES}
    redis = merged["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    cmd = redis["command"]
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "always"
    # an allkeys-* policy could evict a lease's fencing counter (docs/REDIS.md)
    assert not flags.get("--maxmemory-policy", "noeviction").startswith("allkeys")
    assert volume_source(redis, "/data")[0] in merged["volumes"], "the AOF on a named volume"

    trainer = load_settings(merged["services"]["trainer"]["command"], scaled_env(merged, "trainer"))
    assert trainer.event_log_url and not check_redis_url(trainer.event_log_url)
    assert trainer.event_log_url.split("//")[1].split(":")[0] == "redis"
    assert merged["services"]["trainer"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    # both trainers mount one workdir volume and one registry volume, writable
    work, reg = (volume_source(merged["services"]["trainer"], p) for p in (trainer.workdir, trainer.registry_dir))
    assert work[0] in merged["volumes"] and reg[0] in merged["volumes"] and not work[1] and not reg[1]
    for name in ("trainer", *DOMAIN_SERVICES):
        s = merged["services"][name]
        assert s["deploy"]["replicas"] == 2, name
        assert "ports" not in s, f"{name}: replicas cannot share a published host port"
    for name in DOMAIN_SERVICES:
        s = merged["services"][name]
        settings = load_settings(s["command"], scaled_env(merged, name))
        assert settings.trainer_target.startswith("dns:///") and target_hosts(settings.trainer_target) == ["trainer"]
        assert settings.trainer_target.rsplit(":", 1)[1] == str(trainer.port)
        source, ro = volume_source(s, settings.registry_dir)
        assert source == reg[0] and ro, f"{name}: the trainers' registry, read-only"
        spool, ro = volume_source(s, settings.spool_dir)
        assert spool is None and not ro, f"{name}: each replica's spool on its own (anonymous) volume"
    reco = load_settings(merged["services"]["recommender"]["command"], scaled_env(merged, "recommender"))
    assert reco.redis_url == trainer.event_log_url  # one Redis for the log and the online state
