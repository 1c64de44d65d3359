import os

# Triton kernels run through the interpreter on machines without a GPU; the variable
# must be set before any module defining a @triton.jit kernel is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
