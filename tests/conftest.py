import os
import sys
from pathlib import Path

# The repository's top-level `kernels/` (installed as tlr_triton.kernels) shadows an installed
# PyPI package named `kernels` — which transformers >= 5.25 requires and imports — whenever the
# repository root comes first on sys.path, as `python -m pytest` puts it. Move the root to the
# end: it still provides `bench` (and `tlr_triton` without an install), after site-packages.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if p not in ("", ".", _ROOT)] + [_ROOT]

# Triton kernels run through the interpreter on machines without a GPU; the variable
# must be set before any module defining a @triton.jit kernel is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tlr_triton import functional  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


SYNCING = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Make every way of reading a tensor's value on the host raise while the test runs."""

    def install():
        def boom(name):
            def raiser(*args, **kwargs):
                raise AssertionError(f"step() read a device value on the host: Tensor.{name}")

            return raiser

        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, boom(name))
        # CPU reads cost nothing, so the PyTorch path takes them there; run its GPU code instead
        monkeypatch.setattr(functional, "host_reads_free", lambda device: False)

    return install


@pytest.fixture(params=["fused", "torch-ops"])
def cpu_step(request, monkeypatch):
    """Each CPU implementation of the PyTorch path's step in turn: the fused C++ step
    (``tlr_triton.kernels.cpu``, built on first use) and torch's own ops, which run wherever
    it cannot be built (tests/test_cpu_step.py fails where a compiler exists and it does not build)."""
    if request.param == "torch-ops":
        monkeypatch.setattr(functional, "_cpu_extension", lambda: None)
    elif functional._cpu_extension() is None:
        pytest.skip("the fused CPU step cannot be built here")
    return request.param


PATHS = ["cpu-fused", "cpu-torch-ops", "device-masked"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The PyTorch path's three ways of deciding a window: on the CPU's host with the fused
    C++ step or with torch's ops, and the GPU's device-masked code (run on the CPU)."""
    if request.param == "cpu-torch-ops":
        monkeypatch.setattr(functional, "_cpu_extension", lambda: None)
    elif request.param == "device-masked":
        monkeypatch.setattr(functional, "host_reads_free", lambda device: False)
    elif functional._cpu_extension() is None:
        pytest.skip("the fused CPU step cannot be built here")
    return request.param
