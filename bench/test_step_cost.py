"""Step cost of TLR against torch.optim.SGD, with pytest-benchmark.

    pytest bench/ --benchmark-only          # (the normal test run does not collect bench/)

Every optimizer has momentum 0.9 and weight decay 5e-4. A TLR call times a whole
window (W steps, one of which closes it), so its time divided by W is the amortized
cost of a step. The default adaptive window is timed at two of the lengths that
bench/step_cost.py holds it at: every unit closing (3 steps, its worst case; real runs
close every 4–8 steps) and its longest, 48 steps (16 units, one closing). The
summary at the end prints ms/step and the ratio to each SGD variant measured in the
same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
from bench.step_cost import LAYOUTS, grown as _grown, held as _held  # noqa: E402
from tlr_triton import TLR  # noqa: E402

pytest.importorskip("pytest_benchmark")

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

OPTIMIZERS = {
    "sgd-forloop": (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=False), 1),
    "sgd-foreach": (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True), 1),
    "sgd-fused": (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True), 1),
    "tlr-torch-w1": (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=1, backend="torch"), 1),
    "tlr-torch-auto (default, every unit closes)": (lambda ps: _held(TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                                                         backend="torch"), 1), 3),
    "tlr-torch-auto (default, 48-step windows)": (lambda ps: _grown(TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                                                        backend="torch")), 48),
    "tlr-torch-w3": (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=3, backend="torch"), 3),
    "tlr-torch-w10": (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=10, backend="torch"), 10),
    "tlr-torch-w100": (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=100, backend="torch"), 100),
    "tlr-torch-w10-direction": (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=10,
                                                statistic="direction", backend="torch"), 10),
    "tlr-torch-w10-tensor": (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=10,
                                             scope="tensor", backend="torch"), 10),
}
if DEVICE == "cuda":  # the Triton path needs a GPU to be timed (the interpreter is not a benchmark)
    OPTIMIZERS["tlr-triton-w1"] = (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=1, backend="triton"), 1)
    OPTIMIZERS["tlr-triton-w10"] = (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=10, backend="triton"), 10)
    OPTIMIZERS["tlr-triton-auto"] = (lambda ps: TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend="triton"), 3)
    OPTIMIZERS["tlr-triton-auto (48-step windows)"] = (lambda ps: _grown(TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                                                             backend="triton")), 48)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step(benchmark, layout, optimizer):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(DEVICE).requires_grad_() for s in LAYOUTS[layout]()]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(DEVICE)
    build, steps = OPTIMIZERS[optimizer]
    opt = build(params)

    def window():
        for _ in range(steps):
            opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = layout
    benchmark.extra_info.update(layout=layout, optimizer=optimizer, steps_per_call=steps,
                                params=sum(p.numel() for p in params), tensors=len(params))
    benchmark.pedantic(window, rounds=7 if steps < 100 else 3, warmup_rounds=1, iterations=1)
