"""Step cost of TLR's PyTorch path against torch.optim.SGD, interleaved, idle and under load.

    python bench/step_cost.py                  # idle machine: bench/results/step_cost.md
    python bench/step_cost.py --load 3         # with 3 busy processes sharing the cores
    python bench/step_cost.py --layout mlp     # one layout

Every optimizer has momentum 0.9 and weight decay 5e-4. The optimizers take turns, one
round each, so a drift of the machine (frequency, other tenants) hits them alike; the
figure is the median over rounds of the time per step, and the ratio is to
``SGD(foreach=True)`` of the same rounds. TLR runs at its defaults (``window="auto"``, the
blow-up guard testing every 3-step unit's end) with its window held at three lengths, timed
over whole windows: every unit closing its window (3 steps, the worst case), 6 steps, and
its longest, 48 steps (16 units). Real runs sit near the short end:
``python bench/step_cost.py --windows`` trains the models of bench/experiments.py at the
defaults and prints how many steps pass per closing (3.8–7.7 on 2026-12-04). ``--cold`` evicts
the caches before every step, outside the timed part, as a training step's forward and backward
passes do (without it a round's steps find each other's data in the caches). ``--load N``
starts N processes that multiply matrices on all cores (as data-loader workers would) for
the whole measurement.

``pytest bench/ --benchmark-only`` (bench/test_step_cost.py) times more variants with
pytest-benchmark, one optimizer after the other.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
from bench.models import CharTransformer, mlp  # noqa: E402
from tlr_triton import TLR  # noqa: E402

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4

LAYOUTS = {
    "1x10M": lambda: [(10_000_000,)],
    "1000x10k": lambda: [(10_000,)] * 1000,
    "mlp": lambda: [tuple(p.shape) for p in mlp(784).parameters()],
    "transformer": lambda: [tuple(p.shape) for p in CharTransformer(96, dim=256, layers=4, context=128).parameters()],
}


def held(opt: TLR, units: int) -> TLR:
    """The adaptive window held at ``units`` 3-step units per window, each unit end testing the
    blow-up guard as at the defaults: ``window_reset`` 0 makes every Newton step "large"
    (k back to 1), 1e30 none (k grows to its cap, ``max_window``, and stays)."""
    for group in opt.param_groups:
        group["window_reset"] = 0.0 if units == 1 else 1e30
        if units > 1:
            group["max_window"] = 3 * units
            group["window_state"] = torch.tensor([0, units])
    return opt


def grown(opt: TLR) -> TLR:
    """The adaptive window at its longest (k = 16 units of 3 steps), kept there."""
    return held(opt, 16)


def _tlr(units: int):
    return lambda ps: held(TLR(ps, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), units)


# name → (build, steps per round: a whole number of windows)
OPTIMIZERS = {
    "SGD foreach": (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True), 6),
    "SGD fused": (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True), 6),
    "TLR default, every unit closes (3 steps)": (_tlr(1), 6),
    "TLR default, 6-step windows": (_tlr(2), 6),
    "TLR default, 48-step windows": (_tlr(16), 48),
}


def closing_intervals(epochs: int = 5) -> list[tuple[str, float, int, float]]:
    """Steps per closing of TLR at its defaults (window "auto", the blow-up guard) in the
    training runs of bench/experiments.py (digits MLP at batch 16 and 128, the character
    transformer, wine): how long the windows of a real run are."""
    from bench import experiments as ex

    runs = [("digits", 0.01, 16), ("digits", 0.01, 128), ("charlm", 0.1, 32), ("wine", 0.1, 16)]
    out = []
    for name, lr, batch in runs:
        task = ex.TASKS[name]()
        model = task.model(0)
        opt = TLR(model.parameters(), lr=lr, momentum=ex.MOMENTUM, weight_decay=ex.WEIGHT_DECAY)
        state, steps, closings = opt.param_groups[0]["window_state"], 0, 0
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for xb, yb in task.batches(batch, gen):
                opt.zero_grad(set_to_none=True)
                task.loss(model, xb, yb).backward()
                opt.step()
                steps += 1
                closings += steps % 3 == 0 and int(state[0]) == 0  # a unit ended and its window closed
        if not closings:
            raise RuntimeError(f"no window closed in {steps} steps of {name}")
        out.append((f"{name} (MLP)" if name != "charlm" else "charlm (transformer)", lr, batch, steps / closings))
    return out


def _busy(threads: int) -> None:  # a load process: matrix products on every core, until killed
    torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a)


# Twice the development machine's last-level cache (32 MiB).
_EVICT_BYTES = 64 << 20


def measure(layout: str, rounds: int, budget_s: float, cold: bool = False) -> dict[str, float]:
    """Median ms per step of every optimizer, the optimizers taking turns round by round.

    An optimizer whose round takes longer than ``budget_s`` is not timed again (under
    load, torch's fused CPU kernel can take seconds per step). ``cold``: before every step
    (outside the timed part) a buffer of twice the last-level cache is written, as a
    training step's forward and backward passes evict the optimizer's tensors; else a
    round's steps run back to back and find each other's data in the caches."""
    evict = torch.zeros(_EVICT_BYTES // 4) if cold else None
    g = torch.Generator().manual_seed(0)
    shapes = LAYOUTS[layout]()
    runs = {}
    for name, (build, steps) in OPTIMIZERS.items():
        params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt = build(params)
        for _ in range(steps):  # warm-up: state allocated, first windows closed
            opt.step()
        runs[name] = (opt, steps, [])
    for _ in range(rounds):
        for name, (opt, steps, times) in runs.items():
            if times and times[-1] * steps / 1e3 > budget_s:
                continue
            if cold:
                spent = 0.0
                for _ in range(steps):
                    evict.add_(1.0)
                    start = time.perf_counter()
                    opt.step()
                    spent += time.perf_counter() - start
            else:
                start = time.perf_counter()
                for _ in range(steps):
                    opt.step()
                spent = time.perf_counter() - start
            times.append(spent / steps * 1e3)
    return {name: statistics.median(times) for name, (_, _, times) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=list(LAYOUTS), action="append")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per layout (default: 5 for the large ones, 30 else)")
    parser.add_argument("--load", type=int, default=0, help="busy processes sharing the cores while timing")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds after which an optimizer's rounds stop")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    parser.add_argument("--windows", action="store_true", help="only print how often real default runs close a window")
    parser.add_argument("--cold", action="store_true", help="evict the caches before every step (as a forward and "
                        "backward pass does), outside the timed part")
    args = parser.parse_args()
    if args.windows:
        print(f"Steps per window closing of TLR at its defaults, 5 epochs, seed 0, {date.today()} "
              "(`python bench/step_cost.py --windows`)\n\n| task | α0 | batch | steps per closing |\n|---|---:|---:|---:|")
        for name, lr, batch, interval in closing_intervals():
            print(f"| {name} | {lr:g} | {batch} | {interval:.1f} |", flush=True)
        return

    load = [multiprocessing.get_context("spawn").Process(target=_busy, args=(torch.get_num_threads(),), daemon=True)
            for _ in range(args.load)]
    for proc in load:
        proc.start()
    try:
        if load:
            time.sleep(2.0)  # the load is running before the first round
        lines = [
            f"Step cost, {date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"CPU, {args.load} busy processes (`python bench/step_cost.py{f' --load {args.load}' if args.load else ''}"
            f"{' --cold' if args.cold else ''}`)",
            "median ms per step over interleaved rounds; ratio to SGD foreach of the same rounds"
            + ("; caches evicted before every step (outside the timing)" if args.cold else ""),
            "",
            "| layout | " + " | ".join(OPTIMIZERS) + " |",
            "|---|" + "---:|" * len(OPTIMIZERS),
        ]
        print("\n".join(lines), flush=True)
        for layout in args.layout or list(LAYOUTS):
            rounds = args.rounds or (5 if layout in ("1x10M", "1000x10k") else 30)
            ms = measure(layout, rounds, args.budget, args.cold)
            base = ms["SGD foreach"]
            cells = [f"{ms[n]:.3g} ms" if n == "SGD foreach" else f"{ms[n]:.3g} ms ({ms[n] / base:.2f}×)" for n in OPTIMIZERS]
            lines.append(f"| {layout} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    finally:
        for proc in load:
            proc.kill()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
