"""tests/gpu needs TensorRT, Polygraphy and a CUDA device; elsewhere every test here skips, saying which is missing."""

from __future__ import annotations

import functools

import pytest

from runtime.machine import missing_for_tensorrt, probe_machine


@functools.cache
def gpu_missing() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    absent = missing_for_tensorrt(probe_machine())
    if absent:
        return f"needs TensorRT, Polygraphy and a CUDA device; missing here: {', '.join(absent)}"
    try:
        import ctypes

        from polygraphy import cuda

        count = ctypes.c_int(0)
        status = cuda.wrapper().handle.cudaGetDeviceCount(ctypes.byref(count))
        if status != 0 or count.value < 1:
            return f"the CUDA runtime sees no device (cudaGetDeviceCount status {status}, count {count.value})"
    except Exception as err:  # the CUDA runtime library is missing or the driver is unusable
        return f"CUDA runtime unusable through Polygraphy: {err}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            reason = gpu_missing()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
