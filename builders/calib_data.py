"""Calibration and evaluation data: ``.npz`` files, directories of them, or image folders.

A ``Dataset`` is a tuple of shape groups. Each group holds batch-first arrays (one per model
input) whose non-batch shapes agree, plus optional integer ``labels``. Samples of varying shape
(token lengths, image sizes) land in different groups and are batched within their group, so
nothing is padded or crashed on. ``split`` divides one dataset deterministically into a
calibration part and a held-out evaluation part that never share a sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import struct
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builders.tensors import TensorSpec
from core.errors import InvalidInputError, NotFoundError

logger = logging.getLogger(__name__)

LABELS_KEY = "labels"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ShapeGroup:
    """Samples whose per-input shapes agree: batch-first arrays, optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, indices: np.ndarray) -> ShapeGroup:
        labels = self.labels[indices] if self.labels is not None else None
        return ShapeGroup({k: v[indices] for k, v in self.inputs.items()}, labels)


@dataclass(frozen=True)
class Dataset:
    """Checked samples for a model, grouped by shape; ``sha256`` identifies the content."""

    groups: tuple[ShapeGroup, ...]
    source: str
    sha256: str
    fixed_batch: int | None = None  # the model's batch axis is this fixed size (e.g. exported at 1)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def has_labels(self) -> bool:
        return bool(self.groups) and all(g.labels is not None for g in self.groups)

    def batches(self, batch_size: int) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """(inputs, labels) batches of at most ``batch_size`` samples, never mixing shapes.

        A model with a fixed batch axis gets exactly that many samples per batch instead; a
        group's remainder that cannot fill one is left out.
        """
        size = self.fixed_batch or max(1, int(batch_size))
        for group in self.groups:
            stop = len(group) - len(group) % size if self.fixed_batch else len(group)
            for start in range(0, stop, size):
                sl = slice(start, start + size)
                labels = group.labels[sl] if group.labels is not None else None
                yield {k: v[sl] for k, v in group.inputs.items()}, labels
                release(group.inputs.values())  # a file-backed batch leaves memory once used

    def first_batch(self, batch_size: int) -> Batch:
        """The first batch (for latency measurement)."""
        for inputs, _ in self.batches(batch_size):
            return inputs
        raise InvalidInputError(f"{self.source!r} has no complete batch of {self.fixed_batch or batch_size} samples")

    def split(self, eval_fraction: float = 0.3, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Deterministic (calibration, evaluation) split with disjoint samples."""
        total = len(self)
        if total < 2:
            raise InvalidInputError(
                f"{self.source!r} holds {total} sample(s); need at least 2 to split calibration from "
                "evaluation data, or pass a separate --eval file"
            )
        n_eval = min(total - 1, max(1, round(total * eval_fraction)))
        order = np.random.default_rng(seed).permutation(total)
        is_eval = np.zeros(total, dtype=bool)
        is_eval[order[:n_eval]] = True
        calib_groups: list[ShapeGroup] = []
        eval_groups: list[ShapeGroup] = []
        offset = 0
        for group in self.groups:
            mask = is_eval[offset : offset + len(group)]
            offset += len(group)
            if (~mask).any():
                calib_groups.append(group.take(np.flatnonzero(~mask)))
            if mask.any():
                eval_groups.append(group.take(np.flatnonzero(mask)))
        return (
            make_dataset(calib_groups, f"{self.source}[calibration split]", self.fixed_batch),
            make_dataset(eval_groups, f"{self.source}[held-out split]", self.fixed_batch),
        )


@dataclass(frozen=True)
class ImagePreprocess:
    """How to turn image files into a model input: resize, layout, normalization."""

    input_name: str | None = None
    size: tuple[int, int] | None = None  # (height, width)
    layout: str = "NCHW"
    color: str = "RGB"  # "RGB" or "L"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: str = "float32"

    @classmethod
    def parse(cls, spec: str | None) -> ImagePreprocess:
        """From a JSON object string or a path to a JSON file (keys = field names)."""
        if not spec:
            return cls()
        text = Path(spec).read_text(encoding="utf-8") if Path(spec).is_file() else spec
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
            for key in ("size", "mean", "std"):
                if key in raw and raw[key] is not None:
                    raw[key] = tuple(float(x) if key != "size" else int(x) for x in raw[key])
            result = cls(**raw)
        except (ValueError, TypeError) as err:
            raise InvalidInputError(
                f"image preprocessing {spec!r} is invalid ({err}); give JSON like "
                '{"size": [224, 224], "layout": "NCHW", "scale": 0.00392, "mean": [0.485, 0.456, 0.406], '
                '"std": [0.229, 0.224, 0.225]}'
            ) from err
        if result.layout.upper() not in ("NCHW", "NHWC"):
            raise InvalidInputError(f"image layout {result.layout!r} is unknown; use NCHW or NHWC")
        return result


def fixed_batch(specs: Sequence[TensorSpec]) -> int | None:
    """The batch size a model was exported with when every input's first axis is fixed, else None."""
    firsts = {s.shape[0] if s.shape else None for s in specs}
    if len(firsts) == 1:
        first = firsts.pop()
        if isinstance(first, int) and first >= 1:
            return first
    return None


def make_dataset(groups: Sequence[ShapeGroup], source: str, batch: int | None = None) -> Dataset:
    """A Dataset with its content hash (names, dtypes, shapes and bytes of every array)."""
    digest = hashlib.sha256()
    for group in groups:
        arrays = dict(group.inputs)
        if group.labels is not None:
            arrays[LABELS_KEY] = group.labels
        for name in sorted(arrays):
            arr = arrays[name]
            digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            for chunk in _row_chunks(arr):
                digest.update(np.ascontiguousarray(chunk).tobytes())
            release([arr])
    return Dataset(tuple(groups), source, digest.hexdigest(), batch)


def load_dataset(
    path: Path | str,
    specs: Sequence[TensorSpec],
    *,
    preprocess: ImagePreprocess | None = None,
) -> Dataset:
    """Load an .npz file, a directory of .npz files, or an image folder, checked against ``specs``."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"data path {str(path)!r} does not exist; pass an .npz file or a directory")
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise InvalidInputError(f"{str(path)!r} is a single image; pass the folder that holds the images")
        groups = [_group_from_arrays(read_npz(path), specs, str(path))]
    else:
        npz = sorted(p for p in path.rglob("*.npz") if p.is_file())
        if npz:
            groups = [_group_from_arrays(read_npz(p), specs, str(p)) for p in npz]
        else:
            groups = _image_groups(path, specs, preprocess or ImagePreprocess())
    merged = _merge_by_shape(groups)
    if not merged or sum(len(g) for g in merged) == 0:
        raise InvalidInputError(f"{str(path)!r} holds no samples; it needs at least one batch-first array")
    dataset = make_dataset(merged, str(path), fixed_batch(specs))
    if dataset.fixed_batch and not any(len(g) >= dataset.fixed_batch for g in merged):
        raise InvalidInputError(
            f"{str(path)!r} has no shape group with {dataset.fixed_batch} samples, the model's fixed batch size"
        )
    logger.info("loaded %d samples in %d shape group(s) from %s", len(dataset), len(merged), path)
    return dataset


NPZ_HOW = "save it with numpy.savez(path, **{input_name: batch_first_array})"


def read_npz(path: Path, what: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz by key; ``what`` names the file in errors (default: its path)."""
    what = what or repr(str(path))
    try:
        with open(path, "rb") as handle:  # numpy leaks its own handle when the zip is corrupt
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise InvalidInputError(f"{what} is a single .npy array, not an .npz keyed by input name; {NPZ_HOW}")
            with loaded as data:
                arrays: dict[str, np.ndarray] = {}
                for key in data.files:
                    mapped = _member_memmap(path, data.zip, key) if data.zip is not None else None
                    arrays[key] = mapped if mapped is not None else np.asarray(data[key])
                return arrays
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InvalidInputError(f"{what} is not a readable .npz of numeric arrays ({err}); {NPZ_HOW}") from err


MAP_ABOVE = 64 << 20  # arrays larger than this stay in the file (memory-mapped), read batch by batch
_CHUNK_BYTES = 16 << 20


def _member_memmap(path: Path, archive: zipfile.ZipFile, key: str) -> np.ndarray | None:
    """A read-only memory map of an uncompressed .npz member over ``MAP_ABOVE`` bytes, else None.

    ``numpy.savez`` stores members uncompressed, so the array's bytes sit in the file as they are: a
    data set larger than memory is then read one batch at a time (see ``release``) instead of whole.
    """
    try:
        info = archive.getinfo(f"{key}.npy")
    except KeyError:
        return None
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < MAP_ABOVE:
        return None
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(handle)
        offset = handle.tell()
    if fortran or dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def release(arrays: Iterable[np.ndarray]) -> None:
    """Drop the pages of memory-mapped arrays from this process's memory (re-read from disk if used again)."""
    for arr in arrays:
        base = arr
        while isinstance(base, np.ndarray) and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
            base = base.base  # type: ignore[assignment]
        handle = getattr(base, "_mmap", None)
        if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            try:
                handle.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


def _row_chunks(arr: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive row blocks of about 16 MiB (the whole array when it has no rows)."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        yield arr
        return
    rows = max(1, _CHUNK_BYTES // max(1, arr[:1].nbytes))
    for start in range(0, arr.shape[0], rows):
        yield arr[start : start + rows]


def _group_from_arrays(arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec], where: str) -> ShapeGroup:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidInputError(
            f"{where!r} lacks array(s) for model input(s) {missing}; it has {sorted(arrays)}, "
            f"the model expects {names} (plus optional {LABELS_KEY!r})"
        )
    inputs = {s.name: _check_array(arrays[s.name], s, where) for s in specs}
    counts = {n: int(a.shape[0]) for n, a in inputs.items()}
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.dtype.kind not in "iu":
            raise InvalidInputError(
                f"{where!r}: {LABELS_KEY!r} has dtype {labels.dtype}; expected integer class indices"
            )
        counts[LABELS_KEY] = int(labels.shape[0])
    if len(set(counts.values())) != 1:
        raise InvalidInputError(f"{where!r}: arrays disagree on the number of samples (batch axis): {counts}")
    return ShapeGroup(inputs, labels.astype(np.int64) if labels is not None else None)


def _check_array(arr: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    expected = np.dtype(spec.dtype) if spec.dtype != "bfloat16" else np.dtype("uint16")
    if arr.dtype != expected:
        raise InvalidInputError(
            f"{where!r}: input {spec.name!r} has dtype {arr.dtype}; the model expects {expected} "
            f"(convert with array.astype(numpy.{expected}))"
        )
    rank = len(spec.shape)
    shown = "[" + ",".join(str(d) for d in arr.shape) + "]"  # as given, before a batch axis is added
    if arr.ndim == rank - 1:
        arr = arr[np.newaxis]  # one sample without its batch axis
    wanted = "[" + ",".join(str(d) for d in spec.shape) + "]"
    if arr.ndim != rank:
        raise InvalidInputError(
            f"{where!r}: input {spec.name!r} has shape {shown}; the model expects {wanted} (batch first)"
        )
    for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
        if axis > 0 and isinstance(want, int) and want >= 0 and got != want:
            raise InvalidInputError(
                f"{where!r}: input {spec.name!r} has shape {shown}; the model expects {wanted} "
                f"(axis {axis} must be {want})"
            )
    if arr.dtype.kind == "f" and arr.size:
        bad = (
            np.concatenate([np.isnan(c.reshape(c.shape[0], -1)).any(axis=1) for c in _row_chunks(arr)])
            if arr.ndim
            else np.isnan(arr)
        )
        release([arr])
        if bad.any():
            raise InvalidInputError(
                f"{where!r}: input {spec.name!r} has NaN values in {int(bad.sum())} of {arr.shape[0]} sample(s) "
                f"(first at index {int(np.argmax(bad))}); remove or fix them"
            )
    return arr


def _merge_by_shape(groups: Sequence[ShapeGroup]) -> list[ShapeGroup]:
    """Concatenate groups with identical per-sample shapes, keeping first-seen order."""
    buckets: dict[tuple[Any, ...], list[ShapeGroup]] = {}
    for group in groups:
        if len(group) == 0:
            continue
        key = (*((n, a.shape[1:]) for n, a in sorted(group.inputs.items())), group.labels is not None)
        buckets.setdefault(key, []).append(group)
    merged: list[ShapeGroup] = []
    for parts in buckets.values():
        if len(parts) == 1:
            merged.append(parts[0])
            continue
        inputs = {n: np.concatenate([p.inputs[n] for p in parts]) for n in parts[0].inputs}
        first_labels = parts[0].labels
        labels = np.concatenate([p.labels for p in parts if p.labels is not None]) if first_labels is not None else None
        merged.append(ShapeGroup(inputs, labels))
    return merged


def _image_groups(folder: Path, specs: Sequence[TensorSpec], prep: ImagePreprocess) -> list[ShapeGroup]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInputError(f"{str(folder)!r} holds neither .npz files nor images ({', '.join(IMAGE_SUFFIXES)})")
    spec = _image_spec(specs, prep)
    classes = sorted({p.parent.name for p in files}) if all(p.parent != folder for p in files) else []
    groups = []
    for file in files:
        pixels = _read_image(file, prep)
        label = np.array([classes.index(file.parent.name)], dtype=np.int64) if classes else None
        groups.append(_group_from_arrays({spec.name: pixels[np.newaxis]}, [spec], str(file)))
        if label is not None:
            groups[-1] = ShapeGroup(groups[-1].inputs, label)
    return groups


def _image_spec(specs: Sequence[TensorSpec], prep: ImagePreprocess) -> TensorSpec:
    if prep.input_name is None and len(specs) == 1:
        return specs[0]
    for spec in specs:
        if spec.name == prep.input_name:
            if len(specs) > 1:
                raise InvalidInputError(
                    f"the model has {len(specs)} inputs; an image folder can feed only single-input models"
                )
            return spec
    raise InvalidInputError(
        f"image preprocessing names input {prep.input_name!r}; the model's inputs are {[s.name for s in specs]}"
    )


def _read_image(file: Path, prep: ImagePreprocess) -> np.ndarray:
    """One image as float array in the declared layout (without batch axis)."""
    try:
        from PIL import Image
    except ImportError as err:
        raise InvalidInputError("reading image folders needs Pillow; pip install pillow, or convert to .npz") from err
    try:
        with Image.open(file) as opened:
            img = opened.convert(prep.color)
            if prep.size is not None:
                img = img.resize((prep.size[1], prep.size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except OSError as err:
        raise InvalidInputError(f"cannot read image {str(file)!r}: {err}") from err
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    channels = pixels.shape[-1]
    for key in ("mean", "std"):
        if len(getattr(prep, key)) not in (1, channels):
            raise InvalidInputError(
                f"image preprocessing {key} has {len(getattr(prep, key))} values but {str(file)!r} has "
                f"{channels} channel(s) in color mode {prep.color!r}; give 1 or {channels} values"
            )
    pixels = pixels * np.float32(prep.scale)
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    pixels = (pixels - mean) / std
    if prep.layout.upper() == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels.astype(prep.dtype))
