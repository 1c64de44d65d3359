"""tlr-triton: SGD that trains its own learning rate (TLR), as a torch.optim optimizer.

    from tlr_triton import TLR
    opt = TLR(model.parameters(), momentum=0.8, weight_decay=5e-4)

``TLRAdamW`` (``tlr_triton.adamw``) trains AdamW's learning rate the same way (docs/adamw.md;
PyTorch path, fixed windows). ``tlr_triton.reference`` holds the readable float64 references
and the paper's baselines.
"""

from .adamw import TLRAdamW
from .functional import tlr
from .optimizer import TLR

__all__ = ["TLR", "TLRAdamW", "tlr"]
__version__ = "0.1.0"
