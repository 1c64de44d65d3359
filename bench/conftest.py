"""Prints ms/step and ratios to each SGD variant after `pytest bench/ --benchmark-only`."""

import datetime
import platform

import torch


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if "layout" in info:
            rows.setdefault(info["layout"], {})[info["optimizer"]] = bench.stats.median * 1e3 / info["steps_per_call"]
    write = terminalreporter.write_line
    write("")
    write(f"Step cost, {datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"))
    write("median ms/step (TLR amortized over its window); ratios to each SGD variant of the same layout")
    write("| layout | optimizer | ms/step | / forloop | / foreach | / fused |")
    write("|---|---|---:|---:|---:|---:|")
    for layout, opts in rows.items():
        for name, ms in opts.items():
            ratios = [f"{ms / opts[k]:.2f}x" if k in opts else "-" for k in ("sgd-forloop", "sgd-foreach", "sgd-fused")]
            write(f"| {layout} | {name} | {ms:.3f} | " + " | ".join(ratios) + " |")
