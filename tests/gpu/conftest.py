"""tests/gpu needs TensorRT, pycuda and a CUDA device; elsewhere every test here skips, saying which is missing."""

from __future__ import annotations

import functools

import pytest

from runtime.machine import missing_for_tensorrt, probe_machine


@functools.cache
def gpu_missing() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    absent = missing_for_tensorrt(probe_machine())
    if absent:
        return f"needs TensorRT, pycuda and a CUDA device; missing here: {', '.join(absent)}"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return "pycuda sees no CUDA device"
    except Exception as err:  # pycuda.driver.Error and friends: the driver is unusable
        return f"CUDA driver unusable through pycuda: {err}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            reason = gpu_missing()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
