"""Registry garbage collection: what it keeps (CURRENT, the rollback target, versions other
pointers name, pinned, leased by serving processes, the last N, recent ones) and what it
removes; leases written by a real in-process ServedModel/HotReloader; dry runs; crash
leftovers; concurrent gcs; and a publish loop whose disk stays bounded.

Real registry folders, real small ONNX models; time is an injected clock, never a sleep."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from shared import metrics
from shared.registry import ModelRegistry, RegistryError, __main__ as cli
from shared.registry.files import tree_bytes
from shared.registry.registry import LEASES_DIR, TRASH_PREFIX
from shared.reload import HotReloader
from shared.runtime.model import ModelHandle, ModelLoader
from shared.serving import ServedModel

T0 = 1_700_000_000.0


class Clock:
    """Wall clock for the registry (manifests' created, leases, gc ages), moved by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(tmp_path: Path, clock: Clock) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry", clock=clock)


def publish(reg: ModelRegistry, clock: Clock, name: str, model_file: Path, signature, n: int, every_s: float = 60.0,
            **kw) -> list[str]:
    out = []
    for _ in range(n):
        out.append(reg.publish(name, model_file, signature, **kw).version)
        clock.advance(every_s)
    return out


def on_disk(reg: ModelRegistry, name: str) -> list[str]:
    """Entries of the model folder that are version folders (what a gc really left)."""
    return sorted((e for e in os.listdir(reg.model_dir(name)) if e.isdigit()), key=int)


def removed_total(name: str) -> float:
    return metrics.REGISTRY_VERSIONS_REMOVED.labels(name)._value.get()


def test_gc_keeps_current_rollback_target_pointers_pinned_leased_and_last_n(reg, clock, model_files,
                                                                            linear_signature):
    name = "keepers"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 12)
    assert reg.current_version(name) == "12"
    reg.pin(name, "3", note="audited")
    # A pointer gc has no special knowledge of (a future canary): whatever it names is kept.
    (reg.model_dir(name) / "CANARY").write_text(json.dumps({"version": "7", "share": 0.1}))
    # A lease from a process that died long ago: ignored.
    reg.write_lease(name, "replica-dead", {"serving": "9", "previous": None})
    clock.advance(1000)
    reg.write_lease(name, "replica-a", {"serving": "5", "previous": "4", "loading": None})
    before = removed_total(name)
    sizes = {v: tree_bytes(reg.version_dir(name, v)) for v in ("1", "2", "6", "8", "9", "10")}

    report = reg.gc(name, keep_last=2, min_age_s=600, lease_ttl_s=300)

    assert report.removed == ["1", "2", "6", "8", "9", "10"]
    assert on_disk(reg, name) == ["3", "4", "5", "7", "11", "12"] == reg.versions(name)
    assert report.kept["12"] == ["champion (CURRENT)", "last 2"]
    assert report.kept["11"] == ["rollback target of 12", "last 2"]
    assert report.kept["3"] == ["pinned (audited)"]
    assert report.kept["4"] == ["leased by replica-a (previous)"]
    assert report.kept["5"] == ["leased by replica-a (serving)"]
    assert report.kept["7"] == ["named by CANARY"]
    assert report.bytes_freed == sum(sizes.values()) > 0
    assert report.bytes_after == tree_bytes(reg.model_dir(name))
    assert metrics.REGISTRY_BYTES.labels(name)._value.get() == report.bytes_after
    assert removed_total(name) == before + 6
    assert not [e for e in os.listdir(reg.model_dir(name)) if e.startswith(TRASH_PREFIX)]
    for v in reg.versions(name):  # what is kept is intact
        reg.verify(name, v)
    # Rollback still works, to the kept target.
    assert reg.rollback(name) == "11"


def test_young_versions_and_the_rollback_chain_are_kept(reg, clock, model_files, linear_signature):
    name = "young"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 8, every_s=100)
    # Ages now: v8 100 s, v7 200 s ... v1 800 s. CURRENT rolled back to 6: its parent 5 is the next target.
    reg.rollback(name, "6")
    report = reg.gc(name, keep_last=1, min_age_s=350, rollback_depth=2)
    assert report.kept == {
        "4": ["rollback target of 5"],
        "5": ["rollback target of 6"],
        "6": ["champion (CURRENT)", "younger than 350 s"],
        "7": ["younger than 350 s"],
        "8": ["last 1", "younger than 350 s"],
    }
    assert report.removed == ["1", "2", "3"]


def test_dry_run_removes_nothing_and_the_cli_says_what_and_why(reg, clock, model_files, linear_signature, capsys):
    name = "dry"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 5, every_s=1000)
    before = removed_total(name)
    report = reg.gc(name, keep_last=2, min_age_s=0, dry_run=True)
    assert report.dry_run and report.removed == ["1", "2", "3"] and report.bytes_freed > 0
    assert on_disk(reg, name) == ["1", "2", "3", "4", "5"]
    assert removed_total(name) == before

    root = str(reg.root)
    # The CLI reads the real clock: every version here was "created" in 2023, so min-age passes.
    assert cli.main(["--root", root, "gc", name, "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 3" in out and "dry run: nothing removed" in out
    assert "keep   5\tchampion (CURRENT); last 2" in out
    assert "keep   4\trollback target of 5; last 2" in out
    assert "  remove 1" in out and "  remove 3" in out
    assert on_disk(reg, name) == ["1", "2", "3", "4", "5"]

    assert cli.main(["--root", root, "gc", name, "--keep-last", "2"]) == 0
    out = capsys.readouterr().out
    assert "removed 3," in out and "  removed 1" in out and "KB freed" in out
    assert on_disk(reg, name) == ["4", "5"]


def test_pin_and_unpin_from_the_cli(reg, clock, model_files, linear_signature, capsys):
    name = "pins"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 4, every_s=1000)
    root = str(reg.root)
    assert cli.main(["--root", root, "pin", name, "1", "--note", "known good"]) == 0
    assert reg.pins(name)["1"]["note"] == "known good"
    assert cli.main(["--root", root, "list", name]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line for line in listed if line.endswith("pinned")] == [line for line in listed if line.startswith("  1\t")]
    assert cli.main(["--root", root, "pin", name, "9"]) == 2  # only an existing version is pinned
    assert "no version '9'" in capsys.readouterr().err

    assert reg.gc(name, keep_last=1, min_age_s=0).removed == ["2"]
    assert on_disk(reg, name) == ["1", "3", "4"]
    assert cli.main(["--root", root, "unpin", name, "1"]) == 0
    assert cli.main(["--root", root, "unpin", name, "1"]) == 1  # not pinned any more
    assert reg.gc(name, keep_last=1, min_age_s=0).removed == ["1"]


async def test_a_running_served_model_leases_what_it_serves_and_keeps_for_rollback(reg, clock, model_files,
                                                                                 linear_signature):
    name = "leased"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 1)
    # Poll interval of an hour: the test drives the reloader's checks itself.
    served = ServedModel(name, ModelLoader(expected=linear_signature), registry=reg, poll_interval_s=3600)
    await served.start()
    try:
        instance = served.reloader.instance
        publish(reg, clock, name, model_files["v_b"], linear_signature, 1)
        assert (await served.reloader.check_once()).version == "2"
        (lease,) = reg.leases(name)
        assert (lease.instance, lease.versions, lease.fresh) == (instance, {"serving": "2", "previous": "1"}, True)
        # The service lags: ten more versions are published while it still serves 2 (and holds 1).
        publish(reg, clock, name, model_files["v_a"], linear_signature, 10, every_s=10)
        clock.advance(60)  # the lease, written at the swap, is 160 s old: within its TTL
        report = reg.gc(name, keep_last=1, min_age_s=0, lease_ttl_s=300)
        assert report.kept["2"] == [f"leased by {instance} (serving)"]
        assert report.kept["1"] == [f"leased by {instance} (previous)"]
        assert report.removed == [str(v) for v in range(3, 11)]
        # Rolling CURRENT back to what the service holds still works, and swaps instantly.
        reg.rollback(name, "1")
        await served.reloader.check_once()  # (or the watcher's own loop, waiting on the same lock, swaps)
        assert served.current.version == "1"
        assert reg.leases(name)[0].versions == {"serving": "1", "previous": "2"}
    finally:
        await served.stop()
    # A clean stop gives the lease back: what only it protected may go.
    assert reg.leases(name) == []
    reg.set_current(name, "12")
    assert reg.gc(name, keep_last=1, min_age_s=0).removed == ["1", "2"]


async def test_a_version_is_leased_while_it_loads_and_a_stale_lease_protects_nothing(reg, clock, model_files,
                                                                                   linear_signature):
    name = "loading"
    seen_while_loading = []

    def prepare(model):  # runs in the loader thread, in the middle of the load
        seen_while_loading.append(dict(reg.leases(name)[0].versions))

    monotonic = [0.0]
    reloader = HotReloader(reg, ModelHandle(name), ModelLoader(expected=linear_signature, prepare=prepare),
                           clock=lambda: monotonic[0], instance="replica-1", lease_refresh_s=30)
    publish(reg, clock, name, model_files["v_a"], linear_signature, 1)
    assert (await reloader.check_once()).version == "1"
    publish(reg, clock, name, model_files["v_b"], linear_signature, 1)
    assert (await reloader.check_once()).version == "2"
    assert seen_while_loading == [{"loading": "1"}, {"serving": "1", "loading": "2"}]

    publish(reg, clock, name, model_files["v_a"], linear_signature, 3)
    reg.set_current(name, "5")
    # The process hangs (no refresh) past the TTL: its lease no longer protects 1 and 2 ...
    clock.advance(301)
    assert not reg.leases(name, ttl_s=300)[0].fresh
    assert reg.gc(name, keep_last=1, min_age_s=0, lease_ttl_s=300, dry_run=True).removed == ["1", "2", "3"]
    # ... until it refreshes, which its polls do every lease_refresh_s of its own clock.
    monotonic[0] += 29
    assert await reloader.check_once() is not None  # (it loads 5 meanwhile: the lease follows)
    reg.set_current(name, "2")
    assert await reloader.check_once() is not None  # back to 2: instant rollback
    clock.advance(301)
    monotonic[0] += 30
    await reloader.check_once()  # nothing new, but the refresh is due
    assert reg.gc(name, keep_last=1, min_age_s=0, lease_ttl_s=300).removed == ["3", "4"]
    assert reg.versions(name) == ["1", "2", "5"]  # 1: CURRENT's rollback target


def test_a_version_mid_deletion_is_invisible_and_the_next_gc_cleans_it(reg, clock, model_files, linear_signature,
                                                                     capsys):
    name = "trash"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 4, every_s=1000)
    # What a gc that crashed between its rename and its delete leaves behind.
    trash = reg.model_dir(name) / f"{TRASH_PREFIX}2-deadbeef"
    os.rename(reg.version_dir(name, "2"), trash)
    assert reg.versions(name) == ["1", "3", "4"]
    assert reg.current_version(name) == "4"
    assert reg.models() == [name]
    with pytest.raises(RegistryError):
        reg.manifest(name, trash.name)
    assert cli.main(["--root", str(reg.root), "list", name]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["  1", "  3", "* 4"]

    report = reg.gc(name, keep_last=2, min_age_s=0)
    assert report.removed == ["1"] and report.leftovers == [trash.name]
    assert not trash.exists()
    assert sorted(os.listdir(reg.model_dir(name))) == ["3", "4", "CURRENT"]


def test_two_gcs_at_once_do_not_fail_and_remove_each_version_once(tmp_path, clock, model_files, linear_signature):
    root = tmp_path / "registry"
    name = "concurrent"
    publish(ModelRegistry(root, clock=clock), clock, name, model_files["v_a"], linear_signature, 20, every_s=100)
    start = threading.Barrier(4)
    reports, errors = [], []

    def run() -> None:
        reg = ModelRegistry(root, clock=clock)  # each its own registry object and descriptors, like a process
        start.wait()
        try:
            reports.append(reg.gc(name, keep_last=3, min_age_s=0))
        except Exception as e:  # noqa: BLE001 - any failure is the test's failure
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    removed = sorted((v for r in reports for v in r.removed), key=int)
    assert removed == [str(v) for v in range(1, 18)]  # each once, whoever got the lock first
    assert on_disk(ModelRegistry(root), name) == ["18", "19", "20"]


def test_gc_deletes_nothing_when_it_cannot_tell_what_is_in_use(reg, clock, model_files, linear_signature):
    name = "unsure"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 5, every_s=1000)
    mdir = reg.model_dir(name)

    def refused(reason: str) -> None:
        before = metrics.REGISTRY_GC.labels(name, reason)._value.get()
        with pytest.raises(RegistryError) as e:
            reg.gc(name, keep_last=1, min_age_s=0)
        assert e.value.reason == reason
        assert metrics.REGISTRY_GC.labels(name, reason)._value.get() == before + 1
        assert on_disk(reg, name) == ["1", "2", "3", "4", "5"]

    (mdir / "CANARY").write_text("{not json")
    refused("pointer_corrupt")
    (mdir / "CANARY").unlink()
    (mdir / "PINNED").write_text('{"pins": ["3"]}')
    refused("pins_corrupt")
    (mdir / "PINNED").unlink()
    (mdir / LEASES_DIR).mkdir()
    (mdir / LEASES_DIR / "replica-x").write_text("garbage")  # recent (mtime now): it may hold anything
    refused("lease_unreadable")
    (mdir / LEASES_DIR / "replica-x").unlink()
    (mdir / "CURRENT").unlink()
    refused("no_current")
    (mdir / "CURRENT").write_text(json.dumps({"version": "9"}))
    refused("missing")
    with pytest.raises(RegistryError):
        reg.gc(name, keep_last=0)  # the newest version is always kept


def test_rollback_to_a_collected_version_fails_cleanly(reg, clock, model_files, linear_signature):
    name = "gone"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 4, every_s=1000)
    assert reg.gc(name, keep_last=1, min_age_s=0).removed == ["1", "2"]
    with pytest.raises(RegistryError) as e:
        reg.rollback(name, "1")
    assert e.value.reason == "missing"
    assert reg.current_version(name) == "4"


def test_a_planted_link_is_removed_never_followed(reg, clock, model_files, linear_signature, tmp_path):
    name = "linked"
    publish(reg, clock, name, model_files["v_a"], linear_signature, 4, every_s=1000)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"x" * 1000)
    import shutil

    shutil.rmtree(reg.version_dir(name, "2"))
    reg.version_dir(name, "2").symlink_to(outside, target_is_directory=True)
    report = reg.gc(name, keep_last=1, min_age_s=0)
    assert report.removed == ["1", "2"]
    assert (outside / "precious.bin").read_bytes() == b"x" * 1000
    assert not os.path.lexists(reg.version_dir(name, "2"))


async def test_publish_loop_with_gc_after_each_stays_under_a_disk_bound(reg, clock, model_files, linear_signature,
                                                                       tmp_path):
    """The trainer's policy over 50 publishes of ~200 KB versions, a lagging replica following
    every 5th: the registry holds what the policy keeps, never more, however long it runs."""
    name = "loop"
    blob = tmp_path / "catalog.bin"
    blob.write_bytes(os.urandom(200_000))  # incompressible: stands in for a recommender's tables
    keep_last, min_age_s, every_s = 3, 25.0, 10.0
    reloader = HotReloader(reg, ModelHandle(name), ModelLoader(expected=linear_signature), instance="replica")
    per_version = None
    peak = 0
    for i in range(50):
        v = reg.publish(name, model_files["v_a"], linear_signature, extra_files=[blob]).version
        per_version = per_version or tree_bytes(reg.version_dir(name, v))
        if i % 5 == 0:
            await reloader.check_once()
        report = reg.gc(name, keep_last=keep_last, min_age_s=min_age_s)
        clock.advance(every_s)
        peak = max(peak, tree_bytes(reg.root))
        assert report.bytes_after <= peak
    # kept at most: the last N, those younger than min_age (3 at one per 10 s), CURRENT's parent,
    # the replica's serving and previous versions; plus pointers, leases and manifests' slack.
    bound = (keep_last + 3 + 1 + 2) * per_version + 64 * 1024
    assert peak <= bound, (peak, bound)
    assert len(reg.versions(name)) <= keep_last + 3 + 1 + 2
    assert reg.versions(name)[-1] == "50" and reg.current_version(name) == "50"
    assert reloader.handle.current.version in reg.versions(name)
    assert reloader.handle.previous.version in reg.versions(name)
    assert removed_total(name) >= 50 - (keep_last + 3 + 1 + 2)


def test_the_trainer_collects_garbage_after_rounds_and_a_failing_gc_never_stops_it(tmp_path, caplog):
    """The trainer's call site (DomainLoop.collect_garbage, run after every round) on a real
    bootstrapped fraud model, with its settings; a gc that cannot run is logged, not raised."""
    from tests.fraud_fixtures import bootstrap_small_fraud
    from trainer.eventlog import SqliteEventLog
    from trainer.service import DomainLoop, TrainerSettings

    registry, _, _ = bootstrap_small_fraud(tmp_path)
    s = TrainerSettings(workdir=str(tmp_path / "trainer"), registry_dir=str(registry.root), domains="fraud",
                        gc_keep_last=2, gc_min_age_s=0)
    assert s.validate() == []
    event_log = SqliteEventLog(tmp_path / "events.db")
    try:
        loop = DomainLoop("fraud", event_log, registry, s)
        v1 = registry.manifest("fraud", "1")
        for _ in range(5):  # what five published rounds leave
            registry.publish("fraud", registry.model_path("fraud", "1"), v1.signature, extra=v1.extra)
        loop.collect_garbage()
        assert registry.versions("fraud") == ["5", "6"]

        (registry.model_dir("fraud") / "CANARY").write_text("{torn")
        registry.publish("fraud", registry.model_path("fraud", "6"), v1.signature, extra=v1.extra)
        with caplog.at_level("WARNING", logger="trainer.service"):
            loop.collect_garbage()  # does not raise
        assert "deleted nothing (pointer_corrupt)" in caplog.text
        assert registry.versions("fraud") == ["5", "6", "7"]

        loop.gc_keep_last = 0  # off
        (registry.model_dir("fraud") / "CANARY").unlink()
        loop.collect_garbage()
        assert registry.versions("fraud") == ["5", "6", "7"]
    finally:
        event_log.close()
    assert TrainerSettings(gc_keep_last=-1).validate()
