"""Shared fixtures: small real ONNX models built with onnx.helper, and the example model."""

from __future__ import annotations

from pathlib import Path

import pytest

from builders.examples import example_data_path, example_model_path
from harness.models import make_linear_model


@pytest.fixture
def linear_model(tmp_path: Path) -> Path:
    return make_linear_model(tmp_path / "linear.onnx")


@pytest.fixture(scope="session")
def example_model() -> Path:
    return example_model_path()


@pytest.fixture(scope="session")
def example_data() -> Path:
    return example_data_path()
