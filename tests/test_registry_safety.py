"""The registry never reads through a symbolic link below its root, nor a file a manifest names
outside its version folder: such versions are refused (counted, logged) and the version being
served keeps serving. Real files, real ONNX models, a real HotReloader."""
import json
import os
import shutil

import numpy as np
import pytest

from shared import metrics
from shared.registry import ModelRegistry, RegistryError, __main__ as cli, sha256_file
from shared.reload import HotReloader
from shared.runtime.model import ModelHandle, ModelLoader
from tests import onnx_models


def registry_errors(name, reason):
    return metrics.REGISTRY_ERRORS.labels(name, reason)._value.get()


@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"  # beside the registry root, not under it
    d.mkdir()
    return d


async def serving_v1(registry, name, model_files, linear_signature):
    handle = ModelHandle(name)
    reloader = HotReloader(registry, handle, ModelLoader(expected=linear_signature))
    registry.publish(name, model_files["v_a"], linear_signature)
    assert (await reloader.check_once()).version == "1"
    return handle, reloader


async def assert_refused_and_v1_serves(reloader, handle, version, name, before):
    assert await reloader.check_once() is None
    assert "symbolic link" in reloader.refused[version]
    assert registry_errors(name, "symlink") == before + 1
    assert handle.current.version == "1"
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(handle.current.run({"x": x})[0], onnx_models.linear_reference(x, seed=1), rtol=1e-5)
    assert await reloader.check_once() is None  # and not retried while nothing changes
    assert registry_errors(name, "symlink") == before + 1


async def test_model_file_linked_outside_is_refused_and_the_old_version_serves(registry, model_files,
                                                                             linear_signature, outside):
    name = "linkfile"
    handle, reloader = await serving_v1(registry, name, model_files, linear_signature)
    registry.publish(name, model_files["v_b"], linear_signature)
    # The link's target has exactly the bytes the manifest hashes: following it would pass verification.
    target = outside / "model.onnx"
    shutil.copyfile(registry.model_path(name, "2"), target)
    registry.model_path(name, "2").unlink()
    registry.model_path(name, "2").symlink_to(target)
    before = registry_errors(name, "symlink")
    with pytest.raises(RegistryError, match="symbolic link") as e:
        registry.verify(name, "2")
    assert e.value.reason == "symlink"
    await assert_refused_and_v1_serves(reloader, handle, "2", name, before)


async def test_version_folder_linked_outside_is_refused(registry, model_files, linear_signature, outside):
    name = "linkdir"
    handle, reloader = await serving_v1(registry, name, model_files, linear_signature)
    registry.publish(name, model_files["v_b"], linear_signature)
    # A complete, valid version folder moved outside and linked back in under its number.
    moved = outside / "2"
    shutil.move(registry.version_dir(name, "2"), moved)
    registry.version_dir(name, "2").symlink_to(moved, target_is_directory=True)
    before = registry_errors(name, "symlink")
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.manifest(name, "2")
    await assert_refused_and_v1_serves(reloader, handle, "2", name, before)


async def test_extra_file_linked_to_a_system_file_is_never_hashed(registry, model_files, linear_signature):
    name = "linksys"
    handle, reloader = await serving_v1(registry, name, model_files, linear_signature)
    registry.publish(name, model_files["v_b"], linear_signature)
    # The attack seen: a listed file that is a link to a system file, with that file's real checksum.
    system_file = "/etc/hostname" if os.path.isfile("/etc/hostname") else "/etc/passwd"
    vdir = registry.version_dir(name, "2")
    (vdir / "notes.txt").symlink_to(system_file)
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"]["notes.txt"] = sha256_file(system_file)
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    before = registry_errors(name, "symlink")
    await assert_refused_and_v1_serves(reloader, handle, "2", name, before)


async def test_unlisted_link_in_a_version_folder_is_refused(registry, model_files, linear_signature, outside):
    """Services read some files from the version folder by name (the recommender's catalog),
    listed in the manifest or not: any link there refuses the whole version."""
    name = "linkunlisted"
    handle, reloader = await serving_v1(registry, name, model_files, linear_signature)
    registry.publish(name, model_files["v_b"], linear_signature)
    (outside / "users.npz").write_bytes(b"not ours")
    (registry.version_dir(name, "2") / "users.npz").symlink_to(outside / "users.npz")
    before = registry_errors(name, "symlink")
    await assert_refused_and_v1_serves(reloader, handle, "2", name, before)


async def test_linked_pointer_and_model_folder_are_refused(registry, model_files, linear_signature, outside):
    name = "linkptr"
    handle, reloader = await serving_v1(registry, name, model_files, linear_signature)
    pointer = registry.pointer_path(name)
    (outside / "CURRENT").write_text(pointer.read_text())  # a valid pointer, but outside
    pointer.unlink()
    pointer.symlink_to(outside / "CURRENT")
    with pytest.raises(RegistryError, match="symbolic link") as e:
        registry.current_version(name)
    assert e.value.reason == "symlink"
    before = registry_errors(name, "symlink")
    for _ in range(3):
        assert await reloader.check_once() is None
    assert registry_errors(name, "symlink") == before + 1  # one state, counted once
    assert metrics.POINTER_UNREADABLE.labels(name)._value.get() == 1
    assert handle.current.version == "1"

    # a whole model folder that is a link to a registry elsewhere
    other = ModelRegistry(outside / "other-registry")
    other.publish("linked", model_files["v_a"], linear_signature)
    registry.models_dir.joinpath("linked").symlink_to(other.model_dir("linked"), target_is_directory=True)
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.current_version("linked")
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.verify("linked", "1")


def test_the_registry_root_itself_may_be_a_link(tmp_path, model_files, linear_signature):
    """Root is what the operator configured (often a mounted volume behind a link): allowed."""
    real = ModelRegistry(tmp_path / "volume")
    real.publish("m", model_files["v_a"], linear_signature)
    (tmp_path / "registry-link").symlink_to(tmp_path / "volume", target_is_directory=True)
    via_link = ModelRegistry(tmp_path / "registry-link")
    assert via_link.current_version("m") == "1"
    assert via_link.verify("m", "1").files == real.manifest("m", "1").files


@pytest.mark.parametrize("fname", ["../../CURRENT", "..", "/etc/hostname", "a/b.onnx", "a\\b", ".hidden",
                                   "x\x00y", "manifest.json", "", "x" * 256])
def test_manifest_file_names_must_be_plain_names(registry, model_files, linear_signature, fname):
    registry.publish("m", model_files["v_a"], linear_signature)
    vdir = registry.version_dir("m", "1")
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"][fname] = "0" * 64
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError) as e:
        registry.verify("m", "1")
    assert e.value.reason == "unsafe_name"
    from shared.registry.manifest import validate_file_name

    with pytest.raises(RegistryError):
        validate_file_name(fname)


def test_publish_refuses_a_file_name_verify_would_refuse(registry, model_files, linear_signature, tmp_path):
    hidden = tmp_path / ".extra.json"
    hidden.write_text("{}")
    with pytest.raises(RegistryError, match="unsafe file name"):
        registry.publish("m", model_files["v_a"], linear_signature, extra_files=[hidden])
    assert registry.versions("m") == [] and registry.current_version("m") is None


def test_a_special_file_under_a_listed_name_is_refused_without_blocking(registry, model_files, linear_signature):
    registry.publish("m", model_files["v_a"], linear_signature)
    path = registry.model_path("m", "1")
    path.unlink()
    os.mkfifo(path)  # opening a FIFO for reading would block until a writer came
    with pytest.raises(RegistryError, match="not a plain file"):
        registry.verify("m", "1")


def test_cli_verify_reports_a_linked_file(tmp_path, model_files, capsys, outside):
    root = tmp_path / "reg"
    assert cli.main(["--root", str(root), "publish", "fraud", str(model_files["v_a"])]) == 0
    reg = ModelRegistry(root)
    target = outside / "model.onnx"
    shutil.copyfile(reg.model_path("fraud", "1"), target)
    reg.model_path("fraud", "1").unlink()
    reg.model_path("fraud", "1").symlink_to(target)
    capsys.readouterr()
    assert cli.main(["--root", str(root), "verify", "fraud"]) == 2
    assert "symbolic link" in capsys.readouterr().err


def test_cli_list_shows_unreadable_entries_and_goes_on(tmp_path, model_files, linear_signature, capsys, outside):
    reg = ModelRegistry(tmp_path / "reg")
    for _ in range(3):
        reg.publish("m", model_files["v_a"], linear_signature)
    reg.publish("n", model_files["v_a"], linear_signature)
    shutil.move(reg.version_dir("m", "2"), outside / "2")
    reg.version_dir("m", "2").symlink_to(outside / "2", target_is_directory=True)
    reg.pointer_path("n").write_text("{")
    capsys.readouterr()
    assert cli.main(["--root", str(reg.root), "list", "m"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["  1", "  2", "* 3"]
    assert "unreadable (symlink)" in lines[1]
    assert cli.main(["--root", str(reg.root), "list"]) == 2
    out = capsys.readouterr().out
    assert "m\tcurrent=3\tversions=3" in out and "n\tcurrent=unreadable (pointer_corrupt)" in out
