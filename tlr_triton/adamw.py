"""TLRAdamW: AdamW whose learning rate α is trained by TLR's Newton step (docs/adamw.md).

Two paths: PyTorch's foreach ops (any device) and, for CUDA tensors, Triton kernels that do an
ordinary step in one pass (kernels/adamw_step.py); fixed windows. α lives on the parameters'
device (``group["alpha"]``, a 0-dim float32 tensor; ``state[p]["alpha"]`` with scope
"tensor") and is updated there: ``step()`` reads no device value on the host. The window's
statistic R = Σ √p·σg + λ·w/√p (p = 1/(√v̂ + ε)) is SPEC's u in the coordinates in which
AdamW is SGD with momentum, and α's update is SPEC's (``functional._update_alphas``, shared
with ``TLR``). Distributed as ``TLR``: DDP as is, ZeRO with ``shard_group``, FSDP2's DTensors
shard by shard with their mesh's all-reduce (on the PyTorch path). Not yet: the adaptive window
and its guard (issue 12).
"""

from __future__ import annotations

import math
import operator
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional
from .optimizer import (_collective_device, _dtensor_group, _local, _resolve_backend, _ShardGroup,
                        check_hyperparameters, initial_alpha, schedule_factor)

__all__ = ["TLRAdamW", "check_adamw_arguments"]

_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "window_sum", "prev_window_sum")
_GRAD, _DEVICE, _DTYPE, _IS_SPARSE = (operator.attrgetter(a) for a in ("grad", "device", "dtype", "is_sparse"))
_IS_FLOAT = operator.attrgetter("is_floating_point")
_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "bound", "window", "scope")


def check_adamw_arguments(lr, betas, eps, weight_decay, amsgrad, maximize, bound, window, scope) -> None:
    """Raise ValueError/TypeError naming the first invalid argument."""
    initial_alpha(lr)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (expected two numbers)")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas: beta parameter at index {i} is {beta!r} (expected 0 <= beta < 1)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"Invalid epsilon value: {eps!r} (expected a finite number >= 0)")
    if not isinstance(amsgrad, bool):
        raise TypeError(f"Invalid amsgrad: {amsgrad!r} (expected a bool)")
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ValueError(f"Invalid window: {window!r} (TLRAdamW takes a fixed window of >= 1 steps)")
    check_hyperparameters(momentum=0.0, dampening=0.0, weight_decay=weight_decay, nesterov=False, bound=bound,
                          window=window, blowup_ratio=None, scope=scope, statistic="gradient", maximize=maximize)


def _check_backend(backend) -> None:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"Invalid backend: {backend!r} (expected 'auto', 'torch' or 'triton')")


class TLRAdamW(_ShardGroup, Optimizer):
    r"""AdamW (decoupled weight decay, as ``torch.optim.AdamW``) with a trained learning rate.

    The weights move by α·d, d = m̂/(√v̂ + ε) + λ·w; every ``window`` steps α ← α·(1 + r)
    with SPEC's r from ⟨R_k, R_{k−1}⟩ and ‖R_k‖² (docs/adamw.md). ``lr`` is α's start and
    stays the schedule channel: under a learning-rate scheduler the weights move by
    α·lr/initial_lr, and α keeps training.

    Args:
        params: parameters or parameter groups.
        lr: the initial α (> 0).
        betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        bound: the Newton step's cap c (α grows by at most 1 + c per window).
        window: steps per window (α is updated once per window).
        scope: "group" (one α per group) or "tensor" (one per parameter tensor).
        backend: "torch" (the default: PyTorch's foreach ops), "triton" (kernels/adamw_step.py:
            one pass over w, g, m, v and the window sum per ordinary step; on CPU tensors through
            Triton's interpreter, ``TRITON_INTERPRET=1``) or "auto" (Triton for CUDA tensors where
            it is installed). The default stays "torch" until ``bench/gpu_check.py`` has run the
            Triton path on a GPU: so far it is checked through the interpreter and compiled ahead
            of time for sm_80/sm_90 only. Collectives (``shard_group``, FSDP2) need "torch".
        shard_group: as ``TLR``'s: a process group whose ranks each hold part of every
            param group (``ZeroRedundancyOptimizer(..., optimizer_class=TLRAdamW,
            shard_group=group)``); at every closing ⟨R_k, R_{k−1}⟩ and ‖R_k‖² are summed over
            it in one all-reduce, so that every rank takes the single process's α. FSDP2's
            DTensor parameters need none: their mesh's group is used (each rank updates its
            shards; the statistics of scope "group" and "tensor" are summed over the mesh).
            Under DDP every rank already holds the same gradients and needs none either.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, bound: float = 0.25, window: int = 3,
                 scope: str = "group", backend: str = "torch", shard_group=None) -> None:
        check_adamw_arguments(lr, betas, eps, weight_decay, amsgrad, maximize, bound, window, scope)
        _check_backend(backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, bound=bound, window=window, scope=scope, backend=backend)
        super().__init__(params, defaults)
        self._set_shard_group(shard_group)  # not a group option (_ShardGroup, shared with TLR)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_adamw_arguments(*(merged[k] for k in _HYPER))  # before torch adds the group: a refused group is not kept
        _check_backend(merged.get("backend", "torch"))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        # a tensor lr is updated in place by schedulers: the start is a copy of its own
        group.setdefault("initial_lr", group["lr"].detach().clone() if isinstance(group["lr"], Tensor) else group["lr"])
        group.setdefault("step", 0)  # host counter: fixed windows are scheduled on the host, no sync
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        group["alpha"] = torch.tensor(initial_alpha(group["lr"]), dtype=torch.float32, device=device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts floating-point state to the parameter's dtype (which would round the
        fp32 state of bf16 parameters): these entries are put back in their own dtype here."""
        state_dict = dict(state_dict)
        for index, group in enumerate(state_dict.get("param_groups", [])):  # checked before anything is replaced
            missing = [k for k in _HYPER + ("alpha", "step", "initial_lr") if k not in group]
            if missing:
                raise ValueError(f"not a TLRAdamW state_dict: param group {index} has no "
                                 f"{', '.join(map(repr, missing))} (its keys: {sorted(k for k in group if k != 'params')})")
            check_adamw_arguments(*(group[k] for k in _HYPER))
        kept, state = {}, {}
        for key, entry in state_dict["state"].items():
            entry = dict(entry)
            kept[key] = {k: entry.pop(k) for k in _STATE + ("alpha",) if isinstance(entry.get(k), Tensor)}
            state[key] = entry
        state_dict["state"] = state
        shard_group, lost = self._shard_group, self._shard_group_lost  # torch's loader ends in __setstate__
        super().load_state_dict(state_dict)
        self._shard_group, self._shard_group_lost = shard_group, lost
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for key, p in zip(saved, params):
            for k, value in kept.get(key, {}).items():
                dtype = torch.float32 if k == "alpha" else functional.state_dtype(p.dtype)
                self.state[p][k] = value.to(device=p.device, dtype=dtype, copy=True)
        for group in self.param_groups:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group["alpha"] = torch.as_tensor(group["alpha"]).to(device=device, dtype=torch.float32, copy=True)
            group.setdefault("backend", self.defaults.get("backend", "torch"))  # a checkpoint from before the option

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refuse_a_lost_shard_group()
        plans = [self._check_group(index, group) for index, group in enumerate(self.param_groups)]
        collectives = [self._collective(index, group) for index, group in enumerate(self.param_groups)]
        paths = [self._path(index, group, plan, collective)
                 for index, (group, plan, collective) in enumerate(zip(self.param_groups, plans, collectives))]
        for group, plan, collective, triton in zip(self.param_groups, plans, collectives, paths):
            if plan is not None:  # (nothing was modified before every group was checked)
                self._step_group(group, *plan, collective, triton)
            elif collective is not None and self._closes(group) and group["scope"] == "group":
                # this rank holds none of the group's gradients now: it still joins the sum, and takes its α
                totals = torch.zeros(2, dtype=torch.float64, device=_collective_device(group, collective))
                self._update_alpha([group["alpha"]], totals, group["bound"], collective)
            group["step"] += 1
        return loss

    @staticmethod
    def _path(index: int, group: dict[str, Any], plan, collective) -> bool:
        """Whether the group runs on the Triton path (raises for an impossible request, before any
        group is stepped)."""
        if plan is None:
            return False
        triton = _resolve_backend(group.get("backend", "torch"), plan[0][0].device, index) == "triton"
        if triton and collective is not None:
            raise NotImplementedError(f"group {index}: statistics summed over a process group (shard_group, FSDP2) "
                                      "run on the PyTorch path: pass backend='torch'")
        return triton

    @staticmethod
    def _closes(group: dict[str, Any]) -> bool:
        return (group["step"] + 1) % group["window"] == 0

    def _collective(self, index: int, group: dict[str, Any]):
        """The process group whose ranks sum this group's statistics: a DTensor mesh's, the
        shard_group, or None."""
        mesh = _dtensor_group(group, index)
        if mesh is not None and self._shard_group is not None:
            raise ValueError(f"group {index} holds DTensor parameters: their shards are summed over their mesh, "
                             "so shard_group must not be given")
        return mesh if mesh is not None else self._shard_group

    @staticmethod
    def _update_alpha(alphas: list[Tensor], totals: Tensor, bound: float, collective) -> None:
        """α from [⟨R, P⟩, ‖R‖²] summed over ``collective`` (None: this process alone)."""
        if collective is not None:
            import torch.distributed as dist

            reduced = totals.clone()
            dist.all_reduce(reduced, group=collective)
            totals = reduced.to(alphas[0].device)
        functional._update_alphas(alphas, totals[:1], totals[1:], bound)

    def _check_group(self, index: int, group: dict[str, Any]):
        params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
        if not params:
            return None
        grads = list(map(_GRAD, params))  # C-level maps below: this runs every step, over every tensor
        if any(map(_IS_SPARSE, grads)):
            raise RuntimeError(f"TLRAdamW does not support sparse gradients (group {index})")
        devices = set(map(_DEVICE, params)) | set(map(_DEVICE, grads))
        if len(devices) > 1:
            raise RuntimeError(f"group {index}: every parameter and gradient must be on one device, found "
                               f"{sorted(map(str, devices))}")
        dtypes = list(map(_DTYPE, params))
        if dtypes != list(map(_DTYPE, grads)) or not all(map(_IS_FLOAT, set(dtypes))):
            p = next(p for p in params if not p.dtype.is_floating_point or p.grad.dtype != p.dtype)
            raise TypeError(f"group {index}: parameters and their gradients must share one floating-point dtype, "
                            f"got {p.dtype} and {p.grad.dtype}")
        return params, schedule_factor(group["lr"], group["initial_lr"], index)

    def _step_group(self, group: dict[str, Any], owners: list[Tensor], factor, collective=None,
                    triton: bool = False) -> None:
        (beta1, beta2), eps, lam = group["betas"], group["eps"], group["weight_decay"]
        # a DTensor's shard (a view): state and updates are per shard (the Triton path takes no DTensors: _path)
        params = owners if triton else [_local(p) for p in owners]
        if group["alpha"].device != params[0].device:  # the model moved after the optimizer was built
            group["alpha"] = group["alpha"].to(params[0].device)
        # the Triton kernels address state as contiguous memory
        layout = torch.contiguous_format if triton else torch.preserve_format
        states = [self.state[p] for p in owners]
        for p, st in zip(params, states):
            if "exp_avg" not in st:
                dtype = functional.state_dtype(p.dtype)
                st["step"] = 0
                for k in _STATE if group["amsgrad"] else tuple(k for k in _STATE if k != "max_exp_avg_sq"):
                    st[k] = torch.zeros_like(p, dtype=dtype, memory_format=layout)
                if group["scope"] == "tensor":
                    st["alpha"] = group["alpha"].clone()
            else:
                if st["exp_avg"].device != p.device:  # the model moved after its state was made: the state follows
                    for k in _STATE + ("alpha",):
                        if k in st:
                            st[k] = st[k].to(p.device)
            st["step"] += 1
        if triton:
            from .kernels.adamw_launch import adamw_triton_step

            keys = _STATE if group["amsgrad"] else tuple(k for k in _STATE if k != "max_exp_avg_sq")
            rows = [list(map(operator.itemgetter(k), states)) for k in keys]
            if not all(map(Tensor.is_contiguous, chain.from_iterable(rows))):  # state loaded with other strides
                for st in states:
                    for k in keys:
                        st[k] = st[k].contiguous()
                rows = [list(map(operator.itemgetter(k), states)) for k in keys]
            state = dict(zip(keys, rows))
            alphas = [st["alpha"] for st in states] if group["scope"] == "tensor" else [group["alpha"]]
            adamw_triton_step(
                params, list(map(_GRAD, owners)), state["exp_avg"], state["exp_avg_sq"],
                state.get("max_exp_avg_sq"), state["window_sum"], state["prev_window_sum"], alphas,
                [st["step"] for st in states], betas=group["betas"], eps=eps, weight_decay=lam,
                maximize=group["maximize"], bound=group["bound"], scope=group["scope"], closing=self._closes(group),
                lr_factor=factor)
            return
        sdtype = states[0]["exp_avg"].dtype
        half = any(p.dtype != st["exp_avg"].dtype for p, st in zip(params, states))
        ws = [p.to(st["exp_avg"].dtype) for p, st in zip(params, states)] if half else params
        grads = [_local(p.grad) for p in owners]
        gs = [g.to(st["exp_avg"].dtype) for g, st in zip(grads, states)] if half else grads
        if group["maximize"]:
            gs = torch._foreach_neg(gs)
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        if group["amsgrad"]:
            maxes = [st["max_exp_avg_sq"] for st in states]
            torch._foreach_maximum_(maxes, vs)
            vs = maxes
        steps = [st["step"] for st in states]
        # p = 1/(√v̂ + ε), v̂ = v/(1 − β2^t): AdamW's preconditioner, elementwise
        precond = torch._foreach_sqrt(vs)
        torch._foreach_div_(precond, [math.sqrt(1 - beta2 ** t) for t in steps])
        torch._foreach_add_(precond, eps)
        torch._foreach_reciprocal_(precond)
        # d = p·m̂ + λ·w, the direction the weights move along
        d = torch._foreach_mul(ms, precond)
        torch._foreach_div_(d, [1 - beta1 ** t for t in steps])
        if lam != 0:  # λ = 0 means no term (0·NaN weights would be NaN)
            torch._foreach_add_(d, ws, alpha=lam)
        # R += √p·σg + λ·w/√p (docs/adamw.md)
        torch._foreach_sqrt_(precond)
        u = torch._foreach_mul(gs, precond)
        if lam != 0:
            torch._foreach_addcdiv_(u, ws, precond, value=lam)
        sums = [st["window_sum"] for st in states]
        torch._foreach_add_(sums, u)
        del u, precond

        if self._closes(group):  # α first, then the move (Algorithm 2's order)
            prevs = [st["prev_window_sum"] for st in states]
            dots = torch.stack([(r * q).sum(dtype=torch.float64) for r, q in zip(sums, prevs)])
            sqs = torch.stack([(r * r).sum(dtype=torch.float64) for r in sums])
            if group["scope"] == "group":
                self._update_alpha([group["alpha"]], torch.stack([dots.sum(), sqs.sum()]), group["bound"], collective)
            else:
                # ZeRO keeps each tensor whole on one rank (its statistics are its own); FSDP2
                # shards every tensor over the mesh (each tensor's are summed over it)
                n, mesh = len(states), collective if collective is not None and collective is not self._shard_group else None
                totals = torch.cat([dots, sqs])
                if mesh is not None:
                    import torch.distributed as dist

                    totals = totals.clone()
                    dist.all_reduce(totals, group=mesh)
                functional._update_alphas([st["alpha"] for st in states], totals[:n], totals[n:], group["bound"])
            for st in states:  # P ← A, A ← 0 (the old P's storage is reused)
                st["prev_window_sum"], st["window_sum"] = st["window_sum"], st["prev_window_sum"].zero_()
        if group["scope"] == "group":
            torch._foreach_mul_(d, group["alpha"].to(sdtype))
        else:
            for di, st in zip(d, states):
                di.mul_(st["alpha"].to(sdtype))
        if isinstance(factor, Tensor) or factor != 1.0:
            torch._foreach_mul_(d, factor)
        if half:
            torch._foreach_sub_(ws, d)
            for p, w in zip(params, ws):
                p.copy_(w)
        else:
            torch._foreach_sub_(params, d)
