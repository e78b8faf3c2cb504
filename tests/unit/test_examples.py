"""The bundled example model and its held-out data are what the rest of Kiln relies on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import examples
from core.errors import InvalidInputError, NotFoundError


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(examples.example_model_path()), load_external_data=False)


@pytest.fixture(scope="module")
def heldout() -> dict[str, np.ndarray]:
    with np.load(examples.example_data_path()) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(examples.example_model_path()), options, providers=["CPUExecutionProvider"])


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_model_passes_checker_with_inline_weights(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.initializer) > 0
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    assert {"Conv", "Gemm"} <= {node.op_type for node in model.graph.node}
    assert examples.example_model_path().stat().st_size < 1_000_000


def test_model_declares_io_with_symbolic_batch(model: onnx.ModelProto) -> None:
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inp) == ["batch", 1, 8, 8]
    assert out.name == "logits"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(out) == ["batch", 10]
    assert model.opset_import[0].version == examples.example_metadata()["opset"] == 17


def test_heldout_npz_has_kiln_data_format(heldout: dict[str, np.ndarray]) -> None:
    assert set(heldout) == {"input", "labels"}
    x, labels = heldout["input"], heldout["labels"]
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (x.shape[0],)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert x.shape[0] == examples.example_metadata()["num_held_out"]


def test_ort_accuracy_matches_recorded(session: ort.InferenceSession, heldout: dict[str, np.ndarray]) -> None:
    (logits,) = session.run(["logits"], {"input": heldout["input"]})
    accuracy = float((np.asarray(logits).argmax(axis=1) == heldout["labels"]).mean())
    recorded = examples.example_metadata()["held_out_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-9)
    assert accuracy >= 0.97


def test_batch_axis_is_dynamic(session: ort.InferenceSession, heldout: dict[str, np.ndarray]) -> None:
    x = heldout["input"][:7]
    (whole,) = session.run(["logits"], {"input": x})
    (single,) = session.run(["logits"], {"input": x[3:4]})
    assert np.asarray(whole).shape == (7, 10)
    np.testing.assert_allclose(np.asarray(single)[0], np.asarray(whole)[3], atol=1e-5)


def test_metadata_records_the_shipped_files() -> None:
    metadata = examples.example_metadata()
    digest = hashlib.sha256(examples.example_model_path().read_bytes()).hexdigest()
    assert metadata["onnx_sha256"] == digest
    assert metadata["num_train"] + metadata["num_held_out"] == metadata["num_total"] == 1797
    assert metadata["input"]["name"] == "input" and metadata["output"]["name"] == "logits"


def test_missing_file_raises_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(examples, "DATA_DIR", tmp_path)
    with pytest.raises(NotFoundError, match=r"digits\.onnx"):
        examples.example_model_path()


def test_corrupt_metadata_raises_invalid_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "digits.json").write_text("[1, 2", encoding="utf-8")
    monkeypatch.setattr(examples, "DATA_DIR", tmp_path)
    with pytest.raises(InvalidInputError, match=r"digits\.json"):
        examples.example_metadata()
