"""Launch-shape sweep of the Triton path's closing and unit-end launches (one GPU, ~3 minutes).

    python bench/gpu_sweep.py [--host]

The first H200 run of bench/gpu_check.py (2026-12-04) found ordinary steps at fused SGD's
speed but a closing step 6.6x (not the 2.2x its bytes say) and every unit end of the
default's window ~3 ms on a 256M tensor. Two suspects, both launch shapes and not bytes:
the move kernel's persistent grid (``launch._PROGRAMS_PER_SM`` programs per SM, each
walking its blocks one dependent round trip after another) and the one program of the
window and α kernels that sums every block's partials (``launch.RBLOCK`` lanes,
``launch.R_WARPS`` warps; 262k partials on a 256M tensor). This sweeps both and prints
ms/step against fused SGD for each; then a host profile of 2000 x 16k (host-bound there).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from gpu_check import MOMENTUM, WEIGHT_DECAY, gpt2_small_shapes, held, time_ms, window_bytes  # noqa: E402
from tlr_triton.kernels import launch  # noqa: E402
from tlr_triton import TLR  # noqa: E402

# (move programs per SM, RBLOCK, R_WARPS); 10**6 programs per SM is one program per block
SETTINGS = [(4, 2048, 16)]


def configs():
    yield "window 100", 100, lambda ps: TLR(ps, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=100, backend="triton")
    yield "window 1", 20, lambda ps: TLR(ps, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=1, backend="triton")
    for units in (1, 2, 16):
        yield (f"auto {3 * units} steps", 48,
               lambda ps, u=units: held(TLR(ps, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend="triton"), u))


def sweep(device):
    layouts = {"1 x 256M": [(2**28,)], "GPT-2 small": gpt2_small_shapes()}
    print("| layout | programs/SM, RBLOCK, R_WARPS | " + " | ".join(name for name, _, _ in configs()) + " |")
    print("|---|---|" + "---:|" * len(list(configs())))
    for layout, shapes in layouts.items():
        params = [torch.randn(s, device=device).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        fused = torch.optim.SGD(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
        fused_ms = time_ms(fused.step, 20)
        del fused
        print(f"| {layout} | SGD fused: {fused_ms:.3f} ms | " + " | ".join(
            f"bytes {window_bytes(s, s if name.startswith('window') else 3) / 20:.2f}x"
            for name, s in (("window 100", 100), ("window 1", 1), ("auto", 3), ("auto", 6), ("auto", 48))) + " |")
        for per_sm, rblock, rwarps in SETTINGS:
            launch._PROGRAMS_PER_SM, launch.RBLOCK, launch.R_WARPS = per_sm, rblock, rwarps
            cells = []
            for name, iters, build in configs():
                opt = build(params)
                ms = time_ms(opt.step, iters)
                cells.append(f"{ms:.3f} ({ms / fused_ms:.2f}x)")
                del opt
            print(f"| {layout} | {per_sm}, {rblock}, {rwarps} | " + " | ".join(cells) + " |", flush=True)
        del params
        torch.cuda.empty_cache()
    launch._PROGRAMS_PER_SM, launch.RBLOCK, launch.R_WARPS = SETTINGS[0]


def kernel_profile(device):
    """Per-kernel GPU time (torch.profiler) of 1 x 256M, every step closing, at two settings."""
    params = [torch.randn(2**28, device=device).requires_grad_()]
    params[0].grad = torch.randn_like(params[0]) * 1e-3
    for setting in SETTINGS[:1]:
        launch._PROGRAMS_PER_SM, launch.RBLOCK, launch.R_WARPS = setting
        for name, build in (("window 1", lambda ps: TLR(ps, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                                          window=1, backend="triton")),
                            ("auto 48 steps", lambda ps: held(TLR(ps, lr=1e-3, momentum=MOMENTUM,
                                                                  weight_decay=WEIGHT_DECAY, backend="triton"), 16))):
            opt = build(params)
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(48):
                    opt.step()
                torch.cuda.synchronize()
            print(f"\n## kernels, 1 x 256M, {name}, setting {setting}, 48 steps")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))
            del opt
    launch._PROGRAMS_PER_SM, launch.RBLOCK, launch.R_WARPS = SETTINGS[0]


def host_profile(device):
    """cProfile of 50 steps on 2000 x 16k (host-bound on a GPU): fused SGD, TLR window 1, TLR's default."""
    params = [torch.randn(16384, device=device).requires_grad_() for _ in range(2000)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for name, opt in (("SGD fused", torch.optim.SGD(params, lr=1e-3, momentum=MOMENTUM, fused=True)),
                      ("TLR window 1", TLR(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=1,
                                          backend="triton")),
                      ("TLR default", TLR(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend="triton"))):
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            opt.step()
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print(f"\n## {name}: {time_ms(opt.step, 20):.3f} ms/step\n" + out.getvalue()[-3500:])


if __name__ == "__main__":
    dev = torch.device("cuda")
    sweep(dev)
    kernel_profile(dev)
    if "--host" in sys.argv:
        host_profile(dev)
