"""Shared test settings: Hypothesis profiles and the `gpu` marker's skip."""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _gpu_unavailable_reason() -> str:
    from minimoe.backend import cupy_or_reason

    _, reason = cupy_or_reason()
    return reason


# Without a GPU, Numba CUDA kernels run on Numba's simulator (set before anything imports numba.cuda).
if "NUMBA_ENABLE_CUDASIM" not in os.environ and _gpu_unavailable_reason():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_unavailable_reason() or ("NUMBA_ENABLE_CUDASIM=1 simulates CUDA for Numba only; CuPy needs a GPU"
                                           if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else "")
    if reason:
        skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
        for item in gpu_items:
            item.add_marker(skip)
