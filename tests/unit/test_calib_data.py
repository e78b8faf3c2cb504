"""Calibration/evaluation data loading: .npz, directories, images, checks, split, hashing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builders.calib_data import ImagePreprocess, load_dataset
from builders.tensors import TensorSpec
from core.errors import InvalidInputError, NotFoundError

IMAGE = (TensorSpec("input", "float32", ("batch", 1, 8, 8)),)
TOKENS = (TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("mask", "float32", ("batch", "seq")))


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_npz_with_labels_batches_and_hash(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    path = _npz(tmp_path / "d.npz", input=x, labels=np.arange(10))
    data = load_dataset(path, IMAGE)
    assert len(data) == 10 and data.has_labels
    sizes = [len(labels) for _, labels in data.batches(4) if labels is not None]
    assert sizes == [4, 4, 2]
    again = load_dataset(_npz(tmp_path / "e.npz", input=x, labels=np.arange(10)), IMAGE)
    assert again.sha256 == data.sha256  # content hash, not the file name
    x[0, 0, 0, 0] += 1
    assert load_dataset(_npz(tmp_path / "f.npz", input=x), IMAGE).sha256 != data.sha256


def test_missing_input_names_the_inputs(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InvalidInputError, match=r"lacks array\(s\) for model input\(s\) \['input'\].*'images'"):
        load_dataset(path, IMAGE)


def test_wrong_dtype_shows_got_and_expected(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", input=np.zeros((2, 1, 8, 8)))
    with pytest.raises(InvalidInputError, match="dtype float64; the model expects float32"):
        load_dataset(path, IMAGE)


def test_wrong_shape_shows_got_and_expected(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", input=np.zeros((2, 1, 9, 8), np.float32))
    with pytest.raises(InvalidInputError, match=r"shape \[2,1,9,8\]; the model expects \[batch,1,8,8\]"):
        load_dataset(path, IMAGE)


def test_disagreeing_batch_axes_are_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", input=np.zeros((3, 1, 8, 8), np.float32), labels=np.arange(2))
    with pytest.raises(InvalidInputError, match="disagree on the number of samples"):
        load_dataset(path, IMAGE)


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz", IMAGE)


def test_varying_token_lengths_are_grouped_not_crashed(tmp_path: Path) -> None:
    folder = tmp_path / "tokens"
    folder.mkdir()
    for i, length in enumerate([5, 7, 5, 9, 7]):
        _npz(folder / f"s{i}.npz", ids=np.ones((1, length), np.int64), mask=np.ones((1, length), np.float32))
    data = load_dataset(folder, TOKENS)
    assert len(data) == 5
    assert sorted(len(g) for g in data.groups) == [1, 2, 2]
    for inputs, _ in data.batches(8):
        assert inputs["ids"].shape == inputs["mask"].shape  # one shape per batch


def test_split_is_disjoint_deterministic_and_complete(tmp_path: Path) -> None:
    x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1) * np.ones((1, 1, 8, 8), np.float32)
    data = load_dataset(_npz(tmp_path / "d.npz", input=x, labels=np.arange(20)), IMAGE)
    calib, held = data.split(0.3, seed=0)
    calib_ids = set(np.concatenate([g.labels for g in calib.groups if g.labels is not None]).tolist())
    held_ids = set(np.concatenate([g.labels for g in held.groups if g.labels is not None]).tolist())
    assert len(held_ids) == 6 and not calib_ids & held_ids and calib_ids | held_ids == set(range(20))
    assert data.split(0.3, seed=0)[1].sha256 == held.sha256
    assert calib.sha256 != held.sha256


def test_image_folder_with_declared_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 10), (255 if label == "cat" else 0, 128, 0)).save(tmp_path / label / f"{i}.png")
    spec = (TensorSpec("pixels", "float32", ("batch", 3, 4, 6)),)
    prep = ImagePreprocess.parse(json.dumps({"size": [4, 6], "layout": "NCHW", "scale": 1 / 255, "mean": [0.5]}))
    data = load_dataset(tmp_path, spec, preprocess=prep)
    (inputs, labels), *_ = list(data.batches(8))
    assert inputs["pixels"].shape == (4, 3, 4, 6)
    assert labels is not None and sorted(labels.tolist()) == [0, 0, 1, 1]
    red = inputs["pixels"][labels.tolist().index(0), 0]
    np.testing.assert_allclose(red, 0.5, atol=1e-6)  # 255/255 - 0.5


def test_bad_preprocess_spec_says_what_to_give() -> None:
    with pytest.raises(InvalidInputError, match="give JSON like"):
        ImagePreprocess.parse('{"sise": [1, 2]}')
    with pytest.raises(InvalidInputError, match="use NCHW or NHWC"):
        ImagePreprocess.parse('{"layout": "CHW"}')


def test_large_npz_members_are_memory_mapped_and_read_batch_by_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builders.calib_data as calib_data

    monkeypatch.setattr(calib_data, "MAP_ABOVE", 1024)  # "large" for the test: a few KiB
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "big.npz", x=x)
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    spec = [TensorSpec("x", "float32", ("N", 3, 8, 8))]
    mapped = load_dataset(tmp_path / "big.npz", spec)
    packed = load_dataset(tmp_path / "packed.npz", spec)
    assert isinstance(mapped.groups[0].inputs["x"], np.memmap)  # stored member: stays in the file
    assert not isinstance(packed.groups[0].inputs["x"], np.memmap)  # compressed: read whole
    assert mapped.sha256 == packed.sha256  # the content hash does not depend on how it was read
    for (a, _), (b, _) in zip(mapped.batches(7), packed.batches(7), strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    calib, held = mapped.split(0.25)
    assert len(calib) == 30 and len(held) == 10
    bad = x.copy()
    bad[5, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    with pytest.raises(InvalidInputError, match="NaN values in 1 of 40 sample"):
        load_dataset(tmp_path / "nan.npz", spec)
