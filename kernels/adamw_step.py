"""Triton kernels for one TLRAdamW step over every tensor of a bucket (docs/adamw.md).

TLRAdamW's windows are fixed and scheduled by the host's step counter, so the host knows
whether a step closes one; an ordinary step is one launch, a closing three:

1. ``adamw_step_kernel``, one program per block of BLOCK elements of any tensor: AdamW's
   moments (m, v, amsgrad's max v), its direction d = p·m̂ + λ·w with p = 1/(√v̂ + ε), the
   window statistic R += √p·σg + λ·w/√p, and on an ordinary step the move w -= α·f·d (f: a
   learning-rate schedule's factor) — one pass that reads w, g, m, v, R and writes w, m, v,
   R: 36 bytes per fp32 parameter against torch's fused AdamW's 28 (the window sum R is the
   8). With CLOSING it instead writes the block's partial ⟨R, P⟩ and ‖R‖², P ← R, R ← 0,
   and leaves the weights for launch 3 (α first: Algorithm 2's order).
2. ``adamw_alpha_kernel`` (closings), one program per α-scope (the group, or each tensor):
   sums its blocks' partials in a fixed order (no atomics: bit-identical runs) and applies
   SPEC's Newton factor, in fp64, on the device.
3. ``adamw_move_kernel`` (closings): w -= α·f·d with the new α, d recomputed from w, m, v.

Tensors are reached through a table of addresses (one int64 row per kind of tensor) and
blocks through a block → (tensor, offset) map, as in ``tlr_step``, whose helpers these
kernels share. Every tensor of a launch has taken the same number of steps t (the launcher
groups them so); its bias corrections 1 − β^t come from the host, in fp64. State and
reductions are fp32 (fp64 for fp64 weights); α is fp32.
"""

import triton
import triton.language as tl

from .tlr_step import _at, _block, _newton_r, _reduce, _row, _to_param

# Rows of the address table. NUMEL is row 6, as in tlr_step (its ``_block`` reads it there).
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
EXP_AVG = tl.constexpr(2)
WINDOW = tl.constexpr(3)
PREV = tl.constexpr(4)
ALPHA = tl.constexpr(5)
NUMEL = tl.constexpr(6)
EXP_AVG_SQ = tl.constexpr(7)
MAX_EXP_AVG_SQ = tl.constexpr(8)
TABLE_ROWS = 9

# Entries of the float64 hyper-parameter vector (read from device memory: a float argument
# would be fp32 on the GPU, an int one a compile-time constant).
H_BETA1 = tl.constexpr(0)
H_BETA2 = tl.constexpr(1)
H_EPS = tl.constexpr(2)
H_WEIGHT_DECAY = tl.constexpr(3)
H_SIGN = tl.constexpr(4)        # -1.0 with maximize, else 1.0
H_BOUND = tl.constexpr(5)       # the paper's c
H_KEEP1 = tl.constexpr(6)       # 1 − β1 and 1 − β2, taken in fp64 from β (as the PyTorch path's
H_KEEP2 = tl.constexpr(7)       # Python floats): 1 − fp32(β2) is 2% off for β2 = 0.99999
H_LR_FACTOR = tl.constexpr(8)   # a schedule's factor: the weights move by α · factor · d
HYPER_SIZE = 9

_NO_SPEC_STEP = ["n_tensors", "n_blocks", "n_part", "part_offset", "bc1_bits", "bc2_bits"]
_NO_SPEC_MOVE = ["n_tensors", "n_blocks", "bc1_bits", "bc2_bits"]
_NO_SPEC_ALPHA = ["n_scopes", "n_part"]


@triton.jit
def _corrections(bc1_bits, bc2_bits, STATE_DTYPE: tl.constexpr):
    """AdamW's bias corrections 1 − β1^t and √(1 − β2^t), taken on the host in fp64 (as the PyTorch
    path takes them) and passed as the int64 bits of those doubles: a float argument would be fp32
    on the GPU; computed here (libdevice's fp64 exp2/log2, or binary powering) they made closing
    kernels spill 8–16 bytes on sm_80 and sm_90."""
    bc1 = bc1_bits.to(tl.int64).to(tl.float64, bitcast=True).to(STATE_DTYPE)
    bc2_sqrt = bc2_bits.to(tl.int64).to(tl.float64, bitcast=True).to(STATE_DTYPE)
    return bc1, bc2_sqrt


@triton.jit
def _sqrt(x, STATE_DTYPE: tl.constexpr):
    """√x rounded to nearest: tl.sqrt compiles to sqrt.approx.ftz.f32 for fp32, which flushes a
    subnormal v to 0 (with eps = 0 a finite step became inf) where the interpreter's is exact (a
    review found it in the PTX); fp64's tl.sqrt is sqrt.rn already (sqrt_rn takes fp32 only)."""
    if STATE_DTYPE == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _direction(w, g, m, v, vmax, bc1, bc2_sqrt, hyp_ptr, STATE_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
               HAS_DECAY: tl.constexpr):
    """AdamW's new moments, its direction d = p·m̂ + λ·w and TLR's statistic u = √p·σg + λ·w/√p,
    p = 1/(√v̂ + ε), from the moments of the step before (docs/adamw.md)."""
    g = tl.load(hyp_ptr + H_SIGN).to(STATE_DTYPE) * g
    m = m + tl.load(hyp_ptr + H_KEEP1).to(STATE_DTYPE) * (g - m)  # torch's lerp: m + (1 − β1)·(g − m)
    v = tl.load(hyp_ptr + H_BETA2).to(STATE_DTYPE) * v + tl.load(hyp_ptr + H_KEEP2).to(STATE_DTYPE) * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
        vv = vmax
    else:
        vv = v
    precond = 1.0 / (_sqrt(vv, STATE_DTYPE) / bc2_sqrt + tl.load(hyp_ptr + H_EPS).to(STATE_DTYPE))
    d = precond * m / bc1
    root = _sqrt(precond, STATE_DTYPE)
    u = root * g
    if HAS_DECAY:  # λ = 0 has no λ·w term (0·inf weights would be NaN)
        lam = tl.load(hyp_ptr + H_WEIGHT_DECAY).to(STATE_DTYPE)
        d += lam * w
        u += lam * w / root
    return m, v, vmax, d, u


@triton.jit(do_not_specialize=_NO_SPEC_STEP)
def adamw_step_kernel(
    tab_ptr,          # int64 [TABLE_ROWS, n_tensors]: addresses and numels
    n_tensors,
    blk_ptr,          # int64 [2, n_blocks]: each block's tensor index and first element
    n_blocks,
    part_ptr,         # float64 [2, n_part]: per-block ⟨R, P⟩ and ‖R‖² of the whole group (CLOSING)
    n_part,
    part_offset,      # where this bucket's blocks start in part_ptr
    bc1_bits,         # 1 − β1^t and √(1 − β2^t) of this launch's step count t (every tensor of a launch
    bc2_bits,         # has taken t steps, this one included): the int64 bits of fp64 values
    hyp_ptr,          # float64 [HYPER_SIZE]
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    CLOSING: tl.constexpr,        # this step closes the window: partials, P ← R, R ← 0, no move
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,          # > 1: 16-byte-aligned addresses, sizes multiples of ALIGN (host-checked)
):
    bc1, bc2_sqrt = _corrections(bc1_bits, bc2_bits, STATE_DTYPE)
    pid, i, start, lanes, live = _block(tab_ptr, n_tensors, blk_ptr, n_blocks, BLOCK, ALIGN)
    # every load before the first store (the table's addresses may alias: a store in between
    # would send the loads after it back to memory)
    p_ptr = _at(tab_ptr, PARAM, n_tensors, i, start, PARAM_DTYPE, ALIGN)
    w = tl.load(p_ptr + lanes, mask=live, other=0.0).to(STATE_DTYPE)
    g = tl.load(_at(tab_ptr, GRAD, n_tensors, i, start, PARAM_DTYPE, ALIGN) + lanes, mask=live, other=0.0)
    g = g.to(STATE_DTYPE)
    m_ptr = _at(tab_ptr, EXP_AVG, n_tensors, i, start, STATE_DTYPE, ALIGN)
    m = tl.load(m_ptr + lanes, mask=live, other=0.0)
    v_ptr = _at(tab_ptr, EXP_AVG_SQ, n_tensors, i, start, STATE_DTYPE, ALIGN)
    v = tl.load(v_ptr + lanes, mask=live, other=0.0)
    vmax = v
    if AMSGRAD:
        x_ptr = _at(tab_ptr, MAX_EXP_AVG_SQ, n_tensors, i, start, STATE_DTYPE, ALIGN)
        vmax = tl.load(x_ptr + lanes, mask=live, other=0.0)
    a_ptr = _at(tab_ptr, WINDOW, n_tensors, i, start, STATE_DTYPE, ALIGN)
    a = tl.load(a_ptr + lanes, mask=live, other=0.0)
    if CLOSING:
        q_ptr = _at(tab_ptr, PREV, n_tensors, i, start, STATE_DTYPE, ALIGN)
        prev = tl.load(q_ptr + lanes, mask=live, other=0.0)
    alpha = tl.load(_row(tab_ptr, ALPHA, n_tensors, i).to(tl.pointer_type(tl.float32))).to(STATE_DTYPE)
    step_size = alpha * tl.load(hyp_ptr + H_LR_FACTOR).to(STATE_DTYPE)

    m, v, vmax, d, u = _direction(w, g, m, v, vmax, bc1, bc2_sqrt, hyp_ptr, STATE_DTYPE, AMSGRAD, HAS_DECAY)
    a += u
    tl.store(m_ptr + lanes, m, mask=live)
    tl.store(v_ptr + lanes, v, mask=live)
    if AMSGRAD:
        tl.store(x_ptr + lanes, vmax, mask=live)
    if CLOSING:
        tl.store(q_ptr + lanes, a, mask=live)      # P ← R
        tl.store(a_ptr + lanes, tl.zeros_like(a), mask=live)  # R ← 0 (not a·0: NaN·0 is NaN)
        a = tl.where(live, a, 0.0)
        dot = tl.sum(a * prev, axis=0)
        sq = tl.sum(a * a, axis=0)
        tl.store(part_ptr + part_offset + pid, dot.to(tl.float64))
        tl.store(part_ptr + n_part + part_offset + pid, sq.to(tl.float64))
    else:
        tl.store(a_ptr + lanes, a, mask=live)
        tl.store(p_ptr + lanes, _to_param(w - step_size * d, PARAM_DTYPE), mask=live)


@triton.jit(do_not_specialize=_NO_SPEC_ALPHA)
def adamw_alpha_kernel(
    scope_ptr,        # int64 [3, n_scopes]: each α-scope's first block, end block and α address
    n_scopes,
    part_ptr,         # float64 [2, n_part]: the step kernels' partials
    n_part,
    hyp_ptr,
    RBLOCK: tl.constexpr,
):
    """α_s ← α_s·(1 + r_s) (SPEC's Newton step, r_s from scope s's ⟨R, P⟩ and ‖R‖²), in fp64; a new
    α outside float32's normal range is refused (α is kept)."""
    s = tl.program_id(0).to(tl.int64)
    start = tl.load(scope_ptr + s)
    end = tl.load(scope_ptr + n_scopes + s)
    alpha_ptr = tl.load(scope_ptr + 2 * n_scopes + s).to(tl.pointer_type(tl.float32))
    dot, sq = _reduce(part_ptr, n_part, start, end, RBLOCK)
    old = tl.load(alpha_ptr).to(tl.float64)
    new = old * (1.0 + _newton_r(dot, sq, tl.load(hyp_ptr + H_BOUND)))
    keep = (new >= 1.1754943508222875e-38) & (new <= 3.4028234663852886e38)
    tl.store(alpha_ptr, tl.where(keep, new, old).to(tl.float32))


@triton.jit(do_not_specialize=_NO_SPEC_MOVE)
def adamw_move_kernel(
    tab_ptr,
    n_tensors,
    blk_ptr,
    n_blocks,
    bc1_bits,
    bc2_bits,
    hyp_ptr,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """A closing's move with the α launch 2 decided: w -= α·f·d, d = p·m̂ + λ·w from the moments
    launch 1 wrote (12 bytes per fp32 parameter read, 4 written; 16 with amsgrad's max v)."""
    bc1, bc2_sqrt = _corrections(bc1_bits, bc2_bits, STATE_DTYPE)
    pid, i, start, lanes, live = _block(tab_ptr, n_tensors, blk_ptr, n_blocks, BLOCK, ALIGN)
    p_ptr = _at(tab_ptr, PARAM, n_tensors, i, start, PARAM_DTYPE, ALIGN)
    w = tl.load(p_ptr + lanes, mask=live, other=0.0).to(STATE_DTYPE)
    m = tl.load(_at(tab_ptr, EXP_AVG, n_tensors, i, start, STATE_DTYPE, ALIGN) + lanes, mask=live, other=0.0)
    if AMSGRAD:
        vv = tl.load(_at(tab_ptr, MAX_EXP_AVG_SQ, n_tensors, i, start, STATE_DTYPE, ALIGN) + lanes, mask=live,
                     other=0.0)
    else:
        vv = tl.load(_at(tab_ptr, EXP_AVG_SQ, n_tensors, i, start, STATE_DTYPE, ALIGN) + lanes, mask=live,
                     other=0.0)
    alpha = tl.load(_row(tab_ptr, ALPHA, n_tensors, i).to(tl.pointer_type(tl.float32))).to(STATE_DTYPE)
    d = (1.0 / (_sqrt(vv, STATE_DTYPE) / bc2_sqrt + tl.load(hyp_ptr + H_EPS).to(STATE_DTYPE))) * m / bc1  # as launch 1's
    if HAS_DECAY:
        d += tl.load(hyp_ptr + H_WEIGHT_DECAY).to(STATE_DTYPE) * w
    step_size = alpha * tl.load(hyp_ptr + H_LR_FACTOR).to(STATE_DTYPE)
    tl.store(p_ptr + lanes, _to_param(w - step_size * d, PARAM_DTYPE), mask=live)
