"""Triton kernels for one TLR step over every tensor of a (device, dtype) bucket.

One step of one param group is three launches, always the same three, so that a CUDA
graph can capture them; whether the step closes a window is decided on the device from
the group's step counter and window state (units of W0 steps so far, length k):

1. ``tlr_step_kernel``, one program per block of BLOCK elements of any tensor:
   direction (weight decay, momentum, nesterov, maximize), window statistic and, on an
   ordinary step, the weight update with α read from device memory. On a closing step
   it instead writes this block's partial ⟨A, P⟩ and ‖A‖², moves A into P, and leaves
   the weights for launch 3. Its first program writes the "closes" flag.
2. ``tlr_alpha_kernel``, one program per α-scope: on a closing step, sums its blocks'
   partials in a fixed order (no atomics: bit-identical runs), applies SPEC's Newton
   factor with its guards and writes α; its first program advances the window state
   (the adaptive window's next length comes from the whole group's Newton step).
3. ``tlr_move_kernel``: on a closing step, moves the weights with the new α
   (Algorithm 2's order) and restarts the window snapshot; otherwise it does nothing.

Tensors are reached through a table of addresses (one int64 row per kind of tensor),
blocks through a block → (tensor, offset) map; offsets are int64, so one tensor may
hold more than 2³¹ elements. Weights and gradients are fp32, fp16 or bf16 (or fp64);
state and every reduction are fp32 (fp64 for fp64 weights); α is fp32.

Two ways to hold the window sum A (SPEC's "A ← A + u"):
- SNAPSHOT (statistic "direction", or momentum 0, for fp32/fp64 weights): A is the
  displacement since the window started, (S - w)/α, with S a copy of the weights taken
  at the window's start. An ordinary step then touches exactly what fused SGD touches.
- otherwise A is summed in an fp32 buffer: one extra read and write per element.
"""

import triton
import triton.language as tl

# Rows of the address table. Module globals that a kernel reads must be tl.constexpr(...):
# the compiler rejects any other global (Triton's interpreter does not).
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
MOMENTUM = tl.constexpr(2)
WINDOW = tl.constexpr(3)
PREV = tl.constexpr(4)
ALPHA = tl.constexpr(5)
NUMEL = tl.constexpr(6)
FIRST = tl.constexpr(7)
TABLE_ROWS = 8

# Entries of the float64 hyper-parameter vector. Hyper-parameters travel in device memory,
# not as scalar arguments: a float argument is fp32 on the GPU (while the interpreter
# keeps a Python float), and an int one (``weight_decay=1``) becomes a compile-time
# constant; from memory each kernel reads them in fp64 and rounds once to its state dtype.
H_MOMENTUM = tl.constexpr(0)
H_DAMPENING = tl.constexpr(1)
H_WEIGHT_DECAY = tl.constexpr(2)
H_SIGN = tl.constexpr(3)           # -1.0 with maximize, else 1.0
H_BOUND = tl.constexpr(4)          # the paper's c
H_WINDOW_RESET = tl.constexpr(5)
HYPER_SIZE = 6

# Integer arguments that change with the layout of a group (counts, offsets, the window)
# are not specialised: Triton would otherwise compile a new kernel for every value equal
# to 1 or divisible by 16, and a value of 1 would become a constant of another type.
_NO_SPEC_STEP = ["n_tensors", "n_blocks", "n_part", "part_offset", "write_flag", "window", "units"]
_NO_SPEC_ALPHA = ["n_scopes", "n_part", "n_total", "window", "units"]
_NO_SPEC_MOVE = ["n_tensors", "n_blocks"]


@triton.jit
def _row(tab_ptr, row, n_tensors, t):
    return tl.load(tab_ptr + row * n_tensors + t)


@triton.jit
def _and(mask, flag):
    """``mask & flag`` for a block mask and a scalar flag (Triton's interpreter types that `&` as int32)."""
    return (mask.to(tl.int32) * flag.to(tl.int32)) != 0


@triton.jit
def _to_param(x, PARAM_DTYPE: tl.constexpr):
    """Cast fp32/fp64 to the weights' dtype, rounding to nearest even.

    bf16 is rounded by hand: Triton's interpreter truncates fp32 → bf16.
    """
    if PARAM_DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PARAM_DTYPE)


@triton.jit
def _block(tab_ptr, n_tensors, blk_ptr, n_blocks, BLOCK: tl.constexpr):
    """This program's block: its index, tensor, first element (int64), lanes and in-bounds mask.

    Addresses are a scalar base at the block's first element (``_at``) plus int32 lanes:
    one 64-bit address per program, not one per element (which cost registers and spills).
    """
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blk_ptr + pid)
    start = tl.load(blk_ptr + n_blocks + pid)
    lanes = tl.arange(0, BLOCK)
    left = tl.minimum(_row(tab_ptr, NUMEL, n_tensors, t) - start, BLOCK).to(tl.int32)
    return pid, t, start, lanes, lanes < left


@triton.jit
def _at(tab_ptr, row, n_tensors, t, start, DTYPE: tl.constexpr):
    """Pointer to the block's first element in the tensor that ``row`` of the table addresses."""
    return _row(tab_ptr, row, n_tensors, t).to(tl.pointer_type(DTYPE)) + start


@triton.jit
def _weights_and_grads(tab_ptr, n_tensors, t, start, lanes, live, scale_ptr,
                       PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The block's weights pointer, its weights and (unscaled) gradients, upcast to the state dtype."""
    p_ptr = _at(tab_ptr, PARAM, n_tensors, t, start, PARAM_DTYPE)
    w = tl.load(p_ptr + lanes, mask=live, other=0.0).to(STATE_DTYPE)
    g = tl.load(_at(tab_ptr, GRAD, n_tensors, t, start, PARAM_DTYPE) + lanes, mask=live, other=0.0).to(STATE_DTYPE)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(STATE_DTYPE)
    return p_ptr, w, g


@triton.jit
def _hyper(hyp_ptr, index, STATE_DTYPE: tl.constexpr):
    """One hyper-parameter, read in fp64 and rounded once to the state dtype."""
    return tl.load(hyp_ptr + index).to(STATE_DTYPE)


@triton.jit
def _direction(w, g, b, first, hyp_ptr, STATE_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """u = sign·g + λ·w (SPEC: maximize negates g only); the new momentum buffer; d."""
    u = _hyper(hyp_ptr, H_SIGN, STATE_DTYPE) * g + _hyper(hyp_ptr, H_WEIGHT_DECAY, STATE_DTYPE) * w
    momentum = _hyper(hyp_ptr, H_MOMENTUM, STATE_DTYPE)
    if HAS_MOMENTUM:
        b = tl.where(first != 0, u, momentum * b + (1.0 - _hyper(hyp_ptr, H_DAMPENING, STATE_DTYPE)) * u)
        if NESTEROV:
            d = u + momentum * b
        else:
            d = b
    else:
        d = u
    return u, b, d


@triton.jit(do_not_specialize=_NO_SPEC_STEP)
def tlr_step_kernel(
    tab_ptr,          # int64 [TABLE_ROWS, n_tensors]: addresses, numels, first-step flags
    n_tensors,
    blk_ptr,          # int64 [2, n_blocks]: each block's tensor index and first element
    n_blocks,
    part_ptr,         # float64 [2, n_part]: per-block ⟨A, P⟩ and ‖A‖² of the whole group
    n_part,
    part_offset,      # where this bucket's blocks start in part_ptr
    step_ptr,         # int64: the group's step counter (before this step)
    scale_ptr,        # fp32: AMP's grad scale (read if HAS_SCALE)
    inf_ptr,          # fp32: AMP's found_inf (read if HAS_INF): nonzero = skip the step
    ws_ptr,           # int64 [2]: the window's state, units so far and its length k in units
    flag_ptr,         # int32: written here (first bucket's first program): 1 if this step closes
    write_flag,       # 1 for the group's first bucket
    window,           # steps per unit (W0)
    units,            # the longest window, in units (K; 1 = fixed windows)
    hyp_ptr,          # float64 [HYPER_SIZE]: the group's hyper-parameters
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    SUM_DIRECTION: tl.constexpr,   # statistic "direction" (A sums d) or "gradient" (A sums u)
    SNAPSHOT: tl.constexpr,        # WINDOW row holds the window-start weights S, not A
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, t, start, lanes, live = _block(tab_ptr, n_tensors, blk_ptr, n_blocks, BLOCK)
    if HAS_INF:
        live = _and(live, tl.load(inf_ptr) == 0)
    closing = _closing(step_ptr, ws_ptr, window, units)
    if pid == 0:
        if write_flag != 0:  # for the α and move kernels; nothing else in this launch reads it
            if HAS_INF:
                tl.store(flag_ptr, _and(closing, tl.load(inf_ptr) == 0).to(tl.int32))
            else:
                tl.store(flag_ptr, closing.to(tl.int32))
    closes = _and(live, closing)
    moves = _and(live, closing == 0)

    p_ptr, w, g = _weights_and_grads(tab_ptr, n_tensors, t, start, lanes, live, scale_ptr, PARAM_DTYPE, STATE_DTYPE, HAS_SCALE)
    alpha_ptr = _row(tab_ptr, ALPHA, n_tensors, t).to(tl.pointer_type(tl.float32))

    b = tl.zeros([BLOCK], dtype=STATE_DTYPE)
    first = 0
    if HAS_MOMENTUM:
        b_ptr = _at(tab_ptr, MOMENTUM, n_tensors, t, start, STATE_DTYPE)
        b = tl.load(b_ptr + lanes, mask=live, other=0.0)
        first = _row(tab_ptr, FIRST, n_tensors, t)
    u, b, d = _direction(w, g, b, first, hyp_ptr, STATE_DTYPE, HAS_MOMENTUM, NESTEROV)
    if HAS_MOMENTUM:
        tl.store(b_ptr + lanes, b, mask=live)

    alpha = tl.load(alpha_ptr).to(STATE_DTYPE)
    if SNAPSHOT:
        # A so far is the displacement since the window's start; add this step's d.
        # (α = 0 moves nothing and stays 0: its displacement is 0, not 0/0.)
        s_ptr = _at(tab_ptr, WINDOW, n_tensors, t, start, PARAM_DTYPE)
        s = tl.load(s_ptr + lanes, mask=closes, other=0.0).to(STATE_DTYPE)
        a = (s - w) / tl.where(alpha > 0, alpha, 1.0) + d
    else:
        a_ptr = _at(tab_ptr, WINDOW, n_tensors, t, start, STATE_DTYPE)
        if SUM_DIRECTION:
            a = tl.load(a_ptr + lanes, mask=live, other=0.0) + d
        else:
            a = tl.load(a_ptr + lanes, mask=live, other=0.0) + u
        tl.store(a_ptr + lanes, tl.where(closing, 0.0, a), mask=live)  # closing: A restarts at 0

    # Closing step: this block's share of ⟨A, P⟩ and ‖A‖², then P ← A.
    pv_ptr = _at(tab_ptr, PREV, n_tensors, t, start, STATE_DTYPE)
    prev = tl.load(pv_ptr + lanes, mask=closes, other=0.0)
    a = tl.where(closes, a, 0.0)
    tl.store(pv_ptr + lanes, a, mask=closes)
    tl.store(part_ptr + part_offset + pid, tl.sum(a * prev, axis=0).to(tl.float64))
    tl.store(part_ptr + n_part + part_offset + pid, tl.sum(a * a, axis=0).to(tl.float64))

    # Ordinary step: move now with the current α.
    tl.store(p_ptr + lanes, _to_param(w - alpha * d, PARAM_DTYPE), mask=moves)


@triton.jit
def _closing(step_ptr, ws_ptr, window, units):
    """Whether this step closes the window: it ends a unit of W0 steps, and the window has its k units."""
    unit_ends = ((tl.load(step_ptr) + 1) % window) == 0
    k = tl.minimum(tl.load(ws_ptr + 1), units)
    return _and(unit_ends, (tl.load(ws_ptr) + 1) >= k)


@triton.jit
def _reduce(part_ptr, n_part, start, end, RBLOCK: tl.constexpr):
    """Σ of the partial ⟨A, P⟩ and ‖A‖² of blocks [start, end), in a fixed order (deterministic).

    A while loop: Triton 3.6's interpreter cannot use a runtime value as a range() bound.
    """
    dot = tl.zeros([RBLOCK], dtype=tl.float64)
    sq = tl.zeros([RBLOCK], dtype=tl.float64)
    i = start
    while i < end:
        idx = i + tl.arange(0, RBLOCK).to(tl.int64)
        m = idx < end
        dot += tl.load(part_ptr + idx, mask=m, other=0.0)
        sq += tl.load(part_ptr + n_part + idx, mask=m, other=0.0)
        i += RBLOCK
    return tl.sum(dot, axis=0), tl.sum(sq, axis=0)


@triton.jit
def _newton_r(dot, sq, bound):
    """SPEC: r = dot / max(4(sq - dot), dot / c); r := 0 for a non-positive denominator or a non-finite r."""
    denom = tl.maximum(4.0 * (sq - dot), dot / bound)
    r = dot / tl.where(denom > 0, denom, 1.0)
    return tl.where(_and(denom > 0, tl.abs(r) <= 1.7976931348623157e308), r, 0.0)  # NaN fails <=


@triton.jit(do_not_specialize=_NO_SPEC_ALPHA)
def tlr_alpha_kernel(
    scope_ptr,        # int64 [3, n_scopes]: first and end block (in part_ptr) and α address of each scope
    n_scopes,
    part_ptr,         # float64 [2, n_part]: per-block ⟨A, P⟩ and ‖A‖²
    n_part,
    n_total,          # blocks of the whole group
    step_ptr,         # int64: the group's step counter (before this step)
    inf_ptr,
    flag_ptr,         # int32: 1 when this step closes a window (written by the step kernel)
    ws_ptr,           # int64 [2]: the window's state (units so far, k), advanced by program 0
    window,
    units,
    hyp_ptr,          # float64 [HYPER_SIZE]: bound c and window_reset are read here
    HAS_INF: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    start = tl.load(scope_ptr + s)
    end = tl.load(scope_ptr + n_scopes + s)
    alpha_ptr = tl.load(scope_ptr + 2 * n_scopes + s).to(tl.pointer_type(tl.float32))
    closing = tl.load(flag_ptr) != 0

    # On an ordinary step the reduction runs no iteration.
    dot_s, sq_s = _reduce(part_ptr, n_part, start, tl.where(closing, end, start), RBLOCK)
    bound = tl.load(hyp_ptr + H_BOUND)
    r = _newton_r(dot_s, sq_s, bound)
    # A new α outside float32's normal range is refused.
    old = tl.load(alpha_ptr).to(tl.float64)
    new = old * (1.0 + r)
    keep = _and(new >= 1.1754943508222875e-38, new <= 3.4028234663852886e38)
    new = tl.where(_and(keep, closing), new, old)
    tl.store(alpha_ptr, new.to(tl.float32))

    if s == 0:  # the window's state: the next window's length from the group's Newton step
        unit_ends = ((tl.load(step_ptr) + 1) % window) == 0
        if HAS_INF:
            unit_ends = _and(unit_ends, tl.load(inf_ptr) == 0)
        dot_g, sq_g = _reduce(part_ptr, n_part, 0, tl.where(_and(closing, units > 1), n_total, 0), RBLOCK)
        r_g = _newton_r(dot_g, sq_g, bound)
        done = tl.load(ws_ptr)
        k = tl.minimum(tl.load(ws_ptr + 1), units)
        next_k = tl.where(tl.abs(r_g) >= tl.load(hyp_ptr + H_WINDOW_RESET), 1, tl.minimum(k + 1, units))
        tl.store(ws_ptr, tl.where(closing, 0, tl.where(unit_ends, done + 1, done)))
        tl.store(ws_ptr + 1, tl.where(closing, next_k, k))


@triton.jit(do_not_specialize=_NO_SPEC_MOVE)
def tlr_move_kernel(
    tab_ptr, n_tensors, blk_ptr, n_blocks,
    flag_ptr,         # int32: 1 if this step closed a window
    scale_ptr,
    hyp_ptr,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    SNAPSHOT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, t, start, lanes, in_tensor = _block(tab_ptr, n_tensors, blk_ptr, n_blocks, BLOCK)
    live = _and(in_tensor, tl.load(flag_ptr) != 0)
    p_ptr, w, g = _weights_and_grads(tab_ptr, n_tensors, t, start, lanes, live, scale_ptr, PARAM_DTYPE, STATE_DTYPE, HAS_SCALE)
    u = _hyper(hyp_ptr, H_SIGN, STATE_DTYPE) * g + _hyper(hyp_ptr, H_WEIGHT_DECAY, STATE_DTYPE) * w
    if HAS_MOMENTUM:  # the step kernel has already advanced the buffer
        b_ptr = _at(tab_ptr, MOMENTUM, n_tensors, t, start, STATE_DTYPE)
        b = tl.load(b_ptr + lanes, mask=live, other=0.0)
        if NESTEROV:
            d = u + _hyper(hyp_ptr, H_MOMENTUM, STATE_DTYPE) * b
        else:
            d = b
    else:
        d = u
    alpha = tl.load(_row(tab_ptr, ALPHA, n_tensors, t).to(tl.pointer_type(tl.float32))).to(STATE_DTYPE)
    w_new = _to_param(w - alpha * d, PARAM_DTYPE)
    tl.store(p_ptr + lanes, w_new, mask=live)
    if SNAPSHOT:  # the next window starts here
        s_ptr = _at(tab_ptr, WINDOW, n_tensors, t, start, PARAM_DTYPE)
        tl.store(s_ptr + lanes, w_new, mask=live)
