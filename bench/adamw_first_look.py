"""A first look at TLR for AdamW (docs/adamw.md): the float64 reference against AdamW, one seed.

    python bench/adamw_first_look.py [--epochs N] [--tasks digits charlm] [--window W] [--bound C]
                                     [--lrs 1e-4 1e-3 1e-2] [--only-tlr]

Trains the bench/experiments.py tasks (digits MLP, batch 64; the character transformer,
batch 32) with ``torch.optim.AdamW`` at lr ∈ {1e-4, 1e-3, 1e-2} and ``ReferenceTLRAdamW``
from α0 ∈ {1e-4, 1e-3, 1e-2} (fixed windows of a third of an epoch, the paper's p = 0.33;
weight decay 1e-2, AdamW's default, for both) and prints the final training loss, the test
metric and TLR's final α. Not the issue's evidence table (3 seeds, schedules, peers): the
reference is slow and has no adaptive window yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.experiments import CharLM, Digits  # noqa: E402
from tlr_triton.reference import ReferenceTLRAdamW  # noqa: E402

BATCH = {"digits": 64, "charlm": 32}


def train(task, build, epochs: int, batch: int, seed: int = 0):
    model = task.model(seed)
    opt = build(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in task.batches(batch, gen):
            loss = task.loss(model, xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    loss, metric = task.evaluate(model)
    return loss, metric, opt.param_groups[0].get("alpha")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--tasks", nargs="+", default=["digits", "charlm"])
    ap.add_argument("--window", type=int, help="TLR's window in steps (default: a third of an epoch)")
    ap.add_argument("--bound", type=float, default=0.25, help="TLR's bound c")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--only-tlr", action="store_true", help="skip AdamW")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("| task | optimizer | lr / α0 | train loss | test metric | final α |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.tasks:
        task = Digits() if name == "digits" else CharLM()
        batch = BATCH[name]
        window = args.window or max(1, round(0.33 * task.steps_per_epoch(batch)))
        for lr in args.lrs:
            runs = [] if args.only_tlr else [("AdamW", lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=1e-2))]
            runs.append((f"TLR-AdamW (window {window}, c {args.bound:g})",
                         lambda ps, lr=lr: ReferenceTLRAdamW(ps, lr=lr, weight_decay=1e-2, window=window,
                                                             bound=args.bound)))
            for label, build in runs:
                t = time.perf_counter()
                loss, metric, alpha = train(task, build, args.epochs, batch)
                metric = f"{metric:.3f}" if name == "digits" else f"{metric:.2f} ppl"
                alpha = f"{alpha:.2e}" if alpha is not None else ""
                print(f"| {name} | {label} | {lr:g} | {loss:.4f} | {metric} | {alpha} |  <!-- {time.perf_counter() - t:.0f} s -->",
                      flush=True)


if __name__ == "__main__":
    main()
