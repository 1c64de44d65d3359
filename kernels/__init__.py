"""Triton kernels for TLR (installed as ``tlr_triton.kernels``).

- ``tlr_step.py``: the four jit kernels of one step (step, window, α, move) and their story.
- ``launch.py``: address tables, block maps and the launches (``tlr_triton_step``).
- ``adamw_step.py``, ``adamw_launch.py``: TLRAdamW's three kernels (step, α, move) and their
  launches (``adamw_triton_step``), sharing ``tlr_step``'s helpers and ``launch``'s memos.
- ``cpu_step.cpp``, ``cpu.py``: the PyTorch path's fused CPU step (C++, built on first use
  with torch's extension builder; ``cpu.extension()``), used by ``functional._tlr_cpu``; and
  the Triton path's host-side pass over a group's tensors (``cpu.layout_record``,
  ``cpu.same_layout``), with which a step whose tensors did not change skips its checks.

Importing this package does not import Triton; ``tlr_triton.kernels.launch`` does. On a
machine without a GPU the kernels run through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before Triton is first imported.
"""
