"""A first look at TLR for AdamW (docs/adamw.md): the float64 reference against AdamW, one seed.

    python bench/adamw_first_look.py [--epochs N] [--tasks digits charlm cancer wine] [--window W|auto] [--bound C] [--no-guard]
                                     [--lrs 1e-4 1e-3 1e-2] [--seeds 0 1 2] [--only-tlr] [--cosine] [--fast]
                                     [--peers] [--only-peers]

``--peers`` adds the learning-rate-free peers (``pip install -e '.[peers]'``), each started
from the same guesses: Prodigy and D-Adaptation Adam with d0 = α0 (their initial step-size
estimate; lr = 1, decoupled weight decay), Schedule-Free AdamW with lr = α0.

Trains the bench/experiments.py tasks (digits MLP, batch 64; the character transformer,
batch 32) with ``torch.optim.AdamW`` at lr ∈ {1e-4, 1e-3, 1e-2} and ``ReferenceTLRAdamW``
from α0 ∈ {1e-4, 1e-3, 1e-2} (fixed windows of a third of an epoch, the paper's p = 0.33;
weight decay 1e-2, AdamW's default, for both) and prints the final training loss, the test
metric and TLR's final α. Not the issue's evidence table (bench/experiments.py --only adamw):
quick probes of one setting (``--fast``: TLRAdamW's PyTorch path; ``--window auto``: the
adaptive window; cancer and wine at batch 16, tasks outside the evidence table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.experiments import TASKS  # noqa: E402
from tlr_triton import TLRAdamW  # noqa: E402
from tlr_triton.adamw import DEFAULT_ADAMW_BOUND  # noqa: E402
from tlr_triton.reference import ReferenceTLRAdamW  # noqa: E402

BATCH = {"digits": 64, "charlm": 32, "cancer": 16, "wine": 16}


def train(task, build, epochs: int, batch: int, seed: int = 0, cosine: bool = False):
    model = task.model(seed)
    opt = build(model.parameters())
    if hasattr(opt, "train") and hasattr(opt, "eval"):  # Schedule-Free: its own train/eval weights
        opt.train()
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * task.steps_per_epoch(batch))
             if cosine else None)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in task.batches(batch, gen):
            loss = task.loss(model, xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    if hasattr(opt, "train") and hasattr(opt, "eval"):
        opt.eval()
    loss, metric = task.evaluate(model)
    alpha = opt.param_groups[0].get("alpha")
    return loss, metric, float(alpha) if alpha is not None else None


def _peers(guess: float):
    """The learning-rate-free peers, started from ``guess`` (see the module docstring)."""
    import schedulefree
    from dadaptation import DAdaptAdam
    from prodigyopt import Prodigy

    return [("Prodigy (d0)", lambda ps: Prodigy(ps, lr=1.0, d0=guess, weight_decay=1e-2, decouple=True), False),
            ("D-Adaptation Adam (d0)", lambda ps: DAdaptAdam(ps, lr=1.0, d0=guess, weight_decay=1e-2, decouple=True),
             False),
            ("Schedule-Free AdamW (lr)", lambda ps: schedulefree.AdamWScheduleFree(ps, lr=guess, weight_decay=1e-2),
             False)]


def _cell(values, fmt):
    """One seed: the value; several: mean [min–max]."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--tasks", nargs="+", default=["digits", "charlm"], choices=list(BATCH))
    ap.add_argument("--window", help="TLR's window in steps, or auto (default: a third of an epoch)")
    ap.add_argument("--bound", type=float, help="TLR's bound c (default: the class's)")
    ap.add_argument("--no-guard", action="store_true", help="the adaptive window without its blow-up guard")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only-tlr", action="store_true", help="skip AdamW")
    ap.add_argument("--cosine", action="store_true", help="also AdamW with a cosine schedule to 0")
    ap.add_argument("--fast", action="store_true", help="TLRAdamW (the PyTorch path) instead of the float64 reference")
    ap.add_argument("--peers", action="store_true", help="also Prodigy, D-Adaptation Adam, Schedule-Free AdamW")
    ap.add_argument("--only-peers", action="store_true", help="the peers alone")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tlr_class = TLRAdamW if args.fast else ReferenceTLRAdamW
    print(f"seeds {args.seeds}, {args.epochs} epochs; several seeds: mean [min–max]\n")
    print("| task | optimizer | lr / α0 | train loss | test metric | final α |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.tasks:
        task = TASKS[name]()
        batch = BATCH[name]
        window = args.window or max(1, round(0.33 * task.steps_per_epoch(batch)))
        window = window if window == "auto" else int(window)
        for lr in args.lrs:
            runs = [] if args.only_tlr else [("AdamW", lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=1e-2),
                                              False)]
            if args.cosine and not args.only_tlr:
                runs.append(("AdamW, cosine", lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=1e-2), True))
            options = dict(window=window, **({} if args.bound is None else dict(bound=args.bound)),
                           **(dict(blowup_ratio=None) if args.no_guard else {}))
            bound = args.bound if args.bound is not None else DEFAULT_ADAMW_BOUND
            runs.append((f"{'TLRAdamW' if args.fast else 'TLR-AdamW'} (window {window}, c {bound:g}"
                         f"{', no guard' if args.no_guard else ''})",
                         lambda ps, lr=lr: tlr_class(ps, lr=lr, weight_decay=1e-2, **options), False))
            if args.only_peers:
                runs = []
            if args.peers or args.only_peers:
                runs += _peers(lr)
            for label, build, cosine in runs:
                t = time.perf_counter()
                results = [train(task, build, args.epochs, batch, seed, cosine) for seed in args.seeds]
                losses, metrics, alphas = zip(*results)
                metric = _cell(metrics, "{:.2f}") + " ppl" if name == "charlm" else _cell(metrics, "{:.3f}")
                alpha = _cell(alphas, "{:.2e}") if alphas[0] is not None else ""
                print(f"| {name} | {label} | {lr:g} | {_cell(losses, '{:.4f}')} | {metric} | {alpha} |  "
                      f"<!-- {time.perf_counter() - t:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
