"""How precisely can a window sum be recovered from snapshots instead of accumulated? (fp32)

    python bench/reconstruction_precision.py                    # digits and wine, windows 3, 12, 48
    python bench/reconstruction_precision.py --task charlm --windows 12

TLR accumulates A = Σ u_t (u = g + λ·w) in a buffer of its own: one read and write of
4 bytes per parameter and step more than SGD. With heavy-ball momentum (no dampening, no
nesterov), a window's α constant and no learning-rate schedule, the sum can instead be
recovered when the window closes from one array Q = (1 − μ)·w_s/α − μ·b_s written when the
window starts (w_s, b_s: weights and momentum buffer then). At the closing step e, before
its move:

    A_e = Q − (1 − μ)·w_{e−1}/α + μ·b_{e−1} + u_e

since b_t − μ·b_{t−1} = u_t and Σ b_t = (w_s − w_{e−1})/α over the window's earlier steps.
An ordinary step would then move exactly what SGD moves. The price is cancellation:
Q and w/α are large next to A.

This runs the real optimizer (PyTorch path, fixed windows, fp32) twice on the same
batches: once as it is (accumulating), once with A replaced at every closing by its fp32
reconstruction (the emulation of such a path), and reports, over the run, the relative
error of the reconstructed ⟨A, P⟩ and ‖A‖² against the accumulated ones in the same
state, and the two runs' α trajectories and final losses. Not part of the optimizer: a
measurement for the design of the reconstruction path.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
from bench.experiments import EPOCHS, LR0, MOMENTUM, TASKS, WEIGHT_DECAY  # noqa: E402
from tlr_triton import TLR  # noqa: E402

BATCH = {"digits": 128, "wine": 16, "cancer": 16, "charlm": 32}


def run(task, window: int, reconstruct: bool, seed: int = 0) -> dict:
    """Train with TLR (fixed window); with ``reconstruct``, A is replaced by its snapshot
    reconstruction at every closing. Returns α per window, final loss and the errors seen."""
    model = task.model(seed)
    params = [p for p in model.parameters()]
    opt = TLR(params, lr=LR0[task.name], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=window, backend="torch")
    group = opt.param_groups[0]
    mu, lam = MOMENTUM, WEIGHT_DECAY
    with torch.no_grad():  # Q per parameter, fp32, written at each window start (b = 0 before the first step)
        q = [(1 - mu) * p / float(group["alpha"]) for p in params]
    gen = torch.Generator().manual_seed(seed)
    alphas, dot_err, sq_err = [], [], []
    for _ in range(EPOCHS[task.name]):
        for xb, yb in task.batches(BATCH[task.name], gen):
            opt.zero_grad(set_to_none=True)
            task.loss(model, xb, yb).backward()
            step = group["step"]
            alpha = float(group["alpha"])
            closes = (step + 1) % window == 0
            if closes:
                with torch.no_grad():
                    acc, rec, prev = [], [], []
                    for p, qp in zip(params, q):
                        st = opt.state[p]
                        u = p.grad + lam * p
                        acc.append(st["window_sum"] + u)  # what the accumulating path holds after this step's add
                        rec.append(qp - (1 - mu) * p / alpha + mu * st["momentum_buffer"] + u)
                        prev.append(st["prev_window_sum"])
                    dot_a = sum(float(torch.dot(a.flatten(), b.flatten())) for a, b in zip(acc, prev))
                    dot_r = sum(float(torch.dot(a.flatten(), b.flatten())) for a, b in zip(rec, prev))
                    sq_a = sum(float(a.square().sum()) for a in acc)
                    sq_r = sum(float(a.square().sum()) for a in rec)
                    if sq_a > 0 and any(float(b.abs().max()) > 0 for b in prev):
                        dot_err.append(abs(dot_r - dot_a) / max(abs(dot_a), 1e-30))
                        sq_err.append(abs(sq_r - sq_a) / sq_a)
                    if reconstruct:  # the step adds u to A: leave A_rec - u there
                        for p, r in zip(params, rec):
                            opt.state[p]["window_sum"].copy_(r - (p.grad + lam * p))
            opt.step()
            if closes:  # a new window starts after this step: snapshot Q
                a_new = float(group["alpha"])
                with torch.no_grad():
                    q = [(1 - mu) * p / a_new - mu * opt.state[p]["momentum_buffer"] for p in params]
                alphas.append(a_new)
    loss, _ = task.evaluate(model)
    return dict(alphas=alphas, loss=loss, dot_err=dot_err, sq_err=sq_err)


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", nargs="+", default=["digits", "wine"], choices=list(TASKS))
    ap.add_argument("--windows", type=int, nargs="+", default=[3, 12, 48])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same order of sums in both runs
    print(f"Reconstruction of A from snapshots, fp32, {date.today()}, {platform.machine()}, torch {torch.__version__}")
    print(f"momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, seed {args.seed}; errors relative, over the run's closings")
    print("| task | window | closings | ⟨A,P⟩ error median / 99th pct / max | ‖A‖² error median / max "
          "| α, max relative gap over the run | final α (acc. / rec.) | final loss (acc. / rec.) |")
    print("|---|---:|---:|---|---|---:|---|---|")
    for name in args.task:
        task = TASKS[name]()
        for w in args.windows:
            acc = run(task, w, False, args.seed)
            rec = run(task, w, True, args.seed)
            gaps = [abs(a - b) / a for a, b in zip(acc["alphas"], rec["alphas"]) if a > 0 and math.isfinite(b)]
            e = rec["dot_err"]
            print(f"| {name} | {w} | {len(e)} | {statistics.median(e) if e else float('nan'):.2g} / {_pct(e, 0.99):.2g} / "
                  f"{max(e, default=float('nan')):.2g} | {statistics.median(rec['sq_err']) if rec['sq_err'] else float('nan'):.2g} / "
                  f"{max(rec['sq_err'], default=float('nan')):.2g} | {max(gaps, default=float('nan')):.2g} | "
                  f"{acc['alphas'][-1]:.4g} / {rec['alphas'][-1]:.4g} | {acc['loss']:.4g} / {rec['loss']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
