"""Triton kernels for TLR (installed as ``tlr_triton.kernels``).

Not implemented yet: the fused multi-tensor kernels are the next milestone (issue 3).
Until they land, ``TLR(..., backend="triton")`` raises ``NotImplementedError`` and
``backend="auto"`` uses the PyTorch path on every device.
"""
