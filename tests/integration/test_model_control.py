"""``kiln serve --model-control-mode {none,poll,explicit}`` with real clients on 127.0.0.1.

Poll picks up new and removed versions without failing a request in flight; a version that fails
to load (checksum mismatch, half-copied) leaves the serving ones untouched and is reported;
the repository API is refused unless the mode is explicit, as in Triton.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from builders.manifest import build_manifest
from builders.model_config import ServingOptions, render_config
from builders.publish import publish_version
from harness.serve import PAIR_SPECS, make_pair_model
from server.app import start_server
from server.model_store import ModelStore, StoreOptions
from server.repository_watch import RepositoryPoller

pytestmark = pytest.mark.integration
NAME = "pair"
X = np.ones((1, 4), np.float32)


def publish_pair(repo: Path, tmp: Path, offset: float, policy: str = "latest:2") -> int:
    """Publish the pair model (z = x + offset) as the next Kiln version of ``pair``; returns it."""
    artifact = make_pair_model(tmp / f"pair-{offset}.onnx", offset=offset)
    config = render_config(NAME, "ort", *PAIR_SPECS, ServingOptions(max_batch_size=8, version_policy=policy))
    manifest = build_manifest(
        model_name=NAME,
        source_path=artifact,
        source_sha256="0" * 64,
        precision="fp32",
        target="ort",
        artifact="model.onnx",
        files={},
    )
    return publish_version(repo, NAME, {"model.onnx": artifact}, config, manifest).version


def infer_z(client: tc.InferenceServerClient, version: str = "") -> float:
    tensor = tc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(X)
    return float(client.infer(NAME, [tensor], model_version=version).as_numpy("z")[0, 0])


def wait_until(check: object, timeout_s: float = 10.0) -> float:
    """Seconds until ``check()`` is true (bounded); fails the test when it never is."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if check():  # type: ignore[operator]
            return time.perf_counter() - start
        time.sleep(0.02)
    raise AssertionError(f"not true within {timeout_s} s")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    publish_pair(root, tmp_path, offset=1.0)
    return root


def _status(err: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(err.value.status())


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_repository_api_is_refused_unless_explicit(repo: Path, mode: str) -> None:
    with start_server(repo, port=0, model_control_mode=mode) as server, tc.InferenceServerClient(server.url) as client:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as excinfo:
                call(NAME)
            assert _status(excinfo) == "StatusCode.FAILED_PRECONDITION"
            assert f"--model-control-mode {mode}" in excinfo.value.message()
            assert "explicit" in excinfo.value.message()
        assert infer_z(client) == 2.0  # still serving


def test_poll_picks_up_new_and_removed_versions_without_failing_requests(repo: Path, tmp_path: Path) -> None:
    with start_server(repo, port=0, model_control_mode="poll", poll_s=0.2) as server:
        failures: list[str] = []
        answers: set[float] = set()
        stop = threading.Event()

        def load() -> None:  # bounded: stops when the test says so or after 20 s
            deadline = time.perf_counter() + 20
            with tc.InferenceServerClient(server.url) as c:
                while not stop.is_set() and time.perf_counter() < deadline:
                    try:
                        answers.add(infer_z(c))
                    except InferenceServerException as err:
                        failures.append(str(err))

        worker = threading.Thread(target=load)
        worker.start()
        try:
            with tc.InferenceServerClient(server.url) as client:
                assert publish_pair(repo, tmp_path, offset=2.0) == 2
                wait_until(lambda: client.is_model_ready(NAME, "2"))
                assert client.is_model_ready(NAME, "1")  # latest:2 keeps version 1 serving
                assert infer_z(client, "1") == 2.0 and infer_z(client, "2") == 3.0
                shutil.rmtree(repo / NAME / "1")
                wait_until(lambda: not client.is_model_ready(NAME, "1"))
                assert infer_z(client, "2") == 3.0
        finally:
            stop.set()
            worker.join(timeout=30)
    assert failures == []
    assert answers == {2.0, 3.0}  # unversioned requests moved from version 1 to version 2


def test_poll_applies_a_policy_change_and_keeps_the_versions_it_still_serves(repo: Path, tmp_path: Path) -> None:
    from builders.version_policy import change_policy

    with (
        start_server(repo, port=0, model_control_mode="poll", poll_s=0.1) as server,
        tc.InferenceServerClient(server.url) as client,
    ):
        publish_pair(repo, tmp_path, offset=2.0)
        wait_until(lambda: client.is_model_ready(NAME, "2"))
        kept = server.store.get(NAME, "2")
        change_policy(repo, NAME, "1")  # what `kiln repo policy pair --keep-versions 1` does
        wait_until(lambda: not client.is_model_ready(NAME, "1"))
        assert server.store.get(NAME, "2") is kept  # not reloaded: only the policy changed


def test_poll_never_loads_a_version_that_fails_verification(repo: Path, tmp_path: Path) -> None:
    """A hand-copied version: kiln.json arrived, the artifact is half there."""
    with (
        start_server(repo, port=0, model_control_mode="poll", poll_s=0.1) as server,
        tc.InferenceServerClient(server.url) as client,
    ):
        publish_pair(repo, tmp_path, offset=2.0)
        wait_until(lambda: client.is_model_ready(NAME, "2"))
        copy = repo / NAME / "3"
        copy.mkdir()
        shutil.copyfile(repo / NAME / "2" / "kiln.json", copy / "kiln.json")
        whole = (repo / NAME / "2" / "model.onnx").read_bytes()
        (copy / "model.onnx").write_bytes(whole[: len(whole) // 2])

        def reported() -> bool:
            index = {m.version: m for m in client.get_model_repository_index().models if m.name == NAME}
            return "3" in index and index["3"].state == "UNAVAILABLE" and "fails verification" in index["3"].reason

        wait_until(reported)
        assert not client.is_model_ready(NAME, "3")
        assert client.is_model_ready(NAME, "1") and client.is_model_ready(NAME, "2")  # untouched
        assert infer_z(client) == 3.0  # the newest good version still answers unversioned requests
        (copy / "model.onnx").write_bytes(whole)  # the copy completes: now it loads
        wait_until(lambda: client.is_model_ready(NAME, "3"))


def test_poll_waits_for_a_version_without_manifest_to_settle(repo: Path, tmp_path: Path) -> None:
    async def scenario() -> list[bool]:
        store = ModelStore(repo, StoreOptions(model_control_mode="poll"))
        poller = RepositoryPoller(store)
        poller.remember()
        await store.load(NAME)
        plain = repo / NAME / "2"
        plain.mkdir()
        shutil.copyfile(make_pair_model(tmp_path / "p.onnx", offset=5.0), plain / "model.onnx")
        seen = []
        for _ in range(3):
            await poller.poll()
            seen.append(store.is_ready(NAME, "2"))
        await store.close()
        return seen

    assert asyncio.run(scenario()) == [False, True, True]  # loaded once it looked the same twice


def test_explicit_load_with_config_override_and_a_failing_version(repo: Path, tmp_path: Path) -> None:
    with (
        start_server(repo, port=0, model_control_mode="explicit") as server,
        tc.InferenceServerClient(server.url) as client,
    ):
        publish_pair(repo, tmp_path, offset=2.0)
        assert not client.is_model_ready(NAME, "2")  # explicit: nothing happens until asked
        client.load_model(NAME)
        assert client.is_model_ready(NAME, "1") and client.is_model_ready(NAME, "2")
        config = client.get_model_config(NAME).config
        config.version_policy.specific.versions[:] = [2]
        client.load_model(NAME, config=json_format.MessageToJson(config))
        assert not client.is_model_ready(NAME, "1") and infer_z(client, "2") == 3.0
        version = publish_pair(repo, tmp_path, offset=3.0)
        artifact = repo / NAME / str(version) / "model.onnx"
        artifact.write_bytes(artifact.read_bytes()[:-10])  # corrupt after publish: checksum mismatch
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model(NAME)
        assert _status(excinfo) == "StatusCode.FAILED_PRECONDITION"
        assert f"version {version}" in excinfo.value.message() and "checksum" in excinfo.value.message()
        assert infer_z(client, "2") == 3.0  # what served keeps serving
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model(NAME, config="{not json")
        assert _status(excinfo) == "StatusCode.INVALID_ARGUMENT" and "JSON ModelConfig" in excinfo.value.message()


def test_serve_flags_are_checked(tmp_path: Path) -> None:
    from server.cli import main

    assert main(["serve", "--repo", str(tmp_path), "--model-control-mode", "sometimes"]) == 2
    assert main(["serve", "--repo", str(tmp_path), "--repository-poll-secs", "5"]) == 2
    assert main(["serve", "--repo", str(tmp_path), "--model-control-mode", "poll", "--repository-poll-secs", "0"]) == 2
