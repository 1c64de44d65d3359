"""How precisely does the Triton path's window snapshot stand for the summed window? (fp32)

    python bench/reconstruction_precision.py                      # wine and breast cancer, defaults and windows 3, 12
    python bench/reconstruction_precision.py --task digits --windows 12
    python bench/reconstruction_precision.py --task wine --windows auto 3 --dampening 0.3

On the Triton path, for fp32/fp64 weights and no learning-rate schedule, A (the window's
sum of u = g + λ·w) is not summed in a buffer of its own: it is recovered from one snapshot
S written at the window's start, A = c·(S − (w − α·κ·b))/α (docs/triton.md, "Window
snapshots"), so that an ordinary step moves what fused SGD moves. The price is rounding:
S and w are large next to α·A.

This trains the same model twice on the same batches with the real Triton path (through
Triton's interpreter where there is no GPU), once as it is (snapshots) and once with A
summed (``functional.snapshot_form`` patched to None, the path a dampened momentum takes),
and reports the largest relative gap between the two α trajectories over the run, the
final α and the final loss of each. Fixed windows of W steps, and the default adaptive
window with its blow-up guard ("auto").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import date
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
from bench.experiments import EPOCHS, LR0, MOMENTUM, TASKS, WEIGHT_DECAY  # noqa: E402
from tlr_triton import TLR, functional  # noqa: E402

BATCH = {"digits": 128, "wine": 16, "cancer": 16, "charlm": 32}


def run(task, window, snapshots: bool, seed: int = 0, epochs: int | None = None, dampening: float = 0.0) -> dict:
    """Train with TLR on the Triton path; ``window`` an int (fixed) or "auto". Returns α after
    every step, the final loss, and whether the optimizer held a snapshot."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = task.model(seed).to(device)
    kw = dict(window=window) if window != "auto" else {}
    opt = TLR(model.parameters(), lr=LR0[task.name], momentum=MOMENTUM, dampening=dampening, weight_decay=WEIGHT_DECAY,
              backend="triton", **kw)
    form = functional.snapshot_form
    if not snapshots:
        functional.snapshot_form = lambda *args: None  # A summed, as with a learning-rate schedule
    try:
        gen = torch.Generator().manual_seed(seed)
        alphas = []
        for _ in range(epochs or EPOCHS[task.name]):
            for xb, yb in task.batches(BATCH[task.name], gen):
                opt.zero_grad(set_to_none=True)
                task.loss(model, xb.to(device), yb.to(device)).backward()
                opt.step()
                alphas.append(float(opt.param_groups[0]["alpha"]))
    finally:
        functional.snapshot_form = form
    held = any("window_start" in st for st in opt.state.values())
    loss, _ = task.evaluate(model.cpu())
    return dict(alphas=alphas, loss=loss, snapshot=held)


def compare(task, window, seed=0, epochs=None, dampening=0.0) -> dict:
    rec, acc = run(task, window, True, seed, epochs, dampening), run(task, window, False, seed, epochs, dampening)
    gap = max(abs(a - b) / a for a, b in zip(acc["alphas"], rec["alphas"]))
    return dict(steps=len(acc["alphas"]), gap=gap, acc=acc, rec=rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", nargs="+", default=["wine", "cancer"], choices=list(TASKS))
    ap.add_argument("--windows", nargs="+", default=["auto", "3", "12"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dampening", type=float, default=0.0, help="momentum's dampening τ (the snapshot's c = (1 - μ)/(1 - τ))")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same order of sums in both runs
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "Triton's interpreter on the CPU"
    print(f"Window snapshot against summed window, Triton path, fp32, {date.today()}, {platform.machine()}, "
          f"torch {torch.__version__}, {where}")
    print(f"momentum {MOMENTUM}, dampening {args.dampening}, weight decay {WEIGHT_DECAY}, seed {args.seed}, "
          "batch and epochs of bench/experiments.py")
    print("| task | window | steps | α, largest relative gap over the run | final α (summed / snapshot) "
          "| final loss (summed / snapshot) |")
    print("|---|---|---:|---:|---|---|")
    for name in args.task:
        task = TASKS[name]()
        for w in args.windows:
            r = compare(task, w if w == "auto" else int(w), args.seed, dampening=args.dampening)
            assert r["rec"]["snapshot"] and not r["acc"]["snapshot"]
            print(f"| {name} | {w} | {r['steps']} | {r['gap']:.2g} | {r['acc']['alphas'][-1]:.4g} / "
                  f"{r['rec']['alphas'][-1]:.4g} | {r['acc']['loss']:.4g} / {r['rec']['loss']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
