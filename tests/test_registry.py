import json
import threading

import pytest

from shared.registry import ModelRegistry, RegistryError, __main__ as cli
from shared.runtime.signature import signature_of_onnx


def test_publish_writes_version_manifest_and_flips_pointer(registry, model_files, linear_signature):
    assert registry.current_version("fraud") is None
    m1 = registry.publish("fraud", model_files["v_a"], linear_signature, metrics={"pr_auc": 0.7}, learned_up_to=10)
    assert (m1.version, m1.parent) == ("1", None)
    m2 = registry.publish("fraud", model_files["v_b"], linear_signature, extra={"thresholds": [0.1]})
    assert (m2.version, m2.parent) == ("2", "1")
    assert registry.current_version("fraud") == "2"
    assert registry.versions("fraud") == ["1", "2"]
    assert registry.models() == ["fraud"]
    shown = registry.manifest("fraud", "1")
    assert shown.metrics == {"pr_auc": 0.7} and shown.learned_up_to == 10
    assert shown.signature == linear_signature
    assert set(shown.files) == {"model.onnx"} and len(shown.files["model.onnx"]) == 64
    assert registry.verify("fraud", "2").extra == {"thresholds": [0.1]}
    # nothing but version folders and the pointer: staging folders are gone
    assert sorted(p.name for p in registry.model_dir("fraud").iterdir()) == ["1", "2", "CURRENT"]


def test_rollback_goes_to_parent_or_named_version(registry, model_files, linear_signature):
    for _ in range(3):
        registry.publish("m", model_files["v_a"], linear_signature)
    assert registry.rollback("m") == "2"
    assert registry.current_version("m") == "2"
    assert registry.rollback("m", "3") == "3"
    with pytest.raises(RegistryError):
        registry.rollback("m", "9")


def test_verify_detects_tampered_file(registry, model_files, linear_signature):
    registry.publish("m", model_files["v_a"], linear_signature)
    path = registry.model_path("m", "1")
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    with pytest.raises(RegistryError, match="checksum mismatch"):
        registry.verify("m", "1")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "UPPER", ".hidden", "x" * 64, "a\x00b"])
def test_names_that_could_escape_or_confuse_are_refused(registry, model_files, linear_signature, name):
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.publish(name, model_files["v_a"], linear_signature)


@pytest.mark.parametrize("version", ["0", "-1", "1/../2", "abc", "01", ""])
def test_bad_versions_are_refused(registry, version):
    with pytest.raises(RegistryError, match="invalid model version"):
        registry.version_dir("m", version)


def test_corrupt_pointer_is_reported(registry, model_files, linear_signature):
    registry.publish("m", model_files["v_a"], linear_signature)
    registry.pointer_path("m").write_text('{"version": "../../x"}')
    with pytest.raises(RegistryError, match="corrupt pointer"):
        registry.current_version("m")


def test_concurrent_publishers_get_distinct_versions(registry, model_files, linear_signature):
    results, errors = [], []

    def publish():
        try:
            results.append(registry.publish("m", model_files["v_a"], linear_signature).version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results, key=int) == [str(i) for i in range(1, 9)]
    assert registry.versions("m") == [str(i) for i in range(1, 9)]


def test_cli_publish_list_show_verify_rollback(tmp_path, model_files, capsys):
    root = str(tmp_path / "reg")
    assert cli.main(["--root", root, "publish", "fraud", str(model_files["v_a"]), "--metrics", '{"auc": 0.9}']) == 0
    assert cli.main(["--root", root, "publish", "fraud", str(model_files["v_b"])]) == 0
    assert cli.main(["--root", root, "list"]) == 0
    assert "fraud\tcurrent=2\tversions=2" in capsys.readouterr().out
    assert cli.main(["--root", root, "show", "fraud", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metrics"] == {"auc": 0.9}
    assert shown["signature"] == signature_of_onnx(model_files["v_a"]).to_json()
    assert cli.main(["--root", root, "verify", "fraud"]) == 0
    assert cli.main(["--root", root, "rollback", "fraud"]) == 0
    assert ModelRegistry(root).current_version("fraud") == "1"
    assert cli.main(["--root", root, "show", "../x"]) == 2
    assert "invalid model name" in capsys.readouterr().err
