"""Host side of the Triton path: address tables, block maps, launches.

``tlr_triton_step`` runs one TLR step for the tensors of one param group: per (device,
dtype) bucket it launches ``tlr_step_kernel``, then one ``tlr_window_kernel`` for the group
(which also updates a group-scope α) and, with one α per tensor, one ``tlr_alpha_kernel``,
then ``tlr_move_kernel`` per bucket (see ``tlr_step.py``). Nothing here reads a
device value: the closing decision and α stay on the device, and the window kernel
advances the step counter, there too.

Address tables are a pure function of the tensors' addresses, sizes and first-step
flags, so they are memoised on exactly that key (with a caller's ``state_token``, on it
in place of the state tensors' addresses): they are rebuilt whenever an address changes
(``load_state_dict``, ``.to()``, a new param group, gradients reallocated elsewhere) and
reused otherwise. Block maps depend on the sizes alone and hyper-parameter vectors on their
values: each has a memo of its own, so new addresses do not rebuild them. A caller that
vouches that the tensors are as at its last call (``layout_unchanged``: the optimizer's
native layout pass) gets that call's launches again without a look at any tensor
(``steady``), their tables patched where only addresses moved (``addresses``).
"""

from __future__ import annotations

import operator
from array import array
from collections import OrderedDict
from functools import reduce
from itertools import count, repeat
from types import SimpleNamespace

import torch
from torch import Tensor

from . import tlr_step as K  # the package's only import: kernels/ is the leaf of the import graph

_DTYPE, _GRAD = operator.attrgetter("dtype"), operator.attrgetter("grad")
PARAM_ROW, GRAD_ROW, PREV_ROW, NUMEL_ROW = K.PARAM.value, K.GRAD.value, K.PREV.value, K.NUMEL.value  # table rows
assert (PARAM_ROW, GRAD_ROW) == (0, 1)  # _moved writes both as the table's first rows
TABLE_ROWS = K.TABLE_ROWS

BLOCK = 1024   # elements per program of the step and move kernels (half that for fp64 weights: see block_size)
NUM_WARPS = 8  # 4 elements per thread (Triton's default, 4 warps, gave 8 and spilled on sm_90 with Triton 3.6)
RBLOCK = 2048  # partials per iteration of the window and α kernels' reductions
R_WARPS = 16   # warps of the window and α kernels (one program reduces every partial of the group)
_CACHE_SIZE = 64

_TORCH_TO_TRITON = {}


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    if not _TORCH_TO_TRITON:
        _TORCH_TO_TRITON.update({torch.float32: tl.float32, torch.float64: tl.float64,
                                 torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    try:
        return _TORCH_TO_TRITON[dtype]
    except KeyError:
        raise TypeError(f"the Triton path supports fp32, fp64, fp16 and bf16 parameters, not {dtype}") from None


class _Memo:
    """A small memo of device-side tables, oldest out first; ``builds`` counts misses (tests read it)."""

    def __init__(self) -> None:
        self.entries: OrderedDict = OrderedDict()
        self.builds = 0

    def get(self, key, build):
        hit = self.entries.get(key)
        if hit is not None:  # not moved to the end: that hashes the (long) key a second time
            return hit
        self.builds += 1
        return self.put(key, build())

    def put(self, key, value):
        self.entries[key] = value
        if len(self.entries) > _CACHE_SIZE:  # the oldest entry goes, in use or not: at worst it is rebuilt
            self.entries.popitem(last=False)
        return value


tables = _Memo()
blocks = _Memo()  # block maps, by sizes (``_block_map``)
hypers = _Memo()  # hyper-parameter vectors, by values (``_hyper``)


_MOVES = count()  # keys of tables patched with moved addresses (``_moved``)

_PROGRAMS_PER_SM = 4  # the move kernel's persistent grid: programs per streaming multiprocessor
_MOVE_PROGRAMS_OFF_GPU = 64  # and elsewhere (the interpreter)
_sm_counts: dict = {}


def move_programs(device: torch.device, n_blocks: int) -> int:
    """The move kernel's grid: a few programs per SM, striding over the blocks, so that an
    ordinary step (nothing to move) costs O(1) programs however large the model; never more
    programs than blocks. Fixed per device and layout, so a CUDA graph captures it."""
    if device.type == "cuda":
        if device not in _sm_counts:
            _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
        cap = _PROGRAMS_PER_SM * _sm_counts[device]
    else:
        cap = _MOVE_PROGRAMS_OFF_GPU
    return max(1, min(n_blocks, cap))


def block_size(dtype: torch.dtype) -> int:
    """Elements per program for weights of ``dtype``: BLOCK, 4 per thread; 2 per thread for
    fp64, whose step kernel otherwise spills a few bytes on sm_80 (ptxas, Triton 3.9)."""
    return BLOCK // 2 if dtype == torch.float64 else BLOCK


def _alignment(rows: array, tab: Tensor, n: int, itemsize: int) -> int:
    """The kernels' ALIGN for a bucket (its address table for ``n`` tensors, flat in ``rows`` and
    as ``tab`` on the CPU): 16 // ``itemsize`` (its narrowest element) when every address of the
    weights, gradients and state is 16-byte aligned and every size a multiple of that, so that
    whole 16-byte vectors never straddle a tensor's end; else 1 (per-element accesses: unaligned
    views, odd sizes). fp64 buckets stay at 1: their vectorized step kernel spilled 4 bytes on
    sm_90 with Triton 3.6."""
    if itemsize == 8:
        return 1
    vec = 16 // itemsize
    if n < 256:  # a few tensors: Python's ints are quicker than tensor operations
        addresses = reduce(operator.or_, rows[PARAM_ROW * n:(PREV_ROW + 1) * n])
        sizes = reduce(operator.or_, rows[NUMEL_ROW * n:(NUMEL_ROW + 1) * n])
        aligned = addresses % 16 == 0 and sizes % vec == 0  # low bits of an OR: all of them are multiples
    else:
        aligned = not bool((tab[PARAM_ROW:PREV_ROW + 1] % 16).any()) and not bool((tab[NUMEL_ROW] % vec).any())
    return vec if aligned else 1


def _bucket_table(head, state_ptrs, tail, itemsize):
    """For a bucket's layout (``tlr_triton_step``): a serial number (unique, for the group's key),
    the int64 [TABLE_ROWS, n] addresses/numels/flags, the int64 [2, n_blocks] block map, ALIGN,
    BLOCK, the blocks per tensor and the α addresses."""
    device, dtype, p, g = head
    b, s, v, a = state_ptrs
    numels, firsts = tail
    n = len(p)
    # the key's tuples into one int64 buffer, a row at a time (a nested list through torch.tensor is slower)
    rows = array("q", p)
    for row in (g, b if b is not None else (0,) * n, s, v, a * n if len(a) == 1 else a, numels, firsts):
        rows.extend(row)
    tab = torch.frombuffer(rows, dtype=torch.int64).view(TABLE_ROWS, n).clone()
    block = block_size(dtype)
    # the block map depends on the sizes alone: new addresses (gradients reallocated) reuse it
    blk, nblk = blocks.get((device, block, numels), lambda: _block_map(device, block, numels))
    align = _alignment(rows, tab, n, itemsize)
    return tables.builds, tab.to(device, non_blocking=True), blk, align, block, nblk, sum(nblk), a, tab


def _block_map(device, block, numels):
    """The int64 [2, n_blocks] block → (tensor, first element) map, and the blocks per tensor (a tuple)."""
    nblk = tuple((m + block - 1) // block for m in numels)  # a tuple: the group's key holds it
    counts = torch.tensor(nblk, dtype=torch.int64)
    tensor_of_block = torch.repeat_interleave(torch.arange(len(nblk), dtype=torch.int64), counts, output_size=sum(nblk))
    first_block = torch.cumsum(counts, 0) - counts
    offset = (torch.arange(sum(nblk), dtype=torch.int64) - first_block[tensor_of_block]) * block
    return torch.stack([tensor_of_block, offset]).to(device, non_blocking=True), nblk


def _picker(idx: list[int]):
    """A function giving the entries of a list at ``idx``, as a list (C-level for more than one)."""
    if len(idx) == 1:
        return lambda xs: [xs[idx[0]]]
    get = operator.itemgetter(*idx)
    return lambda xs: list(get(xs))


def _scope_table(device, nblks, part_offsets, alpha_ptrs):
    """int64 [3, n_tensors]: first block, end block and α address of each tensor (the α kernel's
    scopes with one α per tensor; a group's one α is the window kernel's, given directly)."""
    starts, ends = [], []
    for off, nblk in zip(part_offsets, nblks):
        for k in nblk:
            starts.append(off)
            off += k
            ends.append(off)
    return torch.tensor([starts, ends, alpha_ptrs], dtype=torch.int64).to(device, non_blocking=True)


def _plan_launches(params, grads, momentum_buffers, window_sums, prev_window_sums, alphas, momentum, scope, device,
                   buckets, snapshots, first_steps, state_token):
    """Per bucket, its tables (memoised) and launch arguments (``tlr_triton_step``); creates the
    momentum buffers of first steps. Returns the launches, the group's blocks, the blocks per
    tensor and the first block of each bucket, the α addresses (scope "tensor"), the tables'
    serials, the weights' working copies, the gradients' (to keep alive until the launches)
    and whether a tensor took its first step."""
    launches, serials, part_offsets, nblks, alpha_ptrs, host_tabs = [], [], [], [], [], []
    copies = []  # (parameter, contiguous working copy) for non-contiguous parameters
    # Working copies of gradients live until the launches: the tables hold only their addresses,
    # and a copy freed early leaves its memory to the next bucket's allocations (a review found it)
    alive = []
    total, new = 0, False
    for number, (idx, snap) in enumerate(zip(buckets, snapshots)):
        pick = list if len(idx) == len(params) else _picker(idx)  # one bucket: every list as it is
        dtype = params[idx[0]].dtype
        work_p, work_g, bufs = pick(params), pick(grads), pick(momentum_buffers)
        # The usual case, checked with C-level maps (this runs every step): contiguous
        # weights, contiguous gradients of the weights' dtype, every momentum buffer there.
        if not all(map(Tensor.is_contiguous, work_p)):
            work_p = [p if p.is_contiguous() else p.contiguous() for p in work_p]
            copies += [(params[i], pc) for i, pc in zip(idx, work_p) if pc is not params[i]]
        if not (all(map(Tensor.is_contiguous, work_g)) and set(map(_DTYPE, work_g)) == {dtype}):
            work_g = [g if g.dtype == dtype and g.is_contiguous() else g.contiguous().to(dtype) for g in work_g]
            alive.append(work_g)
        if first_steps is not None:
            firsts = tuple(int(first_steps[i]) for i in idx)
            new = new or any(firsts)
        elif momentum != 0 and any(map(operator.is_, bufs, repeat(None))):
            firsts = tuple(int(b is None) for b in bufs)
            new = True
            for j, i in enumerate(idx):
                if bufs[j] is None:  # b = u at this first step; the state dtype
                    momentum_buffers[i] = bufs[j] = torch.zeros_like(work_p[j], dtype=prev_window_sums[i].dtype,
                                                                     memory_format=torch.contiguous_format)
        else:
            firsts = (0,) * len(idx)
        ptr = Tensor.data_ptr

        def state_ptrs(bufs=bufs, pick=pick):
            return (tuple(map(ptr, bufs)) if momentum != 0 else None,
                    tuple(map(ptr, pick(window_sums))), tuple(map(ptr, pick(prev_window_sums))),
                    (alphas[0].data_ptr(),) if scope == "group" else tuple(map(ptr, pick(alphas))))

        head = (device, dtype, tuple(map(ptr, work_p)), tuple(map(ptr, work_g)))
        tail = (tuple(map(Tensor.numel, work_p)), firsts)
        state = state_ptrs() if state_token is None else None
        key = head + (state if state is not None else ("state", state_token, number)) + tail
        itemsize = min(dtype.itemsize, prev_window_sums[idx[0]].dtype.itemsize)
        serial, tab, blk, align, block, nblk, n_blocks, a_ptrs, host_tab = tables.get(
            key, lambda: _bucket_table(head, state if state is not None else state_ptrs(), tail, itemsize))
        serials.append(serial)
        launches.append((idx, dtype, snap, tab, blk, align, block, len(idx), n_blocks, total))
        host_tabs.append(host_tab)
        part_offsets.append(total)
        nblks.append(nblk)
        total += n_blocks
        if scope == "tensor":
            alpha_ptrs += a_ptrs
    return launches, host_tabs, total, nblks, part_offsets, alpha_ptrs, serials, copies, alive, new


def _moved(launches, host_tabs, addresses: Tensor, n_params: int, device):
    """The launches, and their tables' host copies, with the weights' and gradients' addresses
    taken from ``addresses`` (int64 [n_params, 2], in the launcher's order): a step whose tensors
    moved and did nothing else (``tlr_triton_step``'s ``addresses``; each address is still 16-byte
    aligned or still not, so ALIGN stands)."""
    out, hosts = [], []
    for (idx, dtype, snap, tab, blk, align, block, n, n_blocks, offset), host in zip(launches, host_tabs):
        # (rows 0 and 1: one cat instead of a copy and a write)
        rows = torch.cat(((addresses if n == n_params else addresses[idx]).t(), host[GRAD_ROW + 1:]))
        # held by the table memo too, as a table built afresh is: a CUDA graph captured with it
        # must not find its memory reused after the next move
        tab = tables.put(("moved", next(_MOVES)), rows.to(device, non_blocking=True))
        out.append((idx, dtype, snap, tab, blk, align, block, n, n_blocks, offset))
        hosts.append(rows)
    return out, hosts


def tlr_triton_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    window_sums: list[Tensor],
    prev_window_sums: list[Tensor],
    alphas: list[Tensor],
    config,
    *,
    step: Tensor,
    window_state: Tensor,
    window_energy: Tensor | None = None,
    buckets: list[list[int]],
    snapshots: list[bool],
    lr_factor: float | Tensor = 1.0,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    first_steps: list[bool] | None = None,
    snapshot_form: tuple[float, float] = (0.0, 1.0),
    state_token: object = None,
    layout_unchanged: bool = False,
    addresses: Tensor | None = None,
    keep: dict | None = None,
) -> None:
    """One TLR step of one param group on the Triton path (see the module docstring).

    ``config`` holds the group's hyper-parameters and window schedule as attributes
    (``tlr_triton.functional.StepConfig``, read by name: this package imports nothing of
    ``tlr_triton``): momentum, dampening, weight_decay, nesterov, maximize, bound,
    statistic, scope, window (W0), units (K), window_reset, blowup_ratio.

    New momentum buffers are created for ``None`` entries of ``momentum_buffers``, or,
    when ``first_steps`` is given, every buffer exists and the flags say which are new.

    ``buckets`` are the indices of the tensors of each (device, dtype); ``window_sums``
    holds the window-start snapshot S (parameter dtype) for the buckets whose entry of
    ``snapshots`` is True (the caller's window representation), else A; ``snapshot_form``
    is its (κ, c): A = c·(S - (w - α·κ·b))/α (``functional.snapshot_form``). ``step`` is the
    group's int64 step counter on the device, read and advanced (by one, or not at all on a step
    AMP skips) by the window kernel.
    ``window_state`` is the window's int64 [units so far, k] (``functional.tlr``),
    updated here; windows are k·W0 steps, 1 <= k <= K. ``config.blowup_ratio`` (None: off)
    and ``window_energy`` (float64 [4], updated here) are the adaptive window's blow-up
    guard (``functional.tlr``).

    ``state_token``: None, or a value the caller changes whenever a state tensor (momentum
    buffer, A or S, P, α) may have been replaced; while it stays the same, the address
    tables are keyed on it instead of on the state tensors' addresses (only the weights',
    the gradients' and the new-buffer flags are read every step).

    ``keep``: None, or the caller's store for this group's launches (a dict, the same at every
    call with this ``state_token``), kept where they hold no working copy and no first step.
    ``layout_unchanged``: the caller vouches that the weights and gradients have the addresses,
    sizes, dtypes and contiguity they had at the last call (``tlr_triton.kernels.cpu.same_layout``;
    ``grads`` may then be None: they are read off ``params`` where needed): the launches in
    ``keep`` are then issued again without a look at any tensor. ``addresses``: with
    ``layout_unchanged``, where the weights or gradients moved and nothing else changed: their
    addresses now (int64 [len(params), 2], from the native pass, not read from the tensors);
    the repeated tables take them.
    """
    momentum, scope, window, units = config.momentum, config.scope, config.window, config.units
    blowup_ratio = config.blowup_ratio if units > 1 else None  # the guard watches adaptive windows only
    device = step.device
    again = keep.get("launches") if layout_unchanged and keep is not None else None
    # ``kept``: what ``keep`` holds after the launches (None: nothing to repeat); written only once
    # they are issued (they may raise: ``keep`` then holds what it held)
    if again is not None and again[0] == snapshots:
        _, launches, host_tabs, total, nblks, part_offsets, alpha_ptrs, serials = kept = again
        if addresses is not None:  # the tensors moved: the tables take their new addresses
            launches, host_tabs = _moved(launches, host_tabs, addresses, len(params), device)
            kept = [again[0], launches, host_tabs, *again[3:]]
        copies = ()
    else:
        if grads is None:
            grads = list(map(_GRAD, params))
        launches, host_tabs, total, nblks, part_offsets, alpha_ptrs, serials, copies, alive, new = _plan_launches(
            params, grads, momentum_buffers, window_sums, prev_window_sums, alphas, momentum, scope, device, buckets,
            snapshots, first_steps, state_token)
        # working copies and first steps are not repeated
        kept = None if copies or alive or new else [list(snapshots), launches, host_tabs, total, nblks,
                                                    part_offsets, alpha_ptrs, serials]

    def build_group():
        width = max(total, 1)
        # one float64 allocation: the guard's caps (α's factor, α's ceiling), then the partials
        # [5, width] (⟨A, P⟩, ‖A‖², ‖w‖², α, ⟨A, w⟩); both 16-byte aligned whatever the width, so
        # that the kernels taking them compile one specialization, not one per parity
        floats = torch.zeros(2 + 5 * width, dtype=torch.float64, device=device)
        cut, part = floats[:2], floats[2:].view(5, width)
        flag = torch.zeros((), dtype=torch.int32, device=device)   # the window kernel's decision
        return part, flag, cut, (_scope_table(device, nblks, part_offsets, alpha_ptrs) if scope == "tensor" else None)

    # The group's tables depend on its buckets' alone (their layouts and α addresses, in order).
    # With a state token they are keyed on it and the layout, so that the partials' row 3 (the α
    # each block moved with, which the next step's snapshot check reads) outlives tables rebuilt
    # for new gradient addresses.
    group_key = (("group", device, scope, tuple(serials)) if state_token is None
                 else ("group", device, scope, state_token, tuple(nblks)))
    part, flag, cut, scopes = tables.get(group_key, build_group)
    hyper = _hyper(device, momentum, config.dampening, config.weight_decay, config.maximize, config.bound,
                   config.window_reset, lr_factor, blowup_ratio if blowup_ratio is not None else 0.0, snapshot_form)
    dummy = flag  # any device pointer, never read when the matching flag is off
    kw = dict(
        HAS_MOMENTUM=momentum != 0,
        NESTEROV=config.nesterov,
        HAS_SCALE=grad_scale is not None,
    )
    with _device_guard(device):
        for idx, dtype, snap, tab, blk, align, block, n, n_blocks, offset in launches:
            K.tlr_step_kernel[(n_blocks,)](
                tab, n, blk, n_blocks, part, part.shape[1], offset, step,
                grad_scale if grad_scale is not None else dummy,
                found_inf if found_inf is not None else dummy,
                window_state, window, units, hyper,
                PARAM_DTYPE=_tl_dtype(dtype), STATE_DTYPE=_tl_dtype(prev_window_sums[idx[0]].dtype),
                SUM_DIRECTION=config.statistic == "direction", SNAPSHOT=snap,
                DAMPENED=momentum != 0 and config.dampening != 0,
                HAS_INF=found_inf is not None, BLOCK=block, ALIGN=align, num_warps=NUM_WARPS, **kw,
            )
        K.tlr_window_kernel[(1,)](
            part, part.shape[1], total, step, found_inf if found_inf is not None else dummy, window_state,
            window_energy if window_energy is not None else torch.zeros(4, dtype=torch.float64, device=device),
            flag, cut, alphas[0] if scope == "group" else dummy, window, units, hyper,
            HAS_INF=found_inf is not None, GROUP_ALPHA=scope == "group", RBLOCK=RBLOCK, num_warps=R_WARPS,
        )
        if scope != "group":  # one α per tensor (one α for the group: the window kernel updates it)
            K.tlr_alpha_kernel[(scopes.shape[1],)](
                scopes, scopes.shape[1], part, part.shape[1], flag, cut, hyper, RBLOCK=RBLOCK, num_warps=R_WARPS,
            )
        for idx, dtype, snap, tab, blk, align, block, n, n_blocks, offset in launches:
            K.tlr_move_kernel[(move_programs(device, n_blocks),)](
                tab, n, blk, n_blocks, flag, part, part.shape[1], offset,
                grad_scale if grad_scale is not None else dummy, hyper,
                PARAM_DTYPE=_tl_dtype(dtype), STATE_DTYPE=_tl_dtype(prev_window_sums[idx[0]].dtype),
                SUM_DIRECTION=config.statistic == "direction", SNAPSHOT=snap, BLOCK=block, ALIGN=align,
                num_warps=NUM_WARPS, **kw,
            )
    for p, pc in copies:
        p.copy_(pc)
    if keep is not None:
        keep["launches"] = kept


def _hyper(device, momentum, dampening, weight_decay, maximize, bound, window_reset, lr_factor, blowup_ratio,
           snapshot_form) -> Tensor:
    """The float64 hyper-parameter vector the kernels read (``tlr_step.H_*``), memoised on its values.

    float() each: a hyper-parameter given as an int (weight_decay=1) is the same value. A
    tensor ``lr_factor`` (a tensor lr) is put in place on the device, without a host read.
    """
    head = tuple(map(float, (momentum, dampening, weight_decay, -1.0 if maximize else 1.0, bound, window_reset)))
    damp = float(dampening) if float(dampening) < 1 else 0.0  # (τ >= 1 is refused before any step)
    tail = (float(blowup_ratio), *map(float, snapshot_form), 1.0 / (1.0 - damp))

    def vector(values):
        return hypers.get((device, values), lambda: torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True))

    if isinstance(lr_factor, Tensor):
        # non_blocking: a CPU tensor lr (torch's usual form) would otherwise sync the host with the GPU every step
        factor = lr_factor.reshape(1).to(dtype=torch.float64).to(device, non_blocking=True)
        return torch.cat([vector(head), factor, vector(tail)])
    return vector(head + (float(lr_factor),) + tail)


class _device_guard:
    def __init__(self, device: torch.device) -> None:
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# torch.compile sees the step as one opaque operator with its mutations declared (the
# launcher's host work, address tables and memo, stays out of the traced graph).
@torch.library.custom_op(
    "tlr_triton::triton_step",
    mutates_args=("params", "momentum_buffers", "window_sums", "prev_window_sums", "alphas", "step", "window_state",
                  "window_energy"),
)
def triton_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    first_steps: list[bool],
    window_sums: list[Tensor],
    prev_window_sums: list[Tensor],
    alphas: list[Tensor],
    step: Tensor,
    window: int,
    units: int,
    window_reset: float,
    window_state: Tensor,
    blowup_ratio: float | None,
    window_energy: Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    bound: float,
    statistic: str,
    scope: str,
    lr_factor: float,
    lr_factor_tensor: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    bucket_of: list[int],
    snapshots: list[bool],
    snapshot_kappa: float,
    snapshot_c: float,
) -> None:
    """``tlr_triton_step`` as a custom op: momentum buffers must exist (empty list without momentum);
    ``bucket_of`` gives each tensor's bucket, whose window representation is ``snapshots[bucket]``."""
    buckets = [[i for i, b in enumerate(bucket_of) if b == k] for k in range(len(snapshots))]
    bufs = list(momentum_buffers) if momentum != 0 else [None] * len(params)
    config = SimpleNamespace(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                             maximize=maximize, bound=bound, statistic=statistic, scope=scope, window=window,
                             units=units, window_reset=window_reset, blowup_ratio=blowup_ratio)
    tlr_triton_step(
        params, grads, bufs, window_sums, prev_window_sums, alphas, config, step=step, window_state=window_state,
        window_energy=window_energy, buckets=buckets, snapshots=snapshots,
        lr_factor=lr_factor_tensor if lr_factor_tensor is not None else lr_factor,
        grad_scale=grad_scale, found_inf=found_inf, first_steps=first_steps if momentum != 0 else None,
        snapshot_form=(snapshot_kappa, snapshot_c),
    )


@triton_step_op.register_fake
def _(params, grads, momentum_buffers, first_steps, window_sums, prev_window_sums, alphas, step, window, units,
      window_reset, window_state, blowup_ratio, window_energy, momentum, dampening, weight_decay, nesterov, maximize,
      bound, statistic, scope, lr_factor, lr_factor_tensor, grad_scale, found_inf, bucket_of, snapshots, snapshot_kappa,
      snapshot_c):
    return None
