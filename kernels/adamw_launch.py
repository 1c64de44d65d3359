"""Host side of TLRAdamW's Triton path: ``adamw_triton_step`` (kernels in ``adamw_step.py``).

One step of one param group: per bucket of tensors that share a dtype and a step count (the
usual case: one bucket), ``adamw_step_kernel``; where the step closes the window (fixed
windows: the caller's host counter says so, no device value is read) then
``adamw_alpha_kernel`` and ``adamw_move_kernel`` per bucket. Address tables and block maps
are memoised as TLR's are (``launch.tables``, ``launch.blocks``): on the tensors' addresses
and sizes, rebuilt only when one changes.
"""

from __future__ import annotations

import math
import operator
import struct
from array import array
from functools import reduce
from itertools import chain

import torch
from torch import Tensor

from . import adamw_step as K
from .launch import (BLOCK, NUM_WARPS, R_WARPS, RBLOCK, _block_map, _device_guard, _picker, _scope_table, _tl_dtype,
                     block_size, blocks, hypers, tables)

_PTR = Tensor.data_ptr
_POINTER_ROWS = (K.PARAM.value, K.GRAD.value, K.EXP_AVG.value, K.WINDOW.value, K.PREV.value, K.EXP_AVG_SQ.value,
                 K.MAX_EXP_AVG_SQ.value)


def _table(device, dtype, ptrs, numels, alpha_ptrs, itemsize):
    """(int64 [TABLE_ROWS, n] address table on ``device``, block map, blocks per tensor, ALIGN)."""
    n = len(numels)
    rows = array("q")
    for row in ptrs[:K.ALPHA.value] + (alpha_ptrs, numels) + ptrs[K.ALPHA.value:]:
        rows.extend(row)
    tab = torch.frombuffer(rows, dtype=torch.int64).view(K.TABLE_ROWS, n).clone()
    block = block_size(dtype)
    blk, nblk = blocks.get((device, block, numels), lambda: _block_map(device, block, numels))
    # 16-byte vectors where every address is 16-byte aligned and every size a multiple of the
    # vector (fp64 stays per element, as TLR's kernels: their vectorised step spilled on sm_90)
    vec = 16 // itemsize
    addresses = reduce(operator.or_, (a for row in ptrs for a in row), 0)
    aligned = itemsize < 8 and addresses % 16 == 0 and reduce(operator.or_, numels, 0) % vec == 0
    return tab.to(device, non_blocking=True), blk, nblk, (vec if aligned else 1), block


def _bits(x: float) -> int:
    """The int64 bits of a double (the kernels bitcast them back: a float argument is fp32 on a GPU)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _corrections(betas, t: int) -> tuple[int, int]:
    """1 − β1^t and √(1 − β2^t), as the PyTorch path takes them, as ``_bits``."""
    return _bits(1.0 - float(betas[0]) ** t), _bits(math.sqrt(1.0 - float(betas[1]) ** t))


def _hyper(device, betas, eps, weight_decay, maximize, bound, lr_factor) -> Tensor:
    """The float64 hyper-parameter vector (``adamw_step.H_*``), memoised on its values; a tensor
    ``lr_factor`` is put in place on the device without a host read."""
    head = tuple(map(float, (betas[0], betas[1], eps, weight_decay, -1.0 if maximize else 1.0, bound,
                             1.0 - betas[0], 1.0 - betas[1])))

    def vector(values):
        return hypers.get(("adamw", device, values),
                          lambda: torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True))

    if isinstance(lr_factor, Tensor):
        # non_blocking: a CPU tensor lr (torch's usual form) would otherwise sync the host with the GPU every step
        return torch.cat([vector(head), lr_factor.reshape(1).to(dtype=torch.float64).to(device, non_blocking=True)])
    return vector(head + (float(lr_factor),))


def adamw_triton_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, window_sums, prev_window_sums, alphas,
                      steps, *, betas, eps, weight_decay, maximize, bound, scope, closing, lr_factor=1.0) -> None:
    """One TLRAdamW step of one param group on the Triton path (see the module docstring).

    ``params`` and ``grads`` are dense tensors of one device; the state lists (``max_exp_avg_sqs``
    None without amsgrad) are contiguous, in each weight's state dtype; ``alphas`` holds the
    group's α (scope "group") or one per tensor, fp32 0-dim tensors updated in place at a
    closing; ``steps`` each tensor's step count with this step (bias corrections); ``closing``:
    whether this step closes the window (α first, then the move).
    """
    device = params[0].device
    amsgrad = max_exp_avg_sqs is not None
    buckets: dict = {}
    if len(set(steps)) == 1 and len(set(map(operator.attrgetter("dtype"), params))) == 1:  # the usual case
        buckets[(params[0].dtype, steps[0])] = list(range(len(params)))
    else:
        for i, (p, t) in enumerate(zip(params, steps)):
            buckets.setdefault((p.dtype, t), []).append(i)
    hyper = _hyper(device, betas, eps, weight_decay, maximize, bound, lr_factor)
    launches, copies, offsets, nblks, alpha_ptrs, total = [], [], [], [], [], 0
    # Working copies of gradients live until the launches: the tables hold only their addresses,
    # and a copy freed early leaves its memory to the next bucket's allocations
    alive = []
    for (dtype, t), idx in buckets.items():
        pick = list if len(idx) == len(params) else _picker(idx)  # one bucket: every list as it is
        work_p = [p if p.is_contiguous() else p.contiguous() for p in pick(params)]
        copies += [(params[i], w) for i, w in zip(idx, work_p) if w is not params[i]]
        work_g = [g if g.dtype == dtype and g.is_contiguous() else g.contiguous().to(dtype) for g in pick(grads)]
        alive.append(work_g)
        state = [pick(exp_avgs), pick(window_sums), pick(prev_window_sums), pick(exp_avg_sqs)]
        state.append(pick(max_exp_avg_sqs) if amsgrad else state[3])  # an unread row without amsgrad
        bad = None if all(map(Tensor.is_contiguous, chain.from_iterable(state))) else next(
            s for rows in state for s in rows if not s.is_contiguous())
        if bad is not None:
            raise ValueError("TLRAdamW's Triton path needs contiguous optimizer state; got a tensor of shape "
                             f"{tuple(bad.shape)} with strides {bad.stride()}")
        ptrs = (tuple(map(_PTR, work_p)), tuple(map(_PTR, work_g))) + tuple(tuple(map(_PTR, rows)) for rows in state)
        numels = tuple(map(Tensor.numel, work_p))
        a_ptrs = (tuple(map(_PTR, pick(alphas))) if scope == "tensor" else (alphas[0].data_ptr(),) * len(idx))
        state_dtype = exp_avgs[idx[0]].dtype
        itemsize = min(dtype.itemsize, state_dtype.itemsize)
        tab, blk, nblk, align, block = tables.get(
            ("adamw", device, dtype, ptrs, numels, a_ptrs),
            lambda: _table(device, dtype, ptrs, numels, a_ptrs, itemsize))
        n_blocks = sum(nblk)
        launches.append((tab, len(idx), blk, n_blocks, total, _corrections(betas, t), dtype, state_dtype, align,
                         block))
        offsets.append(total)
        nblks.append(nblk)
        alpha_ptrs += a_ptrs
        total += n_blocks
    part = scopes = None
    if closing:
        part = torch.empty(2, max(total, 1), dtype=torch.float64, device=device)
        if scope == "tensor":
            scopes = tables.get(("adamw-scopes", device, tuple(nblks), tuple(alpha_ptrs)),
                                lambda: _scope_table(device, nblks, offsets, alpha_ptrs))
        else:  # one scope: every block of every bucket
            scopes = tables.get(("adamw-scopes", device, total, alphas[0].data_ptr()),
                                lambda: torch.tensor([[0], [total], [alphas[0].data_ptr()]],
                                                     dtype=torch.int64).to(device, non_blocking=True))
    dummy = part if part is not None else hyper  # any device pointer; unread without CLOSING
    kw = dict(AMSGRAD=amsgrad, HAS_DECAY=float(weight_decay) != 0.0)
    with _device_guard(device):
        for tab, n, blk, n_blocks, offset, (bc1, bc2), dtype, state_dtype, align, block in launches:
            K.adamw_step_kernel[(n_blocks,)](
                tab, n, blk, n_blocks, dummy, part.shape[1] if part is not None else 1, offset, bc1, bc2, hyper,
                PARAM_DTYPE=_tl_dtype(dtype), STATE_DTYPE=_tl_dtype(state_dtype), CLOSING=closing, BLOCK=block,
                ALIGN=align, num_warps=NUM_WARPS, **kw,
            )
        if closing:
            K.adamw_alpha_kernel[(scopes.shape[1],)](scopes, scopes.shape[1], part, part.shape[1], hyper,
                                                     RBLOCK=RBLOCK, num_warps=R_WARPS)
            for tab, n, blk, n_blocks, offset, (bc1, bc2), dtype, state_dtype, align, block in launches:
                K.adamw_move_kernel[(n_blocks,)](
                    tab, n, blk, n_blocks, bc1, bc2, hyper, PARAM_DTYPE=_tl_dtype(dtype),
                    STATE_DTYPE=_tl_dtype(state_dtype), BLOCK=block, ALIGN=align, num_warps=NUM_WARPS, **kw,
                )
    for p, w in copies:
        p.copy_(w)


__all__ = ["adamw_triton_step", "BLOCK"]
