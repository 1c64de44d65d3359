"""Cost of one optimizer step: TLR's PyTorch path against torch.optim.SGD, same run.

    python bench/step_cost.py            # 10M parameters as 1 tensor and as 1000 tensors
    python bench/step_cost.py --quick    # 1M parameters, for a smoke test

Every optimizer gets the same momentum and weight decay. A TLR step with window W is
timed over whole windows (W - 1 ordinary steps and one closing step), so the number is
the amortized cost per step. Reported: median ms/step over repeats, and the ratio to
SGD(foreach=True) and to SGD(fused=True) measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tlr_triton import TLR  # noqa: E402

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def make(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def time_steps(opt, steps: int, repeats: int) -> float:
    """Median over repeats of the mean time of `steps` consecutive steps, in ms."""
    for _ in range(steps):  # warm-up: state allocated, one window closed
        opt.step()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        samples.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(samples)


def rows(shapes, repeats):
    kw = dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    cases = [
        ("SGD foreach", lambda p: torch.optim.SGD(p, lr=0.01, foreach=True, **kw), 10),
        ("SGD fused", lambda p: torch.optim.SGD(p, lr=0.01, fused=True, **kw), 10),
        ("TLR window 3 (default)", lambda p: TLR(p, **kw), 3 * 4),
        ("TLR window 10", lambda p: TLR(p, window=10, **kw), 10),
        ("TLR window 100", lambda p: TLR(p, window=100, **kw), 100),
        ("TLR window 1", lambda p: TLR(p, window=1, **kw), 10),
        ("TLR w10 direction", lambda p: TLR(p, window=10, statistic="direction", **kw), 10),
        ("TLR w10 scope tensor", lambda p: TLR(p, window=10, scope="tensor", **kw), 10),
    ]
    out = {}
    for name, build, steps in cases:
        out[name] = time_steps(build(make(shapes)), steps, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M parameters, fewer repeats")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    n = 1_000_000 if args.quick else 10_000_000
    repeats = 3 if args.quick else args.repeats
    layouts = {f"1 x {n // 10**6}M": [(n,)], f"1000 x {n // 1000 // 1000}k": [(n // 1000,)] * 1000}
    print(f"{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, fp32 on CPU; median of {repeats} repeats\n")
    print(f"| {'layout':<12} | {'optimizer':<22} | {'ms/step':>8} | {'/ SGD foreach':>13} | {'/ SGD fused':>11} |")
    print(f"|{'-' * 14}|{'-' * 24}|{'-' * 10}|{'-' * 15}|{'-' * 13}|")
    for layout, shapes in layouts.items():
        res = rows(shapes, repeats)
        for name, ms in res.items():
            print(f"| {layout:<12} | {name:<22} | {ms:>8.2f} | {ms / res['SGD foreach']:>12.2f}x | {ms / res['SGD fused']:>10.2f}x |", flush=True)


if __name__ == "__main__":
    main()
