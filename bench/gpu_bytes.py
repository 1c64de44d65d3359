"""DRAM bytes per parameter of each kind of step, read from the GPU's counters (Nsight Compute).

    python bench/gpu_bytes.py        # on a CUDA machine with ncu: runs itself under ncu, prints the table

The byte counts of docs/triton.md ("Memory traffic") are counted lane by lane in Triton's
interpreter; this measures them on the hardware: ``dram__bytes_read.sum`` and
``dram__bytes_write.sum`` of every kernel of one fused SGD step and of TLR's ordinary,
unit-end and closing steps, on one fp32 tensor of 64M elements (256 MB per array, four times
the H200's L2), divided by the element count.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

N = 1 << 26
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
# What each profiled step should move (docs/triton.md), bytes per parameter, fp32 with momentum.
EXPECTED = {"SGD fused": 20, "TLR ordinary": 20, "TLR unit end (guard)": 28, "TLR closing": 44}


def inner() -> None:
    """The profiled region: the steps in a known order, every launch outside it left out."""
    import torch

    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from step_cost import held  # the default's window held at k units, as in the other benches
    from tlr_triton import TLR

    torch.manual_seed(0)
    w = torch.randn(N, device="cuda", requires_grad=True)
    w.grad = torch.randn_like(w) * 1e-3
    sgd = torch.optim.SGD([w], lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
    fixed = TLR([w], lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, window=4, backend="triton")
    # the default window held at 16 units (48 steps): unit ends without closings
    guarded = held(TLR([w], lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend="triton"), 16)
    sgd.step()
    for _ in range(4):  # past the first step (its momentum rule differs) and one whole window
        fixed.step()
    for _ in range(3):
        guarded.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    sgd.step()                   # fused SGD: one launch per 320 chunks
    for _ in range(4):           # window 4: steps 5-7 ordinary, step 8 closes; 3 kernels each
        fixed.step()
    for _ in range(3):           # steps 4-6 of the held default: 4 and 5 ordinary, 6 a unit end
        guarded.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        sys.exit("ncu (Nsight Compute) not found")
    cmd = [str(ncu), "--profile-from-start", "off", "--clock-control", "none", "--print-units", "base", "--csv",
           "--metrics", "dram__bytes_read.sum,dram__bytes_write.sum", sys.executable, __file__, "--inner"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    text = out.stdout
    start = text.find('"ID"')
    if out.returncode != 0 or start < 0:
        sys.exit(f"ncu failed (rc {out.returncode}):\n{text[-3000:]}\n{out.stderr[-3000:]}")
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        k = kernels.setdefault(row["ID"], {"name": row["Kernel Name"]})
        k[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    rows = [kernels[i] for i in sorted(kernels, key=int)]
    # fused SGD's launches (one per 320 chunks of 64k elements) come first; then each TLR
    # step starts with its step kernel
    first = next(i for i, k in enumerate(rows) if k["name"].startswith("tlr_step_kernel"))
    tlr = [[]]
    for k in rows[first:]:
        if k["name"].startswith("tlr_step_kernel") and tlr[-1]:
            tlr.append([])
        tlr[-1].append(k)
    print(f"{len(rows)} kernels profiled: {first} of fused SGD, {len(tlr)} TLR steps of "
          f"{sorted({len(t) for t in tlr})} kernels (expected 7 of 3: one α per group, no α kernel)")
    kinds = ["TLR ordinary"] * 3 + ["TLR closing"] + ["TLR ordinary"] * 2 + ["TLR unit end (guard)"]
    steps = [("SGD fused", rows[:first])] + list(zip(kinds, tlr))
    print("| step | kernels: read + write B/param | total B/param | counted in the interpreter |")
    print("|---|---|---:|---:|")
    for name, ks in steps:
        parts = ", ".join(f"{k['name'].split('(')[0][:24]} {k['dram__bytes_read.sum'] / N:.2f} + "
                          f"{k['dram__bytes_write.sum'] / N:.2f}" for k in ks
                          if k["dram__bytes_read.sum"] + k["dram__bytes_write.sum"] > 0.01 * N)
        total = sum(k["dram__bytes_read.sum"] + k["dram__bytes_write.sum"] for k in ks) / N
        print(f"| {name} | {parts} | {total:.2f} | {EXPECTED[name]} |")


if __name__ == "__main__":
    inner() if "--inner" in sys.argv else main()
