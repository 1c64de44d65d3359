"""Triton kernels for one TLR step over every tensor of a (device, dtype) bucket.

One step of one param group is four launches (three with one α for the group, the
default), always the same ones, so that a CUDA graph can capture them; whether the step
closes a window is decided on the device from the group's step counter and window state
(units of W0 steps so far, length k):

1. ``tlr_step_kernel``, one program per block of BLOCK elements of any tensor:
   direction (weight decay, momentum, nesterov, maximize), window statistic and, on an
   ordinary step, the weight update with α read from device memory. Where the window
   closes as scheduled it instead writes this block's partial ⟨A, P⟩ and ‖A‖², moves A
   into P and leaves the weights for launch 4; at the other ends of units of an adaptive
   window watched by the blow-up guard it writes the partials and moves the weights.
   With the partials go the block's ‖w‖² before the move (the guard's growth test) and
   ⟨A, w⟩ (its decay test); every step it writes the α it moves with (the guard's
   ``MOVE_FLOOR`` weighs ‖A‖² by α²). Every load is issued before the first store.
2. ``tlr_window_kernel``, one program: from the group's total ⟨A, P⟩, ‖A‖² and ‖w‖²
   (summed in a fixed order: no atomics, bit-identical runs) it decides whether the window
   closes (as scheduled, or early when the guard sees ‖A‖² per unit jump), the next
   window's length, and the guard's cap on α's factor (also at a closing where the weights
   grew: ``GROWTH``) and on α itself (a window mostly of weight decay: ``DECAY_SHARE``); it
   advances the window state. With one α for the group it then updates α itself (launch 3's
   work for its one scope: one launch less per step).
3. ``tlr_alpha_kernel``, one program per α-scope, launched with one α per tensor: when the
   window closes, sums its blocks' partials in a fixed order, applies SPEC's Newton factor
   with its guards (and the caps) and writes α.
4. ``tlr_move_kernel``, a persistent grid sized to the GPU striding over the blocks: on a
   scheduled closing, moves the weights with the new α (Algorithm 2's order) and restarts
   the window snapshot; on an early one (the weights moved in launch 1), P ← A and A ← 0,
   or with a snapshot P ← A recovered with the α launch 1 moved with (row 3 of the
   partials) and the snapshot restarted; otherwise each program reads the flag and exits.

Tensors are reached through a table of addresses (one int64 row per kind of tensor),
blocks through a block → (tensor, offset) map; offsets are int64, so one tensor may
hold more than 2³¹ elements. ALIGN > 1 (a constexpr the launcher sets after checking
every address and size of the bucket) lets the compiler use 16-byte vector accesses. Weights and gradients are fp32, fp16 or bf16 (or fp64);
state and every reduction are fp32 (fp64 for fp64 weights); α is fp32.

Two ways to hold the window sum A (SPEC's "A ← A + u"):
- SNAPSHOT (fp32/fp64 weights, no learning-rate schedule): A is recovered from the
  window's start. Within a window α is constant, so with z = w - α·κ·b (b the momentum
  buffer) the window's sum so far is A = c·(S - z)/α, S = z at the window's start:
  statistic "direction" or momentum 0: κ = 0, c = 1 (A is the displacement over α);
  "gradient" with heavy-ball momentum μ: κ = μ/(1 - μ), c = 1 - μ (from b_t - μ·b_{t-1} = u_t
  and Σ b_t = Σ displacement/α); with nesterov κ = μ²/(1 - μ) (docs/triton.md derives
  them.) An ordinary step then reads and writes exactly what fused SGD does; S is read
  only where ⟨A, P⟩ and ‖A‖² are needed and rewritten at a closing.
- otherwise A is summed in a buffer of the state dtype: one extra read and write per element.
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
H_LR_FACTOR = tl.constexpr(6)      # a learning-rate schedule's factor: the weights move by α · factor · d
H_BLOWUP = tl.constexpr(7)         # the adaptive window's blow-up guard ratio (0: off)
H_KAPPA = tl.constexpr(8)          # SNAPSHOT: A = c·(S - (w - α·κ·b))/α
H_SNAP_C = tl.constexpr(9)
H_UNDAMP = tl.constexpr(10)        # 1/(1 - τ) (from the host: a division in the kernel spilled)
HYPER_SIZE = 11

# The blow-up guard's growth test: at a closing with ⟨A, P⟩ < 0 and ‖A‖² per unit above the
# last window's, weights whose Σ‖w‖² grew more than GROWTH-fold since the last closing cut α (tlr_triton.functional.GROWTH, the
# same value: kernels/ imports nothing from tlr_triton; a test checks they agree).
GROWTH = tl.constexpr(2.0)
# Both guard tests count only where Σ α²·‖A‖² per unit exceeds MOVE_FLOOR² · Σ‖w‖² (steps that can
# throw the weights out; tlr_triton.functional.MOVE_FLOOR, the same value).
MOVE_FLOOR = tl.constexpr(0.01)
# The decay test: at a closing with ‖A - λ·n·w‖ <= DECAY_SHARE·‖A‖ (n: the window's steps; a window
# mostly of weight decay) no α grows past max(α, the peak α); tlr_triton.functional.DECAY_SHARE, the same value.
DECAY_SHARE = tl.constexpr(0.9)

# What the window kernel decides for this step (int32 ``flag``).
OPEN = tl.constexpr(0)             # the window goes on
CLOSES = tl.constexpr(1)           # it closes as scheduled: α first, then every weight moves (launch 4)
CLOSES_LATE = tl.constexpr(2)      # the blow-up guard closes it after this step's move: α, then P ← A

# Integer arguments that change with the layout of a group (counts, offsets, the window)
# are not specialised: Triton would otherwise compile a new kernel for every value equal
# to 1 or divisible by 16, and a value of 1 would become a constant of another type.
_NO_SPEC_STEP = ["n_tensors", "n_blocks", "n_part", "part_offset", "window", "units"]
_NO_SPEC_WINDOW = ["n_part", "n_total", "window", "units"]
_NO_SPEC_ALPHA = ["n_scopes", "n_part"]
_NO_SPEC_MOVE = ["n_tensors", "n_blocks", "n_part", "part_offset"]


@triton.jit
def _row(tab_ptr, row, n_tensors, t):
    return tl.load(tab_ptr + row * n_tensors + t)


@triton.jit
def _and(mask, flag):
    """``mask & flag`` for a block mask and a scalar flag (Triton's interpreter types that `&` as int32)."""
    return (mask.to(tl.int32) * flag.to(tl.int32)) != 0


@triton.jit
def _or(a, b):
    """``a | b`` for boolean scalars or blocks (see ``_and``)."""
    return (a.to(tl.int32) + b.to(tl.int32)) != 0


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
def _block(tab_ptr, n_tensors, blk_ptr, n_blocks, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """This program's block (``_block_at`` of the program id)."""
    return _block_at(tab_ptr, n_tensors, blk_ptr, n_blocks, tl.program_id(0).to(tl.int64), BLOCK, ALIGN)


@triton.jit
def _block_at(tab_ptr, n_tensors, blk_ptr, n_blocks, pid, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Block ``pid``: its index, tensor, first element (int64), lanes and in-bounds mask.

    Addresses are a scalar base at the block's first element (``_at``) plus int32 lanes:
    one 64-bit address per program, not one per element (which cost registers and spills).
    Blocks start at multiples of BLOCK; with ALIGN > 1 every tensor's size is a multiple of
    ALIGN (checked on the host), so the mask is constant over runs of ALIGN lanes and the
    compiler may move them with one vector access.
    """
    t = tl.load(blk_ptr + pid)
    start = tl.load(blk_ptr + n_blocks + pid)
    if ALIGN > 1:
        start = tl.multiple_of(start, BLOCK)
    lanes = tl.arange(0, BLOCK)
    left = tl.minimum(_row(tab_ptr, NUMEL, n_tensors, t) - start, BLOCK).to(tl.int32)
    if ALIGN > 1:
        left = tl.multiple_of(left, ALIGN)
    return pid, t, start, lanes, lanes < left


@triton.jit
def _at(tab_ptr, row, n_tensors, t, start, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Pointer to the block's first element in the tensor that ``row`` of the table addresses
    (16-byte aligned when ALIGN > 1: every address of the bucket was checked on the host)."""
    base = _row(tab_ptr, row, n_tensors, t).to(tl.pointer_type(DTYPE))
    if ALIGN > 1:
        base = tl.multiple_of(base, 16)
    return base + start


@triton.jit
def _weights_and_grads(tab_ptr, n_tensors, t, start, lanes, live, scale_ptr,
                       PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr,
                       ALIGN: tl.constexpr):
    """The block's weights pointer, its weights and (unscaled) gradients, upcast to the state dtype."""
    p_ptr = _at(tab_ptr, PARAM, n_tensors, t, start, PARAM_DTYPE, ALIGN)
    w = tl.load(p_ptr + lanes, mask=live, other=0.0).to(STATE_DTYPE)
    g = tl.load(_at(tab_ptr, GRAD, n_tensors, t, start, PARAM_DTYPE, ALIGN) + lanes, mask=live, other=0.0).to(STATE_DTYPE)
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
    part_ptr,         # float64 [5, n_part]: per-block ⟨A, P⟩, ‖A‖², ‖w‖², α and ⟨A, w⟩ of the whole group
    n_part,
    part_offset,      # where this bucket's blocks start in part_ptr
    step_ptr,         # int64: the group's step counter (before this step)
    scale_ptr,        # fp32: AMP's grad scale (read if HAS_SCALE)
    inf_ptr,          # fp32: AMP's found_inf (read if HAS_INF): nonzero = skip the step
    ws_ptr,           # int64 [2]: the window's state, units so far and its length k in units
    window,           # steps per unit (W0)
    units,            # the longest window, in units (K; 1 = fixed windows)
    hyp_ptr,          # float64 [HYPER_SIZE]: the group's hyper-parameters
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    SUM_DIRECTION: tl.constexpr,   # statistic "direction" (A sums d) or "gradient" (A sums u)
    SNAPSHOT: tl.constexpr,        # WINDOW row holds the window-start snapshot S, not A
    DAMPENED: tl.constexpr,        # momentum with dampening τ != 0 (SNAPSHOT: c and a first step's term)
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,           # > 1: 16-byte-aligned addresses, sizes multiples of ALIGN (host-checked)
):
    pid, t, start, lanes, live = _block(tab_ptr, n_tensors, blk_ptr, n_blocks, BLOCK, ALIGN)
    if HAS_INF:
        live = _and(live, tl.load(inf_ptr) == 0)
    unit_ends, closing = _schedule(step_ptr, ws_ptr, window, units)
    # ⟨A, P⟩ and ‖A‖² are needed where the window closes as scheduled, and at every unit's
    # end when the blow-up guard watches the window (the window kernel then decides).
    watched = _and(units > 1, tl.load(hyp_ptr + H_BLOWUP) > 0)
    needed = _and(unit_ends, _or(closing, watched))
    counts = _and(live, needed)
    closes = _and(live, closing)
    moves = _and(live, closing == 0)

    # Every load comes before the first store, and no load's mask waits on another load's
    # value: the compiler keeps loads behind stores (the tables' addresses may alias), so a
    # store in between, or a mask that needs α, costs the block one more trip to memory;
    # at a closing that made the step kernel 5.8x an ordinary one on an H200 (measured).
    p_ptr, w, g = _weights_and_grads(tab_ptr, n_tensors, t, start, lanes, live, scale_ptr, PARAM_DTYPE, STATE_DTYPE, HAS_SCALE,
                                     ALIGN)
    alpha_ptr = _row(tab_ptr, ALPHA, n_tensors, t).to(tl.pointer_type(tl.float32))
    alpha = tl.load(alpha_ptr).to(STATE_DTYPE)
    b = tl.zeros([BLOCK], dtype=STATE_DTYPE)
    first = 0
    if HAS_MOMENTUM:
        b_ptr = _at(tab_ptr, MOMENTUM, n_tensors, t, start, STATE_DTYPE, ALIGN)
        b = tl.load(b_ptr + lanes, mask=live, other=0.0)
        first = _row(tab_ptr, FIRST, n_tensors, t)
    pv_ptr = _at(tab_ptr, PREV, n_tensors, t, start, STATE_DTYPE, ALIGN)
    prev = tl.load(pv_ptr + lanes, mask=counts, other=0.0)
    if SNAPSHOT:
        # α set by hand since the last step (AlphaRestart, fill_): the snapshot holds the α this
        # block last moved with (row 3 of the partials, kept from step to step; 0: unknown), so A
        # is recovered with that one and the snapshot retaken with the new α below.
        moved_with = tl.load(part_ptr + 3 * n_part + part_offset + pid).to(STATE_DTYPE)
        s_ptr = _at(tab_ptr, WINDOW, n_tensors, t, start, PARAM_DTYPE, ALIGN)
        s = tl.load(s_ptr + lanes, mask=counts, other=0.0).to(STATE_DTYPE)
        rebase = _and(moved_with > 0, moved_with != alpha)
        # a tensor's first step with dampening (b = u, not (1 - τ)·u) breaks the snapshot's
        # identity for its window: the snapshot is retaken right after it, as after a rebase
        retake = rebase
        if DAMPENED:
            retake = _or(rebase, first != 0)
        if retake:  # rare: the whole snapshot is needed
            s = tl.load(s_ptr + lanes, mask=live, other=0.0).to(STATE_DTYPE)
    else:
        a_ptr = _at(tab_ptr, WINDOW, n_tensors, t, start, STATE_DTYPE, ALIGN)
        a_old = tl.load(a_ptr + lanes, mask=live, other=0.0)

    u, b, d = _direction(w, g, b, first, hyp_ptr, STATE_DTYPE, HAS_MOMENTUM, NESTEROV)
    step_size = alpha * _hyper(hyp_ptr, H_LR_FACTOR, STATE_DTYPE)
    if SNAPSHOT:
        snap_c = _hyper(hyp_ptr, H_SNAP_C, STATE_DTYPE)
        if HAS_MOMENTUM and NESTEROV and not SUM_DIRECTION:
            mu_u = _hyper(hyp_ptr, H_MOMENTUM, STATE_DTYPE) * u
    if HAS_MOMENTUM:
        tl.store(b_ptr + lanes, b, mask=live)

    if SNAPSHOT:
        # A so far, recovered from the window's snapshot, plus this step's term:
        # c·(S - z)/α with z = w - α·κ·b_old is c·(S - w)/α + c·κ·b_old, and c·κ·b_old + u is
        # the new buffer over 1 - τ, (μ·b_old + (1 - τ)·u)/(1 - τ) with heavy ball (u itself at a
        # first step, where b_old = 0 and b = u), μ·b + (1 - μ)·u with nesterov (b new), so the
        # old buffer need not stay live (it made the kernel spill).
        a = (snap_c / tl.where(rebase, moved_with, alpha)) * (s - w)
        if SUM_DIRECTION:
            a += d
        elif HAS_MOMENTUM and NESTEROV:
            a += d - mu_u
        elif DAMPENED:  # at a tensor's first step u itself (b = u there), which the snapshot retakes
            a += b * tl.where(first != 0, 1.0, _hyper(hyp_ptr, H_UNDAMP, STATE_DTYPE))
        elif HAS_MOMENTUM:
            a += b
        else:
            a += u
        if retake:  # S = z after this step's move (no schedule: α·d), plus α·A/c (a closing retakes it in launch 4)
            s = _to_param(w - alpha * d, PARAM_DTYPE).to(STATE_DTYPE) + (alpha / snap_c) * a
            if HAS_MOMENTUM and not SUM_DIRECTION:
                s -= (alpha * _hyper(hyp_ptr, H_KAPPA, STATE_DTYPE)) * b
            tl.store(s_ptr + lanes, s.to(PARAM_DTYPE), mask=moves)
    else:
        if SUM_DIRECTION:
            a = a_old + d
        else:
            a = a_old + u
        tl.store(a_ptr + lanes, tl.where(closing, 0.0, a), mask=live)  # closing: A restarts at 0

    # A unit's end that the window kernel reads (it reads nothing else): this block's share of
    # ⟨A, P⟩ and ‖A‖² (zeros where not counted), its ‖w‖² and ⟨A, w⟩ before the move (the blow-up
    # guard's growth and decay tests); a scheduled closing: P ← A. Other steps skip the reductions.
    if needed:
        a = tl.where(counts, a, 0.0)
        tl.store(pv_ptr + lanes, a, mask=closes)
        tl.store(part_ptr + part_offset + pid, tl.sum(a * prev, axis=0).to(tl.float64))
        tl.store(part_ptr + n_part + part_offset + pid, tl.sum(a * a, axis=0).to(tl.float64))
        # in fp32 whatever the weights: the growth test compares it with twice its last value
        w32 = w.to(tl.float32)
        tl.store(part_ptr + 2 * n_part + part_offset + pid, tl.sum(w32 * w32, axis=0).to(tl.float64))
        # the decay test reads A as u's sum (λ·Σw its decay part), so a sum of momentum directions gives 0: no test
        if SUM_DIRECTION and HAS_MOMENTUM:
            aw = tl.zeros([], dtype=tl.float64)
        else:
            aw = tl.sum(a * w, axis=0).to(tl.float64)
        tl.store(part_ptr + 4 * n_part + part_offset + pid, aw)
    # The α this block moves with: the window kernel's Σ α²·‖A‖² (the guard's MOVE_FLOOR test) and,
    # at a late close with a snapshot, the move kernel's (α has changed by then); the next step's
    # check above (with a snapshot, not on a step AMP skips: nothing moved). Not α²·‖A‖²
    # itself: that product made snapshot kernels spill.
    if SNAPSHOT and HAS_INF:
        tl.store(part_ptr + 3 * n_part + part_offset + pid, alpha.to(tl.float64), mask=tl.load(inf_ptr) == 0)
    else:
        tl.store(part_ptr + 3 * n_part + part_offset + pid, alpha.to(tl.float64))

    # Ordinary step: move now with the current α.
    tl.store(p_ptr + lanes, _to_param(w - step_size * d, PARAM_DTYPE), mask=moves)


@triton.jit
def _schedule(step_ptr, ws_ptr, window, units):
    """Whether this step ends a unit of W0 steps, and whether the window then has its k units (closes)."""
    unit_ends = ((tl.load(step_ptr) + 1) % window) == 0
    k = tl.minimum(tl.load(ws_ptr + 1), units)
    return unit_ends, _and(unit_ends, (tl.load(ws_ptr) + 1) >= k)


@triton.jit
def _reduce(part_ptr, n_part, start, end, RBLOCK: tl.constexpr):
    """Σ of the first two rows of partials (⟨A, P⟩ and ‖A‖²) over blocks [start, end),
    in a fixed order (deterministic).

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
def _totals(part_ptr, n_part, end, guard_end, RBLOCK: tl.constexpr):
    """The window kernel's sums over blocks [0, end), in a fixed order, in one pass over the
    partials (one trip to memory per RBLOCK blocks): ⟨A, P⟩ (row 0), ‖A‖² (row 1) and, over
    blocks [0, guard_end), the blow-up guard's Σ ‖w‖² (row 2), Σ α²·‖A‖² (rows 3 and 1),
    Σ⟨A, w⟩ (row 4) and the largest α (row 3)."""
    dot = tl.zeros([RBLOCK], dtype=tl.float64)
    sq = tl.zeros([RBLOCK], dtype=tl.float64)
    weights = tl.zeros([RBLOCK], dtype=tl.float64)
    moved = tl.zeros([RBLOCK], dtype=tl.float64)
    along = tl.zeros([RBLOCK], dtype=tl.float64)
    top = tl.zeros([RBLOCK], dtype=tl.float64)
    i = end * 0
    while i < end:
        idx = i + tl.arange(0, RBLOCK).to(tl.int64)
        m = idx < end
        g = idx < guard_end
        dot += tl.load(part_ptr + idx, mask=m, other=0.0)
        a2 = tl.load(part_ptr + n_part + idx, mask=m, other=0.0)
        sq += a2
        weights += tl.load(part_ptr + 2 * n_part + idx, mask=g, other=0.0)
        alpha = tl.load(part_ptr + 3 * n_part + idx, mask=g, other=0.0)
        moved += alpha * alpha * a2
        along += tl.load(part_ptr + 4 * n_part + idx, mask=g, other=0.0)
        top = tl.maximum(top, alpha)
        i += RBLOCK
    return (tl.sum(dot, axis=0), tl.sum(sq, axis=0), tl.sum(weights, axis=0), tl.sum(moved, axis=0),
            tl.sum(along, axis=0), tl.max(top.to(tl.float32), axis=0))


@triton.jit
def _newton_r(dot, sq, bound):
    """SPEC: r = dot / max(4(sq - dot), dot / c); r := 0 for a non-positive denominator or a non-finite r."""
    denom = tl.maximum(4.0 * (sq - dot), dot / bound)
    r = dot / tl.where(denom > 0, denom, 1.0)
    return tl.where(_and(denom > 0, tl.abs(r) <= 1.7976931348623157e308), r, 0.0)  # NaN fails <=


@triton.jit
def _new_alpha(old, closing, dot, sq, cut, ceiling, bound):
    """α ← α·min(1 + r, cut), at most max(α, ceiling), where the window closes (SPEC's Newton step
    and the blow-up guard's caps), in fp64; a new α outside float32's normal range is refused."""
    r = _newton_r(dot, sq, bound)
    new = tl.minimum(old * tl.minimum(1.0 + r, cut), tl.maximum(old, ceiling))
    keep = _and(new >= 1.1754943508222875e-38, new <= 3.4028234663852886e38)
    return tl.where(_and(keep, closing), new, old)


@triton.jit(do_not_specialize=_NO_SPEC_WINDOW)
def tlr_window_kernel(
    part_ptr,         # float64 [5, n_part]: per-block ⟨A, P⟩, ‖A‖², ‖w‖², α and ⟨A, w⟩
    n_part,
    n_total,          # blocks of the whole group
    step_ptr,         # int64: the group's step counter (before this step), advanced here
    inf_ptr,
    ws_ptr,           # int64 [2]: the window's state (units so far, k), advanced here
    we_ptr,           # float64 [4]: ‖A‖² per unit of the last two closed windows, Σ‖w‖² at the last closing,
                      # the peak α (the decay test's)
    flag_ptr,         # int32: written here: OPEN, CLOSES or CLOSES_LATE
    cut_ptr,          # float64 [2]: written here: the largest factor α may take (no cap unless the guard trips)
                      # and the ceiling: no α grows past max(α, ceiling) (the α kernel reads them)
    alpha_ptr,        # fp32: the group's α, updated here when GROUP_ALPHA
    window,
    units,
    hyp_ptr,
    HAS_INF: tl.constexpr,
    GROUP_ALPHA: tl.constexpr,  # one α for the group: this kernel updates it (no α kernel is launched)
    RBLOCK: tl.constexpr,
):
    """One program: the group's window decision for this step (SPEC's closing, the adaptive
    window's next length, the blow-up guard), from the group's total ⟨A, P⟩, ‖A‖² and ‖w‖²;
    with one α for the group, α's update; then the group's step counter advances."""
    unit_ends, scheduled = _schedule(step_ptr, ws_ptr, window, units)
    if HAS_INF:
        ok = tl.load(inf_ptr) == 0
        unit_ends = _and(unit_ends, ok)
        scheduled = _and(scheduled, ok)
    ratio = tl.load(hyp_ptr + H_BLOWUP)
    watched = _and(units > 1, ratio > 0)
    # The totals are summed where the adaptive window's decisions need them and, with one α for
    # the group, at every scheduled closing (α's update below); the decisions see them only
    # where the adaptive window needs them.
    needed = _and(unit_ends, _or(_and(scheduled, units > 1), watched))
    if GROUP_ALPHA:
        end = tl.where(_and(unit_ends, _or(scheduled, watched)), n_total, 0)
    else:
        end = tl.where(needed, n_total, 0)
    dot_all, sq_all, weights, moved, along, top = _totals(part_ptr, n_part, end, tl.where(watched, end, 0), RBLOCK)
    dot = tl.where(needed, dot_all, 0.0)
    sq = tl.where(needed, sq_all, 0.0)
    done = tl.load(ws_ptr) + 1
    k = tl.minimum(tl.load(ws_ptr + 1), units)
    energy = sq / done.to(tl.float64)
    # The guard watches only steps that can throw the weights out.
    moving = _and(watched, moved / done.to(tl.float64) > weights * MOVE_FLOOR * MOVE_FLOOR)  # tensor first: the
    # interpreter turns constexpr * constexpr * tensor into a nested tensor
    reference = tl.maximum(tl.load(we_ptr), tl.load(we_ptr + 1))
    jump = _and(_and(unit_ends, moving), _and(reference > 0, energy > ratio * reference))
    no_cap = 1.7976931348623157e308  # the largest float64
    cut = tl.where(jump, 1.0 / (1.0 + tl.sqrt(energy / tl.where(reference > 0, reference, 1.0))), no_cap)
    closes = _or(scheduled, jump)
    # The growth test: consecutive windows disagree and ‖A‖² per unit rises while Σ‖w‖² grew
    # more than GROWTH-fold.
    last = tl.load(we_ptr + 2)
    rising = _and(dot < 0, energy > tl.load(we_ptr))
    grows = _and(_and(closes, moving), _and(_and(last > 0, rising), weights > GROWTH * last))
    cut = tl.minimum(cut, tl.where(grows, 1.0 / (1.0 + tl.sqrt(weights / tl.where(last > 0, last, 1.0))), no_cap))
    tl.store(cut_ptr, cut)
    # The decay test: a window whose sum is mostly weight decay's pull λ·n·w lets no α grow past
    # the peak; any other closing raises the peak to the largest α it moved with.
    decay = tl.load(hyp_ptr + H_WEIGHT_DECAY) * (done * window).to(tl.float64)
    rest = sq - 2.0 * decay * along + decay * decay * weights  # ‖A - λ·n·w‖²
    decays = _and(_and(watched, decay > 0), _and(sq > 0, rest <= sq * DECAY_SHARE * DECAY_SHARE))
    peak = tl.load(we_ptr + 3)
    ceiling = tl.where(decays, peak, no_cap)
    tl.store(cut_ptr + 1, ceiling)
    tl.store(we_ptr + 3, tl.where(_and(_and(closes, watched), decays == 0), tl.maximum(peak, top), peak))
    tl.store(flag_ptr, tl.where(scheduled, CLOSES, tl.where(jump, CLOSES_LATE, OPEN)).to(tl.int32))
    r = _newton_r(dot, sq, tl.load(hyp_ptr + H_BOUND))
    large = tl.abs(r) >= tl.load(hyp_ptr + H_WINDOW_RESET)
    next_k = tl.where(_or(large, _or(jump, grows)), 1, tl.minimum(k + 1, units))
    tl.store(ws_ptr, tl.where(closes, 0, tl.where(unit_ends, done, done - 1)))
    tl.store(ws_ptr + 1, tl.where(closes, next_k, k))
    previous = tl.load(we_ptr)
    tl.store(we_ptr + 1, tl.where(closes, previous, tl.load(we_ptr + 1)))
    tl.store(we_ptr, tl.where(closes, energy, previous))
    tl.store(we_ptr + 2, tl.where(_and(closes, watched), weights, last))
    if GROUP_ALPHA:  # the α kernel's work for its one scope, from the same sums in the same order
        old = tl.load(alpha_ptr).to(tl.float64)
        new = _new_alpha(old, closes, dot_all, sq_all, cut, ceiling, tl.load(hyp_ptr + H_BOUND))
        tl.store(alpha_ptr, new.to(tl.float32))
    # The step counter advances here, after the step kernels have read it (a step AMP skips does
    # not count): no separate launch for it.
    if HAS_INF:
        tl.store(step_ptr, tl.load(step_ptr) + (tl.load(inf_ptr) == 0).to(tl.int64))
    else:
        tl.store(step_ptr, tl.load(step_ptr) + 1)


@triton.jit(do_not_specialize=_NO_SPEC_ALPHA)
def tlr_alpha_kernel(
    scope_ptr,        # int64 [3, n_scopes]: first and end block (in part_ptr) and α address of each scope
    n_scopes,
    part_ptr,         # float64 [5, n_part]: per-block ⟨A, P⟩ and ‖A‖² (rows 0 and 1 read here)
    n_part,
    flag_ptr,         # int32: the window kernel's decision
    cut_ptr,          # float64 [2]: the blow-up guard's cap on the factor, and α's ceiling
    hyp_ptr,          # float64 [HYPER_SIZE]: the bound c is read here
    RBLOCK: tl.constexpr,
):
    """One program per α-scope: α ← α·min(1 + r, cut), at most max(α, ceiling), when the window closes
    (SPEC's Newton step and the blow-up guard's caps)."""
    s = tl.program_id(0)
    start = tl.load(scope_ptr + s)
    end = tl.load(scope_ptr + n_scopes + s)
    alpha_ptr = tl.load(scope_ptr + 2 * n_scopes + s).to(tl.pointer_type(tl.float32))
    closing = tl.load(flag_ptr) != OPEN

    # on an ordinary step the reduction runs no iteration
    dot_s, sq_s = _reduce(part_ptr, n_part, start, tl.where(closing, end, start), RBLOCK)
    old = tl.load(alpha_ptr).to(tl.float64)
    new = _new_alpha(old, closing, dot_s, sq_s, tl.load(cut_ptr), tl.load(cut_ptr + 1), tl.load(hyp_ptr + H_BOUND))
    tl.store(alpha_ptr, new.to(tl.float32))


@triton.jit(do_not_specialize=_NO_SPEC_MOVE)
def tlr_move_kernel(
    tab_ptr, n_tensors, blk_ptr, n_blocks,
    flag_ptr,         # int32: the window kernel's decision
    part_ptr,         # float64 [5, n_part]: row 3, the α each block moved with in launch 1 (SNAPSHOT)
    n_part,
    part_offset,
    scale_ptr,
    hyp_ptr,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    SUM_DIRECTION: tl.constexpr,
    SNAPSHOT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """A persistent grid (the launcher sizes it to the GPU, not to the tensors): each program
    strides over the blocks, and on an ordinary step (flag OPEN) runs no iteration at all."""
    flag = tl.load(flag_ptr)
    i = tl.program_id(0).to(tl.int64)
    end = tl.where(flag == OPEN, 0, n_blocks)
    while i < end:
        _move_block(tab_ptr, n_tensors, blk_ptr, n_blocks, i, flag, part_ptr + 3 * n_part + part_offset, scale_ptr,
                    hyp_ptr, PARAM_DTYPE, STATE_DTYPE, HAS_MOMENTUM, NESTEROV, SUM_DIRECTION, SNAPSHOT, HAS_SCALE,
                    BLOCK, ALIGN)
        i += tl.num_programs(0)


@triton.jit
def _move_block(tab_ptr, n_tensors, blk_ptr, n_blocks, blk, flag, used_ptr, scale_ptr, hyp_ptr,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, SUM_DIRECTION: tl.constexpr, SNAPSHOT: tl.constexpr,
                HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """``tlr_move_kernel``'s work on block ``blk``."""
    pid, t, start, lanes, in_tensor = _block_at(tab_ptr, n_tensors, blk_ptr, n_blocks, blk, BLOCK, ALIGN)
    moves = _and(in_tensor, flag == CLOSES)
    late = _and(in_tensor, flag == CLOSES_LATE)
    # A late close with a snapshot reads the weights (moved by the step kernel) to restart it.
    reads = _or(moves, late) if SNAPSHOT else moves
    p_ptr = _at(tab_ptr, PARAM, n_tensors, t, start, PARAM_DTYPE, ALIGN)
    w = tl.load(p_ptr + lanes, mask=reads, other=0.0).to(STATE_DTYPE)
    b = tl.zeros([BLOCK], dtype=STATE_DTYPE)
    if HAS_MOMENTUM:  # the step kernel has already advanced the buffer
        b = tl.load(_at(tab_ptr, MOMENTUM, n_tensors, t, start, STATE_DTYPE, ALIGN) + lanes, mask=reads, other=0.0)
    if HAS_MOMENTUM and not NESTEROV:
        d = b  # heavy ball: the gradient is not read again
    else:
        g = tl.load(_at(tab_ptr, GRAD, n_tensors, t, start, PARAM_DTYPE, ALIGN) + lanes, mask=moves, other=0.0)
        g = g.to(STATE_DTYPE)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr).to(STATE_DTYPE)
        d = _hyper(hyp_ptr, H_SIGN, STATE_DTYPE) * g + _hyper(hyp_ptr, H_WEIGHT_DECAY, STATE_DTYPE) * w
        if HAS_MOMENTUM:
            d += _hyper(hyp_ptr, H_MOMENTUM, STATE_DTYPE) * b
    alpha = tl.load(_row(tab_ptr, ALPHA, n_tensors, t).to(tl.pointer_type(tl.float32))).to(STATE_DTYPE)
    w_new = _to_param(w - alpha * _hyper(hyp_ptr, H_LR_FACTOR, STATE_DTYPE) * d, PARAM_DTYPE)
    tl.store(p_ptr + lanes, w_new, mask=moves)
    pv_ptr = _at(tab_ptr, PREV, n_tensors, t, start, STATE_DTYPE, ALIGN)
    if SNAPSHOT:
        s_ptr = _at(tab_ptr, WINDOW, n_tensors, t, start, PARAM_DTYPE, ALIGN)
        w = tl.where(moves, w_new.to(STATE_DTYPE), w)
        kappa = 0.0
        if HAS_MOMENTUM and not SUM_DIRECTION:
            kappa = _hyper(hyp_ptr, H_KAPPA, STATE_DTYPE)
        if flag == CLOSES_LATE:  # P ← A, recovered with the α the window moved with (launch 1's)
            used = tl.load(used_ptr + blk).to(STATE_DTYPE)
            s = tl.load(s_ptr + lanes, mask=late, other=0.0).to(STATE_DTYPE)
            a = (_hyper(hyp_ptr, H_SNAP_C, STATE_DTYPE) / used) * (s - (w - (used * kappa) * b))
            tl.store(pv_ptr + lanes, a, mask=late)
        tl.store(s_ptr + lanes, (w - (alpha * kappa) * b).to(PARAM_DTYPE), mask=reads)  # the next window starts here
        tl.store(used_ptr + blk, alpha.to(tl.float64))  # taken with the new α (the step kernel's check)
    else:  # the blow-up guard closed the window after the step kernel's move: P ← A, A ← 0
        a_ptr = _at(tab_ptr, WINDOW, n_tensors, t, start, STATE_DTYPE, ALIGN)
        tl.store(pv_ptr + lanes, tl.load(a_ptr + lanes, mask=late), mask=late)
        tl.store(a_ptr + lanes, tl.zeros([BLOCK], dtype=STATE_DTYPE), mask=late)
