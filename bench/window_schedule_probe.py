"""Probe: does a window that adapts to the run serve both tasks? (evidence for the next default)

    python bench/window_schedule_probe.py digits 0.5     # the digits robustness grid, W = max(3, round(k·√t))
    python bench/window_schedule_probe.py charlm 1.0     # charlm, α0 ∈ {1e-3, 1e-2, 1e-1}
    python bench/window_schedule_probe.py charlm grow0.1 # W0 = 3; after a closing with |r| < 0.1 the next window is 3 steps longer (≤ 48), else 3
    python bench/window_schedule_probe.py digits cos0.1  # extend a 3-step window until |cos(A, P)| >= 0.1 (at most 48 steps)

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
    step, next_close, start, length = 0, w0 - 1, 0, w0
    for _ in range(epochs):
        for xb, yb in task.batches(batch, gen):
            opt.zero_grad()
            task.loss(model, xb, yb).backward()
            if isinstance(k, str) and k.startswith("grow"):  # "grow<ρ>": window length L in units of w0
                if step == next_close:
                    group["window"] = step + 1
                else:
                    group["window"] = step + 2
                a_before = float(group["lr"])
                opt.step()
                if step == next_close:
                    r = float(group["lr"]) / a_before - 1.0
                    rho, _, units = k[4:].partition("k")
                    strong = r >= 0.999 * 0.25 if rho == "cap" else abs(r) >= float(rho)
                    length = w0 if strong else min(length + w0, int(units or 16) * w0)
                    next_close = step + length
                step += 1
                continue
            if isinstance(k, str):  # "cos<κ>": close at a 3-step boundary once the sums agree or disagree clearly
                close = (step + 1 - start) % w0 == 0 and (step + 1 - start >= 48 or _informative(opt, float(k[3:])))
                if close:
                    start = step + 1
                group["window"] = step + 1 if close else step + 2
            elif step == next_close:
                group["window"] = step + 1
                next_close = step + max(w0, round(k * math.sqrt(step + 1)))
            else:
                group["window"] = step + 2
            opt.step()
            step += 1
    loss, metric = task.evaluate(model)
    return loss, metric, float(group["lr"])


def _informative(opt, kappa: float) -> bool:
    """|cos(A, P)| >= κ over the group (A as it stands before this step), or no previous window yet."""
    dot = sq = psq = 0.0
    for st in opt.state.values():
        if "window_sum" in st:
            a, p = st["window_sum"], st["prev_window_sum"]
            dot += float((a * p).sum())
            sq += float((a * a).sum())
            psq += float((p * p).sum())
    return psq == 0 or sq == 0 or abs(dot) >= kappa * math.sqrt(sq * psq)


def main() -> None:
    which, k = sys.argv[1], sys.argv[2]
    k = k if k[0].isalpha() else float(k)
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
