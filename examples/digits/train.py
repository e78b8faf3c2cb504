"""Train Kiln's example model: a small CNN on scikit-learn's bundled handwritten digits.

Dev tooling only (needs ``torch==2.13.0`` and scikit-learn); Kiln itself never imports torch.
The data ship with scikit-learn (8x8 grayscale, 1797 samples), so nothing is downloaded.

Writes, into ``--out-dir`` (default ``builders/data``):

* ``digits.onnx``: opset 17, input ``input`` float32 [batch,1,8,8], output ``logits``
  float32 [batch,10], weights as initializers inside the file.
* ``digits_heldout.npz``: the held-out split, ``input`` float32 [M,1,8,8] and ``labels``
  int64 [M]; Kiln's calibration/evaluation data format.
* ``digits.json``: held-out accuracy measured with ONNX Runtime on the exported file, split,
  seed, tool versions and the ONNX file's sha256.

Regenerate with::

    .venv/bin/python examples/digits/train.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
OPSET = 17
NUM_CLASSES = 10
MODEL_FILE = "digits.onnx"
DATA_FILE = "digits_heldout.npz"
METADATA_FILE = "digits.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights."""

    seed: int
    held_out_fraction: float
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float


@dataclass(frozen=True)
class Split:
    """Stratified train / held-out split, inputs scaled to [0, 1] and shaped [N,1,8,8]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_held: np.ndarray
    y_held: np.ndarray


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions (two with BatchNorm), one max-pool, two fully connected layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_deterministic(seed: int) -> None:
    """Seed every generator and ask torch for deterministic kernels on one thread."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_split(seed: int, held_out_fraction: float) -> Split:
    """Load the bundled digits, scale pixels x/16 into [0, 1] and split stratified by label."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_held, y_train, y_held = train_test_split(
        images, labels, test_size=held_out_fraction, random_state=seed, stratify=labels
    )
    return Split(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_held=np.ascontiguousarray(x_held),
        y_held=np.ascontiguousarray(y_held),
    )


def train(model: nn.Module, split: Split, config: TrainConfig) -> None:
    """Adam with cosine decay over ``config.epochs`` epochs of shuffled mini-batches."""
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        if epoch % 10 == 9 or epoch == config.epochs - 1:
            held = torch_accuracy(model, split.x_held, split.y_held)
            print(f"epoch {epoch + 1:3d}  loss {total / len(x):.4f}  held-out acc {held:.4f}")


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export with the TorchScript exporter (clean, constant-folded graph, inline weights)."""
    model.eval()
    dummy = torch.zeros(2, 1, 8, 8, dtype=torch.float32)
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose: it constant-folds BatchNorm into the
        # convolutions and needs no onnxscript; torch warns that it is not the default.
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_torchscript(model, dummy, path)
    proto = onnx.load(str(path), load_external_data=False)
    proto.doc_string = "Kiln example: small CNN on scikit-learn digits (examples/digits/train.py)"
    onnx.save(proto, str(path), save_as_external_data=False)


def _export_torchscript(model: nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
        opset_version=OPSET,
        do_constant_folding=True,
        export_params=True,
    )


def check_export(model: nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
    """Check the file (checker, no external data, dynamic batch) and ORT == torch within 1e-4.

    Returns ORT's logits for ``x``.
    """
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise SystemExit(f"initializer {init.name!r} uses external data; expected inline")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.dim_param != BATCH_AXIS:
        raise SystemExit(f"input batch dim is {batch_dim}; expected symbolic {BATCH_AXIS!r}")
    logits = run_ort(path, x)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    max_err = float(np.abs(logits - reference).max())
    print(f"ORT vs torch max abs error: {max_err:.2e}")
    if max_err > 1e-4:
        raise SystemExit(f"ORT and torch logits differ by {max_err:.2e} (> 1e-4)")
    return logits


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the ONNX file with ONNX Runtime on CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return np.asarray(logits)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arrays_sha256(*arrays: np.ndarray) -> str:
    """Digest of the arrays' raw bytes (the .npz zip itself carries timestamps)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write_metadata(
    path: Path, config: TrainConfig, split: Split, accuracy: float, params: int, onnx_path: Path
) -> None:
    """Write ``digits.json``: accuracy (ONNX Runtime), split, training, files, tool versions."""
    data_path = onnx_path.with_name(DATA_FILE)
    fields = dict(
        model="digits",
        held_out_accuracy=accuracy,
        accuracy_measured_with=f"onnxruntime {ort.__version__} CPUExecutionProvider",
        num_train=len(split.y_train),
        num_held_out=len(split.y_held),
        num_total=len(split.y_train) + len(split.y_held),
        seed=config.seed,
        split={
            "method": "sklearn train_test_split, stratified by label",
            "train_fraction": round(1.0 - config.held_out_fraction, 6),
            "held_out_fraction": config.held_out_fraction,
        },
        preprocessing="pixels / 16.0 -> float32 in [0, 1], shape [N,1,8,8]",
        training={
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "optimizer": "Adam",
            "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay,
            "schedule": "cosine",
        },
        parameter_count=params,
        input={"name": INPUT_NAME, "dtype": "float32", "shape": [BATCH_AXIS, 1, 8, 8]},
        output={"name": OUTPUT_NAME, "dtype": "float32", "shape": [BATCH_AXIS, NUM_CLASSES]},
        opset=OPSET,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_of(onnx_path),
        onnx_bytes=onnx_path.stat().st_size,
        held_out_file=data_path.name,
        held_out_arrays_sha256=arrays_sha256(split.x_held, split.y_held),
        versions={
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": sys.version.split()[0],
        },
        script="examples/digits/train.py",
    )
    path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def parse_args(argv: list[str]) -> tuple[TrainConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "builders" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out-fraction", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    args = parser.parse_args(argv)
    config = TrainConfig(
        seed=args.seed,
        held_out_fraction=args.held_out_fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
    )
    return config, args.out_dir


def main(argv: list[str]) -> int:
    config, out_dir = parse_args(argv)
    make_deterministic(config.seed)
    split = load_split(config.seed, config.held_out_fraction)
    model = DigitsCNN()
    params = sum(p.numel() for p in model.parameters())
    print(f"train {len(split.y_train)}  held-out {len(split.y_held)}  params {params}")
    started = time.perf_counter_ns()
    train(model, split, config)
    train_s = (time.perf_counter_ns() - started) / 1e9
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / MODEL_FILE
    data_path = out_dir / DATA_FILE
    export_onnx(model, onnx_path)
    logits = check_export(model, onnx_path, split.x_held)
    accuracy = float((logits.argmax(axis=1) == split.y_held).mean())
    np.savez_compressed(data_path, input=split.x_held, labels=split.y_held)  # keyed by INPUT_NAME
    write_metadata(out_dir / METADATA_FILE, config, split, accuracy, params, onnx_path)
    print(f"held-out accuracy (ORT): {accuracy:.4f}  train time {train_s:.1f}s")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes), {data_path}, digits.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
