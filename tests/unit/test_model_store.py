"""Version policy and instance counts, decided from config.pbtxt alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from builders.model_config import ServingOptions, render_config
from builders.repository import ModelEntry, VersionInfo
from builders.tensors import TensorSpec
from core.errors import NotFoundError
from server.model_store import instance_count, select_versions

SPECS = ((TensorSpec("x", "float32", (-1, 4)),), (TensorSpec("y", "float32", (-1, 4)),))


def entry(versions: list[int]) -> ModelEntry:
    infos = tuple(VersionInfo(v, Path(f"/repo/m/{v}"), None) for v in versions)
    return ModelEntry("m", Path("/repo/m"), None, None, infos)


def config(policy: str = "latest:1", instances: int = 1) -> mc.ModelConfig:
    return render_config(
        "m", "ort", *SPECS, ServingOptions(max_batch_size=4, version_policy=policy, instances=instances)
    )


@pytest.mark.parametrize(
    ("policy", "served"),
    [("latest:1", [5]), ("latest:2", [3, 5]), ("latest:9", [1, 3, 5]), ("all", [1, 3, 5]), ("specific:1,3", [1, 3])],
)
def test_version_policy(policy: str, served: list[int]) -> None:
    assert select_versions(entry([1, 3, 5]), config(policy)) == served


def test_default_policy_is_latest_one() -> None:
    bare = mc.ModelConfig(name="m", platform="onnxruntime_onnx")
    assert select_versions(entry([2, 7]), bare) == [7]


def test_specific_version_missing_is_not_found() -> None:
    with pytest.raises(NotFoundError, match=r"\[4\].*available: \[1, 3, 5\]"):
        select_versions(entry([1, 3, 5]), config("specific:3,4"))


def test_no_versions_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="no versions"):
        select_versions(entry([]), config())


def test_instance_count_sums_groups() -> None:
    assert instance_count(config(instances=3)) == 3
    two_groups = config(instances=2)
    two_groups.instance_group.add(count=1)
    assert instance_count(two_groups) == 3
    assert instance_count(mc.ModelConfig()) == 1
