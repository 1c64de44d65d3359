"""Compile every Triton kernel specialization for real GPUs, ahead of time, without a GPU.

Triton's interpreter (which runs the kernels in the CPU tests) accepts code that the real
compiler rejects or treats differently, so passing tests prove nothing about a GPU. This
module closes that gap in two steps:

1. **record**: drive the real optimizers, ``TLR(..., backend="triton")`` and
   ``TLRAdamW(..., backend="triton")``, over the configuration space (weight dtypes,
   mixed-dtype groups, momentum / dampening / nesterov, statistic, scope, maximize, AMP's
   grad_scale / found_inf, fixed and adaptive windows, amsgrad, tensor counts and sizes that
   make integer arguments 1 or multiples of 16)
   with every kernel replaced by a recorder: nothing runs, each launch's arguments are
   kept as Triton's binder will see them (tensor dtype and 16-byte alignment, scalars,
   constexprs). Needs ``TRITON_INTERPRET=1`` (CPU tensors reach the launcher).
2. **compile**: in a process without the interpreter (and, with ``--triton``, with
   another Triton release first on ``sys.path``), bind each launch with the CUDA
   backend's own binder for sm_80 and sm_90, keep one launch per distinct
   specialization (Triton's cache key), and ``triton.compile`` it: Triton's code
   generator, LLVM and the ptxas that ships in the triton wheel. ptxas's log gives
   registers, spills and stack frame; the PTX gives local-memory use and the global
   loads and stores.

Command line (the full set is what an issue is resolved against; the test suite runs
``--subset``, which covers every constexpr combination)::

    .venv/bin/python tests/gpu_compile.py [--subset] [--triton DIR ...] [--arch 80 90] [--jobs 2] [--json FILE]

``--triton DIR`` compiles once more with the Triton installed in DIR (a ``pip install
--target DIR triton==3.6.0``, as ``scripts/setup.sh`` makes it). The exit status is 1 on
any compile error, spill or local-memory use.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("tlr_triton.kernels.tlr_step", "tlr_triton.kernels.adamw_step")  # TLR's and TLRAdamW's
ARCHS = (80, 90)

# ----------------------------------------------------------------------------- the space

DTYPES = ("float32", "float64", "float16", "bfloat16", "mixed")
MOMENTA = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov": dict(momentum=0.9, nesterov=True),
}
STATISTICS = ("gradient", "direction")
AMP = ("none", "found_inf", "scale+found_inf")  # GradScaler passes grad_scale=None after unscale_()
SCOPES = ("group", "tensor")
SIGNS = (dict(), dict(maximize=True, weight_decay=1e-2))
# Fixed windows of 1 (an int argument equal to 1), 2 and 16 (a multiple of 16); the
# adaptive default (16 units of 3 steps); an adaptive window of 1-step units.
WINDOWS = (dict(window=1), dict(window=2), dict(window=16), dict(), dict(window=1, max_window=4))
# Shapes per group: one 1-element tensor (counts equal to 1), 16 tensors of one block
# (multiples of 16), odd sizes across block boundaries.
LAYOUTS = {
    "one": [(1,)],
    "sixteen": [(1024,)] * 16,
    "odd": [(16 * 1024 + 3,), (5, 3), (), (1025,)],
}
MIXED = ("bfloat16", "float32", "float64", "float16")
# Hyper-parameters given as Python ints, as users write them: an int argument equal to 1
# must not become a compile-time constant, nor an int 0 an int32.
INT_HYPERPARAMETERS = dict(lr=1, momentum=0, dampening=0, weight_decay=1, bound=1, window_reset=0)


def configurations(subset: bool = False) -> list[dict]:
    """The configurations to drive: the full product, or a subset that still holds every
    (dtype, momentum, statistic, AMP) combination, with the other axes cycled through."""
    main = list(itertools.product(DTYPES, MOMENTA, STATISTICS, AMP))
    rest = list(itertools.product(SCOPES, range(len(SIGNS)), range(len(WINDOWS)), LAYOUTS))
    configs = []
    if subset:
        for i, (dtype, mom, stat, amp) in enumerate(main):
            scope, sign, win, layout = (SCOPES[i % 2], (i // 2) % len(SIGNS), (i // 3) % len(WINDOWS),
                                        list(LAYOUTS)[(i // 5) % len(LAYOUTS)])
            configs.append(dict(dtype=dtype, momentum=mom, statistic=stat, amp=amp, scope=scope, sign=sign,
                                window=win, layout=layout))
    else:
        for (dtype, mom, stat, amp), (scope, sign, win, layout) in itertools.product(main, rest):
            configs.append(dict(dtype=dtype, momentum=mom, statistic=stat, amp=amp, scope=scope, sign=sign,
                                window=win, layout=layout))
    for amp in AMP:  # user-written ints, both scopes
        configs.append(dict(dtype="float32", momentum="plain", statistic="gradient", amp=amp, scope=SCOPES[len(amp) % 2],
                            sign=0, window=0, layout="odd", ints=True))
    return configs + adamw_configurations(subset)


# TLRAdamW (fixed windows of 2 steps: its first step is an ordinary one, its second a closing):
# every weight dtype, amsgrad, weight decay or none (an int 0), both scopes, maximize, the layouts.
ADAMW_HYPER = {
    "default": dict(lr=0.01),
    "amsgrad": dict(lr=0.01, amsgrad=True, maximize=True),
    "amsgrad-no-decay": dict(lr=0.01, amsgrad=True, weight_decay=0.0),
    "no-decay": dict(lr=1, weight_decay=0, betas=(0, 0.999), eps=0),  # user-written ints
}


def adamw_configurations(subset: bool = False) -> list[dict]:
    """TLRAdamW's configurations: every (dtype, hyper-parameters) pair, the scopes and layouts
    cycled through (the subset) or crossed (the full set)."""
    main = list(itertools.product(DTYPES, ADAMW_HYPER))
    rest = list(itertools.product(SCOPES, LAYOUTS))
    if subset:
        return [dict(optimizer="adamw", dtype=d, hyper=h, scope=SCOPES[i % 2], layout=list(LAYOUTS)[i % len(LAYOUTS)])
                for i, (d, h) in enumerate(main)]
    return [dict(optimizer="adamw", dtype=d, hyper=h, scope=sc, layout=lay) for (d, h), (sc, lay) in
            itertools.product(main, rest)]


# ----------------------------------------------------------------------------- record

def _encode(value):
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch and runs nothing.

    A launch is kept as {"kernel", "module", "args": every kernel parameter by name, "options":
    launch options such as num_warps}.
    """

    def __init__(self, name: str, kernel, sink: list, module: str) -> None:
        self.name, self.sink, self.module = name, sink, module
        self.params = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.params, args))
            named.update((k, v) for k, v in kwargs.items() if k in self.params)
            if len(named) != len(self.params):
                raise TypeError(f"{self.name}: missing arguments {sorted(set(self.params) - set(named))}")
            self.sink.append({"kernel": self.name, "module": self.module, "args": {k: _encode(v) for k, v in named.items()},
                              "options": {k: _encode(v) for k, v in kwargs.items() if k not in self.params}})

        return launch


@contextlib.contextmanager
def recording():
    """Replace every kernel of the kernel modules by a recorder; yields the list of launches."""
    import importlib

    found = []  # (module, name, kernel)
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        kernels = [(module, name, obj) for name, obj in vars(module).items()
                   if not name.startswith("_") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")]
        if not kernels:
            raise RuntimeError(f"no kernels found in {module_name}")
        found += kernels
    sink: list = []
    try:
        for module, name, obj in found:
            setattr(module, name, _Recorder(name, obj, sink, module.__name__))
        yield sink
    finally:
        for module, name, obj in found:
            setattr(module, name, obj)


def _params(config: dict) -> list:
    """The weights of a configuration: its layout's shapes in its dtype (or the mixed dtypes)."""
    import torch

    shapes = LAYOUTS[config["layout"]]
    if config["dtype"] == "mixed":
        dtypes = [getattr(torch, MIXED[i % len(MIXED)]) for i in range(len(shapes))]
    else:
        dtypes = [getattr(torch, config["dtype"])] * len(shapes)
    return [torch.zeros(s, dtype=d, requires_grad=True) for s, d in zip(shapes, dtypes)]


def _drive_adamw(config: dict) -> None:
    import torch

    from tlr_triton import TLRAdamW

    params = _params(config)
    opt = TLRAdamW(params, backend="triton", window=2, scope=config["scope"], **ADAMW_HYPER[config["hyper"]])
    for _ in range(2):  # an ordinary step, then a closing
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def _drive(config: dict, steps: int = 2) -> None:
    import torch

    from tlr_triton import TLR

    if config.get("optimizer") == "adamw":
        return _drive_adamw(config)
    torch.manual_seed(0)
    params = _params(config)
    if config.get("ints"):
        hyper = dict(INT_HYPERPARAMETERS, scope=config["scope"])
    else:
        hyper = dict(lr=0.01, scope=config["scope"], statistic=config["statistic"], **MOMENTA[config["momentum"]],
                     **SIGNS[config["sign"]], **WINDOWS[config["window"]])
    opt = TLR(params, backend="triton", **hyper)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        if config["amp"] != "none":
            opt.grad_scale = torch.tensor(2.0) if config["amp"] == "scale+found_inf" else None
            opt.found_inf = torch.zeros(())
        opt.step()


def record(configs: list[dict]) -> list[dict]:
    """Every launch the optimizer makes over ``configs``, one per distinct argument pattern."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("recording drives the optimizer on CPU tensors: set TRITON_INTERPRET=1 before importing triton")
    seen, launches = set(), []
    with recording() as sink:
        for config in configs:
            sink.clear()
            _drive(config)
            for launch in sink:
                key = json.dumps(launch, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    launches.append(dict(launch, config=config))
    return launches


# ----------------------------------------------------------------------------- compile

def _decode(value):
    import torch
    import triton.language as tl

    if isinstance(value, dict) and "tensor" in value:
        dtype = getattr(torch, value["tensor"])
        buf = torch.empty(64, dtype=dtype)
        return buf if value["aligned"] else buf[1:]
    if isinstance(value, dict) and "tl" in value:
        return {d.name: d for d in (tl.float16, tl.bfloat16, tl.float32, tl.float64, tl.int32, tl.int64)}[value["tl"]]
    return value


def _bind(kernel, launch: dict, arch: int):
    """Triton's own binding of a launch for a CUDA target: (cache key, ASTSource, target, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {k: _decode(v) for k, v in {**launch["args"], **launch["options"]}.items()}
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (launch["kernel"], arch, str(specialization), str(sorted(options.__dict__.items())))
    readable = {kernel.params[path[0]].name: str(value) for path, value in constexprs.items()}
    return key, ASTSource(kernel, signature, constexprs, attrs), target, options, readable, signature


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_GLOBAL = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.(v2|v4|v8))?\.([busf])(8|16|32|64|128)\b")


def ptx_summary(ptx: str) -> dict:
    """Global load/store instructions of the PTX, counted by access width in bytes."""
    out: dict[str, dict[str, int]] = {"ld": {}, "st": {}}
    for op, vec, _, bits in _GLOBAL.findall(ptx):
        width = str(int(bits) // 8 * (int(vec[1:]) if vec else 1))
        out[op][width] = out[op].get(width, 0) + 1
    return out


def _compile_one(item):
    """Compile one launch for one arch (runs in a worker process); a dict of results."""
    launch, arch = item
    import importlib

    import triton
    from triton import knobs

    module = importlib.import_module(launch["module"])
    kernel = getattr(module, launch["kernel"])
    _, src, target, options, constexprs, signature = _bind(kernel, launch, arch)
    result = dict(kernel=launch["kernel"], arch=arch, triton=triton.__version__, constexprs=constexprs,
                  signature={k: v for k, v in signature.items() if v != "constexpr"}, config=launch.get("config"))
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas, and its log
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported with its config
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return result
    text = log.getvalue()
    regs, frame = _REGS.search(text), _PTXAS.search(text)
    if regs is None or frame is None:
        result["error"] = "could not read registers and spills from ptxas's log:\n" + text[-1000:]
        return result
    ptx = compiled.asm["ptx"]
    result.update(registers=int(regs.group(1)), stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                  spill_loads=int(frame.group(3)), local=bool(re.search(r"\b(ld|st)\.local\b|\.local\s", ptx)),
                  ptx=ptx_summary(ptx), approx_sqrt=bool(re.search(r"\bsqrt\.approx", ptx)))
    return result


def compile_launches(launches: list[dict], archs=ARCHS, jobs: int = 1) -> list[dict]:
    """Compile every distinct specialization of ``launches`` for each arch (no interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling needs the real @triton.jit kernels: unset TRITON_INTERPRET")
    import importlib

    unique = {}
    for launch in launches:
        module = importlib.import_module(launch["module"])
        for arch in archs:
            key = _bind(getattr(module, launch["kernel"]), launch, arch)[0]
            unique.setdefault(key, (launch, arch))
    items = sorted(unique.values(), key=lambda item: (item[0]["kernel"], item[1]))
    if jobs <= 1:
        return [_compile_one(item) for item in items]
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, items, chunksize=4))


# ----------------------------------------------------------------------------- report

# A step or move kernel of an aligned bucket (ALIGN > 1) moves elements only in vectors: its
# loads narrower than 8 bytes are the scalars (α, the window flag, AMP's scale and found_inf),
# it stores nothing narrower than 8 bytes (the fp64 partials), and the fp32/fp64 arrays
# (state, and fp32/fp64 weights and gradients) go in 16-byte accesses. fp16/bf16 weights and
# gradients go in 8 bytes: 4 elements per thread.
_SCALAR_LOADS = 4
# A stack frame without spills or local memory: the return address of a call to the slow path of
# sqrt.rn.f32 (tl.sqrt_rn, TLRAdamW's kernels: special inputs only), 8 bytes where ptxas does not
# inline it. Anything larger, or any spill, is a problem.
_CALL_FRAME = 8
_ELEMENTWISE = ("tlr_step_kernel", "tlr_move_kernel", "adamw_step_kernel", "adamw_move_kernel")


def vector_problems(r: dict) -> list[str]:
    """What is not vectorized in one compiled aligned step or move kernel (``problems``)."""
    if r["kernel"] not in _ELEMENTWISE or int(r["constexprs"].get("ALIGN", "1")) <= 1 or "error" in r:
        return []
    ld, st = r["ptx"]["ld"], r["ptx"]["st"]
    narrow_loads = sum(n for w, n in ld.items() if int(w) < 8)
    narrow_stores = sum(n for w, n in st.items() if int(w) < 8)
    out = []
    if narrow_loads > _SCALAR_LOADS or narrow_stores:
        out.append(f"narrow accesses: {narrow_loads} loads, {narrow_stores} stores under 8 bytes")
    if not ld.get("16"):
        out.append("no 16-byte load")
    return out


# The element arrays that each fp32 step and move kernel reads and writes, and the kinds of
# step whose lanes move them ("o" ordinary, "u" the end of a unit that the blow-up guard
# reads, "c" a scheduled closing; "r" a step after α was set by hand, "l" the guard's late
# close). For aligned fp32 buckets every element access is a 16-byte vector of 4 elements
# (one per thread and array), so the compiled PTX holds exactly one such instruction per
# entry (``access_problems``); which kinds move which lanes is what the interpreter test
# counts lane by lane (tests/test_triton.py), and ``step_bytes`` adds them up per kind.
def element_accesses(kernel: str, cx: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(loads, stores) of ``kernel`` with constexprs ``cx``: (array, kinds) pairs."""
    if kernel.startswith("adamw_"):
        return _adamw_accesses(kernel, cx)
    momentum, nesterov, snapshot = (cx["HAS_MOMENTUM"] == "True", cx["NESTEROV"] == "True", cx["SNAPSHOT"] == "True")
    if kernel == "tlr_step_kernel":
        loads = [("w", "oucrl"), ("g", "oucrl")] + [("b", "oucrl")] * momentum + [("P", "uc")]
        loads += [("S", "uc"), ("S", "r")] if snapshot else [("A", "oucrl")]
        stores = [("b", "oucrl")] * momentum + ([("S", "r")] if snapshot else [("A", "oucrl")])
        stores += [("P", "c"), ("w", "ourl")]
    elif kernel == "tlr_move_kernel":
        read = "cl" if snapshot else "c"  # a late close rebuilds P and S from w and b
        loads = [("w", read)] + [("b", read)] * momentum + [("g", "c")] * (not momentum or nesterov)
        loads += [("S", "l")] if snapshot else [("A", "l")]
        stores = [("w", "c"), ("P", "l"), ("S", "cl") if snapshot else ("A", "l")]
    else:
        raise ValueError(kernel)
    return loads, stores


def _adamw_accesses(kernel: str, cx: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """TLRAdamW's kernels, one specialization per kind of step ("o" ordinary, "c" a closing, from
    the constexpr CLOSING of the step kernel; the move kernel runs at closings only). m, v (and
    amsgrad's max v, "x") and the window sum R are fp32 state; P is the last window's R."""
    amsgrad, decay = cx["AMSGRAD"] == "True", cx.get("HAS_DECAY", "True") == "True"
    if kernel == "adamw_step_kernel":
        kind = "c" if cx["CLOSING"] == "True" else "o"
        # a closing reads w only for λ·w (the move kernel moves it)
        loads = [("w", kind)] * (kind == "o" or decay) + [("g", kind), ("m", kind), ("v", kind)]
        loads += [("x", kind)] * amsgrad + [("R", kind)]
        stores = [("m", kind), ("v", kind)] + [("x", kind)] * amsgrad
        if kind == "c":
            loads.append(("P", kind))
            stores += [("P", kind), ("R", kind)]
        else:
            stores += [("R", kind), ("w", kind)]
    elif kernel == "adamw_move_kernel":
        loads = [("w", "c"), ("m", "c"), ("x" if amsgrad else "v", "c")]
        stores = [("w", "c")]
    else:
        raise ValueError(kernel)
    return loads, stores


def step_bytes(cx: dict, kind: str, optimizer: str = "tlr") -> int:
    """fp32 bytes per parameter that a step of ``kind`` moves through the step and move kernels
    (TLRAdamW's: ``cx`` without CLOSING, which ``kind`` decides)."""
    if optimizer == "adamw":
        step = element_accesses("adamw_step_kernel", dict(cx, CLOSING=str(kind == "c")))
        move = element_accesses("adamw_move_kernel", cx) if kind == "c" else ([], [])
        return 4 * sum(len(accesses) for accesses in step + move)
    return 4 * sum(kind in kinds for k in ("tlr_step_kernel", "tlr_move_kernel")
                   for accesses in element_accesses(k, cx) for _, kinds in accesses)


def access_problems(r: dict) -> list[str]:
    """An aligned fp32 step or move kernel whose PTX moves elements other than ``element_accesses`` says."""
    cx = r["constexprs"]
    if (r["kernel"] not in _ELEMENTWISE or "error" in r or int(cx.get("ALIGN", "1")) <= 1
            or cx["PARAM_DTYPE"] != "fp32" or cx["STATE_DTYPE"] != "fp32"):
        return []
    loads, stores = element_accesses(r["kernel"], cx)
    got = (r["ptx"]["ld"].get("16", 0), r["ptx"]["st"].get("16", 0))
    if got != (len(loads), len(stores)):
        return [f"16-byte element accesses {got[0]} loads, {got[1]} stores; expected {len(loads)} "
                f"({', '.join(a for a, _ in loads)}) and {len(stores)} ({', '.join(a for a, _ in stores)})"]
    return []


def problems(results: list[dict]) -> list[str]:
    """One line per compile error, spill, local-memory use, unvectorized aligned kernel, or aligned fp32
    kernel whose element accesses differ from ``element_accesses``."""
    out = []
    for r in results:
        where = f"{r['kernel']} sm_{r['arch']} triton {r['triton']} {r['constexprs']} (config {r['config']})"
        if "error" in r:
            out.append(f"{where}: {r['error']}")
        elif r["spill_stores"] or r["spill_loads"] or r["local"] or r["stack"] > _CALL_FRAME:
            out.append(f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B, "
                       f"local memory {r['local']}")
        if r.get("approx_sqrt"):  # the interpreter's square root is exact: the tests would not see it
            out.append(f"{where}: sqrt.approx in the PTX (flushes subnormals to 0; use tl.sqrt_rn)")
        out += [f"{where}: {line} (PTX {r['ptx']})" for line in vector_problems(r) + access_problems(r)]
    return out


def table(results: list[dict]) -> str:
    """Registers per kernel, target and Triton version (min-max over the specializations)."""
    rows = {}
    for r in results:
        row = rows.setdefault((r["triton"], r["arch"], r["kernel"]), dict(n=0, failed=0, spills=0, regs=[]))
        row["n"] += 1
        if "error" in r:
            row["failed"] += 1
            continue
        row["spills"] += bool(r["spill_stores"] or r["spill_loads"] or r["stack"] > _CALL_FRAME or r["local"])
        row["regs"].append(r["registers"])
    lines = ["| triton | target | kernel | specializations | failed | spilling | registers |", "|---|---|---|---|---|---|---|"]
    for (version, arch, kernel), row in sorted(rows.items()):
        regs = f"{min(row['regs'])}-{max(row['regs'])}" if row["regs"] else "-"
        lines.append(f"| {version} | sm_{arch} | {kernel} | {row['n']} | {row['failed']} | {row['spills']} | {regs} |")
    return "\n".join(lines)


def compile_in_subprocess(launches_file: Path, triton_dir: str | None, archs=ARCHS, jobs: int = 1) -> list[dict]:
    """Run the compile step in a fresh interpreter (optionally with ``triton_dir`` first on its path)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_dir:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns that its default will change; keep it
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, __file__, "compile", str(launches_file), "--out", str(out), "--jobs", str(jobs),
               "--arch", *map(str, archs)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compile step failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    comp = sub.add_parser("compile", help="compile recorded launches (internal step)")
    comp.add_argument("launches")
    comp.add_argument("--out", required=True)
    comp.add_argument("--jobs", type=int, default=1)
    comp.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--subset", action="store_true", help="the test suite's subset (every constexpr combination)")
    parser.add_argument("--triton", action="append", default=[], help="also compile with the Triton installed in DIR")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args(argv)

    if args.command == "compile":
        results = compile_launches(json.loads(Path(args.launches).read_text()), args.arch, args.jobs)
        Path(args.out).write_text(json.dumps(results))
        return 0

    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.append(str(ROOT))  # after site-packages: see tests/conftest.py
    configs = configurations(subset=args.subset)
    launches = record(configs)
    print(f"{len(configs)} configurations drove {len(launches)} distinct launches", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        launches_file = Path(tmp) / "launches.json"
        launches_file.write_text(json.dumps(launches))
        for triton_dir in [None, *args.triton]:
            results += compile_in_subprocess(launches_file, triton_dir, args.arch, args.jobs)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    found = problems(results)
    print(f"{len(results)} compiles, {len(found)} problems")
    for line in found:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
