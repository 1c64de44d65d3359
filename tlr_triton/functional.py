"""The functional core of TLR: one entry point, ``tlr()``, with the PyTorch path here and
the Triton path in ``tlr_triton.kernels`` (imported only when used).

The math is ``SPEC.md`` (paper Algorithm 2 with the Section 4 window). Per step, for the
tensors of one parameter group that have a gradient::

    u = s·g + λ·w                         s = -1 with maximize, else +1 (as torch.optim.SGD)
    d = u, or momentum applied to u       (b = u first, then b = μ·b + (1-τ)·u)
    A += u  (statistic "gradient")  or  A += d  (statistic "direction")
    if the step closes a window:          per α-scope, α ← α·(1 + r(⟨A,P⟩, ‖A‖², c))
        P ← A;  A ← 0
    w ← w - α·d                           with the α just updated (Algorithm 2's order)

Nothing here reads a device value on the host: α, the dot products and the Newton
factor stay tensors, so a step never synchronises with the device.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["tlr", "StepConfig", "newton_factor", "state_dtype", "window_representation", "snapshot_form",
           "snapshot_to_sum", "sum_to_snapshot", "snapshots_allowed", "advance_step", "host_reads_free"]

# The blow-up guard's growth test (``tlr``'s docstring; docs/defaults.md, "Blow-up guard"):
# at a closing whose consecutive windows disagree (⟨A, P⟩ < 0) and whose ‖A‖² per unit
# exceeds the last window's, the weights' Σ‖w‖² having grown more than this many times
# since the last closing cuts α. kernels/tlr_step.py holds
# the same constant (it imports nothing from here; a test checks they agree).
GROWTH = 2.0

# The guard watches only units that move the weights: both its tests need the window's
# displacement energy Σ α²·‖A‖² per unit (α of each tensor's scope) above MOVE_FLOOR² times
# Σ‖w‖², i.e. α·‖A‖ per unit at least 1% of ‖w‖. A gradient spike under a step too small to
# throw the weights out is noise, and cutting α for it let α collapse towards 0 (1e-37) at
# small batches (docs/defaults.md, "Blow-up guard"). kernels/tlr_step.py holds the same constant.
MOVE_FLOOR = 0.01

# The guard's decay test: at a closing where the window's sum is mostly weight decay's pull,
# ‖A - λ·n·w‖ <= DECAY_SHARE·‖A‖ (n: the window's steps; w: the weights now, for their mean
# over the window; summed over the group), the data term is silent (train loss near 0). The
# Newton step then sees only the decay's curvature and asks for α ≈ 1/λ; α is not let grow
# past the largest α that a window with a live data term moved with (``window_energy[3]``,
# from the initial α on), so that the data term, when it returns, does not meet an α it never
# stood. Only where A sums u (statistic "gradient", or no momentum): a sum of momentum
# directions has no λ·n·w part to measure. kernels/tlr_step.py holds the same constant
# (docs/defaults.md, "Blow-up guard"). 0.9, not 0.6: at 0.6 a late blow-up still got through
# on the robustness grid (1 of 42 runs at α0 = 1); 0.9 and 0.95 left none, 0.8 one. The value
# was chosen on that grid. Its price: on the transformer task it trips at about 1 closing in 5
# (never at 0.6) and costs about 2% perplexity.
DECAY_SHARE = 0.9

# α is stored in float32; a product that leaves the normal float32 range is refused
# (α keeps its old value), so α is never 0, subnormal, inf or NaN.
_ALPHA_TINY = torch.finfo(torch.float32).tiny
_ALPHA_MAX = torch.finfo(torch.float32).max


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """dtype of every state buffer of a parameter: fp32, or the parameter's if wider."""
    return torch.promote_types(param_dtype, torch.float32)


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs no synchronisation: CPU tensors.

    Only there does the PyTorch path read device values (window decisions, checks); on a
    GPU it never does. The tests patch this to ``False`` to run the GPU's sync-free code
    on the CPU with every host read forbidden (``forbid_host_reads`` in tests/conftest.py).
    """
    return device.type == "cpu" and not torch.compiler.is_compiling()  # a read would break a traced graph


def advance_step(step: Tensor, found_inf: Tensor | None) -> None:
    """Advance a device step counter by one, or not at all when AMP found an inf (no host read)."""
    step.add_(1 if found_inf is None else (found_inf == 0).to(step.dtype))


def snapshot_form(statistic: str, momentum: float, dampening: float, nesterov: bool) -> tuple[float, float] | None:
    """(κ, c) of the window snapshot that can stand for A on the Triton path, or None.

    Within a window α is constant, so A is recoverable from S, the value of
    z = w - α·κ·b (b the momentum buffer, zero before the first step) at the window's
    start: A = c·(S - z)/α. Summing the directions taken ("direction", or momentum 0,
    where u = d), A is the displacement over α: κ = 0, c = 1. Summing u = g + λw with
    momentum μ: b_t - μ·b_{t-1} = u_t and Σ b_t = Σ displacement/α give κ = μ/(1 - μ),
    c = 1 - μ; with nesterov (d = u + μ·b) κ = μ²/(1 - μ). With dampening τ (b_t - μ·b_{t-1}
    = (1 - τ)·u_t) c = (1 - μ)/(1 - τ); a tensor's first step (b = u, not (1 - τ)·u) breaks
    the identity for its window, so the step kernel retakes the snapshot right after it.
    """
    if statistic == "direction" or momentum == 0:
        return (0.0, 1.0)
    if not 0 < momentum < 1 or not 0 <= dampening < 1 or (nesterov and dampening != 0):
        return None  # (nesterov with dampening is refused before any step: its c would be (1 - μ)/(1 - μ·τ))
    return ((momentum * momentum if nesterov else momentum) / (1.0 - momentum), (1.0 - momentum) / (1.0 - dampening))


def window_representation(backend: str, dtype: torch.dtype, form: tuple[float, float] | None,
                          snapshots: bool = True) -> str:
    """State key that holds a tensor's window statistic on a backend.

    "window_sum" is A itself. "window_start" is the snapshot S of ``snapshot_form``
    ``form`` taken at the window's start: the Triton path uses it for fp32/fp64 weights,
    so that an ordinary step touches no more memory than SGD's (for 2-byte weights the
    snapshot would be too coarse). ``snapshots=False`` where a snapshot cannot stand for
    A: a learning-rate schedule changes the step size within a window.
    """
    if backend == "triton" and snapshots and form is not None and dtype in (torch.float32, torch.float64):
        return "window_start"
    return "window_sum"


def _shadow(w: Tensor, b: Tensor | None, alpha: Tensor, kappa: float) -> Tensor:
    """z = w - α·κ·b in the state dtype (b None: a tensor before its first step, b = 0)."""
    dtype = state_dtype(w.dtype)
    z = w.to(dtype)
    if b is not None and kappa != 0:
        z = z - (alpha.to(dtype) * kappa) * b.to(dtype)
    return z


def snapshot_to_sum(s: Tensor, w: Tensor, b: Tensor | None, alpha: Tensor, form: tuple[float, float]) -> Tensor:
    """A from a window snapshot S (``snapshot_form``): c·(S - (w - α·κ·b))/α, in the state dtype."""
    kappa, c = form
    z = _shadow(w, b, alpha, kappa)
    return (c / alpha.to(z.dtype)) * (s.to(z.dtype) - z)


def sum_to_snapshot(a: Tensor | None, w: Tensor, b: Tensor | None, alpha: Tensor, form: tuple[float, float]) -> Tensor:
    """The window snapshot S that stands for A (None: 0): w - α·κ·b + α·A/c, in the weights' dtype."""
    kappa, c = form
    s = _shadow(w, b, alpha, kappa)
    if a is not None:
        s = s + (alpha.to(s.dtype) / c) * a.to(s.dtype)
    return s.to(w.dtype)


def snapshots_allowed(lr_factor: float | Tensor) -> bool:
    """Whether a window snapshot can stand for A: a constant step size within a window (no
    learning-rate schedule)."""
    return not isinstance(lr_factor, Tensor) and lr_factor == 1.0


def newton_factor(dot: Tensor, sq: Tensor, bound: float) -> Tensor:
    """1 + r with r = dot / max(4·(sq - dot), dot / c), elementwise (SPEC, paper Eq. 9).

    r := 0 where the denominator is not positive (only sq = dot = 0) or r is not finite
    (inf/NaN gradients), so the factor lies in (3/4, 1 + c].
    """
    denom = torch.maximum(4.0 * (sq - dot), dot / bound)
    r = dot / denom
    r = torch.where((denom > 0) & torch.isfinite(r), r, torch.zeros_like(r))
    return 1.0 + r


def _update_alphas(alphas: list[Tensor], dots: Tensor, sqs: Tensor, bound: float, closes: Tensor | None = None,
                   cut: Tensor | None = None, ceiling: Tensor | None = None) -> None:
    """α_s ← α_s·min(1 + r_s, cut) in place, for the scopes whose statistics are dots[s], sqs[s] (where ``closes``),
    and at most max(α_s, ``ceiling``) (the guard's decay test; inf: no ceiling)."""
    old = torch.stack(alphas).to(dots.dtype)
    factor = newton_factor(dots, sqs, bound)
    if cut is not None:
        factor = torch.minimum(factor, cut.to(factor.dtype))
    new = old * factor
    if ceiling is not None:
        new = torch.minimum(new, torch.maximum(old, ceiling.to(new.dtype)))
    ok = torch.isfinite(new) & (new >= _ALPHA_TINY) & (new <= _ALPHA_MAX)
    if closes is not None:
        ok &= closes
    new = torch.where(ok, new, old)
    torch._foreach_copy_(alphas, list(new.to(torch.float32).unbind(0)))


# Long CPU tensors: torch's CPU reductions of one long fp32 tensor accumulate naively (10M
# positive values: its sum of squares is off by 6e-4, torch.dot by 8e-5), so a CPU tensor
# of more than _LONG elements is reduced in rows of _ROW elements (norms, on every core) or
# chunks of _CHUNK (dots) whose results are summed in float64: exact to about 5e-8 (3M
# positive values; 2e-7 with chunks twice as long, 2e-8 with chunks a quarter as long, but
# each chunk is a call: a dot of 0.8M elements takes 1.7 times one torch.dot's time in
# chunks of 2^16, 1.3 times in chunks of 2^18). Over a thousand small tensors laid out flat
# (``flat_windows``) the rows are also faster than one reduction per tensor (1000 × 10k:
# 0.8 ms against 4–7 ms).
_ROW, _LONG, _CHUNK = 4096, 1 << 16, 1 << 18


def _long(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() > _LONG


def _square_sum(t: Tensor) -> Tensor:
    """‖t‖² of a contiguous tensor, float64 0-dim, in rows of ``_ROW`` (fp16/bf16 in fp32)."""
    flat = t.view(-1)
    rows = flat.numel() // _ROW
    body, tail = flat[: rows * _ROW].view(rows, _ROW), flat[rows * _ROW:]
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return (torch.linalg.vector_norm(body, dim=1, dtype=acc).to(torch.float64).square().sum()
            + tail.to(torch.float64).square().sum())


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ of two contiguous tensors of one dtype, 0-dim: torch.dot, or for a long CPU pair
    chunks of ``_CHUNK`` summed in float64 (then float64)."""
    a, b = a.view(-1), b.view(-1)
    if not _long(a) or torch.compiler.is_compiling():  # traced, the chunks would unroll into one op each
        return torch.dot(a, b)
    return torch.stack([torch.dot(x, y) for x, y in zip(a.split(_CHUNK), b.split(_CHUNK))]).to(torch.float64).sum()


def _squares(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor ‖t‖², in order: one ``_foreach_powsum`` over the short tensors (fp16/bf16
    summed in fp32: their squares overflow; the others in their own dtype, as float64 makes
    torch's CPU kernel 20 times slower on fp32), long CPU tensors exactly (``_square_sum``)."""
    out: list[Tensor | None] = [None] * len(tensors)
    half = [i for i, t in enumerate(tensors) if t.dtype in (torch.float16, torch.bfloat16) and not _long(t)]
    full = [i for i, t in enumerate(tensors) if t.dtype not in (torch.float16, torch.bfloat16) and not _long(t)]
    for idx, kw in ((half, dict(dtype=torch.float32)), (full, {})):
        if idx:
            for i, v in zip(idx, torch._foreach_powsum([tensors[i] for i in idx], 2, **kw)):
                out[i] = v
    for i, t in enumerate(tensors):
        if out[i] is None:
            out[i] = _square_sum(t.contiguous())
    return out


def _dots_and_squares(window_sums: list[Tensor], prev_window_sums: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor ⟨A, P⟩ and ‖A‖², as two vectors (one entry per tensor) in the sums' dtype.

    torch has no multi-tensor dot product; this loop runs only on window-closing steps
    (once every `window` steps). Window sums are contiguous, so view(-1) is free. Long CPU
    tensors are reduced exactly (``_square_sum``, ``_dot``).
    """
    dots = torch.stack([_dot(a, p).to(a.dtype) for a, p in zip(window_sums, prev_window_sums)])
    if hasattr(torch, "_foreach_powsum") and not torch.compiler.is_compiling():  # torch >= 2.13; Dynamo cannot trace it
        sqs = [v.to(a.dtype) for v, a in zip(_squares(window_sums), window_sums)]
    else:
        sqs = [n.square() if not _long(a) else _square_sum(a).to(a.dtype)
               for n, a in zip(torch._foreach_norm(window_sums), window_sums)]
    return dots, torch.stack(sqs)


def _u(params, grads, *, weight_decay, maximize) -> tuple[list[Tensor], bool]:
    """u = s·g + λ·w for one bucket (SPEC), and whether u is a fresh list of tensors (else it is ``grads``)."""
    if maximize:
        u = torch._foreach_neg(grads)
        if weight_decay != 0:
            torch._foreach_add_(u, params, alpha=weight_decay)
        return u, True
    if weight_decay != 0:
        return torch._foreach_add(grads, params, alpha=weight_decay), True
    return list(grads), False  # read-only below


def _momentum(u, fresh, bufs, *, momentum, dampening, nesterov) -> list[Tensor]:
    """d for the directions u, advancing the momentum buffers ``bufs`` (entries replaced; None: first step).

    b = u on a tensor's first step, then b = μ·b + (1-τ)·u; d = b, or u + μ·b with nesterov.
    Heavy-ball without dampening writes μ·b + u into u's own storage (fresh tensors, not
    ``p.grad``), which becomes the new buffer: one pass instead of two.
    """
    if momentum == 0:
        return u
    old = [i for i, b in enumerate(bufs) if b is not None]
    # On the CPU u's storage may become the buffer. Elsewhere the buffers keep their identity
    # (CUDA graphs capture addresses; torch.compile fuses the passes itself and guards on it).
    reuse = fresh and dampening == 0 and not nesterov and host_reads_free(u[0].device) if u else False
    for i, b in enumerate(bufs):
        if b is None:  # first step of this tensor: b = u
            bufs[i] = u[i] if reuse else u[i].detach().clone(memory_format=torch.contiguous_format)
    if old:
        us, bs = [u[i] for i in old], [bufs[i] for i in old]
        if reuse:
            torch._foreach_add_(us, bs, alpha=momentum)
            for i, b in zip(old, us):
                bufs[i] = b
        else:  # in place: the buffers keep their identity
            torch._foreach_mul_(bs, momentum)
            torch._foreach_add_(bs, us, alpha=1.0 - dampening)
    if nesterov:
        return torch._foreach_add(u, bufs, alpha=momentum)
    return list(bufs)


# torch's grain size (at::internal::GRAIN_SIZE): its CPU ops split a tensor over threads
# only from this many elements on.
_GRAIN = 32768


def _fused_ok(params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether torch's fused SGD kernel can move this bucket.

    For contiguous fp32/fp64 tensors on CUDA or the CPU, and not under torch.compile
    (which traces the foreach path and fuses it itself). torch's CPU kernel writes
    non-contiguous parameters as if they were contiguous and gives wrong bf16/fp16
    updates (torch 2.13), hence the checks. On the CPU it also splits every tensor over
    the threads, however small, and each split ends at a barrier that costs a scheduler
    time slice when other processes share the cores (1000 tensors of 10k: seconds per
    step): tensors below torch's grain size take the foreach path (``_grain_split``),
    whose ops keep them on one thread.
    """
    p = params[0]
    return (
        not torch.compiler.is_compiling()  # _fused_sgd_ with a tensor lr has no fake kernel to trace
        and (p.device.type == "cuda" or p.device.type == "cpu" and all(t.numel() >= _GRAIN for t in params))
        and p.dtype in (torch.float32, torch.float64)
        and all(t.is_contiguous() for t in params)
        and all(g.is_contiguous() and g.dtype == p.dtype for g in grads)
    )


def _grain_split(params: list[Tensor], idx: list[int]) -> list[list[int]]:
    """A CPU bucket's tensors at or above torch's grain size apart from the smaller ones."""
    if params[idx[0]].device.type != "cpu":
        return [idx]
    large = [i for i in idx if params[i].numel() >= _GRAIN]
    if not large or len(large) == len(idx):
        return [idx]
    return [large, [i for i in idx if params[i].numel() < _GRAIN]]


def _buckets(params: list[Tensor]) -> list[list[int]]:
    """Indices of the tensors of each (device, dtype), in first-seen order."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        out.setdefault((p.device, p.dtype), []).append(i)
    return list(out.values())


@dataclass(frozen=True)
class StepConfig:
    """A parameter group's hyper-parameters as ``tlr`` reads them, its window schedule included:
    windows are k·``window`` steps long (W0, one unit), 1 <= k <= ``units`` (K; 1: the
    paper's fixed window, more: the adaptive one). The optimizer builds one when a group's
    hyper-parameters change (and validates them then), and passes the same object to every
    step in between. The blow-up guard (``blowup_ratio``, None: off) watches adaptive
    windows only."""

    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    bound: float
    statistic: str  # "gradient": A sums u = s·g + λ·w; "direction": A sums the step's direction d
    scope: str      # "group": one α for the group; "tensor": one α per tensor
    window: int
    units: int = 1
    window_reset: float = 0.05
    blowup_ratio: float | None = None

    @property
    def guarded(self) -> bool:
        return self.units > 1 and self.blowup_ratio is not None


def tlr(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    window_sums: list[Tensor],
    prev_window_sums: list[Tensor],
    alphas: list[Tensor],
    config: StepConfig,
    *,
    step: int | Tensor,
    window_state: Tensor | None = None,
    window_energy: Tensor | None = None,
    lr_factor: float | Tensor = 1.0,
    backend: str = "torch",
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    shard_group=None,
    sharded_tensors: bool = False,
    buckets: list[list[int]] | None = None,
    state_token: object = None,
    flat_windows: tuple[Tensor, Tensor] | None = None,
    layout_unchanged: bool = False,
    addresses: Tensor | None = None,
    keep: dict | None = None,
) -> None:
    """One TLR step for the tensors of one parameter group (see the module docstring).

    Args:
        params, grads: the tensors that have a gradient, and their gradients.
        momentum_buffers: one entry per tensor, ``None`` before its first step; new
            buffers are written into this list (the caller stores them).
        window_sums, prev_window_sums: A and P, contiguous, in ``state_dtype``. On the
            PyTorch path a closing step swaps the two lists' entries (P ← A, A ← the old
            P zeroed); the caller stores both lists back.
        alphas: float32 0-dim tensors, updated in place: one (scope "group") or one per
            tensor (scope "tensor").
        config: the group's hyper-parameters (``StepConfig``), its window schedule included.
        step: the group's step count before this step. The PyTorch path takes an int (and
            the caller advances it); the Triton path an int64 device tensor, which it
            advances itself, on the device.
        window_state: windows are k·W0 steps long, 1 <= k <= K (``config.window``,
            ``config.units``; K = 1: fixed windows). Every step with (step + 1) % W0 == 0
            ends a unit; the window closes when its units reach k. ``window_state`` is an
            int64 tensor [units so far, k] on the parameters' device, updated in place:
            after a closing k becomes 1 if |r| of the group's total ⟨A, P⟩, ‖A‖² is >=
            ``config.window_reset``, else min(k + 1, K). Needed when K > 1 (the PyTorch path
            ignores it when K = 1).
        window_energy: the adaptive window's blow-up guard (K > 1 and ``config.blowup_ratio``
            not None; else off): a float64 [4] tensor, ‖A‖² per unit of the last two closed
            windows, Σ‖w‖² at the last closing and the peak α (below; the optimizer starts it
            at the initial α, 0 holds α until a first such window), updated in place. At
            every unit's end, if ‖A‖² per unit of the window so far exceeds
            ``config.blowup_ratio`` times the larger of the two, the window closes after this
            step's move (a scheduled closing comes first, as always), k becomes 1 and every
            α's factor is at most 1/(1 + √q), q that ratio. At every closing, if ⟨A, P⟩ < 0 while Σ‖w‖² (before
            this step's move) has grown more than ``GROWTH`` times since the last closing
            and ‖A‖² per unit exceeds the last window's, every α's factor is also at most
            1/(1 + √q), q that growth, and k becomes 1. Both tests count only where
            Σ α²·‖A‖² per unit (α of each tensor's scope) exceeds ``MOVE_FLOOR``² times
            Σ‖w‖²: steps that can throw the weights out. At every closing, if
            ‖A - λ·n·w‖ <= ``DECAY_SHARE``·‖A‖ (n the window's steps: a window mostly of
            weight decay), no α grows past max(α, peak); else the peak becomes the largest α
            the window moved with.
        lr_factor: a learning-rate schedule's factor (``lr / initial_lr``, a float or a
            0-dim device tensor): the weights move by α · lr_factor · d; α is trained as
            without it.
        backend: "torch" (``_tlr_torch``) or "triton" (``_tlr_triton``). On the Triton path
            ``window_sums`` holds, for the tensors where ``window_representation`` says
            "window_start", the window-start snapshot of ``snapshot_form`` instead of A.
        grad_scale, found_inf: AMP's tensors (Triton path only): gradients are divided
            by ``grad_scale``, and nothing changes when ``found_inf`` is nonzero.
        shard_group: a ``torch.distributed`` process group whose ranks each hold part of
            this group's tensors (ZeroRedundancyOptimizer): at every step that ends a
            window unit, the group's ⟨A, P⟩ and ‖A‖² are summed over it with one
            all-reduce (PyTorch path). Every rank must call this at the same steps, also
            with no tensors, so that the collective is never skipped. With scope
            "tensor" each tensor lives whole on one rank: its own statistics are local.
        sharded_tensors: every tensor is split over ``shard_group`` (DTensor shards, in
            the same order on every rank): with scope "tensor" each tensor's statistics
            are summed too, in the same all-reduce.
        buckets: the indices of the tensors of each (device, dtype), as ``_buckets(params)``
            gives them (a caller that keeps them between steps saves a pass over params).
        state_token: Triton path: None, or a value that the caller changes whenever one of
            the state tensors it passes (buffers, A or S, P, α) may be another tensor than
            at its last call; while it stays the same, their addresses are not read again.
        flat_windows: PyTorch path on the CPU, scope "group": two 1-D tensors of which
            ``window_sums`` and ``prev_window_sums`` are consecutive slices, in order (which
            of the two holds A is read off the first tensor's storage; the roles swap at
            every closing). The window's reductions then run over them in rows
            (``_flat_square``): exact, and one reduction instead of one per tensor.
        keep, layout_unchanged, addresses: Triton path. ``keep``: a dict the caller keeps for
            this group (the same at every call with ``state_token``), where the launcher keeps
            its launches. ``layout_unchanged``: the caller found the weights and gradients as
            at its last call (``kernels.cpu.same_layout``); ``grads`` may then be None. The
            launcher repeats the kept launches, with ``addresses`` (int64 [len(params), 2]) as
            the weights' and gradients' addresses where only those moved.
    """
    if config.scope == "group" and len(alphas) != 1:
        raise ValueError(f"scope 'group' takes one alpha, got {len(alphas)}")
    if config.scope == "tensor" and len(alphas) != len(params):
        raise ValueError(f"scope 'tensor' takes one alpha per tensor, got {len(alphas)} for {len(params)}")
    if config.units > 1 and window_state is None:
        raise ValueError(f"an adaptive window ({config.units} units of {config.window} steps) needs window_state")
    if config.guarded and window_energy is None:
        raise ValueError("the blow-up guard (blowup_ratio) needs window_energy")
    if window_energy is not None and tuple(window_energy.shape) != (4,):
        raise ValueError(f"window_energy must be a float64 tensor of 4 values, got shape {tuple(window_energy.shape)}")
    impl = {"torch": _tlr_torch, "triton": _tlr_triton}.get(backend)
    if impl is None:
        raise ValueError(f"unknown backend {backend!r}")
    impl(params, grads, momentum_buffers, window_sums, prev_window_sums, alphas, config, step=step,
         window_state=window_state, window_energy=window_energy, lr_factor=lr_factor, grad_scale=grad_scale,
         found_inf=found_inf, shard_group=shard_group, sharded_tensors=sharded_tensors, buckets=buckets,
         state_token=state_token, flat_windows=flat_windows, layout_unchanged=layout_unchanged, addresses=addresses,
         keep=keep)


_LAUNCH = []


def _kernels_launch():
    """``tlr_triton.kernels.launch``, imported on the first Triton step (it imports triton)."""
    if not _LAUNCH:
        from tlr_triton.kernels import launch

        _LAUNCH.append(launch)
    return _LAUNCH[0]


def _tlr_triton(params, grads, momentum_buffers, window_sums, prev_window_sums, alphas, config, *, step, window_state,
                window_energy, lr_factor, grad_scale, found_inf, shard_group, sharded_tensors, buckets, state_token,
                flat_windows, layout_unchanged=False, addresses=None, keep=None) -> None:
    """``tlr`` on the Triton path (``tlr_triton.kernels``): three launches (four with one α per
    tensor), nothing read on the host."""
    if shard_group is not None:
        raise NotImplementedError("shard_group is implemented on the PyTorch path only; use backend='torch'")
    launch = _kernels_launch()
    if window_state is None:  # fixed windows keep no window state between steps
        window_state = torch.tensor([0, 1], dtype=torch.int64, device=step.device)
    if window_energy is None:
        window_energy = torch.zeros(4, dtype=torch.float64, device=step.device)
    if params:
        if buckets is None:
            buckets = _buckets(params)
        momentum = config.momentum
        form = snapshot_form(config.statistic, momentum, config.dampening, config.nesterov)
        allowed = snapshots_allowed(lr_factor)
        snapshots = [window_representation("triton", params[idx[0]].dtype, form, allowed)
                     == "window_start" for idx in buckets]
        form = form or (0.0, 1.0)
        if torch.compiler.is_compiling():  # one opaque custom op for the traced graph
            first = [b is None for b in momentum_buffers]
            if momentum != 0:
                for i, b in enumerate(momentum_buffers):
                    if b is None:
                        momentum_buffers[i] = torch.zeros_like(prev_window_sums[i])
            factor_tensor = lr_factor if isinstance(lr_factor, Tensor) else None
            bucket_of = [0] * len(params)
            for k, idx in enumerate(buckets):
                for i in idx:
                    bucket_of[i] = k
            c = config  # a custom op's schema takes plain values only
            launch.triton_step_op(
                params, grads, momentum_buffers if momentum != 0 else [], first, window_sums, prev_window_sums,
                alphas, step, c.window, c.units, c.window_reset, window_state, c.blowup_ratio, window_energy,
                momentum, c.dampening, c.weight_decay, c.nesterov, c.maximize, c.bound, c.statistic, c.scope,
                1.0 if factor_tensor is not None else float(lr_factor), factor_tensor, grad_scale, found_inf,
                bucket_of, snapshots, *form,
            )
        else:
            launch.tlr_triton_step(
                params, grads, momentum_buffers, window_sums, prev_window_sums, alphas, config,
                step=step, window_state=window_state, window_energy=window_energy, lr_factor=lr_factor,
                buckets=buckets, snapshots=snapshots, grad_scale=grad_scale, found_inf=found_inf,
                snapshot_form=form, state_token=state_token, layout_unchanged=layout_unchanged,
                addresses=addresses, keep=keep,
            )
    else:  # the window kernel advances the counter; with no tensors the step still counts
        advance_step(step, found_inf)


def _tlr_torch(params, grads, momentum_buffers, window_sums, prev_window_sums, alphas, config, *, step, window_state,
               window_energy, lr_factor, grad_scale, found_inf, shard_group, sharded_tensors, buckets, state_token,
               flat_windows, layout_unchanged=False, addresses=None, keep=None) -> None:
    """``tlr`` on the PyTorch path (any device). On the CPU with one α and no collective, the
    fused C++ step (``_tlr_cpu``) where it is built and takes the tensors; elsewhere torch's
    fused SGD kernel where it applies and its foreach ops otherwise, the window's decisions
    read on the host on the CPU."""
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("grad_scale/found_inf are honoured by the Triton path only")
    if not params and shard_group is None:
        return
    momentum, dampening, weight_decay, nesterov, maximize = (config.momentum, config.dampening, config.weight_decay,
                                                             config.nesterov, config.maximize)
    scope, bound, window, units = config.scope, config.bound, config.window, config.units
    # Fixed windows: this step closes one. Adaptive: it ends a unit, and the window's state decides.
    closes_window = (step + 1) % window == 0
    # On the CPU, one α and no collective: the window's scalars are read and computed on
    # the host (free there), a few tensor operations instead of some seventy small ones.
    host = len(alphas) == 1 and shard_group is None and bool(window_sums) and host_reads_free(alphas[0].device)
    if host and _cpu_kernel_fits(params, grads, momentum_buffers, window_sums, prev_window_sums):
        ext = _cpu_extension()
        if ext is not None:
            _tlr_cpu(ext, params, grads, momentum_buffers, window_sums, prev_window_sums, alphas[0], config,
                     unit_end=closes_window, window_state=window_state, window_energy=window_energy,
                     lr_factor=lr_factor, flats=_flat_roles(flat_windows, window_sums))
            return
    kw = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    sign = -1.0 if maximize else 1.0
    sums_u = config.statistic == "gradient" or momentum == 0  # A sums u, known before momentum
    movers = []  # weight updates, run after α has been updated

    if buckets is None:
        buckets = _buckets(params)
    for idx in (part for bucket in buckets for part in _grain_split(params, bucket)):
        b_params = [params[i] for i in idx]
        b_grads = [grads[i] for i in idx]
        b_bufs = [momentum_buffers[i] for i in idx]
        b_sums = [window_sums[i] for i in idx]
        b_alphas = alphas * len(idx) if scope == "group" else [alphas[i] for i in idx]
        half = b_params[0].dtype not in (torch.float32, torch.float64)

        if half:
            # Compute in fp32 (state is fp32 too) and round once into the parameter.
            work_params = [p.float() for p in b_params]
            work_grads = [g.float() for g in b_grads]
        else:
            work_params, work_grads = b_params, b_grads

        # With heavy-ball momentum, d is the new momentum buffer: on a step that closes
        # no window it can be summed after the fused kernel has computed it.
        sums_new_buffer = not sums_u and not nesterov and not closes_window
        if scope == "group" and (sums_u or sums_new_buffer) and not half and _fused_ok(b_params, b_grads):
            # Hot path: torch's fused SGD kernel, with α as a device tensor, moves the
            # weights and the momentum in one pass after α has been updated.
            if sums_u:  # A += s·g + λ·w
                torch._foreach_add_(b_sums, b_grads, alpha=sign)
                if weight_decay != 0:
                    torch._foreach_add_(b_sums, b_params, alpha=weight_decay)
            movers.append(_fused_mover(b_params, b_grads, b_bufs, momentum_buffers, idx, b_alphas[0], lr_factor, kw))
            if sums_new_buffer:  # A += d = the updated buffer
                movers.append(lambda sums=b_sums, bufs=b_bufs: torch._foreach_add_(sums, bufs))
            continue

        u, fresh = _u(work_params, work_grads, weight_decay=weight_decay, maximize=maximize)
        if sums_u:
            torch._foreach_add_(b_sums, u)  # before the momentum update may reuse u's storage
        d = _momentum(u, fresh, b_bufs, momentum=momentum, dampening=dampening, nesterov=nesterov)
        for j, i in enumerate(idx):
            momentum_buffers[i] = b_bufs[j]
        if not sums_u:
            torch._foreach_add_(b_sums, d)
        movers.append(_foreach_mover(b_params, work_params, d, b_alphas, lr_factor, half))

    before, after = [], []  # window work that must come before the move (α) and after it
    if closes_window:
        def statistics():
            return _window_statistics(buckets, window_sums, prev_window_sums, alphas, scope, shard_group, window_state,
                                      sharded_tensors, params if config.guarded else None)

        flats = _flat_roles(flat_windows, window_sums) if host else None
        if units > 1:
            # ‖A‖² alone (the guard's test) is cheaper where the decision is read on the host
            squares = None if shard_group is not None else (
                (lambda: _square_total(window_sums)) if flats is None else (lambda: _flat_square(flats[0])))
            if host:
                before, after = _host_unit_end(config, squares, window_sums, prev_window_sums, alphas[0], window_state,
                                               window_energy, params, weight_decay if sums_u else 0.0, flats)
            else:
                before, after = _adaptive_unit_end(config, statistics, squares, window_sums, prev_window_sums,
                                                   window_state, window_energy, weight_decay if sums_u else 0.0)
        elif host:
            _host_close(window_sums, prev_window_sums, alphas[0], bound, _host_totals(window_sums, prev_window_sums, flats),
                        flats=flats)
        else:
            _close_window(statistics(), window_sums, prev_window_sums, bound)
    for work in before + movers + after:
        work()


def _cpu_extension():
    """The fused CPU step (``tlr_triton.kernels.cpu``), or None where it cannot be built."""
    from tlr_triton.kernels import cpu

    return cpu.extension()


def _cpu_kernel_fits(params, grads, momentum_buffers, window_sums, prev_window_sums) -> bool:
    """Whether the fused CPU step (``_tlr_cpu``) takes these tensors: dense, contiguous CPU
    float32/float64 weights, and gradients, momentum buffers (where they exist), A and P
    contiguous in their weights' dtype. (bf16/fp16 weights, whose state is fp32, take torch's
    ops; so does a step after torch's ops left a buffer non-contiguous, e.g. one built from a
    transposed gradient, or a checkpoint loaded with other strides.)"""
    bufs = [b for b in momentum_buffers if b is not None]
    dtypes = set(map(_DTYPE, params))
    if len(dtypes) == 1:  # the usual case, in C-level maps (this runs every step, over every tensor)
        return (dtypes <= {torch.float32, torch.float64}
                and all(map(Tensor.is_contiguous, params)) and all(map(Tensor.is_contiguous, grads))
                and all(map(Tensor.is_contiguous, window_sums)) and all(map(Tensor.is_contiguous, prev_window_sums))
                and all(map(Tensor.is_contiguous, bufs))
                and set(map(_DTYPE, grads)) == set(map(_DTYPE, window_sums)) == set(map(_DTYPE, prev_window_sums)) == dtypes
                and set(map(_DTYPE, bufs)) <= dtypes and not any(map(_IS_SPARSE, grads)))
    return all(
        p.dtype in (torch.float32, torch.float64) and p.is_contiguous()
        and g.layout == torch.strided and g.dtype == p.dtype and g.is_contiguous()
        and a.dtype == p.dtype and q.dtype == p.dtype and a.is_contiguous() and q.is_contiguous()
        and (b is None or (b.dtype == p.dtype and b.is_contiguous()))
        for p, g, b, a, q in zip(params, grads, momentum_buffers, window_sums, prev_window_sums)
    )


_DTYPE, _IS_SPARSE = operator.attrgetter("dtype"), operator.attrgetter("is_sparse")


def _tlr_cpu(ext, params, grads, momentum_buffers, window_sums, prev_window_sums, alpha, config, *, unit_end,
             window_state, window_energy, lr_factor, flats) -> None:
    """``_tlr_torch`` on the CPU for one α, in the fused C++ step (kernels/cpu_step.cpp).

    An ordinary step is one pass: u, the momentum buffer, A and the move. A unit's end takes
    the group's ‖A‖², Σ‖w‖² and Σ⟨A, w⟩ in the same pass (A after this step's term, w before
    the move), and ⟨A, P⟩ where the window is scheduled to close; the host decides the window
    (``_host_unit_end``, ``_host_close``: the same decisions as the other paths). At a
    scheduled closing the weights then move with the α so decided, in a second pass; at any
    other unit's end the first pass moved them already. Tensors of each dtype go in one call."""
    momentum = config.momentum
    sign = -1.0 if config.maximize else 1.0
    sums_u = config.statistic == "gradient" or momentum == 0
    first = [b is None for b in momentum_buffers] if momentum != 0 else [False] * len(params)
    # b = u on a tensor's first step: the kernel writes it into a new buffer, which the caller
    # gets (``momentum_buffers``) once the first pass has run
    bufs = ([torch.empty_like(p, memory_format=torch.contiguous_format) if new else b
             for p, b, new in zip(params, momentum_buffers, first)] if momentum != 0 else [])
    if len(set(map(_DTYPE, params))) == 1:
        args = [(params, grads, bufs, window_sums, prev_window_sums, first)]
    else:
        args = [([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx] if bufs else [],
                 [window_sums[i] for i in idx], [prev_window_sums[i] for i in idx], [first[i] for i in idx])
                for idx in _buckets(params)]
    scalars = (sign, config.weight_decay, momentum, config.dampening, config.nesterov)

    def lr() -> float:
        return float(alpha) * float(lr_factor)

    if not unit_end:
        for w, g, b, a, p, f in args:
            ext.step(w, g, b, a, p, f, lr(), True, False, False, *scalars, sums_u)
        momentum_buffers[:] = bufs or momentum_buffers
        return
    # A scheduled closing changes α before this step's move: the move waits for the decision,
    # and P, read for ⟨A, P⟩, is zeroed in the same pass (it becomes the next window's A).
    # At any other unit's end α moves after the move, if at all (the guard's early closing),
    # so the pass moves too, after taking its sums over the weights before the move.
    # Only a closing reads ⟨A, P⟩: elsewhere P is left unread (4 bytes per parameter) unless
    # the guard trips (``_host_unit_end`` then takes the dot itself).
    # (each host read or write of a small tensor costs microseconds with cold caches: each is done once)
    state = window_state.tolist() if config.units > 1 else None
    closes = state is None or _scheduled_closing(state, config.units)
    value = float(alpha)
    rate = 0.0 if closes else value * float(lr_factor)
    totals = [0.0] * 4
    for w, g, b, a, p, f in args:
        sums = ext.step(w, g, b, a, p if closes else [], f, rate, not closes, True, closes, *scalars, sums_u)
        totals = [x + y for x, y in zip(totals, sums)]
    momentum_buffers[:] = bufs or momentum_buffers
    if not closes:
        totals[0] = None
    dot, sq = totals[0], totals[1]
    if state is not None:
        before, after = _host_unit_end(config, lambda: sq, window_sums, prev_window_sums, alpha, window_state,
                                       window_energy, params, config.weight_decay if sums_u else 0.0, flats,
                                       totals=totals, zeroed=closes, state=state, alpha_value=value)
    else:
        before, after = [lambda: _host_close(window_sums, prev_window_sums, alpha, config.bound, (dot, sq),
                                             zeroed=True, old=value)], []

    def move():
        rate = lr()
        for w, g, b, *_ in args:
            ext.move(w, g, b, rate, sign, config.weight_decay, momentum, config.nesterov)

    for work in before + ([move] if closes else []) + after:
        work()


def _scheduled_closing(state: list[int], units: int) -> bool:
    """Whether the adaptive window closes at this unit's end whatever the guard says, from
    ``window_state``'s values (CPU: read on the host)."""
    done, k = state
    return done + 1 >= min(k, units)


def _window_statistics(buckets, window_sums, prev_window_sums, alphas, scope, shard_group=None, window_state=None,
                       sharded_tensors=False, params=None):
    """[(α-scopes' alphas, their ⟨A, P⟩, their ‖A‖²)], the group's total ⟨A, P⟩ and ‖A‖², and
    the blow-up guard's (float64; None unless ``params`` are given): its Σ‖w‖², Σ α²·‖A‖²,
    Σ⟨A, w⟩ and its largest α.

    With ``shard_group`` the group's totals (and, for ``sharded_tensors`` with scope
    "tensor", every tensor's) are summed over its ranks: one all-reduce, in float64 so
    that every rank sends the same dtype, also a rank with no tensors.
    """
    stats = [_dots_and_squares([window_sums[i] for i in idx], [prev_window_sums[i] for i in idx]) for idx in buckets]
    acc = torch.float64 if any(d.dtype == torch.float64 for d, _ in stats) else torch.float32
    device = alphas[0].device if alphas else window_state.device
    if stats:
        dot = torch.stack([d.to(acc).sum() for d, _ in stats]).sum()
        sq = torch.stack([s.to(acc).sum() for _, s in stats]).sum()
    else:  # a rank that holds none of this group's tensors still joins the collective
        dot = sq = torch.zeros((), dtype=acc, device=device)
    weights = moved = along = top = None
    if params is not None:
        weights = _weights_total(params, device)
        moved = _moved_total(buckets, stats, alphas, scope, device)
        along = _along_total(window_sums, params, device)
        top = torch.stack(alphas).max().to(torch.float64) if alphas else torch.zeros((), dtype=torch.float64,
                                                                                    device=device)
    if shard_group is not None:
        import torch.distributed as dist

        per_tensor = sharded_tensors and scope == "tensor" and stats
        if top is not None and scope == "tensor" and not sharded_tensors:  # each rank holds other tensors' α
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=shard_group)
        # Σ α²·‖A‖² of this rank's tensors (or shards): summed over the ranks like the rest
        head = [dot, sq] + ([] if weights is None else [weights, moved, along])
        parts = [torch.stack([t.to(torch.float64) for t in head])] + (
            [t for pair in stats for t in pair] if per_tensor else [])
        total = torch.cat([t.to(torch.float64) for t in parts])
        dist.all_reduce(total, group=shard_group)
        dot, sq = total[:2].to(acc).unbind(0)
        if weights is not None:
            weights, moved, along = total[2], total[3], total[4]
        if per_tensor:
            sizes = [len(t) for pair in stats for t in pair]
            summed = list(total[len(head):].split(sizes))
            stats = [(summed[2 * i], summed[2 * i + 1]) for i in range(len(stats))]
    guard = (weights, moved, along, top)
    if scope == "group":
        return [(alphas, dot.reshape(1), sq.reshape(1))], dot, sq, guard
    return [([alphas[i] for i in idx], d.to(acc), s.to(acc)) for idx, (d, s) in zip(buckets, stats)], dot, sq, guard


def _moved_total(buckets, stats, alphas, scope, device) -> Tensor:
    """Σ α²·‖A‖² over the tensors (α: each tensor's scope's), float64 0-dim: the guard's ``MOVE_FLOOR`` test."""
    if not stats:
        return torch.zeros((), dtype=torch.float64, device=device)
    parts = []
    for idx, (_, s) in zip(buckets, stats):
        a = alphas[0].to(torch.float64) if scope == "group" else torch.stack([alphas[i] for i in idx]).to(torch.float64)
        parts.append((a.square() * s.to(torch.float64)).sum())
    return torch.stack(parts).sum()


def _along_total(window_sums: list[Tensor], params: list[Tensor], device: torch.device) -> Tensor:
    """Σ⟨A, w⟩ over the tensors (the weights before this step's move), float64 0-dim: the guard's
    decay test. One dot per tensor (as ``_dots_and_squares``), where the guard's statistics are taken."""
    if not params:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([_dot(a, p.detach().to(a.dtype).contiguous()).to(torch.float64)
                        for a, p in zip(window_sums, params)]).sum()


def _decays(along, sq, weights, decay):
    """The guard's decay test: ‖A - decay·w‖² <= DECAY_SHARE²·‖A‖², decay = λ·(the window's steps),
    from Σ⟨A, w⟩, Σ‖A‖² and Σ‖w‖² (floats or tensors)."""
    return (decay > 0) & (sq > 0) & (sq - 2 * decay * along + decay * decay * weights <= DECAY_SHARE ** 2 * sq)


def _weights_total(params: list[Tensor], device: torch.device) -> Tensor:
    """Σ‖w‖² over ``params`` (the weights before this step's move), a float64 0-dim tensor: one pass."""
    if not params:
        return torch.zeros((), dtype=torch.float64, device=device)
    if hasattr(torch, "_foreach_powsum") and not torch.compiler.is_compiling():
        return torch.stack([t.to(torch.float64) for t in _squares([p.detach() for p in params])]).sum()
    return torch.stack([p.detach().to(torch.float64).square().sum() for p in params]).sum()


def _close_window(statistics, window_sums, prev_window_sums, bound, cut: Tensor | None = None,
                  ceiling: Tensor | None = None) -> None:
    """Update every α-scope's α from ⟨A, P⟩ and ‖A‖² (``_window_statistics``; its factor at
    most ``cut``, and α at most max(α, ``ceiling``): the blow-up guard's), then P ← A and A ← 0.

    The last part swaps the two lists' entries (the old P, zeroed, becomes the new A)
    instead of copying A into P: the caller stores the lists back into its state.
    """
    scopes = statistics[0]
    for a, dots, sqs in scopes:
        _update_alphas(a, dots, sqs, bound, cut=cut, ceiling=ceiling)
    _rotate_windows(window_sums, prev_window_sums)


def _rotate_windows(window_sums: list[Tensor], prev_window_sums: list[Tensor],
                    flats: tuple[Tensor, Tensor] | None = None, zeroed: bool = False) -> None:
    """P ← A, A ← 0 by swapping the lists' entries (the old P, zeroed, becomes the new A;
    ``zeroed``: the caller has zeroed it)."""
    if zeroed:
        pass
    elif flats is not None:
        flats[1].zero_()
    elif prev_window_sums:
        torch._foreach_zero_(prev_window_sums)
    window_sums[:], prev_window_sums[:] = prev_window_sums[:], window_sums[:]


def _square_total(window_sums: list[Tensor]) -> float:
    """Σ‖A‖² over the tensors, read on the host (CPU only: the read is free there)."""
    if not window_sums:
        return 0.0
    if torch.compiler.is_compiling() or not hasattr(torch, "_foreach_powsum"):
        return float(sum(float(a.square().sum()) for a in window_sums))
    return float(torch.stack(torch._foreach_powsum(window_sums, 2)).sum())  # one read, not one per tensor


def _flat_square(flat: Tensor) -> float:
    """‖flat‖² of a flat window buffer, read on the host (CPU only)."""
    return float(_square_sum(flat))


def _flat_dot(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ of two flat window buffers, read on the host (CPU only)."""
    return float(_dot(a, b))


def _flat_weights(params: list[Tensor], prev_window_sums: list[Tensor], flats: tuple[Tensor, Tensor],
                  along: bool) -> tuple[float, float]:
    """Σ‖w‖² and Σ⟨A, w⟩ (0.0 unless ``along``) of the weights before this step's move, read on
    the host, at a closing of a group with flat window buffers (``_flat_roles``): P's buffer,
    free once ⟨A, P⟩ is taken (the closing zeroes it), receives the weights, so that both are
    flat reductions instead of two per tensor (1000 × 10k: about 10 ms against 30)."""
    torch._foreach_copy_(prev_window_sums, [p.detach() for p in params])
    return _flat_square(flats[1]), (_flat_dot(flats[0], flats[1]) if along else 0.0)


def _flat_roles(flat_windows: tuple[Tensor, Tensor] | None, window_sums: list[Tensor]):
    """(A's flat buffer, P's) of ``flat_windows``, whose roles swap at every closing; None without."""
    if flat_windows is None:
        return None
    first, second = flat_windows
    if window_sums[0].untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        return first, second
    return second, first


def _host_totals(window_sums: list[Tensor], prev_window_sums: list[Tensor],
                 flats: tuple[Tensor, Tensor] | None = None) -> tuple[float, float]:
    """The group's Σ⟨A, P⟩ and Σ‖A‖², read on the host (CPU only): one read for all tensors,
    or the flat buffers' (``_flat_roles``) where the group has them."""
    if flats is not None:
        return _flat_dot(*flats), _flat_square(flats[0])
    dots, squares = _dots_and_squares(window_sums, prev_window_sums)
    values = torch.cat((dots, squares)).tolist()
    n = len(window_sums)
    return math.fsum(values[:n]), math.fsum(values[n:])


def _host_dot(window_sums: list[Tensor], prev_window_sums: list[Tensor],
              flats: tuple[Tensor, Tensor] | None = None) -> float:
    """The group's Σ⟨A, P⟩ alone, read on the host (CPU only)."""
    if flats is not None:
        return _flat_dot(*flats)
    return math.fsum(float(_dot(a, p)) for a, p in zip(window_sums, prev_window_sums))


def _host_factor(dot: float, sq: float, bound: float) -> float:
    """``newton_factor`` on host floats."""
    denom = max(4.0 * (sq - dot), dot / bound)
    r = dot / denom if denom > 0 else 0.0
    return 1.0 + r if math.isfinite(r) else 1.0


def _host_close(window_sums, prev_window_sums, alpha: Tensor, bound: float, totals: tuple[float, float],
                cut: float = math.inf, ceiling: float = math.inf, flats: tuple[Tensor, Tensor] | None = None,
                zeroed: bool = False, old: float | None = None) -> None:
    """``_close_window`` for one α on the CPU: α ← min(α·min(1 + r, cut), max(α, ceiling)) when
    that stays a normal float32 (else α is kept), P ← A, A ← 0 (``_rotate_windows``). ``old``:
    α's value where the caller has read it."""
    if old is None:
        old = float(alpha)
    new = min(old * min(_host_factor(*totals, bound), cut), max(old, ceiling))
    if math.isfinite(new) and _ALPHA_TINY <= new <= _ALPHA_MAX:
        alpha.fill_(new)
    _rotate_windows(window_sums, prev_window_sums, flats, zeroed)


def _host_write(tensor: Tensor, values) -> None:
    """Write host numbers into a small CPU tensor (``window_state``, ``window_energy``): through
    its NumPy view where NumPy is installed (about a third of the time of ``torch.tensor`` +
    ``copy_`` when the caches are cold, as they are after a forward and backward pass)."""
    try:
        view = tensor.detach().numpy()
    except (RuntimeError, TypeError):  # no NumPy
        tensor.copy_(torch.tensor(values, dtype=tensor.dtype))
        return
    view[...] = values


def _host_unit(squares, window_state, units, blowup_ratio, window_energy, state=None):
    """A unit's end read on the host (CPU only): None when the window stays open — not
    scheduled to close and the guard's test on ‖A‖² (``squares()``) holds; ``window_state``
    then counts the unit — else (units so far, k, the guard's references: ``window_energy``'s
    values). ``state``: ``window_state``'s values where the caller has read them."""
    done, stored_k = state if state is not None else window_state.tolist()
    done, k = done + 1, min(stored_k, units)
    energies = window_energy.tolist() if window_energy is not None else [0.0, 0.0, 0.0, 0.0]  # None: no guard
    reference = max(energies[:2])
    if done < k and not (blowup_ratio is not None and reference > 0 and squares() / done > blowup_ratio * reference):
        _host_write(window_state, (done, stored_k))
        return None
    return done, k, energies, stored_k


def _host_unit_end(config, squares, window_sums, prev_window_sums, alpha, window_state, window_energy, params,
                   weight_decay, flats=None, totals=None, zeroed=False, state=None, alpha_value=None):
    """``_adaptive_unit_end`` for one α on the CPU, its scalars on the host: the same decisions
    (the reference's), in float64 instead of the window sums' dtype. ``totals``: the group's
    [⟨A, P⟩, ‖A‖², Σ‖w‖², Σ⟨A, w⟩] where the caller has them (``_tlr_cpu``); ``zeroed``: P is
    zeroed already if the window closes as scheduled (``_rotate_windows``); ``state``,
    ``alpha_value``: ``window_state``'s values and α's where the caller has read them."""
    bound, units, window, window_reset, blowup_ratio = (config.bound, config.units, config.window,
                                                        config.window_reset, config.blowup_ratio)
    unit = _host_unit(squares, window_state, units, blowup_ratio, window_energy, state)
    if unit is None:
        return [], []
    done, k, energies, stored_k = unit
    reference = max(energies[:2])
    guarded = blowup_ratio is not None and reference > 0
    dot, sq = totals[:2] if totals is not None else _host_totals(window_sums, prev_window_sums, flats)
    energy = sq / done
    jump = guarded and energy > blowup_ratio * reference
    weights, moving, decays, peak = energies[2], False, False, energies[3]
    if blowup_ratio is not None and (jump or done >= k):  # the weights before this step's move
        # Σ⟨A, w⟩ only where the decay test can trip (weight decay, A summing u)
        if totals is not None:
            weights, along = totals[2], (totals[3] if weight_decay > 0 else 0.0)
        elif flats is not None and done >= k:  # the window closes: P's buffer is free
            weights, along = _flat_weights(params, prev_window_sums, flats, weight_decay > 0)
        else:
            weights = float(_weights_total(params, alpha.device))
            along = float(_along_total(window_sums, params, alpha.device)) if weight_decay > 0 else 0.0
        if alpha_value is None:
            alpha_value = float(alpha)
        moving = alpha_value ** 2 * energy > MOVE_FLOOR ** 2 * weights  # steps that can throw them out
        jump = jump and moving
        decays = weight_decay > 0 and bool(_decays(along, sq, weights, weight_decay * done * window))
        if not decays:
            peak = max(peak, alpha_value)
    if done < k and not jump:  # the float64 total, or the steps' size, does not confirm the ‖A‖² test
        _host_write(window_state, (done, stored_k))
        return [], []
    if dot is None:  # the caller's pass did not read P: the window closes early, so take ⟨A, P⟩ now
        dot = _host_dot(window_sums, prev_window_sums, flats)
    cut = 1.0 / (1.0 + math.sqrt(energy / reference)) if jump else math.inf
    if moving and energies[2] > 0 and dot < 0 and energy > energies[0] and weights > GROWTH * energies[2]:  # growth
        jump, cut = True, min(cut, 1.0 / (1.0 + math.sqrt(weights / energies[2])))
    large = abs(_host_factor(dot, sq, bound) - 1.0) >= window_reset
    next_k = 1 if large or jump else min(k + 1, units)

    def close():
        _host_close(window_sums, prev_window_sums, alpha, bound, (dot, sq), cut, peak if decays else math.inf, flats,
                    zeroed and done >= k, alpha_value)
        _host_write(window_state, (0, next_k))
        if window_energy is not None:
            _host_write(window_energy, (energy, energies[0], weights, peak))

    return ([close], []) if done >= k else ([], [close])


def _adaptive_unit_end(config, statistics, squares, window_sums, prev_window_sums, window_state, window_energy,
                       weight_decay):
    """The end of a unit of an adaptive window: (work before the move, work after it).

    The window closes when its units reach k (scheduled: α is updated before this step's
    move, Algorithm 2's order) or when the blow-up guard trips (after the move: an early
    close takes effect from the next step). On the CPU the decision is read on the host
    (free): a unit that closes nothing costs one ‖A‖² (``squares()``, when given), and only
    a closing computes ``statistics()``. Elsewhere every update is masked on the device,
    so no step reads a device value. ``weight_decay``: the λ the guard's decay test sees
    (0 where A sums momentum directions).
    """
    bound, units, window, window_reset, blowup_ratio = (config.bound, config.units, config.window,
                                                        config.window_reset, config.blowup_ratio)
    if host_reads_free(window_state.device) and squares is not None:
        if _host_unit(squares, window_state, units, blowup_ratio, window_energy) is None:
            return [], []
    scopes, dot, sq, (weights, moved, along, top) = statistics()
    done, k = window_state[0] + 1, window_state[1].clamp(max=units)
    scheduled = done >= k
    energy = sq.to(torch.float64) / done
    if blowup_ratio is not None:
        reference = window_energy[:2].max()
        moving = moved / done > MOVE_FLOOR ** 2 * weights  # the guard watches steps that can throw the weights out
        jump = moving & (reference > 0) & (energy > blowup_ratio * reference)
        cut = torch.where(jump, 1.0 / (1.0 + (energy / reference.clamp_min(_ALPHA_TINY)).sqrt()), math.inf)
        # The growth test (at a closing): ⟨A, P⟩ < 0 and ‖A‖² per unit above the last window's
        # while Σ‖w‖² grew more than GROWTH-fold.
        last = window_energy[2]
        grows = (moving & (scheduled | jump) & (last > 0) & (dot < 0) & (energy > window_energy[0])
                 & (weights > GROWTH * last))
        cut = torch.minimum(cut, torch.where(grows, 1.0 / (1.0 + (weights / last.clamp_min(_ALPHA_TINY)).sqrt()),
                                             math.inf))
        jump_or_grows = jump | grows
        kept_weights = weights
        # The decay test: a window mostly of weight decay lets no α grow past the peak.
        decays = _decays(along, sq.to(torch.float64), weights, weight_decay * window * done.to(torch.float64))
        ceiling = torch.where(decays, window_energy[3], math.inf)
        peak = torch.where(decays, window_energy[3], torch.maximum(window_energy[3], top))
    else:
        jump, cut, ceiling = torch.zeros_like(scheduled), None, None
        jump_or_grows = jump
        kept_weights = window_energy[2] if window_energy is not None else None
        peak = window_energy[3] if window_energy is not None else None
    large = (newton_factor(dot, sq, bound) - 1.0).abs() >= window_reset
    next_k = torch.where(large | jump_or_grows, torch.ones_like(k), (k + 1).clamp(max=units))
    closed_state = torch.stack([torch.zeros_like(k), next_k])
    closed_energy = (torch.stack([energy, window_energy[0], kept_weights.to(torch.float64), peak])
                     if window_energy is not None else None)

    if host_reads_free(window_state.device):
        closes_now, closes_later = bool(scheduled), bool(jump) and not bool(scheduled)
        if not (closes_now or closes_later):
            window_state[0] = done
            return [], []

        def close():
            _close_window((scopes, dot, sq), window_sums, prev_window_sums, bound, cut, ceiling)
            window_state.copy_(closed_state)
            if closed_energy is not None:
                window_energy.copy_(closed_energy)

        return ([close], []) if closes_now else ([], [close])

    closes, early = scheduled | jump, jump & ~scheduled

    def update_alphas(mask):
        for a, dots, sqs in scopes:
            _update_alphas(a, dots, sqs, bound, mask, cut, ceiling)

    def finish():
        update_alphas(early)
        # (k as it was, not clamped: a max_window lowered for a while does not shorten the window for good,
        # as on the CPU and in the reference)
        window_state.copy_(torch.where(closes, closed_state, torch.stack([done, window_state[1]])))
        if closed_energy is not None:
            window_energy.copy_(torch.where(closes, closed_energy, window_energy))
        for a, p in zip(window_sums, prev_window_sums):
            torch.where(closes, a, p, out=p)  # P ← A
            a.masked_fill_(closes, 0.0)        # A ← 0

    return [lambda: update_alphas(scheduled)], [finish]


def _fused_mover(params, grads, bufs, momentum_buffers, idx, alpha, lr_factor, kw):
    momentum = kw["momentum"]
    wd = kw["weight_decay"]  # torch's maximize negates only g, as SPEC does
    if momentum == 0:
        parts = [(list(range(len(params))), False)]
    else:
        fresh = [j for j, b in enumerate(bufs) if b is None]
        for j in fresh:
            bufs[j] = torch.empty_like(params[j])
            momentum_buffers[idx[j]] = bufs[j]
        old = sorted(set(range(len(params))) - set(fresh))
        parts = [(fresh, True), (old, False)]

    def move():
        # α after its update; times a schedule's factor in the weights' precision (fp64 weights: no fp32 rounding)
        lr = alpha if isinstance(lr_factor, float) and lr_factor == 1.0 else alpha.to(params[0].dtype) * lr_factor
        for js, first in parts:
            if not js:
                continue
            torch._fused_sgd_(
                [params[j] for j in js],
                [grads[j] for j in js],
                [bufs[j] for j in js] if momentum != 0 else [],
                weight_decay=wd,
                momentum=momentum,
                lr=lr,
                dampening=kw["dampening"],
                nesterov=kw["nesterov"],
                maximize=kw["maximize"],
                is_first_step=first,
            )

    return move


def _foreach_mover(params, work_params, directions, alphas, lr_factor, half):
    def move():
        # w ← w - α·f·d with α a device tensor: addcmul takes it without a host read (where
        # reading is free, one α is read and the plain add is a little faster).
        if host_reads_free(alphas[0].device) and not isinstance(lr_factor, Tensor) and all(a is alphas[0] for a in alphas):
            torch._foreach_add_(work_params, directions, alpha=-float(alphas[0]) * float(lr_factor))
        elif isinstance(lr_factor, Tensor):
            torch._foreach_addcmul_(work_params, directions, [a * lr_factor for a in alphas], value=-1.0)
        else:
            torch._foreach_addcmul_(work_params, directions, alphas, value=-float(lr_factor))
        if half:
            torch._foreach_copy_(params, work_params)

    return move
