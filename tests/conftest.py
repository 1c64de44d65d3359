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
