"""Triton kernels for TLR (installed as ``tlr_triton.kernels``).

- ``tlr_step.py``: the three jit kernels of one step (step, α, move) and their story.
- ``launch.py``: address tables, block maps and the launches (``tlr_triton_step``).

Importing this package does not import Triton; ``tlr_triton.kernels.launch`` does. On a
machine without a GPU the kernels run through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before Triton is first imported.
"""
