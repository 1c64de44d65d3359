"""TLRAdamW: AdamW whose learning rate α is trained by TLR's Newton step (docs/adamw.md).

Two paths: PyTorch's foreach ops (any device) and, for CUDA tensors, Triton kernels that do an
ordinary step in one pass (kernels/adamw_step.py; fixed windows only). Windows are fixed, or
TLR's adaptive window (``window="auto"``, the default; PyTorch path), decided on the device.
α lives on the parameters' device (``group["alpha"]``, a 0-dim float32 tensor; ``state[p]["alpha"]`` with scope
"tensor") and is updated there: ``step()`` reads no device value on the host. The window's
statistic R = Σ √p·σg + λ·w/√p (p = 1/(√v̂ + ε)) is SPEC's u in the coordinates in which
AdamW is SGD with momentum, and α's update is SPEC's (``functional._update_alphas``, shared
with ``TLR``). Distributed as ``TLR``: DDP as is, ZeRO with ``shard_group``, FSDP2's DTensors
shard by shard with their mesh's all-reduce (on the PyTorch path). The adaptive window has
TLR's jump test as its blow-up guard (``blowup_ratio``). Not yet: the adaptive window on the
Triton path.
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
from .optimizer import (DEFAULT_BLOWUP_RATIO, DEFAULT_WINDOW_RESET, _collective_device, _dtensor_group, _local,
                        _resolve_backend, _ShardGroup, _state_follows, check_hyperparameters, initial_alpha,
                        schedule_factor, window_schedule)

__all__ = ["TLRAdamW", "check_adamw_arguments"]

_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "window_sum", "prev_window_sum")
_EXP_AVG = operator.itemgetter("exp_avg")
_SIZE = operator.attrgetter("shape")
_HAS_MAX = operator.methodcaller("__contains__", "max_exp_avg_sq")
_GRAD, _DEVICE, _DTYPE, _IS_SPARSE = (operator.attrgetter(a) for a in ("grad", "device", "dtype", "is_sparse"))
_IS_FLOAT = operator.attrgetter("is_floating_point")
_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "bound", "window", "scope", "max_window",
          "window_reset", "blowup_ratio")
# for checkpoints from before these options (they ran without the blow-up guard: resumed so)
_WINDOW_DEFAULTS = {"max_window": None, "window_reset": DEFAULT_WINDOW_RESET, "blowup_ratio": None}
# TLRAdamW's default bound c: twice SPEC's 1/4 (with the blow-up guard; docs/adamw.md, "The bound c")
DEFAULT_ADAMW_BOUND = 0.5


def check_adamw_arguments(lr, betas, eps, weight_decay, amsgrad, maximize, bound, window, scope, max_window=None,
                          window_reset=DEFAULT_WINDOW_RESET, blowup_ratio=DEFAULT_BLOWUP_RATIO) -> None:
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
    check_hyperparameters(momentum=0.0, dampening=0.0, weight_decay=weight_decay, nesterov=False, bound=bound,
                          window=window, max_window=max_window, window_reset=window_reset, blowup_ratio=blowup_ratio,
                          scope=scope, statistic="gradient", maximize=maximize)


def _check_backend(backend) -> None:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"Invalid backend: {backend!r} (expected 'auto', 'torch' or 'triton')")


def _adaptive(group: dict[str, Any]) -> bool:
    return window_schedule(group["window"], group.get("max_window"))[1] > 1


def _check_window_backend(group: dict[str, Any]) -> None:
    if group.get("backend", "torch") == "triton" and _adaptive(group):
        raise ValueError(f"backend='triton' takes a fixed window (an int), not window={group['window']!r} with "
                         f"max_window={group.get('max_window')!r}: the adaptive window runs on the PyTorch path")


class TLRAdamW(_ShardGroup, Optimizer):
    r"""AdamW (decoupled weight decay, as ``torch.optim.AdamW``) with a trained learning rate.

    The weights move by α·d, d = m̂/(√v̂ + ε) + λ·w; at every window's end α ← α·(1 + r)
    with SPEC's r from ⟨R_k, R_{k−1}⟩ and ‖R_k‖² (docs/adamw.md). ``lr`` is α's start and
    stays the schedule channel: under a learning-rate scheduler the weights move by
    α·lr/initial_lr, and α keeps training.

    Args:
        params: parameters or parameter groups.
        lr: the initial α (> 0).
        betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        bound: the Newton step's cap c (α grows by at most 1 + c per window); 0.5 by default,
            twice SPEC's (docs/adamw.md, "The bound c").
        window: "auto" (the default, as TLR's): TLR's adaptive window — windows of k units of 3
            steps, k + 1 after a closing whose Newton step was small (|r| < ``window_reset``),
            back to 1 after a large one, up to ``max_window`` steps (48), decided on the device
            (no host read); PyTorch path only (docs/adamw.md, "Adaptive window"). Or an int:
            fixed windows of that many steps (the Triton path).
        max_window, window_reset: the adaptive window's longest window (steps) and threshold.
        blowup_ratio: the adaptive window's blow-up guard, TLR's jump test (16; None: off): at a
            unit's end where ‖R‖² per unit of the window so far exceeds this many times the
            larger of the last two closed windows', the window closes now with α's factor at
            most 1/(1 + √jump), and the next window is one unit long.
        scope: "group" (one α per group) or "tensor" (one per parameter tensor).
        backend: "torch" (the default: PyTorch's foreach ops), "triton" (fixed windows only;
            kernels/adamw_step.py: one pass over w, g, m, v and the window sum per ordinary step;
            on CPU tensors through Triton's interpreter, ``TRITON_INTERPRET=1``) or "auto" (Triton
            for CUDA tensors where it is installed and the window is fixed). The default stays "torch" until ``bench/gpu_check.py`` has run the
            Triton path on a GPU: so far it is checked through the interpreter and compiled ahead
            of time for sm_80/sm_90 only. Collectives (``shard_group``, FSDP2) need "torch".
        shard_group: as ``TLR``'s: a process group whose ranks each hold part of every
            param group (``ZeroRedundancyOptimizer(..., optimizer_class=TLRAdamW,
            shard_group=group)``); at every closing (with the adaptive window: at every unit's end)
            ⟨R_k, R_{k−1}⟩ and ‖R_k‖² are summed over it in one all-reduce, so that every rank takes
            the single process's α and window. FSDP2's
            DTensor parameters need none: their mesh's group is used (each rank updates its
            shards; the statistics of scope "group" and "tensor" are summed over the mesh).
            Under DDP every rank already holds the same gradients and needs none either.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, bound: float = DEFAULT_ADAMW_BOUND,
                 window: int | str = "auto", scope: str = "group", backend: str = "torch", shard_group=None,
                 max_window: int | None = None, window_reset: float = DEFAULT_WINDOW_RESET,
                 blowup_ratio: float | None = DEFAULT_BLOWUP_RATIO) -> None:
        check_adamw_arguments(lr, betas, eps, weight_decay, amsgrad, maximize, bound, window, scope, max_window,
                              window_reset, blowup_ratio)
        _check_backend(backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, bound=bound, window=window, scope=scope, backend=backend,
                        max_window=max_window, window_reset=window_reset, blowup_ratio=blowup_ratio)
        super().__init__(params, defaults)
        self._set_shard_group(shard_group)  # not a group option (_ShardGroup, shared with TLR)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**_WINDOW_DEFAULTS, **self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_adamw_arguments(*(merged[k] for k in _HYPER))  # before torch adds the group: a refused group is not kept
        _check_backend(merged.get("backend", "torch"))
        _check_window_backend(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        # a tensor lr is updated in place by schedulers: the start is a copy of its own
        group.setdefault("initial_lr", group["lr"].detach().clone() if isinstance(group["lr"], Tensor) else group["lr"])
        group.setdefault("step", 0)  # host counter: fixed windows are scheduled on the host, no sync
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        group["alpha"] = torch.tensor(initial_alpha(group["lr"]), dtype=torch.float32, device=device)
        group["window_state"] = torch.tensor([0, 1], dtype=torch.int64, device=device)  # [units so far, k]
        # the blow-up guard's references: ‖R‖² per unit of the last two closed windows (0: none yet)
        group["window_energy"] = torch.zeros(2, dtype=torch.float64, device=device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts floating-point state to the parameter's dtype (which would round the
        fp32 state of bf16 parameters): these entries are put back in their own dtype here."""
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [{**_WINDOW_DEFAULTS, **g} for g in state_dict.get("param_groups", [])]
        for index, group in enumerate(state_dict.get("param_groups", [])):  # checked before anything is replaced
            missing = [k for k in _HYPER + ("alpha", "step", "initial_lr") if k not in group]
            if missing:
                raise ValueError(f"not a TLRAdamW state_dict: param group {index} has no "
                                 f"{', '.join(map(repr, missing))} (its keys: {sorted(k for k in group if k != 'params')})")
            check_adamw_arguments(*(group[k] for k in _HYPER))
            energy = group.get("window_energy")
            if energy is not None and tuple(torch.as_tensor(energy).shape) != (2,):
                raise ValueError(f"param group {index}: window_energy must hold 2 values, got shape "
                                 f"{tuple(torch.as_tensor(energy).shape)}")
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
            group["window_state"] = torch.as_tensor(group.get("window_state", [0, 1])).to(
                device=device, dtype=torch.int64, copy=True)
            group["window_energy"] = torch.as_tensor(group.get("window_energy", [0.0, 0.0])).to(
                device=device, dtype=torch.float64, copy=True)
            group.setdefault("backend", self.defaults.get("backend", "torch"))  # a checkpoint from before the option

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (``torch.save(opt)``, deepcopy): an object from before an option gets its default."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _WINDOW_DEFAULTS.items():
                group.setdefault(key, value)
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            if "window_state" not in group:
                group["window_state"] = torch.tensor([0, 1], dtype=torch.int64, device=device)
            if "window_energy" not in group:
                group["window_energy"] = torch.zeros(2, dtype=torch.float64, device=device)

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
            elif collective is not None and self._closes(group) and (group["scope"] == "group" or _adaptive(group)):
                # this rank holds none of the group's gradients now: it still joins the sum(s), and takes its α
                # (and the adaptive window's next state)
                zero = torch.zeros(1, dtype=torch.float64, device=_collective_device(group, collective))
                tensor_scope = group["scope"] == "tensor"
                self._window_end(group, [] if tensor_scope else [group["alpha"]], zero[:0] if tensor_scope else zero,
                                 zero[:0] if tensor_scope else zero, collective,
                                 collective if collective is not self._shard_group else None, live=False)
            group["step"] += 1
        return loss

    @staticmethod
    def _path(index: int, group: dict[str, Any], plan, collective) -> bool:
        """Whether the group runs on the Triton path (raises for an impossible request, before any
        group is stepped)."""
        if plan is None:
            return False
        triton = _resolve_backend(group.get("backend", "torch"), plan[0][0].device, index) == "triton"
        if triton and _adaptive(group):
            if group.get("backend") == "triton":  # (refused when the group was added; a group edited since)
                _check_window_backend(group)
            return False  # "auto": the adaptive window runs on the PyTorch path
        if triton and collective is not None:
            raise NotImplementedError(f"group {index}: statistics summed over a process group (shard_group, FSDP2) "
                                      "run on the PyTorch path: pass backend='torch'")
        return triton

    @staticmethod
    def _closes(group: dict[str, Any]) -> bool:
        """Whether this step ends a window (fixed windows) or a unit of an adaptive one (which
        closes where the device's window state says so)."""
        return (group["step"] + 1) % window_schedule(group["window"], group.get("max_window"))[0] == 0

    def _collective(self, index: int, group: dict[str, Any]):
        """The process group whose ranks sum this group's statistics: a DTensor mesh's, the
        shard_group, or None."""
        mesh = _dtensor_group(group, index)
        if mesh is not None and self._shard_group is not None:
            raise ValueError(f"group {index} holds DTensor parameters: their shards are summed over their mesh, "
                             "so shard_group must not be given")
        return mesh if mesh is not None else self._shard_group

    @staticmethod
    def _window_end(group: dict[str, Any], alphas: list[Tensor], dots: Tensor, sqs: Tensor, collective,
                    per_tensor_mesh, live: bool = True) -> Tensor | None:
        """The end of a fixed window, or of a unit of an adaptive one: α's update from ⟨R, P⟩ and
        ‖R‖² (``dots``, ``sqs``: float64, one per α of ``alphas``), summed over ``collective`` for
        scope "group" and over ``per_tensor_mesh`` (FSDP2's: every tensor sharded) for scope
        "tensor" (ZeRO keeps each tensor whole on one rank: its statistics are its own). Returns
        None for a fixed window (it closes now); for an adaptive one, the device bool "the window
        closes now" (its units reach k), by which α's update is masked, and the window state
        advanced: after a closing k = 1 if |r| of the group's totals >= window_reset, else
        min(k + 1, K) (TLR's rule, no host read). ``live``: whether this rank holds any of the group's
        gradients (a rank without joins the sums with zeros)."""
        import torch.distributed as dist

        w0, units = window_schedule(group["window"], group.get("max_window"))
        n, bound = dots.numel(), group["bound"]
        # the last entry counts the ranks that hold gradients: where none does (every rank joins the sums
        # with zeros), the window stays as it is, as in one process that steps without gradients
        live = torch.full((1,), 1.0 if live else 0.0, dtype=dots.dtype, device=dots.device)
        totals = torch.cat([dots, sqs, live])
        mesh = collective if group["scope"] == "group" else per_tensor_mesh
        if mesh is not None:
            dist.all_reduce(totals, group=mesh)
        if alphas:
            totals = totals.to(alphas[0].device)
        ws, we = group["window_state"], group["window_energy"]
        if units == 1:
            if alphas:
                functional._update_alphas(alphas, totals[:n], totals[n:2 * n], bound)
            # a fixed window closes: an adaptive one chosen later starts afresh (as the reference)
            restart = torch.stack([torch.zeros_like(ws[0]), torch.ones_like(ws[1])])
            ws.copy_(torch.where(totals[2 * n].to(ws.device) > 0, restart, ws))
            we.masked_fill_(totals[2 * n].to(we.device) > 0, 0.0)
            return None
        done, k = ws[0] + 1, ws[1].clamp(max=units)
        # the group's, for the next window's length
        both = torch.stack([totals[:n].sum(), totals[n:2 * n].sum(), totals[2 * n]])
        if group["scope"] == "tensor" and collective is not None and per_tensor_mesh is None:
            dist.all_reduce(both, group=collective)
        both = both.to(ws.device)
        any_live = both[2] > 0
        closes = (done >= k) & any_live
        # The blow-up guard (TLR's jump test): ‖R‖² per unit of the window so far above blowup_ratio times
        # the larger of the last two closed windows' closes the window now, α's factor at most
        # 1/(1 + √jump), and the next window is one unit long.
        energy = both[1] / done
        jump = torch.zeros_like(closes)
        cut = None
        if group.get("blowup_ratio") is not None:
            reference = we.max()
            jump = (reference > 0) & (energy > group["blowup_ratio"] * reference) & any_live
            cut = torch.where(jump, 1.0 / (1.0 + (energy / reference.clamp_min(1e-300)).sqrt()), math.inf)
            closes = closes | jump
        if alphas:
            functional._update_alphas(alphas, totals[:n], totals[n:2 * n], bound, closes.to(totals.device),
                                      None if cut is None else cut.to(totals.device))
        large = (functional.newton_factor(both[0], both[1], bound) - 1.0).abs() >= group["window_reset"]
        next_k = torch.where(large | jump, torch.ones_like(k), (k + 1).clamp(max=units))
        # (k as it was, not clamped: a max_window lowered for a while does not shorten the window for good)
        advanced = torch.where(closes, torch.stack([torch.zeros_like(k), next_k]), torch.stack([done, ws[1]]))
        ws.copy_(torch.where(any_live, advanced, ws))
        we.copy_(torch.where(closes, torch.stack([energy, we[0]]), we))
        return closes

    def _check_hyperparameters(self, index: int, group: dict[str, Any]) -> None:
        """A group's hyper-parameters set by hand between steps (``group["bound"] = ...``) are
        checked when they change (not every step), before any group steps. (lr, the schedule
        channel, is checked by ``schedule_factor``.)"""
        signature = tuple(group.get(k) for k in _HYPER[1:])
        validated = self.__dict__.setdefault("_validated", {})
        if validated.get(id(group)) == signature:
            return
        try:
            check_adamw_arguments(1.0, *signature)
            _check_window_backend(group)
        except (ValueError, TypeError) as error:
            raise type(error)(f"group {index}: {error}") from None
        validated[id(group)] = signature

    def _check_group(self, index: int, group: dict[str, Any]):
        self._check_hyperparameters(index, group)
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
        return params, schedule_factor(group["lr"], group["initial_lr"], index), self._check_state(index, group, params)

    def _check_state(self, index: int, group: dict[str, Any], params: list[Tensor]) -> list[dict | None]:
        """The parameters' states (None: none yet), each checked to have its parameter's size
        before any group steps: a parameter given data of another size (``p.data = ...``) would
        have the Triton kernels run past the end of its state, and the PyTorch path fail half-way
        through the step. (Another dtype or device: the state follows, ``_step_group``.)"""
        states = list(map(self.state.get, params))  # (no entry made for a parameter without state)
        # a DTensor's state has its local shard's shape
        local = list(map(_local, params)) if hasattr(params[0], "device_mesh") else params
        try:  # C-level maps: this runs every step
            if list(map(_SIZE, map(_EXP_AVG, states))) == list(map(_SIZE, local)) and (
                    not group["amsgrad"] or all(map(_HAS_MAX, states))):
                return states
        except (TypeError, KeyError):  # a parameter without state, or with state but no moments yet
            pass
        for p, q, st in zip(params, local, states):
            for k in _STATE:
                t = (st or {}).get(k)
                if isinstance(t, Tensor) and t.shape != q.shape:
                    i = next(i for i, r in enumerate(group["params"]) if r is p)
                    raise ValueError(f"the state of parameter {i} of group {index} does not fit it: {k} has shape "
                                     f"{tuple(t.shape)}, the parameter {tuple(q.shape)} (its data was replaced by a "
                                     "tensor of another shape?)")
        return states

    def _step_group(self, group: dict[str, Any], owners: list[Tensor], factor, states: list[dict | None],
                    collective=None, triton: bool = False) -> None:
        (beta1, beta2), eps, lam = group["betas"], group["eps"], group["weight_decay"]
        # a DTensor's shard (a view): state and updates are per shard (the Triton path takes no DTensors: _path)
        params = owners if triton else [_local(p) for p in owners]
        if group["alpha"].device != params[0].device:  # the model moved after the optimizer was built
            group["alpha"] = group["alpha"].to(params[0].device)
        for key in ("window_state", "window_energy"):  # (a review found them left behind)
            if group[key].device != params[0].device:
                group[key] = group[key].to(params[0].device)
        # the Triton kernels address state as contiguous memory
        layout = torch.contiguous_format if triton else torch.preserve_format
        if None in states:  # (parameters stepped for the first time get their state now)
            states = [self.state[p] if st is None else st for p, st in zip(owners, states)]
        for p, st in zip(params, states):
            if "exp_avg" not in st:
                dtype = functional.state_dtype(p.dtype)
                st["step"] = 0
                for k in _STATE if group["amsgrad"] else tuple(k for k in _STATE if k != "max_exp_avg_sq"):
                    st[k] = torch.zeros_like(p, dtype=dtype, memory_format=layout)
                if group["scope"] == "tensor":
                    st["alpha"] = group["alpha"].clone()
            elif group["amsgrad"] and "max_exp_avg_sq" not in st:  # amsgrad turned on mid-run: max v starts at v
                st["max_exp_avg_sq"] = st["exp_avg_sq"].clone(memory_format=layout)
            if st["exp_avg"].device != p.device or (st["exp_avg"].dtype is not p.dtype  # (fp32: no call per step)
                                                      and st["exp_avg"].dtype != functional.state_dtype(p.dtype)):
                _state_follows(p, st, _STATE + ("alpha",), torch.preserve_format)  # the model moved or changed dtype
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
            if self._closes(group):  # a fixed window closes: an adaptive one chosen later starts afresh (as on
                group["window_state"][0].zero_()  # the PyTorch path and in the reference)
                group["window_state"][1].fill_(1)
                group["window_energy"].zero_()
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
            # ZeRO keeps each tensor whole on one rank (its statistics are its own); FSDP2
            # shards every tensor over the mesh (each tensor's are summed over it)
            mesh = collective if collective is not None and collective is not self._shard_group else None
            if group["scope"] == "group":
                closes = self._window_end(group, [group["alpha"]], dots.sum().reshape(1), sqs.sum().reshape(1),
                                          collective, mesh)
            else:
                closes = self._window_end(group, [st["alpha"] for st in states], dots, sqs, collective, mesh)
            if closes is None:  # a fixed window: P ← A, A ← 0 (the old P's storage is reused)
                for st in states:
                    st["prev_window_sum"], st["window_sum"] = st["window_sum"], st["prev_window_sum"].zero_()
            else:  # where the adaptive window closes now, on the device
                for st in states:
                    torch.where(closes, st["window_sum"], st["prev_window_sum"], out=st["prev_window_sum"])
                    st["window_sum"].masked_fill_(closes, 0.0)
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
