"""The paper's MNIST network on scikit-learn's bundled digits: TLR and SGD side by side.

One hidden layer of 1000 ReLU units, momentum 0.8 and weight decay 5e-4 for both
optimizers (the paper's setting); TLR starts from the same α as SGD's constant rate.
Prints train loss, test accuracy and α per epoch. Data ship with scikit-learn (1797
8x8 images); the train/test split is fixed and seeded.

    python bench/train_digits.py                 # TLR vs SGD, lr 0.01, batch 64, 30 epochs
    python bench/train_digits.py --sweep         # the grid behind the README's defaults
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tlr_triton import TLR  # noqa: E402

MOMENTUM, WEIGHT_DECAY = 0.8, 5e-4


def load_digits(seed: int = 0):
    """Digits scaled to [0, 1], split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_load

    x, y = sk_load(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 1000), nn.ReLU(), nn.Linear(1000, 10))


def make_optimizer(name: str, params, lr: float, **tlr_kwargs):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if name == "tlr":
        return TLR(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **tlr_kwargs)
    raise ValueError(f"unknown optimizer {name!r}")


def train(name: str, lr: float, batch: int, epochs: int, seed: int = 0, data=None, **tlr_kwargs):
    """Train one run; return per-epoch lists of train loss, test accuracy and α."""
    (xtr, ytr), (xte, yte) = data or load_digits()
    model = mlp(seed)
    opt = make_optimizer(name, model.parameters(), lr, **tlr_kwargs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    hist = {"loss": [], "acc": [], "alpha": []}
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        with torch.no_grad():
            hist["loss"].append(loss_fn(model(xtr), ytr).item())
            hist["acc"].append((model(xte).argmax(1) == yte).float().mean().item())
        hist["alpha"].append(float(opt.param_groups[0]["lr"]))
    return hist


def side_by_side(lr: float, batch: int, epochs: int, window: int | None) -> None:
    data = load_digits()
    kw = {} if window is None else {"window": window}
    t0 = time.perf_counter()
    runs = {"sgd": train("sgd", lr, batch, epochs, data=data), "tlr": train("tlr", lr, batch, epochs, data=data, **kw)}
    print(f"digits MLP 64-1000-10, batch {batch}, lr0 {lr}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}")
    print(f"{'epoch':>5} | {'SGD loss':>9} {'acc':>6} | {'TLR loss':>9} {'acc':>6} {'alpha':>9}")
    for e in range(epochs):
        s, t = runs["sgd"], runs["tlr"]
        print(f"{e + 1:>5} | {s['loss'][e]:>9.4f} {s['acc'][e]:>6.3f} | {t['loss'][e]:>9.4f} {t['acc'][e]:>6.3f} {t['alpha'][e]:>9.4g}")
    print(f"({time.perf_counter() - t0:.1f} s)")


def sweep(epochs: int, windows: list[int], lrs: list[float], batches: list[int], seeds: list[int]) -> None:
    """Final train loss over the robustness grid, per window; the evidence for the defaults."""
    data = load_digits()

    def summary(name, **kw):
        finals = []
        for lr in lrs:
            for b in batches:
                for s in seeds:
                    finals.append(train(name, lr, b, epochs, seed=s, data=data, **kw)["loss"][-1])
        ok = [f for f in finals if math.isfinite(f)]
        div = len(finals) - len(ok)
        worst = max(ok) if ok else float("nan")
        return f"median {sorted(ok)[len(ok) // 2]:.4f}  worst {worst:.4f}  spread {worst / min(ok):7.1f}x  diverged {div}/{len(finals)}"

    print(f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"final train loss over lr0 {lrs} x batch {batches} x seeds {seeds}, {epochs} epochs")
    print(f"{'SGD constant':>18}: {summary('sgd')}")
    for w in windows:
        print(f"{'TLR window ' + str(w):>18}: {summary('tlr', window=w)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--window", type=int, default=None, help="TLR window (default: TLR's own default)")
    ap.add_argument("--sweep", action="store_true", help="run the defaults grid instead")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 3, 10, 30, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.sweep:
        sweep(args.epochs, args.windows, args.lrs, args.batches, args.seeds)
    else:
        side_by_side(args.lr, args.batch, args.epochs, args.window)


if __name__ == "__main__":
    main()
