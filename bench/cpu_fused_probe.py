"""Probe: what a fused C++ CPU step would cost (issue 10, item 4: a decision, not a feature).

    python bench/cpu_fused_probe.py      # compiles a small C++ extension (g++, ~1 min), then times

TLR's default on the CPU runs torch's fused SGD kernel plus two foreach adds per step (A += g,
A += λ·w) and, at unit ends and closings, several passes for ⟨A, P⟩, ‖A‖², Σ‖w‖², Σ⟨A, w⟩.
torch's ops cannot fuse these; a C++ loop can. This times two such loops against
``SGD(foreach=True)`` and TLR's default (window held at 6 steps) on bench/step_cost.py's
layouts: an ordinary step in one pass (u = g + λw, b = μb + u, A += u, w -= α·b: 28 bytes
per parameter against SGD foreach's 36), and a closing's reductions in one pass over A, P, w
(fp64 accumulators). Not used by the library.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.step_cost import LAYOUTS, held  # noqa: E402
from tlr_triton import TLR  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

void ordinary(std::vector<at::Tensor> w, std::vector<at::Tensor> g, std::vector<at::Tensor> b,
              std::vector<at::Tensor> a, double alpha, double mu, double lam) {
  for (size_t t = 0; t < w.size(); ++t) {
    float* W = w[t].data_ptr<float>(); const float* G = g[t].data_ptr<float>();
    float* B = b[t].data_ptr<float>(); float* A = a[t].data_ptr<float>();
    const float fa = alpha, fm = mu, fl = lam;
    at::parallel_for(0, w[t].numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float u = G[i] + fl * W[i];
        float bi = fm * B[i] + u;
        B[i] = bi; A[i] += u; W[i] -= fa * bi;
      }
    });
  }
}

std::vector<double> reductions(std::vector<at::Tensor> a, std::vector<at::Tensor> p, std::vector<at::Tensor> w) {
  double dot = 0, sq = 0, ww = 0, aw = 0;
  for (size_t t = 0; t < a.size(); ++t) {
    const float* A = a[t].data_ptr<float>(); const float* P = p[t].data_ptr<float>(); const float* W = w[t].data_ptr<float>();
    int64_t n = a[t].numel(), chunk = 16384, chunks = (n + chunk - 1) / chunk;
    std::vector<double> part(4 * chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        // four independent chains per sum (no reassociation needed to keep the FPU busy)
        double d[4] = {0, 0, 0, 0}, s[4] = {0, 0, 0, 0}, x[4] = {0, 0, 0, 0}, y[4] = {0, 0, 0, 0};
        const int64_t lo = c * chunk, hi = std::min(n, (c + 1) * chunk);
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) {
          for (int k = 0; k < 4; ++k) {
            double av = A[i + k], pv = P[i + k], wv = W[i + k];
            d[k] += av * pv; s[k] += av * av; x[k] += wv * wv; y[k] += av * wv;
          }
        }
        for (; i < hi; ++i) {
          double av = A[i], pv = P[i], wv = W[i];
          d[0] += av * pv; s[0] += av * av; x[0] += wv * wv; y[0] += av * wv;
        }
        double dd = (d[0] + d[1]) + (d[2] + d[3]), ss = (s[0] + s[1]) + (s[2] + s[3]);
        double xx = (x[0] + x[1]) + (x[2] + x[3]), yy = (y[0] + y[1]) + (y[2] + y[3]);
        part[4 * c] = dd; part[4 * c + 1] = ss; part[4 * c + 2] = xx; part[4 * c + 3] = yy;
      }
    });
    for (int64_t c = 0; c < chunks; ++c) { dot += part[4*c]; sq += part[4*c+1]; ww += part[4*c+2]; aw += part[4*c+3]; }
  }
  return {dot, sq, ww, aw};
}
"""


def timed(fn, steps=30, rounds=9):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        samples.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(samples)


def main() -> None:
    ext = load_inline("tlr_cpu_probe", SOURCE, functions=["ordinary", "reductions"], extra_cflags=["-O3", "-march=native"],
                      verbose=False)
    print(f"Fused CPU probe, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "ms per step (median of 9 rounds), ratio to SGD foreach\n")
    print("| layout | SGD foreach | TLR default, 6-step windows | fused ordinary step | fused closing reductions | "
          "fused estimate, 6-step windows |")
    print("|---|---:|---:|---:|---:|---:|")
    for layout, shapes_of in LAYOUTS.items():
        shapes = shapes_of()
        g = torch.Generator().manual_seed(0)
        make = lambda: [torch.randn(s, generator=g).requires_grad_() for s in shapes]  # noqa: E731
        ps = make()
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        sgd = torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
        sgd_ms = timed(sgd.step)
        qs = make()
        for q in qs:
            q.grad = torch.randn(q.shape, generator=g) * 1e-3
        tlr = held(TLR(qs, momentum=0.9, weight_decay=5e-4), 2)
        tlr_ms = timed(tlr.step, steps=36)
        w = [p.detach() for p in make()]
        grads = [torch.randn(s, generator=g) for s in shapes]
        b, a, prev = ([torch.zeros(s) for s in shapes] for _ in range(3))
        fused_ms = timed(lambda: ext.ordinary(w, grads, b, a, 1e-3, 0.9, 5e-4))
        red_ms = timed(lambda: ext.reductions(a, prev, w))
        # a 6-step window: 6 steps, a unit end (one reduction pass) and a closing (one pass, then the
        # move the closing defers: one more ordinary-step pass as an upper bound)
        estimate = (7 * fused_ms + 2 * red_ms) / 6
        print(f"| {layout} | {sgd_ms:.3f} | {tlr_ms:.3f} ({tlr_ms / sgd_ms:.2f}x) | {fused_ms:.3f} ({fused_ms / sgd_ms:.2f}x) | "
              f"{red_ms:.3f} | {estimate:.3f} ({estimate / sgd_ms:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
