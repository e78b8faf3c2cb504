from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from builders.manifest import build_manifest, read_manifest
from builders.model_config import ServingOptions, render_config
from builders.publish import publish_version
from builders.repository import check_model_name, list_models, list_versions, verify_repository
from builders.tensors import TensorSpec
from core.errors import InvalidInputError, RepositoryError
from harness.models import tree_snapshot

SPECS = (TensorSpec("x", "float32", ("batch", 4)),)
OUT = (TensorSpec("probs", "float32", ("batch", 3)),)


def _publish(repo: Path, artifact: Path, name: str = "lin-fp32-ort", hook=None):
    config = render_config(name, "ort", SPECS, OUT, ServingOptions(max_batch_size=8))
    manifest = build_manifest(
        model_name=name,
        source_path=artifact,
        source_sha256="abc",
        precision="fp32",
        target="ort",
        artifact="model.onnx",
        files={},
    )
    return publish_version(repo, name, {"model.onnx": artifact}, config, manifest, hook=hook)


@pytest.mark.parametrize("name", ["digits-fp32-ort", "a", "A.b_c-9"])
def test_safe_names_accepted(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", ".", ".hidden", "x" * 129, "a b", "a\\b"])
def test_unsafe_names_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="is not allowed"):
        check_model_name(name)


def test_versions_increase_and_manifest_records_checksums(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    first = _publish(repo, linear_model)
    second = _publish(repo, linear_model)
    assert (first.version, second.version) == (1, 2)
    manifest = read_manifest(second.path)
    assert manifest["version"] == 2
    assert manifest["precision"] == "fp32"
    assert manifest["source"]["sha256"] == "abc"
    assert set(manifest["files"]) == {"model.onnx"}
    assert manifest["files"]["model.onnx"]["bytes"] == linear_model.stat().st_size
    assert {"kiln", "onnx", "onnxruntime", "numpy"} <= set(manifest["tools"])
    assert list_versions(repo / "lin-fp32-ort") == [1, 2]
    assert verify_repository(repo) == []
    assert [e.name for e in list_models(repo)] == ["lin-fp32-ort"]


@pytest.mark.parametrize("stage", ["computing checksums", "syncing the staged files"])
def test_failure_mid_publish_leaves_repository_unchanged(tmp_path: Path, linear_model: Path, stage: str) -> None:
    repo = tmp_path / "repo"
    _publish(repo, linear_model)
    before = tree_snapshot(repo)

    def fail(at: str) -> None:
        if at == stage:
            raise OSError(28, "No space left on device")

    with pytest.raises(RepositoryError, match="nothing was published"):
        _publish(repo, linear_model, hook=fail)
    assert tree_snapshot(repo) == before


def test_failure_on_first_publish_leaves_no_model_dir(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    def fail(at: str) -> None:
        raise OSError(5, "I/O error")

    with pytest.raises(RepositoryError):
        _publish(repo, linear_model, hook=fail)
    assert list(repo.iterdir()) == []


def test_concurrent_publishes_get_distinct_versions(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    barrier = threading.Barrier(6)
    results: list[int] = []
    errors: list[BaseException] = []

    def racer(at: str) -> None:
        if at == "synced":
            barrier.wait(timeout=10)

    def work() -> None:
        try:
            results.append(_publish(repo, linear_model, hook=racer).version)
        except BaseException as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    for v in results:
        assert json.loads((repo / "lin-fp32-ort" / str(v) / "kiln.json").read_text())["version"] == v
    assert not [p for p in (repo / "lin-fp32-ort").iterdir() if p.name.startswith(".")]


def test_repo_path_that_is_a_file(tmp_path: Path, linear_model: Path) -> None:
    file_repo = tmp_path / "repo"
    file_repo.write_text("not a dir")
    with pytest.raises(RepositoryError, match="is a file"):
        _publish(file_repo, linear_model)
    assert file_repo.read_text() == "not a dir"


def test_verify_finds_tampering(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    published = _publish(repo, linear_model)
    (published.path / "model.onnx").write_bytes(b"tampered")
    (published.path / "extra.txt").write_text("x")
    problems = verify_repository(repo)
    assert any("checksum" in p for p in problems)
    assert any("'extra.txt' is not listed" in p for p in problems)


def test_verify_finds_config_artifact_mismatch(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    _publish(repo, linear_model)
    cfg = repo / "lin-fp32-ort" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "probs"', 'name: "scores"'))
    problems = verify_repository(repo)
    assert any("'scores' is in config.pbtxt but not in the artifact" in p for p in problems)
    cfg.write_text("garbage {")
    assert any("does not parse" in p for p in verify_repository(repo))


def test_verify_still_checks_config_against_artifact_without_a_manifest(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    published = _publish(repo, linear_model)
    (published.path / "kiln.json").unlink()
    cfg = repo / "lin-fp32-ort" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "probs"', 'name: "scores"'))
    problems = verify_repository(repo)
    assert any("kiln.json missing or unreadable" in p for p in problems)
    assert any("'scores' is in config.pbtxt but not in the artifact" in p for p in problems)
