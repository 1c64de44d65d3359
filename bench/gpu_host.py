"""Host time per step() on a GPU: what the CPU spends to issue one step, launches included.

    python bench/gpu_host.py

bench/host_cost.py measures the Python work with every kernel mocked, on any machine; this
measures the real thing on a CUDA machine: the wall time of ``step()`` calls issued back to
back right after a synchronisation, so that the launches queue on the GPU and none waits
(10 steps per round, far below the launch queue's depth), median of 15 rounds, the
optimizers taking turns round by round. Momentum 0.9 and weight decay; TLR at its defaults
on the Triton path.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from gpu_check import gpt2_small_shapes  # noqa: E402
from tlr_triton import TLR  # noqa: E402

LAYOUTS = {"1 x 10M": [(10_000_000,)], "GPT-2 small (148 tensors)": gpt2_small_shapes(), "2000 x 16k": [(16384,)] * 2000}


def main() -> None:
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | host µs per step() (median of 15 rounds of 10)\n")
    print("| layout | SGD fused | SGD foreach | TLR default | TLR / SGD fused |")
    print("|---|---:|---:|---:|---:|")
    for layout, shapes in LAYOUTS.items():
        params = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opts = {
            "SGD fused": torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True),
            "SGD foreach": torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, foreach=True),
            "TLR default": TLR(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, backend="triton"),
        }
        for opt in opts.values():
            for _ in range(5):
                opt.step()
        times = {name: [] for name in opts}
        for _ in range(15):
            for name, opt in opts.items():
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(10):
                    opt.step()
                times[name].append((time.perf_counter() - t) / 10 * 1e6)
        torch.cuda.synchronize()
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"| {layout} | {med['SGD fused']:.0f} | {med['SGD foreach']:.0f} | {med['TLR default']:.0f} | "
              f"{med['TLR default'] / med['SGD fused']:.2f}x |", flush=True)
        del params, opts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
