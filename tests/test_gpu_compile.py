"""The Triton kernels compile for real GPUs: sm_80 and sm_90, on the installed Triton and on 3.6.0.

Triton's interpreter, which runs the kernels everywhere else in this suite, accepts code
that the compiler rejects (non-constexpr globals, arguments equal to 1 turned into
constants, ...). Here every specialization that the optimizer's launcher produces is
compiled ahead of time with Triton's code generator and the ptxas shipped in the triton
wheel, no GPU needed (``gpu_compile.py``): any compile error, register spill or use of
local memory fails, and the registers per kernel are printed.

Triton 3.6.0 (the GPU machines' version) is installed by ``scripts/setup.sh`` into
``.venv/triton-3.6.0`` and put first on the compile step's path.
"""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("triton")

import gpu_compile as G  # noqa: E402

TRITON_36 = Path(__file__).resolve().parents[1] / ".venv" / "triton-3.6.0"
KERNELS = {"tlr_step_kernel", "tlr_window_kernel", "tlr_alpha_kernel", "tlr_move_kernel",
           "adamw_step_kernel", "adamw_alpha_kernel", "adamw_move_kernel"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    launches = G.record(G.configurations())
    path = tmp_path_factory.mktemp("aot") / "launches.json"
    path.write_text(json.dumps(launches))
    return launches, path


def test_recording_covers_the_space(recorded):
    """Every kernel is launched, and integer arguments take the values Triton would specialise on."""
    launches, _ = recorded
    assert {launch["kernel"] for launch in launches} == KERNELS
    step = [launch["args"] for launch in launches if launch["kernel"] == "tlr_step_kernel"]
    for name in ("n_tensors", "n_blocks", "window", "units"):
        values = {args[name] for args in step}
        assert 1 in values and any(v % 16 == 0 for v in values), (name, sorted(values))
    assert len({args["part_offset"] for args in step}) > 2  # mixed-dtype groups: buckets after the first
    assert {args["PARAM_DTYPE"]["tl"] for args in step} == {"fp32", "fp64", "fp16", "bf16"}
    assert {(args["HAS_SCALE"], args["HAS_INF"]) for args in step} == {(False, False), (False, True), (True, True)}
    # aligned buckets (vector accesses, checked in the PTX by G.problems) and unaligned ones, per weight
    # dtype; fp64 buckets are never aligned (launch._alignment)
    aligned = {(args["PARAM_DTYPE"]["tl"], args["ALIGN"] > 1) for args in step}
    assert aligned == {(d, a) for d in ("fp32", "fp16", "bf16") for a in (False, True)} | {("fp64", False)}, aligned
    adamw = [launch["args"] for launch in launches if launch["kernel"] == "adamw_step_kernel"]
    assert {(a["PARAM_DTYPE"]["tl"], a["ALIGN"] > 1) for a in adamw} == aligned
    assert {(a["AMSGRAD"], a["HAS_DECAY"], a["CLOSING"]) for a in adamw} == {
        (amsgrad, decay, closing) for amsgrad in (False, True) for decay in (False, True) for closing in (False, True)}
    assert len({a["bc1_bits"] for a in adamw}) >= 2 and 1 in {a["n_tensors"] for a in adamw}
    assert min(a[k] for a in adamw for k in ("bc1_bits", "bc2_bits")) > 2**31  # always typed int64

@pytest.mark.parametrize("version", ["installed", "3.6.0"])
def test_every_specialization_compiles_for_sm80_and_sm90(recorded, version, capsys):
    _, path = recorded
    triton_dir = None
    if version == "3.6.0":
        if not (TRITON_36 / "triton").is_dir():
            pytest.fail(f"Triton 3.6.0 is missing from {TRITON_36}: run scripts/setup.sh (the README's test command does)")
        triton_dir = TRITON_36
    results = G.compile_in_subprocess(path, triton_dir, jobs=os.cpu_count() or 1)
    with capsys.disabled():
        print(f"\nAhead-of-time compile, Triton {version}: {len(results)} kernels\n{G.table(results)}")
    assert {(r["kernel"], r["arch"]) for r in results} == {(k, a) for k in KERNELS for a in G.ARCHS}
    if version == "3.6.0":
        assert {r["triton"] for r in results} == {"3.6.0"}
    found = G.problems(results)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("mode, expected", [
    # (HAS_MOMENTUM, NESTEROV, SNAPSHOT) → fp32 bytes per parameter of an ordinary step, a unit end the
    # guard reads, a closing (docs/triton.md, "Memory traffic"; fused SGD: 20 with momentum, 12 without)
    (("True", "False", "True"), (20, 28, 44)),    # the default: momentum, statistic "gradient"
    (("True", "True", "True"), (20, 28, 48)),     # nesterov: the move kernel reads g again
    (("False", "False", "True"), (12, 20, 36)),   # momentum 0
    (("True", "False", "False"), (28, 32, 44)),   # A summed (dampening, a schedule, 2-byte weights)
])
def test_the_access_model_gives_the_documented_bytes(mode, expected):
    """``element_accesses`` — which the compile test holds every aligned fp32 kernel's PTX to — adds up
    to the bytes per step kind that the interpreter counts lane by lane and the docs give."""
    cx = dict(zip(("HAS_MOMENTUM", "NESTEROV", "SNAPSHOT"), mode))
    assert tuple(G.step_bytes(cx, kind) for kind in "ouc") == expected


@pytest.mark.parametrize("amsgrad, expected", [
    # fp32 bytes per parameter of an ordinary step and a closing (torch's fused AdamW: 28, amsgrad 36)
    ("False", (36, 56)),
    ("True", (44, 64)),
])
def test_tlr_adamw_moves_what_fused_adamw_moves_plus_its_window_sum(amsgrad, expected):
    """TLRAdamW's ordinary step: fused AdamW's bytes plus 8 (the window sum R, read and written);
    a closing adds P and the move kernel's second pass (docs/adamw.md, "Triton kernels")."""
    cx = {"AMSGRAD": amsgrad}
    assert tuple(G.step_bytes(cx, kind, "adamw") for kind in "oc") == expected
