"""Host cost of one step: the Python and dispatch work around the kernels, with the kernels mocked.

    python bench/host_cost.py                # all layouts
    python bench/host_cost.py --layout gpt2  # one

On a GPU the step of an optimizer is launched asynchronously, so what the host spends per
``step()`` is a floor under the step time that no kernel can remove (and, with small or
many tensors, often the step time itself). This measures it on any machine: the tensors
live on the CPU and every kernel is replaced by a no-op, so only the host work remains —

- TLR's Triton path (``backend="triton"``, default configuration: momentum 0.9, weight
  decay, the adaptive window): its launches (three) are no-ops; "launcher" is the part spent
  in ``tlr_triton_step`` (tables, memo, launch arguments), "memo miss" a step whose
  address tables must be rebuilt (every gradient's address changed: the group's buffers,
  keyed on its state and layout, stay), "memo cleared" one after the step plan and every
  table were dropped (as after a state load: the group's partial sums are allocated again too).
  An ordinary step finds every weight and gradient as at the last one (one native pass,
  ``kernels.cpu.same_layout``) and repeats its launches;
- ``torch.optim.SGD(momentum=0.9, fused=True)``: ``torch._fused_sgd_`` is a no-op;
- ``torch.optim.SGD(momentum=0.9, foreach=True)``: its ``torch._foreach_*`` ops are no-ops;
- ``TLRAdamW(backend="triton")`` (ordinary steps: one launch per bucket) against
  ``torch.optim.AdamW(fused=True)``, whose ``torch._fused_adamw_`` is a no-op.

Layouts: one tensor of 10M elements, GPT-2 small's 148 tensors (124M parameters), 2000
tensors of 16k. Median of 15 rounds, µs per step, the optimizers taking turns round by round;
ratios to SGD fused measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # backend="triton" on CPU tensors; no kernel runs here

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
from tlr_triton import TLR, TLRAdamW  # noqa: E402


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes, in its module order (148 tensors)."""
    d, blocks = 768, []
    for _ in range(12):
        blocks += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(50257, d), (1024, d)] + blocks + [(d,), (d,)]


LAYOUTS = {"1x10M": lambda: [(10_000_000,)], "gpt2": gpt2_small, "2000x16k": lambda: [(16_384,)] * 2000}


class _NoLaunch:
    """Stands for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextmanager
def mocked_kernels():
    from tlr_triton.kernels import adamw_step, launch, tlr_step

    names = ("tlr_step_kernel", "tlr_window_kernel", "tlr_alpha_kernel", "tlr_move_kernel")
    adamw_names = ("adamw_step_kernel", "adamw_alpha_kernel", "adamw_move_kernel")
    foreach = ("_foreach_add", "_foreach_add_", "_foreach_mul_", "_foreach_mul", "_foreach_addcmul_", "_foreach_neg")

    def identity(tensors, *args, **kwargs):
        return list(tensors)

    spent = [0.0]
    real_step = launch.tlr_triton_step

    def timed_step(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_step(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    with mock.patch.multiple(tlr_step, **{n: _NoLaunch() for n in names}), \
            mock.patch.multiple(adamw_step, **{n: _NoLaunch() for n in adamw_names}), \
            mock.patch.object(launch, "tlr_triton_step", timed_step), \
            mock.patch.object(torch, "_fused_sgd_", lambda *a, **k: None), \
            mock.patch.object(torch, "_fused_adamw_", lambda *a, **k: None), \
            mock.patch.multiple(torch, **{n: identity for n in foreach}):
        yield spent


def params_for(shapes):
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in ps:
        p.grad = torch.zeros_like(p)
    return ps


def _moved_gradients(params):
    """Before a step, what "every weight and gradient moved" costs the host: each gradient is
    swapped for one at another address (two sets, taking turns) and the launcher's address
    tables are dropped (the group tables, keyed on its state and layout, stay). The native pass
    then sees the change, and the step takes the full checks and rebuilds its tables."""
    from tlr_triton.kernels import launch

    other = [torch.zeros_like(p) for p in params]

    def move():
        for i, p in enumerate(params):
            p.grad, other[i] = other[i], p.grad
        for key in [k for k in launch.tables.entries if k[0] != "group"]:
            del launch.tables.entries[key]
    return move


def _state_loaded(opt):
    """Before a step, what a state load leaves: no step plan, no table (the group's partial sums
    are allocated again too)."""
    from tlr_triton.kernels import launch

    def clear():
        opt._plans.clear()
        launch.tables.entries.clear()
    return clear


def _round(step, steps: int, before=None) -> float:
    """µs per call of ``step`` over ``steps`` calls (``before`` runs ahead of each, untimed)."""
    total = 0.0
    for _ in range(steps):
        if before is not None:
            before()
        t = time.perf_counter()
        step()
        total += time.perf_counter() - t
    return total / steps * 1e6


def measure(layout: str, rounds: int = 15) -> dict[str, float]:
    """Median µs per step of each optimizer over ``rounds`` rounds, the optimizers taking turns
    round by round, so that a drift of the machine (other tenants, frequency) hits them alike."""
    from tlr_triton.kernels import launch

    shapes = LAYOUTS[layout]()
    steps = 48 if len(shapes) < 500 else 12
    with mocked_kernels() as spent:
        sgd_fused = torch.optim.SGD(params_for(shapes), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
        sgd_foreach = torch.optim.SGD(params_for(shapes), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
        tlr_params = params_for(shapes)
        tlr = TLR(tlr_params, lr=0.01, momentum=0.9, weight_decay=5e-4, backend="triton")
        adamw_fused = torch.optim.AdamW(params_for(shapes), lr=1e-3, fused=True)
        tlr_adamw = TLRAdamW(params_for(shapes), lr=1e-3, window=100, backend="triton")  # ordinary steps
        runs = {  # name → (step, steps per round, work before each step)
            "SGD fused": (sgd_fused.step, steps, None),
            "SGD foreach": (sgd_foreach.step, steps, None),
            "TLR step()": (tlr.step, steps, None),
            "TLR, memo miss": (tlr.step, max(2, steps // 4), _moved_gradients(tlr_params)),
            "TLR, memo cleared": (tlr.step, max(2, steps // 4), _state_loaded(tlr)),
            "AdamW fused": (adamw_fused.step, steps, None),
            "TLRAdamW step()": (tlr_adamw.step, steps, None),
        }
        for step, _, _ in runs.values():
            step()
            step()  # state created, tables built
        times = {name: [] for name in runs}
        launcher = []
        for _ in range(rounds):
            for name, (step, n, before) in runs.items():
                spent[0] = 0.0
                times[name].append(_round(step, n, before))
                if name == "TLR step()":
                    launcher.append(spent[0] / n * 1e6)
    out = {name: statistics.median(values) for name, values in times.items()}
    out["of it the launcher"] = statistics.median(launcher)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=list(LAYOUTS), nargs="+", default=list(LAYOUTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"Host cost per step, µs (kernels mocked), {date.today()}, {platform.machine()}, torch {torch.__version__}")
    cols = ["TLR step()", "of it the launcher", "TLR, memo miss", "TLR, memo cleared", "SGD fused", "SGD foreach",
            "TLRAdamW step()", "AdamW fused"]
    print("| layout | " + " | ".join(cols) + " | TLR / SGD fused | miss / hit | TLRAdamW / AdamW fused |")
    print("|---|" + "---:|" * (len(cols) + 3))
    for layout in args.layout:
        r = measure(layout)
        print(f"| {layout} | " + " | ".join(f"{r[c]:.0f}" for c in cols)
              + f" | {r['TLR step()'] / r['SGD fused']:.2f}x | {r['TLR, memo miss'] / r['TLR step()']:.2f}x"
              + f" | {r['TLRAdamW step()'] / r['AdamW fused']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
