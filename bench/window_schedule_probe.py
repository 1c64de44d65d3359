"""Probe: does a window that grows with the run serve both tasks? (evidence for the next default)

    python bench/window_schedule_probe.py digits 0.5     # the digits robustness grid, W = max(3, round(k·√t))
    python bench/window_schedule_probe.py charlm 1.0     # charlm, α0 ∈ {1e-3, 1e-2, 1e-1}

TLR has no window schedule yet; this probe closes windows at the scheduled steps from
the outside, through the public ``group["window"]`` (the optimizer closes a window when
(step + 1) % window == 0, so window = step + 1 closes one now and step + 2 does not).
Prints final train loss and the metric; nothing here is part of the library.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import experiments as E  # noqa: E402
from tlr_triton import TLR  # noqa: E402


def run(task, lr: float, batch: int, epochs: int, k: float, w0: int = 3, seed: int = 0):
    model = task.model(seed)
    opt = TLR(model.parameters(), lr=lr, momentum=E.MOMENTUM, weight_decay=E.WEIGHT_DECAY)
    group = opt.param_groups[0]
    gen = torch.Generator().manual_seed(seed)
    step, next_close = 0, w0 - 1
    for _ in range(epochs):
        for xb, yb in task.batches(batch, gen):
            opt.zero_grad()
            task.loss(model, xb, yb).backward()
            if step == next_close:
                group["window"] = step + 1
                next_close = step + max(w0, round(k * math.sqrt(step + 1)))
            else:
                group["window"] = step + 2
            opt.step()
            step += 1
    loss, metric = task.evaluate(model)
    return loss, metric, float(group["lr"])


def main() -> None:
    which, k = sys.argv[1], float(sys.argv[2])
    if which == "charlm":
        task = E.CharLM()
        for lr in (1e-3, 1e-2, 1e-1):
            loss, ppl, alpha = run(task, lr, 32, E.EPOCHS["charlm"], k)
            print(f"charlm k={k} lr0={lr}: train loss {loss:.3f}, test perplexity {ppl:.2f}, final α {alpha:.3g}", flush=True)
    else:
        task = E.Digits()
        finals = [run(task, lr, b, E.EPOCHS["digits"], k)[0] for lr in (1e-3, 1e-2, 1e-1) for b in (64, 128, 256, 512)]
        finals.sort()
        print(f"digits k={k}: median {finals[6]:.3f}, worst {finals[-1]:.3f}, spread {finals[-1] / finals[0]:.1f}x "
              f"over α0 {{1e-3, 1e-2, 1e-1}} x batch {{64, 128, 256, 512}}", flush=True)


if __name__ == "__main__":
    main()
