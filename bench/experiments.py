"""The paper's experiments at small scale, on data that ships inside packages.

    python bench/experiments.py                  # default configuration (about 12 min on 2 cores)
    python bench/experiments.py --full           # every experiment, every task, 3 seeds
    python bench/experiments.py --only robustness --task digits
    python bench/experiments.py --plot-only      # re-plot and re-tabulate from the JSON files
    python bench/experiments.py --only sweep --task digits --windows 3 10 auto --lrs 1e-3 1e-2 --batches 64 512
                                                 # final loss over α0 x batch x seeds, per window
    python bench/experiments.py --only adamw --seeds 0 1 2
                                                 # TLRAdamW against AdamW and the peers (issue 12)

Tasks: "digits", the paper's MNIST network (one hidden layer of 1000) on scikit-learn's
digits; "charlm", a small character-level transformer on text from Python's own
standard library sources (the analogue of the paper's transformer experiment); "wine"
and "cancer", an MLP (one hidden layer of 64) on scikit-learn's small tabular sets, where
small batches drive the train loss to 0 (the setting of the blow-up guard). Splits
are fixed and seeded. Experiments: robustness (paper Fig. 1), baselines (Fig. 3), bound c
(Fig. 8), window p (Fig. 6), fixed meta-rate η (Fig. 9); "sweep", the grid behind the
defaults (SGD and TLR with each of ``--windows`` over ``--lrs`` x ``--batches`` x seeds); and
"adamw" (digits and charlm): TLRAdamW from α0 ∈ {1e-4, 1e-3, 1e-2} against AdamW at each rate,
constant and cosine, and the learning-rate-free peers from the same guesses (docs/adamw.md). Each writes
bench/out/<experiment>-<task>.{json,md,png}; finished runs are kept in the JSON, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
from bench.models import CharTransformer, mlp  # noqa: E402
from tlr_triton import TLR, TLRAdamW  # noqa: E402
from tlr_triton.reference import HypergradientSGD, NaiveTLR  # noqa: E402

OUT = Path(os.environ.get("TLR_BENCH_OUT", Path(__file__).resolve().parent / "out"))  # the variable: a separate run
MOMENTUM, WEIGHT_DECAY = 0.8, 5e-4  # the paper's, for every SGD-based method


# ----------------------------------------------------------------------------- tasks
class Digits:
    name, metric = "digits", "accuracy"

    def __init__(self, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_test = len(x) // 5
        self.test, self.train = (x[perm[:n_test]], y[perm[:n_test]]), (x[perm[n_test:]], y[perm[n_test:]])

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(64, 1000, 10)

    def batches(self, batch: int, gen: torch.Generator):
        x, y = self.train
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            yield x[perm[i : i + batch]], y[perm[i : i + batch]]

    def steps_per_epoch(self, batch: int) -> int:
        return math.ceil(len(self.train[0]) / batch)

    def loss(self, model, xb, yb):
        return nn.functional.cross_entropy(model(xb), yb)

    @torch.no_grad()
    def evaluate(self, model):
        loss = self.loss(model, *self.train).item()
        acc = (model(self.test[0]).argmax(1) == self.test[1]).float().mean().item()
        return loss, acc


class CharLM:
    """Characters of a fixed list of standard-library modules; 90/10 split of the text."""

    name, metric = "charlm", "perplexity"
    FILES = ["textwrap.py", "argparse.py", "string.py", "fractions.py", "heapq.py", "bisect.py", "shlex.py"]

    def __init__(self, seed: int = 0, chars: int = 200_000, context: int = 64, epoch_steps: int = 40) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        text = "".join((root / f).read_text(encoding="utf-8") for f in self.FILES if (root / f).exists())[:chars]
        vocab = sorted(set(text))
        self.vocab = len(vocab)
        stoi = {c: i for i, c in enumerate(vocab)}
        data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.train_data, self.test_data = data[:split], data[split:]
        self.context, self.epoch_steps = context, epoch_steps
        g = torch.Generator().manual_seed(seed + 1)
        self.eval_train = self._windows(self.train_data, 256, g)
        self.eval_test = self._windows(self.test_data, 256, g)

    def _windows(self, data, n, gen):
        start = torch.randint(0, len(data) - self.context - 1, (n,), generator=gen)
        idx = start[:, None] + torch.arange(self.context + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharTransformer(self.vocab, dim=64, layers=2, heads=4, context=self.context)

    def batches(self, batch: int, gen: torch.Generator):
        for _ in range(self.epoch_steps):  # an "epoch" is a fixed number of random windows
            yield self._windows(self.train_data, batch, gen)

    def steps_per_epoch(self, batch: int) -> int:
        return self.epoch_steps

    def loss(self, model, xb, yb):
        return nn.functional.cross_entropy(model(xb).flatten(0, 1), yb.flatten())

    @torch.no_grad()
    def evaluate(self, model):
        test = self.loss(model, *self.eval_test).item()
        return self.loss(model, *self.eval_train).item(), math.exp(test) if test < 700 else math.inf  # diverged: inf


class Tabular:
    """A small tabular classification set bundled with scikit-learn (standardised, 80/20 split) and
    an MLP with one hidden layer of 64: the setting where the adaptive window once locked α in a
    blow-up (train loss near 0, small batches)."""

    metric = "accuracy"
    SETS = {"wine": "load_wine", "cancer": "load_breast_cancer"}

    def __init__(self, name: str, seed: int = 0) -> None:
        import sklearn.datasets

        self.name = name
        x, y = getattr(sklearn.datasets, self.SETS[name])(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_test = len(x) // 5
        test, train = perm[:n_test], perm[n_test:]
        mean, std = x[train].mean(0), x[train].std(0)
        x = (x - mean) / std
        self.test, self.train = (x[test], y[test]), (x[train], y[train])
        self.classes = int(y.max()) + 1

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(self.train[0].shape[1], 64, self.classes)

    batches, steps_per_epoch, loss, evaluate = Digits.batches, Digits.steps_per_epoch, Digits.loss, Digits.evaluate


TASKS = {"digits": Digits, "charlm": CharLM, "wine": lambda: Tabular("wine"), "cancer": lambda: Tabular("cancer")}


# ----------------------------------------------------------------------------- optimizers
def build(name: str, params, lr: float, epochs: int, steps_per_epoch: int, **kw):
    """Return (optimizer, scheduler or None). SGD-based methods share momentum 0.8 and wd 5e-4."""
    sgd = dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    params = list(params)
    if name == "tlr-adamw":  # fixed windows of 3 steps (no blow-up guard: it watches adaptive windows), c = 0.5
        return TLRAdamW(params, lr=lr, weight_decay=ADAMW_WD, window=3), None
    if name == "tlr-adamw-auto":  # the defaults: the adaptive window (units of 3 steps, up to 48), its guard, c = 0.5
        return TLRAdamW(params, lr=lr, weight_decay=ADAMW_WD, window="auto"), None
    if name.startswith("tlr"):  # tlr, tlr-tensor, tlr-direction, tlr-tensor-direction, tlr-noguard
        scope = "tensor" if "tensor" in name else "group"
        statistic = "direction" if "direction" in name else "gradient"
        if "noguard" in name:  # the adaptive window without its blow-up guard (the previous default)
            kw = dict(kw, blowup_ratio=None)
        return TLR(params, lr=lr, scope=scope, statistic=statistic, **sgd, **kw), None
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **sgd), None
    if name == "sgd-multistep":
        opt = torch.optim.SGD(params, lr=lr, **sgd)
        total = epochs * steps_per_epoch
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2, 3 * total // 4], gamma=0.1)
    if name == "sgd-exp":  # α decays 100-fold over the run
        opt = torch.optim.SGD(params, lr=lr, **sgd)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1 / (epochs * steps_per_epoch)))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=WEIGHT_DECAY), None
    if name.startswith("hd"):
        return HypergradientSGD(params, lr=lr, meta_lr=kw.get("meta_lr", 1e-4), **sgd), None
    if name.startswith("naive"):
        return NaiveTLR(params, lr=lr, meta_lr=kw.get("meta_lr", 1e-4), **sgd), None
    if name == "schedulefree":
        import schedulefree

        return schedulefree.SGDScheduleFree(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY), None
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0, weight_decay=WEIGHT_DECAY), None
    if name == "dadaptation":
        from dadaptation import DAdaptSGD

        return DAdaptSGD(params, lr=1.0, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), None
    # The AdamW experiment (issue 12): AdamW's default weight decay, decoupled, for every run;
    # the learning-rate-free peers started from the same guess (their d0, or Schedule-Free's lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WD), None
    if name == "adamw-cosine":  # to 0 over the run
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WD)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    if name == "prodigy-adam":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0, d0=lr, weight_decay=ADAMW_WD, decouple=True), None
    if name == "dadapt-adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=1.0, d0=lr, weight_decay=ADAMW_WD, decouple=True), None
    if name == "schedulefree-adamw":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=ADAMW_WD), None
    raise ValueError(f"unknown optimizer {name!r}")


def optional_peers() -> list[str]:
    """The learning-rate-free peers that are installed (pip install -e '.[peers]')."""
    found = []
    for name, module in (("schedulefree", "schedulefree"), ("prodigy", "prodigyopt"), ("dadaptation", "dadaptation")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            pass
    return found


def alphas(opt) -> list[float]:
    """The learning rate(s) in use: per group, or per tensor for TLR's scope "tensor"."""
    out = []
    for g in opt.param_groups:
        if isinstance(opt, (TLR, TLRAdamW)) and g["scope"] == "tensor":
            out += [float(opt.state[p]["alpha"]) for p in g["params"] if "alpha" in opt.state.get(p, {})]
        elif isinstance(opt, (TLR, TLRAdamW)):
            out.append(float(g["alpha"]) * float(g["lr"]) / float(g["initial_lr"]))
        else:
            out.append(float(g["lr"]))
    return out


# ----------------------------------------------------------------------------- one run
def train(task, opt_name: str, lr: float, batch: int, epochs: int, seed: int, **kw) -> dict:
    model = task.model(seed)
    spe = task.steps_per_epoch(batch)
    if "window_p" in kw:  # the paper's window: a fraction p of an epoch
        kw["window"] = max(1, round(kw.pop("window_p") * spe))
    opt, sched = build(opt_name, model.parameters(), lr, epochs, spe, **kw)
    gen = torch.Generator().manual_seed(seed)
    hist = {"loss": [], "metric": [], "alpha": [], "seconds": 0.0, "initial_loss": task.evaluate(model)[0]}
    t0 = time.perf_counter()
    if hasattr(opt, "train"):  # schedule-free optimizers switch modes
        opt.train()
    for _ in range(epochs):
        for xb, yb in task.batches(batch, gen):
            def closure():
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, xb, yb)
                loss.backward()
                return loss

            if isinstance(opt, NaiveTLR):  # evaluates the loss a second time itself
                opt.step(closure)
            else:
                closure()
                opt.step()
            if sched is not None:
                sched.step()
        if hasattr(opt, "eval"):
            opt.eval()
        loss, metric = task.evaluate(model)
        if hasattr(opt, "train"):
            opt.train()
        hist["loss"].append(loss)
        hist["metric"].append(metric)
        hist["alpha"].append(alphas(opt))
        if not math.isfinite(loss):
            break
    hist["seconds"] = time.perf_counter() - t0
    return hist


def diverged(h: dict) -> bool:
    """A run diverged if its final train loss is not finite or above the untrained model's."""
    final = h["loss"][-1]
    return not math.isfinite(final) or final > h["initial_loss"]


# ----------------------------------------------------------------------------- experiments
LR0 = {"digits": 0.01, "charlm": 0.1, "wine": 0.1, "cancer": 0.1}
BATCH = {"digits": 128, "charlm": 32, "wine": 16, "cancer": 16}
# The robustness grid (paper Fig. 1 and beyond): initial rates up to 1.0, small batches.
ROBUST_LRS = (1e-3, 1e-2, 1e-1, 1.0)
ROBUST_BATCHES = {"digits": [8, 16, 64, 128, 256, 512], "charlm": [8, 16, 32, 64, 128], "wine": [8, 16, 32, 64],
                  "cancer": [8, 16, 32, 64]}
QUICK_BATCHES = {"digits": [16, 128, 512], "charlm": [32], "wine": [8, 16], "cancer": [8, 16]}


def grid(experiment: str, task: str, full: bool):
    """The runs of an experiment: list of (label, optimizer, lr, batch, kwargs)."""
    lr0, batch = LR0[task], BATCH[task]
    if experiment == "robustness":
        batches = ROBUST_BATCHES[task] if full else QUICK_BATCHES[task]
        optimizers = ("sgd", "tlr", "tlr-noguard") if full else ("sgd", "tlr")
        return [(f"{o} lr0={lr} batch={b}", o, lr, b, {}) for o in optimizers for lr in ROBUST_LRS for b in batches]
    if experiment == "baselines":
        names = ["tlr", "tlr-tensor", "tlr-direction", "tlr-tensor-direction", "sgd", "sgd-multistep", "sgd-exp", "adam",
                 "hd-1e-5", "hd-1e-4", "hd-1e-3", "naive"] + optional_peers()
        runs = []
        for n in names:
            kw = {"meta_lr": float(n.split("-", 1)[1])} if n.startswith("hd") else ({"meta_lr": 1e-4} if n == "naive" else {})
            runs.append((n, n, 1e-3 if n == "adam" else lr0, batch, kw))
        return runs
    if experiment == "bound":
        return [(f"tlr c={c}", "tlr", lr0, batch, {"bound": c}) for c in (0.25, 1.0, 5.0, 10.0)]
    if experiment == "window":
        runs = [(f"tlr p={p}", "tlr", lr0, batch, {"window_p": p}) for p in (0.1, 0.25, 0.33, 1.0)]
        return runs + [("tlr window=3 (fixed)", "tlr", lr0, batch, {"window": 3}),
                       ("tlr window=auto (default)", "tlr", lr0, batch, {}),
                       ("tlr window=auto, no blow-up guard", "tlr-noguard", lr0, batch, {})]
    if experiment == "sweep":
        variants = [("sgd", "sgd", {})] + [(f"tlr window={w}", "tlr", {} if w == "auto" else {"window": int(w)})
                                          for w in SWEEP["windows"]]
        return [(f"{label} lr0={lr} batch={b}", o, lr, b, kw) for label, o, kw in variants
                for lr in SWEEP["lrs"] for b in SWEEP["batches"]]
    if experiment == "adamw":
        if task not in ADAMW_BATCH:
            raise ValueError(f"the adamw experiment runs on {sorted(ADAMW_BATCH)}, not {task!r}")
        names = ADAMW_RUNS + [ADAMW_PEERS[p] for p in optional_peers()]
        return [(f"{n} lr0={lr}", n, lr, ADAMW_BATCH[task], {"epochs": ADAMW_EPOCHS}) for lr in ADAMW_LRS for n in names]
    if experiment == "meta":
        etas = (1e-5, 1e-4, 1e-3, 1e-2) if full else (1e-5, 1e-4, 1e-3)
        return [(f"hd eta={e}", "hd", lr0, batch, {"meta_lr": e}) for e in etas] + \
               [(f"naive eta={e}", "naive", lr0, batch, {"meta_lr": e}) for e in etas] + [("tlr", "tlr", lr0, batch, {})]
    raise ValueError(experiment)


EXPERIMENTS = ["robustness", "baselines", "bound", "window", "meta"]  # --full runs these; "sweep", "adamw" on request
# The AdamW experiment (issue 12, docs/adamw.md): digits and the character transformer, AdamW at
# each rate, constant and with a cosine schedule, TLRAdamW from each as α0, and the peers from each
ADAMW_LRS = (1e-4, 1e-3, 1e-2)
ADAMW_BATCH = {"digits": 64, "charlm": 32}
ADAMW_EPOCHS = 10
ADAMW_WD = 1e-2
ADAMW_RUNS = ["adamw", "adamw-cosine", "tlr-adamw", "tlr-adamw-auto"]
ADAMW_PEERS = {"prodigy": "prodigy-adam", "dadaptation": "dadapt-adam", "schedulefree": "schedulefree-adamw"}
SWEEP = dict(windows=["auto", 3, 10], lrs=[1e-3, 1e-2, 1e-1], batches=[64, 128, 256, 512])
EPOCHS = {"digits": 30, "charlm": 15, "wine": 40, "cancer": 40}


def _metric(task: str) -> str:
    return "perplexity" if task == "charlm" else "accuracy"


def summarise(task: str, runs: dict) -> list[dict]:
    """One row per label: final train loss, metric, epochs to 95% of best metric, diverged; mean ± std over seeds.

    "Diverged" = the final train loss is not finite or above the untrained model's.
    """
    rows = {}
    for key, h in runs.items():
        label = key.rsplit(" seed=", 1)[0]
        rows.setdefault(label, []).append(h)
    out = []
    for label, hs in rows.items():
        finals = [h["loss"][-1] for h in hs]
        metrics = [h["metric"][-1] for h in hs]
        reach = []
        for h in hs:
            m = h["metric"]
            if _metric(task) == "accuracy":
                best = max(m)
                reach.append(next(i + 1 for i, v in enumerate(m) if v >= 0.95 * best))
            else:
                best = min(x for x in m if math.isfinite(x)) if any(math.isfinite(x) for x in m) else float("nan")
                reach.append(next((i + 1 for i, v in enumerate(m) if v <= best / 0.95), len(m)))
        out.append(dict(label=label, seeds=len(hs), loss=_ms(finals), metric=_ms(metrics), reach=_ms(reach),
                        diverged=sum(diverged(h) for h in hs)))
    return out


def _ms(xs):
    """Mean and population standard deviation; NaN/inf (diverged runs) propagate."""
    xs = [float(x) for x in xs]
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if len(xs) > 1 else 0.0


def markdown(experiment: str, task: str, rows: list[dict], runs: dict) -> str:
    metric = f"test {_metric(task)}"
    lines = [f"### {experiment} — {task} ({date.today()}, {platform.machine()}, torch {torch.__version__})", "",
             f"| run | seeds | final train loss | {metric} | epochs to 95% of best | diverged |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['seeds']} | {r['loss'][0]:.4g} ± {r['loss'][1]:.2g} | {r['metric'][0]:.4g} ± {r['metric'][1]:.2g} "
                     f"| {r['reach'][0]:.1f} | {r['diverged']} |")
    if experiment == "sweep":  # one row per optimizer and window, over the whole grid
        variants = {}
        for key, h in runs.items():
            variants.setdefault(key.split(" lr0=")[0], []).append(h)
        lines += ["", f"Over α0 {SWEEP['lrs']} x batch {SWEEP['batches']} x seeds, {len(next(iter(variants.values())))} runs each:",
                  "", "| optimizer | median final train loss | worst | spread (worst/best, floored at 1e-6) | diverged |",
                  "|---|---:|---:|---:|---:|"]
        for name, hs in variants.items():
            ok = sorted(max(h["loss"][-1], 1e-6) for h in hs if not diverged(h))
            if ok:
                lines.append(f"| {name} | {ok[len(ok) // 2]:.4g} | {ok[-1]:.4g} | {ok[-1] / ok[0]:.1f}x | {len(hs) - len(ok)}/{len(hs)} |")
            else:
                lines.append(f"| {name} | - | - | - | {len(hs)}/{len(hs)} |")
    if experiment == "robustness":
        lines += ["", "| optimizer | worst final train loss (runs that did not diverge) | spread (max/min, losses floored at 1e-6) "
                      "| diverged |", "|---|---:|---:|---:|"]
        for opt in ("sgd", "tlr", "tlr-noguard"):
            for cap in (None, 0.1):  # the whole grid, then without α0 = 1 (beyond SGD's stable rates here)
                hs = [h for k, h in runs.items() if k.startswith(opt + " ")
                      and (cap is None or float(k.split("lr0=")[1].split()[0]) <= cap)]
                if not hs:
                    continue
                ok = [max(h["loss"][-1], 1e-6) for h in hs if not diverged(h)]
                worst, spread = (max(ok), max(ok) / min(ok)) if ok else (float("nan"), float("nan"))
                name = opt if cap is None else f"{opt}, α0 ≤ {cap:g}"
                lines.append(f"| {name} | {worst:.4g} | {spread:.1f}x | {len(hs) - len(ok)}/{len(hs)} |")
    if experiment == "adamw":
        lines += [""] + adamw_table(task, runs)
    return "\n".join(lines) + "\n"


def adamw_table(task: str, runs: dict) -> list[str]:
    """The AdamW experiment's table: the test metric per optimizer and start (mean over seeds), its
    spread over the starts, and TLRAdamW's gap to the best tuned AdamW (constant or cosine)."""
    lower = _metric(task) == "perplexity"
    by = {}
    for key, h in runs.items():
        name, lr = key.rsplit(" seed=", 1)[0].split(" lr0=")
        by.setdefault(name, {}).setdefault(float(lr), []).append(h)
    names = [n for n in ADAMW_RUNS + list(ADAMW_PEERS.values()) if n in by]
    lrs = sorted({lr for d in by.values() for lr in d})

    def mean(hs):
        return statistics.fmean(h["metric"][-1] for h in hs)

    def cell(hs):
        m = [h["metric"][-1] for h in hs]
        bad = sum(diverged(h) for h in hs)
        return f"{statistics.fmean(m):.4g} [{min(m):.4g}–{max(m):.4g}]" + (f" ({bad} diverged)" if bad else "")

    lines = [f"Test {_metric(task)} (mean [min–max] over seeds) by start (lr, α0, or the peer's d0/lr):", "",
             "| start | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for lr in lrs:
        lines.append(f"| {lr:g} | " + " | ".join(cell(by[n][lr]) if lr in by[n] else "" for n in names) + " |")
    def spread(n):  # a start whose mean is not finite (a diverged seed) makes the spread infinite
        means = [mean(hs) for hs in by[n].values()]
        return max(means) - min(means) if all(map(math.isfinite, means)) else math.inf

    spreads = [spread(n) for n in names]
    lines.append("| spread over the starts | " + " | ".join(f"{s:.3g}" for s in spreads) + " |")
    tuned = [m for n in ("adamw", "adamw-cosine") for hs in by.get(n, {}).values() if math.isfinite(m := mean(hs))]
    for variant in [n for n in ("tlr-adamw", "tlr-adamw-auto") if n in by and tuned]:
        # the criterion is in perplexity (relative); accuracy gaps are given in points
        best = min(tuned) if lower else max(tuned)
        tlr = {lr: mean(hs) for lr, hs in sorted(by[variant].items())}
        if lower:
            gaps = ", ".join(f"{lr:g}: {100 * (m - best) / best:+.1f}%" for lr, m in tlr.items())
            verdict = f" — every α0 within 3%: {'yes' if all(m <= 1.03 * best for m in tlr.values()) else 'no'}"
        else:
            gaps = ", ".join(f"{lr:g}: {100 * (best - m):+.1f} points" for lr, m in tlr.items())
            verdict = ""
        peers = [s for n, s in zip(names, spreads) if n in ADAMW_PEERS.values()]
        spread = spreads[names.index(variant)]
        lines += ["", f"{variant}: its gap to the best tuned AdamW (constant or cosine, over the starts: {best:.4g}) "
                  f"by α0 (positive: worse): {gaps}{verdict}; a smaller spread over α0 than every peer: "
                  + ("yes" if peers and all(spread < s for s in peers) else "no" if peers else "no peers installed")
                  + f"; diverged runs: {sum(diverged(h) for hs in by[variant].values() for h in hs)} (every "
                  f"optimizer: {sum(diverged(h) for d in by.values() for hs in d.values() for h in hs)})."]
    return lines


def _clip(values, top):
    """A curve for a log plot: values above ``top`` (or not finite) are cut there."""
    return [min(v, top) if math.isfinite(v) else top for v in values]


def plot(experiment: str, task: str, runs: dict, path: Path) -> None:
    """Seed-0 curves. Robustness: one loss panel per optimizer (colour = α0, line = batch) and TLR's α;
    otherwise one distinct colour per run. Losses are clipped at 10x the untrained model's, so a
    diverged run shows as a curve ending at the top edge instead of stretching the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    shown = {key.rsplit(" seed=", 1)[0]: h for key, h in runs.items() if key.endswith("seed=0") or " seed=" not in key}
    if not shown:
        return
    top = 10 * max(h["initial_loss"] for h in shown.values())

    def alpha_curve(h):
        return [statistics.median(x) for x in h["alpha"]]

    if experiment == "robustness":
        optimizers = [o for o in ("sgd", "tlr", "tlr-noguard") if any(k.startswith(o + " ") for k in shown)]
        lrs = sorted({float(k.split("lr0=")[1].split()[0]) for k in shown})
        batches = sorted({int(k.split("batch=")[1]) for k in shown})
        colour = {lr: plt.cm.plasma(0.85 * i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
        style = dict(zip(batches, ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]))
        fig, axes = plt.subplots(1, len(optimizers) + 1, figsize=(4.6 * (len(optimizers) + 1), 4.2))
        for ax, opt in zip(axes, optimizers):
            for key, h in shown.items():
                if key.startswith(opt + " "):
                    lr, b = float(key.split("lr0=")[1].split()[0]), int(key.split("batch=")[1])
                    ax.plot(range(1, len(h["loss"]) + 1), _clip(h["loss"], top), color=colour[lr], ls=style[b], lw=1.2)
                    if opt == "tlr":
                        axes[-1].plot(range(1, len(h["alpha"]) + 1), alpha_curve(h), color=colour[lr], ls=style[b], lw=1.2)
            ax.set(yscale="log", xlabel="epoch", ylabel="train loss", title=f"{opt}: {task}")
            ax.set_ylim(top=top * 1.5)
        axes[-1].set(yscale="log", xlabel="epoch", ylabel="TLR's α (median over scopes)", title="tlr: α")
        handles = [Line2D([], [], color=colour[lr], lw=2, label=f"α0 = {lr:g}") for lr in lrs]
        handles += [Line2D([], [], color="k", ls=style[b], label=f"batch {b}") for b in batches]
        axes[-1].legend(handles=handles, fontsize=7, ncol=2, loc="best")
    else:
        fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(13, 4.5))
        cmap = plt.cm.tab10 if len(shown) <= 10 else plt.cm.tab20
        for i, (label, h) in enumerate(shown.items()):
            c = cmap(i % cmap.N)
            ep = range(1, len(h["loss"]) + 1)
            ax_loss.plot(ep, _clip(h["loss"], top), color=c, lw=1.2, label=label)
            if not all(math.isfinite(v) and v <= top for v in h["loss"]):
                ax_loss.plot(ep[-1], top, "x", color=c, ms=8)  # diverged: cut at the top edge
            if h["alpha"]:
                ax_alpha.plot(range(1, len(h["alpha"]) + 1), alpha_curve(h), color=c, lw=1.2, label=label)
        ax_loss.set(yscale="log", xlabel="epoch", ylabel="train loss (x: diverged, cut at 10x the untrained loss)",
                    title=f"{experiment}: {task}")
        ax_loss.set_ylim(top=top * 1.5)
        ax_alpha.set(yscale="log", xlabel="epoch", ylabel="learning rate (TLR: α, median over scopes)")
        ax_alpha.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_experiment(experiment: str, task_name: str, seeds: list[int], full: bool, plot_only: bool) -> str:
    OUT.mkdir(exist_ok=True)
    # a sweep's runs depend on its epochs too: one file per length
    stem = OUT / (f"{experiment}-{task_name}" + (f"-{EPOCHS[task_name]}ep" if experiment == "sweep" else ""))
    saved = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {"runs": {}}
    runs = saved["runs"]
    if not plot_only:
        from tqdm import tqdm

        task = TASKS[task_name]()
        todo = [(label, o, lr, b, kw, s) for label, o, lr, b, kw in grid(experiment, task_name, full) for s in seeds
                if f"{label} seed={s}" not in runs]
        for label, o, lr, b, kw, s in tqdm(todo, desc=f"{experiment}/{task_name}", unit="run"):
            kw = dict(kw)
            runs[f"{label} seed={s}"] = train(task, o, lr, b, kw.pop("epochs", EPOCHS[task_name]), s, **kw)
            stem.with_suffix(".json").write_text(json.dumps({"experiment": experiment, "task": task_name, "runs": runs}))
    # tables and figures show this grid's runs (the JSON may also hold runs of other grids)
    wanted = {f"{label} seed={s}" for label, *_ in grid(experiment, task_name, full) for s in seeds}
    shown = {k: h for k, h in runs.items() if k in wanted} or runs
    rows = summarise(task_name, shown)
    text = markdown(experiment, task_name, rows, shown)
    stem.with_suffix(".md").write_text(text)
    plot(experiment, task_name, shown, stem.with_suffix(".png"))
    return text


DEFAULT = [("robustness", "digits"), ("robustness", "wine"), ("baselines", "digits"), ("window", "digits"),
           ("bound", "digits"), ("robustness", "charlm"), ("baselines", "charlm")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every experiment on every task, 3 seeds")
    ap.add_argument("--only", choices=EXPERIMENTS + ["sweep", "adamw"], nargs="+")
    ap.add_argument("--windows", nargs="+", help="sweep: TLR windows (ints or auto)")
    ap.add_argument("--lrs", type=float, nargs="+", help="sweep: initial learning rates")
    ap.add_argument("--batches", type=int, nargs="+", help="sweep: batch sizes")
    ap.add_argument("--epochs", type=int, help="epochs per run (default: the task's)")
    ap.add_argument("--task", choices=list(TASKS), nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--plot-only", action="store_true", help="re-plot and re-tabulate from bench/out/*.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for key in ("windows", "lrs", "batches"):
        if getattr(args, key):
            SWEEP[key] = getattr(args, key)
    if args.epochs:
        global ADAMW_EPOCHS
        EPOCHS.update(dict.fromkeys(EPOCHS, args.epochs))
        ADAMW_EPOCHS = args.epochs
    if args.full or args.only or args.task:
        plan = [(e, t) for e in (args.only or EXPERIMENTS)
                for t in (args.task or (list(ADAMW_BATCH) if e == "adamw" else list(TASKS)))]
    else:
        plan = DEFAULT
    seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    t0 = time.perf_counter()
    report = []
    for e, t in plan:  # each table as soon as its experiment is done
        report.append(run_experiment(e, t, seeds, args.full, args.plot_only))
        print(report[-1], flush=True)
        (OUT / "summary.md").write_text("\n".join(report))
    print(f"({time.perf_counter() - t0:.0f} s; tables, JSON and figures in {OUT})")


if __name__ == "__main__":
    main()
