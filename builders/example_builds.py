"""Ready-made INT8 builds of the bundled example, for ``kiln quickstart`` and the rollout demo."""

from __future__ import annotations

from pathlib import Path

from builders.examples import example_data_path, example_model_path
from builders.pipeline import build_model
from builders.request import BuildRequest, BuildResult, Int8Options

BAD_AMAX_SCALE = 0.05  # every threshold at 5% of its calibrated value: heavy clipping


def build_example_int8(
    repo: Path, *, name: str = "digits", cache_dir: Path | None = None, calib: Path | None = None
) -> BuildResult:
    """INT8 (``--target ort``) of the example, gated and published with ``report.md``.

    Equivalent to ``kiln build digits.onnx --name NAME --precision int8 --calib digits_heldout.npz``
    (a disjoint 30% of the data is held out for validation). The Triton model is ``NAME-int8-ort``;
    ``result.published.path / "report.md"`` is the validation report. ``calib``: other calibration
    data (default the bundled held-out set); a rebuild publishes the next version.
    """
    options = Int8Options(calib=calib or example_data_path(), cache_dir=cache_dir)
    return build_model(_request(repo, name, options))


def build_example_bad_int8(
    repo: Path, *, name: str = "digits", cache_dir: Path | None = None, amax_scale: float = BAD_AMAX_SCALE
) -> BuildResult:
    """A deliberately badly calibrated INT8 of the example, published with the gate overridden.

    Every amax is multiplied by ``amax_scale``; the gate fails and ``--skip-gate`` publishes it
    anyway as the next version of ``NAME-int8-ort``; kiln.json records ``validation.gate`` with
    ``passed: false, overridden: true``. This is the candidate a rollout should roll back.
    """
    options = Int8Options(calib=example_data_path(), cache_dir=cache_dir, amax_scale=amax_scale, skip_gate=True)
    return build_model(_request(repo, name, options))


def _request(repo: Path, name: str, options: Int8Options) -> BuildRequest:
    return BuildRequest(
        model=example_model_path(), name=name, precision="int8", target="ort", repo=Path(repo), int8=options
    )
