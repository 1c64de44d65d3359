"""Every GPU check of the Triton path in one run (a few minutes on one H200).

    python bench/gpu_check.py            # on a CUDA machine: checks, then the speed table
    python bench/gpu_check.py --dry      # anywhere: the correctness checks through Triton's
                                         # interpreter on the CPU, small sizes (keeps this script honest)

Run it from a checkout whose package is installed (``pip install -e .``, as scripts/setup.sh
does): ``kernels/`` becomes ``tlr_triton.kernels`` only through the install.

1. Correctness against the float64 reference (fp32 and bf16 weights; several settings).
2. No host synchronisation: ``torch.cuda.set_sync_debug_mode("error")`` around step(), on
   the Triton and the PyTorch path, fixed and adaptive windows (a gradient jump trips the
   blow-up guard).
3. CUDA-graph capture of step() (closing steps, and the guard's early close, included)
   replayed against eager steps, window 2 and the default.
4. Training: an MLP on scikit-learn's digits at the defaults, the Triton path beside the
   PyTorch path on the same batches (600 steps; 60 in --dry): both train, α side by side.
   A checkpoint saved on the GPU resumes on the CPU and back, against the uninterrupted run.
5. Speed against torch.optim.SGD(fused=True) and (foreach=True), same momentum and
   weight decay: one tensor of 256M elements, 2000 tensors of 16k, GPT-2-small's
   parameter list (124M); fixed windows of 1 and 100 steps, and the default with its
   adaptive window held at 3, 6 and 48 steps; ms/step, ratio to fused SGD, GB/s and % of
   the measured device-to-device copy bandwidth. Bytes per parameter come from the
   kernels (docs/triton.md, "Memory traffic").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after site-packages: see tests/conftest.py
from step_cost import held  # noqa: E402  (the default's window held at k units, as in the CPU step-cost bench)
from tlr_triton import TLR, TLRAdamW  # noqa: E402
from tlr_triton.reference import ReferenceTLR, ReferenceTLRAdamW  # noqa: E402

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def lockstep(device, sizes, dtype, seed, build, build_reference, steps=8):
    """An optimizer on ``device`` and its float64 reference on the CPU, from the same weights, after
    ``steps`` steps on the same gradients: (optimizer, reference, its weights, the reference's)."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    ps = [t.clone().to(device).requires_grad_() for t in init]
    qs = [t.clone().requires_grad_() for t in init]
    opt, ref = build(ps), build_reference(qs)
    for _ in range(steps):
        for p, q in zip(ps, qs):
            grad = torch.randn(q.shape, generator=g).to(dtype)
            p.grad, q.grad = grad.to(device), grad.clone()
        opt.step()
        ref.step()
    return opt, ref, ps, qs


def check_reference(device, sizes):
    """TLR(backend="triton") against ReferenceTLR for 8 steps, every α compared."""
    worst = 0.0
    configs = [
        dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=2),
        dict(momentum=MOMENTUM, statistic="direction", scope="tensor", window=3),
        dict(momentum=0.0, window=1, maximize=True),
        dict(momentum=MOMENTUM, nesterov=True, window=2),
        dict(momentum=MOMENTUM, window=1, max_window=4, window_reset=0.02),  # adaptive window, decided on the device
    ]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for cfg in configs:
            opt, ref, ps, qs = lockstep(device, sizes, dtype, 0, lambda ps: TLR(ps, lr=0.05, backend="triton", **cfg),
                                        lambda qs: ReferenceTLR(qs, lr=0.05, **cfg))
            for p, q in zip(ps, qs):
                if p.numel() == 0:
                    continue
                err = ((p.detach().cpu().double() - q.detach().double()).abs() / (q.detach().double().abs() + 1)).max().item()
                worst = max(worst, err / tol)
                assert err <= tol, (dtype, cfg, err)
            alpha = float(opt.param_groups[0]["alpha"]) if cfg.get("scope") != "tensor" else float(opt.state[ps[0]]["alpha"])
            ralpha = ref.param_groups[0]["alpha"] if cfg.get("scope") != "tensor" else ref.state[qs[0]]["alpha"]
            assert abs(alpha - ralpha) <= 1e-5 * ralpha, (dtype, cfg, alpha, ralpha)
    print(f"reference: OK ({len(configs)} settings x fp32/bf16, 8 steps; worst error {worst:.2f} of tolerance)")


def check_adamw(device, sizes):
    """TLRAdamW(backend="triton") against ReferenceTLRAdamW for 8 steps (closings included), every α
    compared; on a GPU also its steps under set_sync_debug_mode('error')."""
    configs = [dict(window=2), dict(window=3, scope="tensor", amsgrad=True, maximize=True)]
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
        for cfg in configs:
            opt, ref, ps, qs = lockstep(device, sizes, dtype, 1,
                                        lambda ps: TLRAdamW(ps, lr=1e-2, backend="triton", **cfg),
                                        lambda qs: ReferenceTLRAdamW(qs, lr=1e-2, **cfg))
            for p, q in zip(ps, qs):
                if p.numel():
                    err = ((p.detach().cpu().double() - q.detach().double()).abs() / (q.detach().double().abs() + 1)).max()
                    assert float(err) <= tol, (dtype, cfg, float(err))
                    if cfg.get("scope") == "tensor":
                        alpha, ralpha = float(opt.state[p]["alpha"]), ref.state[q]["alpha"]
                    else:
                        alpha, ralpha = float(opt.param_groups[0]["alpha"]), ref.param_groups[0]["alpha"]
                    assert abs(alpha - ralpha) <= 1e-5 * ralpha, (dtype, cfg, alpha, ralpha)
    if device.type == "cuda":
        params = [torch.randn(1000, device=device, requires_grad=True) for _ in range(3)]
        opt = TLRAdamW(params, lr=torch.tensor(1e-3), window=2, backend="triton")  # a CPU tensor lr: no sync either
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.step()
        # and the default: the PyTorch path with the adaptive window, decided on the device
        default = TLRAdamW([torch.randn(1000, device=device, requires_grad=True) for _ in range(3)], lr=1e-3)
        for p in default.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        default.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(10):
                opt.step()
            for _ in range(30):  # unit ends and closings included
                default.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"TLRAdamW Triton path: OK ({len(configs)} settings x fp32/bf16 against the float64 reference, 8 steps"
          + ("; no host sync in 10 steps, nor in 30 of the default (PyTorch path, adaptive window))"
             if device.type == "cuda" else ")"))


def adamw_speed(device):
    """TLRAdamW's Triton path against torch's fused AdamW, ms per step (ordinary steps: window 100;
    a closing every 3 steps), GPT-2 small's shapes; bytes per parameter: 28 fused, 36 TLRAdamW
    ordinary, 56 closing."""
    params = [torch.randn(s, device=device).requires_grad_() for s in gpt2_small_shapes()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    base = time_ms(fused.step, 20)
    print(f"\n| GPT-2 small | AdamW fused | {base:.3f} ms | 1.00x |")
    for window in (100, 3):
        opt = TLRAdamW(params, lr=1e-4, window=window, backend="triton")
        ms = time_ms(opt.step, 99 if window == 3 else 100)
        print(f"| GPT-2 small | TLRAdamW window {window} | {ms:.3f} ms | {ms / base:.2f}x |", flush=True)
        del opt
    del params, fused
    torch.cuda.empty_cache()


def check_no_sync(device):
    """Both paths, fixed and adaptive windows (with a gradient jump that trips the blow-up guard)."""
    for backend in ("triton", "torch"):
        for window in (dict(window=2), dict(), dict(lr=torch.tensor(0.01))):  # a CPU tensor lr too
            params = [torch.randn(1000, device=device, requires_grad=True) for _ in range(3)]
            opt = TLR(params, momentum=MOMENTUM, backend=backend, **window)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()  # tables and state built (host → device copies) outside the checked region
            opt.step()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for t in range(30):
                    for p in params:
                        p.grad.normal_().mul_(100.0 if t >= 20 else 1.0)
                    opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    print("no host sync: OK (Triton and PyTorch paths, window 2 and auto, a CPU tensor lr; 30 steps under "
          "set_sync_debug_mode('error'))")


def check_cuda_graph(device, **window):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    params = list(model.parameters())
    opt = TLR(params, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend="triton", **window)
    eager = TLR(twin, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend="triton", **window)
    grads = [[torch.randn_like(p) * (30.0 if i >= 15 else 1.0) for p in params] for i in range(27)]
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()  # static gradients: the graph reads these addresses
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):  # warm-up: state, tables, counters
            for p, g in zip(params, grads[i]):
                p.grad.copy_(g)
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(3):
        for p, g in zip(twin, grads[i]):
            p.grad = g.clone()
        eager.step()
    for i in range(3, 27):  # replays: several close a window (and the jump at 15 trips the guard of "auto")
        for p, g in zip(params, grads[i]):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(twin, grads[i]):
            p.grad = g.clone()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    assert torch.equal(opt.param_groups[0]["alpha"], eager.param_groups[0]["alpha"])
    assert torch.equal(opt.param_groups[0]["window_state"], eager.param_groups[0]["window_state"])
    assert int(opt.param_groups[0]["step"]) == int(eager.param_groups[0]["step"]) == 27
    print(f"CUDA graph {window or 'window auto'}: OK (captured once, replayed 24 times = eager, bitwise; "
          f"α {float(eager.param_groups[0]['alpha']):.5f})")


def check_checkpoint(device):
    """A checkpoint crosses devices: saved on ``device`` (the Triton path on CUDA) and resumed on the
    CPU (PyTorch path), and back, each against the run that never stopped, 20 steps on."""
    import io

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (10, 64)]
    init = [torch.randn(s) for s in shapes]
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(s, generator=g) * (1 + i % 7) for s in shapes] for i in range(40)]

    def steps(params, opt, first, last):
        for i in range(first, last):
            for p, grad in zip(params, grads[i]):
                p.grad = grad.to(p.device)
            opt.step()

    worst = 0.0
    for src, dst in ((device, cpu), (cpu, device)):
        ps = [t.clone().to(src).requires_grad_() for t in init]
        opt = TLR(ps, lr=0.05, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)  # auto: Triton on CUDA, PyTorch on CPU
        steps(ps, opt, 0, 20)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        qs = [p.detach().to(dst).clone().requires_grad_() for p in ps]
        resumed = TLR(qs, lr=0.05, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        resumed.load_state_dict(torch.load(buf, map_location=dst))
        steps(ps, opt, 20, 40)
        steps(qs, resumed, 20, 40)
        for p, q in zip(ps, qs):
            err = ((p.detach().cpu() - q.detach().cpu()).abs() / (p.detach().cpu().abs() + 1)).max().item()
            worst = max(worst, err)
            assert err < 1e-4, (src, dst, err)
        a, b = opt.param_groups[0], resumed.param_groups[0]
        assert torch.equal(a["window_state"].cpu(), b["window_state"].cpu()), (a["window_state"], b["window_state"])
        assert int(a["step"]) == int(b["step"]) == 40
        assert abs(float(a["alpha"]) - float(b["alpha"])) <= 1e-4 * float(a["alpha"]), (float(a["alpha"]), float(b["alpha"]))
    print(f"checkpoint across devices: OK ({device} -> cpu and back, 20 steps resumed against 20 uninterrupted; "
          f"largest weight gap {worst:.1e})")


def check_training(device, steps):
    """An MLP trained on scikit-learn's digits at TLR's defaults (adaptive window, blow-up guard),
    once with the Triton path and once with the PyTorch path on the same device and batches:
    both must train, and their α trajectories are reported side by side (float32 sums in
    different orders: the paths agree closely, not bitwise)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-6), dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)
    runs = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(device)
        opt = TLR(model.parameters(), lr=0.05, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=backend)
        g = torch.Generator().manual_seed(1)
        losses, alphas = [], []
        for _ in range(steps):
            idx = torch.randint(0, len(y), (32,), generator=g).to(device)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            alphas.append(opt.param_groups[0]["alpha"].detach().clone())
        full = torch.nn.functional.cross_entropy(model(x), y).item()
        runs[backend] = (full, torch.stack(alphas).double().cpu(), torch.stack(losses).cpu())
    (tf, ta, tl_), (pf, pa, pl) = runs["triton"], runs["torch"]
    gap = ((ta - pa).abs() / pa.abs()).max().item()
    changes = int((ta[1:] != ta[:-1]).sum())
    assert tf < 0.5 and pf < 0.5, (tf, pf)
    print(f"training (digits MLP, defaults, {steps} steps): full-data loss Triton {tf:.4f} / PyTorch {pf:.4f}; "
          f"final α {ta[-1].item():.5f} / {pa[-1].item():.5f}; α changed {changes} times; "
          f"largest relative α gap along the run {gap:.1e}")


def bandwidth(device):
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), 20)
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s: read + write


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return sorted(samples)[len(samples) // 2]


def gpt2_small_shapes():
    d, v, n, layers = 768, 50257, 1024, 12
    shapes = [(v, d), (n, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


# fp32 bytes per parameter and step with momentum, from the kernels (docs/triton.md, "Memory
# traffic"): fused SGD; TLR's ordinary step, a unit end the blow-up guard watches, a closing.
BYTES = {"sgd": 20, "ordinary": 20, "unit end": 28, "closing": 44}


def window_bytes(steps: int, unit: int = 3) -> float:
    """Average bytes per parameter and step over one window of ``steps`` steps whose units
    of ``unit`` steps each end with the guard's reads (the last one is the closing)."""
    units = steps // unit
    return (BYTES["ordinary"] * (steps - units) + BYTES["unit end"] * (units - 1) + BYTES["closing"]) / steps


def speed_table(device):
    peak = bandwidth(device)
    print(f"\ndevice-to-device copy: {peak:.0f} GB/s\n")
    print("| layout | optimizer | window | ms/step | / SGD fused | GB/s | % of copy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    layouts = {"1 x 256M": [(2**28,)], "2000 x 16k": [(16384,)] * 2000, "GPT-2 small (124M)": gpt2_small_shapes()}
    for layout, shapes in layouts.items():
        params = [torch.randn(s, device=device).requires_grad_() for s in shapes]
        n = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        rows = []
        fused = torch.optim.SGD(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
        fused_ms = time_ms(fused.step, 20)
        rows.append(("SGD fused", "", fused_ms, BYTES["sgd"]))
        foreach = torch.optim.SGD(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
        rows.append(("SGD foreach", "", time_ms(foreach.step, 20), BYTES["sgd"]))
        for statistic in ("gradient", "direction"):
            for window in (1, 100):  # fixed windows: every step closes, or almost none
                opt = TLR(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=window,
                          statistic=statistic, backend="triton")
                ms = time_ms(opt.step, 100 if window == 100 else 20)  # whole windows: amortized
                rows.append((f"TLR {statistic}", window, ms, window_bytes(window, window)))
                del opt
        # the default, its adaptive window held at 3, 6 and 48 steps (real runs close every
        # 3.8-7.7 steps: bench/results/window_closings.md), every unit end watched by the guard
        for units in (1, 2, 16):
            opt = held(TLR(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend="triton"), units)
            ms = time_ms(opt.step, 96)
            rows.append(("TLR default", f"auto, {3 * units} steps", ms, window_bytes(3 * units)))
            del opt
        for name, window, ms, per in rows:
            gbs = per * n / ms / 1e6
            print(f"| {layout} | {name} | {window} | {ms:.3f} | {ms / fused_ms:.2f}x | {gbs:.0f} | {100 * gbs / peak:.0f}% |", flush=True)
        del params, fused, foreach
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, Triton's interpreter, correctness only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.dry or not torch.cuda.is_available():
        if not args.dry:
            sys.exit("no CUDA device: run with --dry for the interpreter checks")
        check_reference(torch.device("cpu"), [(3, 5), (), (1025,), (0,), (7,)])
        check_adamw(torch.device("cpu"), [(3, 5), (), (1025,), (0,)])
        check_training(torch.device("cpu"), 60)
        check_checkpoint(torch.device("cpu"))
        print(f"dry run (interpreter, CPU): the GPU-only checks (sync, graph, speed) were skipped; {time.perf_counter() - t0:.0f} s")
        return
    import triton

    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    check_reference(device, [(3, 5), (), (1025,), (0,), (65537,), (300, 70)])
    check_no_sync(device)
    check_cuda_graph(device, window=2)
    check_cuda_graph(device)
    check_training(device, 600)
    check_checkpoint(device)
    check_adamw(device, [(3, 5), (), (1025,), (0,), (65537,)])
    speed_table(device)
    adamw_speed(device)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
