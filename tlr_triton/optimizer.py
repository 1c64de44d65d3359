"""``TLR``: SGD that trains its own learning rate, as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections import defaultdict
from itertools import compress, count, repeat
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional
from .kernels.cpu import CHANGED, MOVED, address_fields, same_layout  # the native module: no Triton import
from .kernels.cpu import layout_record as _layout_record
from .functional import DECAY_SHARE, GROWTH, MOVE_FLOOR, advance_step, state_dtype, tlr, window_representation

__all__ = ["TLR", "check_hyperparameters", "window_schedule", "DEFAULT_LR", "DEFAULT_WINDOW", "AUTO_WINDOW",
           "AUTO_MAX_WINDOW", "DEFAULT_WINDOW_RESET", "DEFAULT_BLOWUP_RATIO", "GROWTH",
           "MOVE_FLOOR", "DECAY_SHARE"]

SCOPES = ("group", "tensor")
STATISTICS = ("gradient", "direction")
BACKENDS = ("auto", "torch", "triton")

# Defaults chosen by measurement (README, "Defaults"): TLR adapts α, so the initial α
# matters little. No fixed window served both benchmark tasks (3 steps was the most
# robust on digits and among the worst on charlm, where 13 was best), so the default
# window adapts to the run: it starts at AUTO_WINDOW steps, grows by AUTO_WINDOW steps
# after each closing whose Newton step was small (|r| < window_reset: α is near what
# this horizon can tell) up to AUTO_MAX_WINDOW, and falls back to AUTO_WINDOW after a
# large one (α far off, either way: react fast). An int window is the paper's fixed W.
DEFAULT_LR = 0.01
DEFAULT_WINDOW = "auto"
AUTO_WINDOW = 3
AUTO_MAX_WINDOW = 48
DEFAULT_WINDOW_RESET = 0.05
# The adaptive window's blow-up guard (README, "Adaptive window"): when the window so far
# carries more than this many times the squared gradient sum per unit of the larger of the
# last two windows, it closes early and α is cut to at most 1/(1 + √ratio) of itself.
DEFAULT_BLOWUP_RATIO = 16.0
# Its growth test (functional.GROWTH), at every closing: consecutive windows disagree
# (⟨A, P⟩ < 0) and ‖A‖² per unit rises while the weights' Σ‖w‖² has grown more than GROWTH
# times since the last closing — a blow-up too gradual for the ‖A‖² test (docs/defaults.md, "Blow-up guard").
# Both tests count only steps that can throw the weights out: α·‖A‖ per unit at least
# functional.MOVE_FLOOR (1%) of ‖w‖. Its decay test (functional.DECAY_SHARE): at a closing
# whose window sum is mostly weight decay's pull λ·n·w (the data term silent) no α grows
# past the largest α a window with a live data term moved with.

# State entries that live in fp32 (or wider) whatever the parameter's dtype; torch's
# load_state_dict would cast them to the parameter's dtype, so TLR loads them itself.
_GRAD, _DTYPE, _DEVICE = operator.attrgetter("grad"), operator.attrgetter("dtype"), operator.attrgetter("device")
_IS_SPARSE, _SHAPE_DEVICE = operator.attrgetter("is_sparse"), operator.attrgetter("shape", "device")
_STATE_KEYS = ("momentum_buffer", "window_sum", "window_start", "prev_window_sum", "alpha")


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: {value!r} (expected a real number)")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def initial_alpha(lr) -> float:
    """The α that ``lr`` starts TLR from, checked: > 0, finite, a normal float32."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if lr.is_complex() or not (lr.is_floating_point() or lr.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"Invalid learning rate: tensor of dtype {lr.dtype}")
        value = float(lr.detach().cpu())
    else:
        value = _finite_number("learning rate", lr)
    if not _ALPHA_MIN <= value <= _ALPHA_MAX:
        raise ValueError(
            f"Invalid learning rate: {value} (lr is the initial α, which TLR trains by multiplying it: it must be > 0 "
            f"and a normal float32, {_ALPHA_MIN:.4g} to {_ALPHA_MAX:.4g})"
        )
    return value


def schedule_factor(lr, initial_lr, index: int) -> float | Tensor:
    """``lr / initial_lr``: the factor a learning-rate schedule applies to the trained α.

    Checked when both are numbers (free); a tensor lr is not read (that would synchronise).
    """
    if isinstance(lr, Tensor) or isinstance(initial_lr, Tensor):
        for name, value in (("lr", lr), ("initial_lr", initial_lr)):
            if isinstance(value, Tensor) and value.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)} in group {index}")
        return torch.as_tensor(lr) / torch.as_tensor(initial_lr)
    value = _finite_number(f"learning rate of group {index}", lr)
    if value < 0:
        raise ValueError(f"Invalid learning rate of group {index}: {value} (a schedule's value must be >= 0)")
    start = _finite_number(f"initial_lr of group {index}", initial_lr)
    if start <= 0:
        raise ValueError(f"Invalid initial_lr of group {index}: {start} (expected > 0: lr is used as lr / initial_lr)")
    return value / start


def window_schedule(window: int | str, max_window: int | None) -> tuple[int, int]:
    """(W0, K): windows are k·W0 steps long with 1 <= k <= K; K = 1 is the paper's fixed window."""
    w0 = AUTO_WINDOW if window == "auto" else window
    if max_window is None:
        max_window = AUTO_MAX_WINDOW if window == "auto" else w0
    return w0, max(1, max_window // w0)


_SKIP = object()  # check_hyperparameters(lr=_SKIP): the learning rate is checked elsewhere
_ALPHA_MIN = torch.finfo(torch.float32).tiny
_ALPHA_MAX = torch.finfo(torch.float32).max


def check_hyperparameters(
    *,
    lr=_SKIP,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    bound,
    window,
    max_window=None,
    window_reset=DEFAULT_WINDOW_RESET,
    blowup_ratio=DEFAULT_BLOWUP_RATIO,
    scope,
    statistic,
    maximize,
    backend="torch",
) -> None:
    """Raise ValueError/TypeError naming the first invalid hyper-parameter.

    ``lr`` is the initial α: a float or a 1-element tensor (read here, at construction:
    never in ``step()``), > 0 and a normal float32, because α is trained by multiplying
    it (from 0 it would never move).
    """
    if lr is not _SKIP:
        initial_alpha(lr)
    m = _finite_number("momentum value", momentum)
    if not 0.0 <= m < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum} (TLR needs 0 <= momentum < 1)")
    d = _finite_number("dampening value", dampening)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"Invalid dampening value: {dampening} (expected 0 <= dampening <= 1)")
    if _finite_number("weight_decay value", weight_decay) < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not isinstance(nesterov, bool):
        raise TypeError(f"Invalid nesterov: {nesterov!r} (expected a bool)")
    if nesterov and (m <= 0 or d != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if _finite_number("bound", bound) <= 0.0:
        raise ValueError(f"Invalid bound: {bound} (the paper's c must be > 0)")
    if window != "auto":
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"Invalid window: {window!r} (expected an int number of steps or 'auto')")
        if window < 1:
            raise ValueError(f"Invalid window: {window} (expected >= 1 step)")
    if max_window is not None:
        if isinstance(max_window, bool) or not isinstance(max_window, numbers.Integral):
            raise TypeError(f"Invalid max_window: {max_window!r} (expected an int number of steps or None)")
        w0 = window_schedule(window, None)[0]
        if max_window < w0:
            raise ValueError(f"Invalid max_window: {max_window} (expected >= the window, {w0})")
    if _finite_number("window_reset", window_reset) < 0.0:
        raise ValueError(f"Invalid window_reset: {window_reset} (expected >= 0)")
    if blowup_ratio is not None and _finite_number("blowup_ratio", blowup_ratio) <= 1.0:
        raise ValueError(f"Invalid blowup_ratio: {blowup_ratio} (expected a number > 1, or None to turn the guard off)")
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope: {scope!r} (expected one of {SCOPES})")
    if statistic not in STATISTICS:
        raise ValueError(f"Invalid statistic: {statistic!r} (expected one of {STATISTICS})")
    if not isinstance(maximize, bool):
        raise TypeError(f"Invalid maximize: {maximize!r} (expected a bool)")
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {BACKENDS})")


def _triton_ready() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_RESOLVED: dict[tuple[str, torch.device], str] = {}  # (backend, device) → the path, for requests that succeeded


def _resolve_backend(backend: str, device: torch.device, index: int) -> str:
    """The path a group on ``device`` takes: Triton for CUDA under "auto", else PyTorch.

    Remembered once it succeeds (every step asks), except for Triton on CPU tensors, whose
    check reads the environment (``TRITON_INTERPRET``) every time."""
    path = _RESOLVED.get((backend, device))
    if path is None:
        path = _resolve_backend_now(backend, device, index)
        if not (backend == "triton" and device.type == "cpu"):
            _RESOLVED[(backend, device)] = path
    return path


def _resolve_backend_now(backend: str, device: torch.device, index: int) -> str:
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_ready() else "torch"
    if not _triton_ready():
        raise RuntimeError(f"backend='triton' (group {index}) needs the triton package: pip install triton")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' (group {index}) got CPU tensors: Triton kernels run on CUDA devices, or on the CPU "
            "through Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported"
        )
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"backend='triton' (group {index}) does not support {device.type} tensors; use backend='torch'")
    return "triton"


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor); other tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def _dtensor_group(group: dict[str, Any], index: int):
    """The process group that the DTensor parameters of ``group`` are sharded over, or None.

    Supported: every parameter a DTensor on one 1-D mesh with Shard placements (FSDP2's
    ``fully_shard``); a group mixing DTensors and regular tensors is refused, because
    the regular ones would be counted once per rank.
    """
    meshes, plain = [], False
    for p in group["params"]:
        if hasattr(p, "device_mesh") and hasattr(p, "placements"):
            if p.device_mesh.ndim != 1 or any(type(pl).__name__ != "Shard" for pl in p.placements):
                raise NotImplementedError(
                    f"group {index}: TLR sums DTensor statistics over a 1-D mesh with Shard placements, got "
                    f"{tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
                )
            if meshes and p.device_mesh != meshes[0]:
                raise ValueError(f"group {index} holds DTensors on different device meshes; use one group per mesh")
            meshes.append(p.device_mesh)
        else:
            plain = True
    if not meshes:
        return None
    if plain:
        raise ValueError(f"group {index} mixes DTensor and regular parameters; put them in separate param groups")
    return meshes[0].get_group()


def _collective_device(group: dict[str, Any], shard_group) -> torch.device:
    """Where a rank that holds no tensor of ``group`` keeps its side of the all-reduce."""
    if group["params"]:
        return group["params"][0].device
    import torch.distributed as dist

    if dist.get_backend(shard_group) == "nccl":  # NCCL reduces CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return group["alpha"].device


def _ensure_window_state(p: Tensor, state: dict[str, Any], key: str, alpha: Tensor,
                         form: tuple[float, float] | None) -> None:
    """Create the window state of ``p``, or convert it to the representation ``key``.

    "window_sum" is A; "window_start" is a snapshot S with A = c·(S - (w - α·κ·b))/α, its
    (κ, c) kept beside it as "window_start_form" (``functional.snapshot_form``; ``form``
    is the one a new snapshot takes). Converting costs a pass or two and happens only when
    the backend or a hyper-parameter that the form depends on changes, or a tensor without
    a gradient misses a closing.
    """
    dtype = state_dtype(p.dtype)
    if "prev_window_sum" not in state:
        state["prev_window_sum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
    if key in state and (key == "window_sum" or state.get("window_start_form", _POSITION_FORM) == form):
        return
    w, b = p.detach(), state.get("momentum_buffer")
    s = state.pop("window_start", None)
    old_form = state.pop("window_start_form", _POSITION_FORM)
    a = state.pop("window_sum", None) if s is None else functional.snapshot_to_sum(s, w, b, alpha, old_form)
    if key == "window_start":
        state["window_start"] = functional.sum_to_snapshot(a, w, b, alpha, form).clone(
            memory_format=torch.contiguous_format)
        state["window_start_form"] = tuple(map(float, form))
    else:
        a = torch.zeros_like(p, dtype=dtype) if a is None else a.to(dtype)
        state["window_sum"] = a.contiguous()


def _state_follows(p: Tensor, state: dict[str, Any], keys=_STATE_KEYS[:-1],
                   memory_format=torch.contiguous_format) -> None:
    """A parameter moved to another device or dtype after its state was made (``model.to(...)``,
    ``p.data = p.data.double()``): its state follows (a snapshot in the parameter's dtype, a
    per-tensor α in float32, the rest in ``state_dtype``); the kernels would otherwise read it
    at the wrong width or place. (TLR's keys by default; TLRAdamW passes its own.)"""
    dtype = state_dtype(p.dtype)
    for k in keys:
        t = state.get(k)
        want = p.dtype if k == "window_start" else torch.float32 if k == "alpha" else dtype
        if isinstance(t, Tensor) and (t.dtype != want or t.device != p.device):
            state[k] = t.to(device=p.device, dtype=want, memory_format=memory_format)


_POSITION_FORM = (0.0, 1.0)  # a snapshot saved before "window_start_form" existed: the weights themselves


def _step_config(hyper: dict[str, Any]) -> functional.StepConfig:
    """The ``StepConfig`` of a group's validated hyper-parameters (``_hyperparameters``)."""
    w0, units = window_schedule(hyper["window"], hyper["max_window"])
    return functional.StepConfig(
        momentum=hyper["momentum"], dampening=hyper["dampening"], weight_decay=hyper["weight_decay"],
        nesterov=hyper["nesterov"], maximize=hyper["maximize"], bound=hyper["bound"], statistic=hyper["statistic"],
        scope=hyper["scope"], window=w0, units=units, window_reset=hyper["window_reset"],
        blowup_ratio=hyper["blowup_ratio"])


_HYPER_KEYS = ("momentum", "dampening", "weight_decay", "nesterov", "bound", "window", "max_window", "window_reset",
               "blowup_ratio", "scope", "statistic", "maximize", "backend")
_HYPER_VALUES = operator.itemgetter(*_HYPER_KEYS)  # one C call per step: the signature compared with the last


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: group[k] for k in _HYPER_KEYS}


_PLAN_SERIALS = count()


def _picker(idx: list[int]):
    """A function giving the entries of a list at ``idx``, as a list."""
    if len(idx) <= 1:
        return lambda xs: [xs[i] for i in idx]
    get = operator.itemgetter(*idx)
    return lambda xs: list(get(xs))


def _flat_span(tensors: list[Tensor]) -> Tensor | None:
    """A 1-D view over ``tensors`` where they are contiguous, consecutive slices of one storage
    from its start, in order (else None)."""
    first = tensors[0]
    ptr, offset = first.untyped_storage().data_ptr(), 0
    for t in tensors:
        if t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset or not t.is_contiguous():
            return None
        offset += t.numel()
    return first.as_strided((offset,), (1,), 0)


def _flat_windows(states, keys, sums: list[Tensor], prevs: list[Tensor], copy: bool) -> tuple[Tensor, Tensor] | None:
    """Lay a group's window sums A and P out as consecutive slices of two flat buffers, so that
    the window's reductions run once over each buffer (``functional.tlr``'s ``flat_windows``).

    The tensors are copied there unless they already are (a plan rebuilt while the state
    stays), and the states and lists get the slices; ``state_dict()`` and copies hand out
    tensors of their own (``_compact``). Only with ``copy`` (every tensor of the group has a
    gradient): where gradients come and go from step to step (a mixture of experts) each
    plan would copy the buffers again. None where the sums differ in dtype, or are not flat
    and may not be copied.
    """
    if not sums or any(t.dtype != sums[0].dtype for t in sums + prevs):
        return None
    flats = []
    for tensors, key_of in ((sums, keys), (prevs, repeat("prev_window_sum"))):
        flat = _flat_span(tensors)
        if flat is None and not copy:
            return None
        if flat is None:
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
            torch._foreach_copy_(views, tensors)
            for i, (state, key, view) in enumerate(zip(states, key_of, views)):
                state[key] = tensors[i] = view
        flats.append(flat)
    return flats[0], flats[1]


def _compact(entry: dict[str, Any]) -> dict[str, Any]:
    """A state entry whose window sums own their storage: on the CPU they are slices of two flat
    buffers (``_flat_windows``), and pickle writes a slice's whole buffer (torch.save would not),
    so a pickled optimizer would hold one copy of the buffers per tensor. The next step lays
    them out flat again."""
    if not isinstance(entry, dict):  # a state_dict hook's own entry: left as it is
        return entry
    return {k: v.clone() if k in _WINDOW_KEYS and type(v) is Tensor and v.untyped_storage().nbytes() != v.nbytes
            else v for k, v in entry.items()}


_WINDOW_KEYS = ("window_sum", "prev_window_sum")


class _StepPlan:
    """What a group's step gathered (``TLR._init_group``), kept for its next step.

    Gathering a group's tensors and state costs a few dict lookups per tensor; for a
    thousand tensors that is more than the step's arithmetic on a small model. A plan is
    reused while ``fits`` holds: the same parameters, dtypes and gradients present, the
    same backend, device and window representation, and every state entry still the
    tensor the plan holds (anything that replaced one — ``load_state_dict``, a hand edit
    — sends the step back to ``_init_group``). The lists are the ones the functional core
    updates in place, so they stay current from step to step. While a plan serves, the
    Triton path's launcher keys its address tables on the plan's serial instead of reading
    every state tensor's address (swapping a state tensor's storage in place, ``.data =``,
    is not seen: replace the entry instead, as ``load_state_dict`` does).
    """

    def __init__(self, group, grads_all, key, owners, states, params, bufs, sums, prevs, alphas, keys):
        self.group = group
        self.all_params = list(group["params"])
        self.present = [g is not None for g in grads_all]
        self.index = [i for i, (p, g) in enumerate(zip(self.all_params, grads_all)) if g is not None and p.numel() > 0]
        # the gradients of ``index`` from the group's list, C-level (every tensor: the list as it is)
        self.pick = list if self.index == list(range(len(self.all_params))) else _picker(self.index)
        self.key = key
        self.owners, self.states = owners, states
        self.params, self.bufs, self.sums, self.prevs, self.alphas, self.keys = params, bufs, sums, prevs, alphas, keys
        self.dtypes = [p.dtype for p in params]  # p.data = p.data.half() keeps the tensor, not its dtype
        self.shapes = list(map(_SHAPE_DEVICE, params))  # ... nor its size or device
        self.buckets = functional._buckets(params)
        self.serial = next(_PLAN_SERIALS)  # the launcher's state_token: unique, never reused
        self.flat = None  # the flat window buffers (``_flat_windows``) where the group has them
        # Triton path: the group's tensors as the plan's last step found them (``kernels.cpu.layout_record``:
        # the weights' identities, and the addresses, sizes, dtypes, devices, contiguity of weights and
        # gradients), that step's validated hyper-parameters and devices. While a step finds the same (one
        # native pass), it skips the per-tensor checks and the launcher repeats the launches it keeps here.
        self.record, self.validated, self.devices, self.launches = None, None, (), {}
        self.moved = torch.empty((len(self.all_params), 2), dtype=torch.int64)  # the addresses of a step that moved
        self.index_tensor = None if self.pick is list else torch.tensor(self.index, dtype=torch.int64)
        self.last_step = -1  # the optimizer's step() call that last built or checked this plan

    def addresses(self) -> Tensor:
        """The moved weights' and gradients' addresses (``moved``) of the tensors in ``params``."""
        return self.moved if self.index_tensor is None else self.moved[self.index_tensor]

    def commit_moved(self) -> None:
        """After the step that took them: the moved addresses into ``record``."""
        self.record[:, address_fields()].copy_(self.moved)

    def fits(self, state, group, present, key, state_unchanged: bool, steady: bool = False) -> bool:
        """``present``: whether each of the group's parameters has a gradient now;
        ``state_unchanged``: the optimizer's state maps every parameter to the same dict as
        when this plan was last checked (then the per-parameter lookups are skipped);
        ``steady``: the parameters matched ``record`` (dtypes included)."""
        is_ = operator.is_
        return (
            key == self.key
            and present == self.present
            and (steady or list(map(_DTYPE, self.params)) == self.dtypes)
            # the kernels take every size and address from the weights: a state tensor of another size or
            # device would be run past or read in the wrong place (the PyTorch path's ops raise instead)
            and (steady or key[0] != "triton" or list(map(_SHAPE_DEVICE, self.params)) == self.shapes)
            and (state_unchanged or all(map(is_, map(state.get, self.owners), self.states)))
            and all(map(is_, map(dict.get, self.states, self.keys), self.sums))
            and all(map(is_, map(dict.get, self.states, repeat("prev_window_sum")), self.prevs))
            and all(map(is_, map(dict.get, self.states, repeat("momentum_buffer")), self.bufs))
            and (all(map(is_, map(dict.get, self.states, repeat("alpha")), self.alphas)) if group["scope"] == "tensor"
                 else self.alphas[0] is group["alpha"])
        )


class _ShardGroup:
    """The ``shard_group`` option of TLR and TLRAdamW (an Optimizer mixin). A process group is not a
    group option (a state_dict cannot hold it) and cannot be copied: a copy (deepcopy, pickle,
    torch.save) only learns that the original had one, and refuses to step until it is set again."""

    def _set_shard_group(self, group) -> None:
        # after Optimizer.__init__: Dynamo drops attributes set before it when it builds the
        # optimizer inside a compiled frame
        self._shard_group, self._shard_group_lost = group, False

    @property
    def shard_group(self):
        """The process group the window statistics are summed over (``None``: this process alone)."""
        return self._shard_group

    @shard_group.setter
    def shard_group(self, group) -> None:
        self._set_shard_group(group)

    def _refuse_a_lost_shard_group(self) -> None:
        if self._shard_group_lost:
            raise RuntimeError(
                f"this {type(self).__name__} is a copy (deepcopy, pickle or torch.save) of one whose window statistics "
                "were summed over a shard_group; a process group is not copied: set opt.shard_group = <process group> "
                "before step()"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "had_shard_group": self._shard_group is not None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        lost = state.pop("had_shard_group", False)
        super().__setstate__(state)
        self._shard_group, self._shard_group_lost = None, lost


class TLR(_ShardGroup, Optimizer):
    r"""SGD whose learning rate α is trained by a Newton step on the line-search loss.

    TLR ("Trainable Learning Rate", ICLR 2022 submission) treats α as a parameter of
    L_α(α) = L(w - α·∇L(w)). Both derivatives in α come from two consecutive gradients,
    so the Newton step costs one inner product and one squared norm. Minibatch noise is
    averaged by summing the update statistic over a window of steps (the paper's
    Section 4) and updating α once per window. With an int ``window`` W and no
    ``max_window`` this is SPEC.md exactly::

        for every step t, for the parameters p of a group that have a gradient:
            u = s·g + λ·w                               (s = -1 with maximize, else 1)
            d = u, or with momentum: b = u (first step) | μ·b + (1-τ)·u;  d = b | u + μ·b (nesterov)
            A += u  (statistic="gradient")  |  A += d  (statistic="direction", the paper's)
            if (t + 1) % window == 0:                   (t counts step() calls)
                for each α-scope s (the group, or each tensor):
                    dot, sq = Σ⟨A, P⟩, Σ‖A‖² over the tensors of s
                    r = dot / max(4·(sq - dot), dot / c)   (r := 0 if not finite or 0/0)
                    α_s = α_s · (1 + r)                    (grows ≤ (1+c)x, shrinks < 25%)
                P = A;  A = 0
            w = w - α_s·d                               (the new α, as in Algorithm 2)

    The default ``window="auto"`` departs from the paper (README, "Adaptive window"):
    windows are k·W0 steps long (W0 = 3, 1 <= k <= K = 48 // 3); the test "does the
    window close?" runs every W0 steps, and after a closing k becomes 1 if the group's
    Newton step was large, |r| >= ``window_reset`` (r of the group's total ⟨A, P⟩ and
    ‖A‖², also with scope "tensor"), else min(k + 1, K). The window's state (steps
    since it started, in units of W0, and k) is ``group["window_state"]``, an int64
    tensor on the device: no host read decides a closing.

    Args:
        params: parameters or parameter groups (any hyper-parameter may differ per group).
        lr: the initial α (float or 1-element tensor). TLR adapts it, so it matters
            little (see the README's robustness table).
        momentum, dampening, weight_decay, nesterov: as in :class:`torch.optim.SGD`.
        bound: the paper's c, the largest relative growth of α per window.
        window: ``"auto"`` (the adaptive window above), or steps per α update (W), fixed.
            The paper uses p·N, a fraction p of an epoch of N steps:
            ``window=max(1, round(0.33 * len(train_loader)))``.
        max_window: the longest window in steps (default: 48 with "auto", else
            ``window``, i.e. fixed). An int ``window`` with a larger ``max_window`` adapts
            from ``window`` up to the largest multiple of it not above ``max_window``.
        window_reset: the |r| at or above which the next window is short again.
        blowup_ratio: the adaptive window's blow-up guard (below); None turns it off.
        scope: ``"group"``, one α per param group (the paper's ``sgd_tlr``), or
            ``"tensor"``, one α per parameter tensor (``sgd_tlr_pl``).
        statistic: ``"gradient"`` sums g + λ·w (default), ``"direction"`` sums the
            directions taken, (w_t - w_{t-W})/α, as the paper's code does; with momentum
            the latter is biased upwards and can diverge (SPEC.md).
        maximize: maximise the objective. As in torch's SGD only g is negated, so weight
            decay still pulls the weights toward zero (SPEC).
        backend: ``"auto"`` (Triton for CUDA tensors when triton is installed, the
            PyTorch path elsewhere), ``"torch"``, or ``"triton"`` (the fused kernels: CUDA,
            or CPU through Triton's interpreter with ``TRITON_INTERPRET=1``; anything else
            fails at ``step()`` with a RuntimeError).
        shard_group: a ``torch.distributed`` process group whose ranks each hold part of
            every param group (``ZeroRedundancyOptimizer(..., optimizer_class=TLR,
            shard_group=group)``): the window statistics are summed over it, one
            all-reduce per group at each step that ends a window (or, with an adaptive
            window, a unit of it), so α is the same on every rank and equals the
            unsharded run's. Every rank must call ``step()`` at the same steps. PyTorch
            path only.

    Where α lives: with scope ``"group"``, ``group["alpha"]`` is the group's trained α, a
    0-dim float32 tensor on the parameters' device updated in place
    (``float(group["alpha"])`` reads it). With scope ``"tensor"``, each tensor's α is
    ``optimizer.state[p]["alpha"]`` and ``group["alpha"]`` is the α a tensor starts from.
    ``group["lr"]`` is the schedule channel: a number TLR never writes, starting at the
    initial α (``group["initial_lr"]``); a step moves the weights by
    α · lr / initial_lr · d, so a learning-rate scheduler's factor multiplies the trained
    α. ``group["step"]`` counts steps (an int on the PyTorch path, an int64 device tensor
    on the Triton path, where the step counter and the closing decision live on the
    device for CUDA graphs).

    The adaptive window's blow-up guard (``blowup_ratio``, default 16; None: off): at the
    end of every W0-step unit that does not close the window, if ‖A‖² per unit of the
    window so far exceeds ``blowup_ratio`` times the larger of the last two closed
    windows' (per unit), the window closes after this step's move, k becomes 1 and every
    α's factor is at most 1/(1 + √q), q that ratio. And at every closing, if ⟨A, P⟩ < 0,
    ‖A‖² per unit exceeds the last window's and the weights' Σ‖w‖² has grown more than
    ``GROWTH`` (2) times since the last closing, every α's factor is at most 1/(1 + √q)
    with q that growth, and k becomes 1. Both tests count only where the steps can throw
    the weights out: Σ α²·‖A‖² per unit (α of each tensor's scope) above ``MOVE_FLOOR``²
    (1e-4) times Σ‖w‖², so a gradient spike under a tiny α does not cut it further.
    Finally, at every closing whose window sum is mostly weight decay's pull,
    ‖A - λ·n·w‖ <= ``DECAY_SHARE`` (0.9)·‖A‖ over the group (n the window's steps, w the
    weights now) — the data term silent, where the Newton step asks for α ≈ 1/λ — no α
    grows past max(α, peak), the peak being the largest α that a window with a live data
    term moved with (from the initial α on; ``group["window_energy"][3]``). Decided on the
    device (on the CPU, where reading is free, on the host).

    Parameters whose ``grad`` is None are skipped: their state is untouched, they add
    nothing to the window statistics, and a window closing without them leaves their
    window sums to the next window. Zero-size parameters are skipped too.

    ``step()`` never reads a device value on the host. State (momentum, window sums,
    α) is fp32 for fp16/bf16 parameters, and their update is computed in fp32.

    Example:
        >>> opt = TLR(model.parameters(), lr=0.01, momentum=0.8, weight_decay=5e-4)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     loss_fn(model(x), y).backward()
        ...     opt.step()
        >>> float(opt.param_groups[0]["alpha"])   # the trained α
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = DEFAULT_LR,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        bound: float = 0.25,
        window: int | str = DEFAULT_WINDOW,
        max_window: int | None = None,
        window_reset: float = DEFAULT_WINDOW_RESET,
        blowup_ratio: float | None = DEFAULT_BLOWUP_RATIO,
        scope: str = "group",
        statistic: str = "gradient",
        maximize: bool = False,
        backend: str = "auto",
        shard_group=None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            bound=bound,
            window=window,
            max_window=max_window,
            window_reset=window_reset,
            blowup_ratio=blowup_ratio,
            scope=scope,
            statistic=statistic,
            maximize=maximize,
            backend=backend,
        )
        check_hyperparameters(**defaults)  # before super().__init__, so nothing is built on bad input
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered collection (a list), not a set: a set's order changes between runs")
        super().__init__(params, defaults)
        self._set_shard_group(shard_group)  # not a group option (_ShardGroup)
        self._validated: dict[int, tuple] = {}  # id(group) → (the hyper-parameters last validated, their StepConfig)
        self._factors: dict[int, tuple] = {}  # id(group) → (lr, initial_lr, lr / initial_lr) for numbers
        self._plans: dict[int, _StepPlan] = {}  # id(group) → the lists its last step gathered
        self._steps = 0  # step() calls that returned
        self._state_seen = None  # (state, its keys, its values) when the last step() returned

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            return super().add_param_group(param_group)  # raises torch's TypeError
        group = dict(param_group)  # the caller's dict is never modified
        if not isinstance(group.get("params"), (Tensor, set)):
            group["params"] = list(group["params"])
        merged = {**self.defaults, **group}
        check_hyperparameters(**{k: merged[k] for k in ("lr", *_hyperparameters(merged))})
        if "alpha" in group:  # a group of a state_dict: its α travels with it
            initial_alpha(group["alpha"])
        tensors = [p[1] if isinstance(p, tuple) else p for p in ([group["params"]] if isinstance(group["params"], Tensor) else group["params"])]
        for i, p in enumerate(tensors):
            if isinstance(p, Tensor) and (p.is_complex() or not p.is_floating_point()):
                raise TypeError(
                    f"TLR optimizes real floating-point tensors; parameter {i} of the new group has dtype {p.dtype}"
                )
        devices = {p.device for p in tensors if isinstance(p, Tensor)}
        if merged["scope"] == "group" and len(devices) > 1:
            raise ValueError(
                f"scope='group' shares one α across the group, but its parameters are on several devices "
                f"{sorted(map(str, devices))}; use one group per device or scope='tensor'"
            )
        super().add_param_group(group)  # torch's checks (non-leaf, duplicates, overlap)
        device = next(iter(devices)) if devices else torch.device("cpu")
        # group["lr"] stays what the user (or a scheduler) sets: TLR never writes it. The
        # trained α starts from it and lives in group["alpha"]; a step moves the weights by
        # α · lr / initial_lr, so a schedule's factor multiplies the trained α.
        group["alpha"] = self._alpha_tensor(group.get("alpha", merged["lr"]), device)
        group.setdefault("initial_lr", group["lr"].detach().clone() if isinstance(group["lr"], Tensor) else group["lr"])
        group.setdefault("step", 0)
        group["window_state"] = self._window_state(group.get("window_state"), device)
        group["window_energy"] = self._window_energy(group.get("window_energy"), device, group["alpha"])
        try:  # the Triton path keeps its step counter on the device from the start
            if devices and _resolve_backend(group["backend"], device, len(self.param_groups) - 1) == "triton":
                group["step"] = torch.as_tensor(group["step"], dtype=torch.int64).to(device)
        except RuntimeError:
            pass  # an impossible Triton request is reported by step()

    @staticmethod
    def _alpha_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
        """A fresh 0-dim float32 α on ``device`` (never the caller's tensor: α is updated in place)."""
        if isinstance(lr, Tensor):
            return lr.detach().reshape(()).to(device=device, dtype=torch.float32, copy=True)
        return torch.tensor(float(lr), dtype=torch.float32, device=device)

    @staticmethod
    def _window_state(value: Tensor | None, device: torch.device) -> Tensor:
        """The window's int64 state on ``device``: [units of W0 since it started, its length k in units]."""
        value = torch.tensor([0, 1]) if value is None else torch.as_tensor(value)
        return value.to(device=device, dtype=torch.int64, copy=True)

    @staticmethod
    def _window_energy(value: Tensor | None, device: torch.device, alpha: Tensor) -> Tensor:
        """float64 [4] on ``device``, the blow-up guard's references: ‖A‖² per unit of the last
        two closed windows, Σ‖w‖² at the last closing (0: none) and the peak α of the decay
        test, which starts at the initial α. Older versions' [2] and [3] get a 0 for Σ‖w‖²
        and ``alpha`` (the group's α now) for the peak."""
        value = torch.zeros(3, dtype=torch.float64) if value is None else torch.as_tensor(value, dtype=torch.float64)
        if value.shape == (2,):
            value = torch.cat((value.cpu(), torch.zeros(1, dtype=torch.float64)))
        if value.shape == (3,):
            value = torch.cat((value.to(device), alpha.detach().to(device=device, dtype=torch.float64).reshape(1)))
        if value.shape != (4,):
            raise ValueError(f"window_energy must hold 4 values (2 or 3 from older versions), got shape "
                             f"{tuple(value.shape)}")
        return value.to(device=device, dtype=torch.float64, copy=True)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups (and _ShardGroup whether there was a process group)
        state = super().__getstate__()
        return {**state, "state": defaultdict(dict, {p: _compact(entry) for p, entry in state["state"].items()})}

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict()``, its window sums as tensors of their own (see ``_compact``)."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: _compact(entry) for k, entry in state_dict["state"].items()}
        return state_dict

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # _ShardGroup: the process group is forgotten
        # Attributes set in __init__ that torch's state does not carry (deepcopy, pickle, torch.save).
        self._validated = {}
        self._factors = {}
        self._plans = {}
        self._steps = 0
        self._state_seen = None
        # Fill in entries added after a checkpoint was written, so older dicts still load.
        defaults = dict(bound=0.25, window=DEFAULT_WINDOW, max_window=None, window_reset=DEFAULT_WINDOW_RESET,
                        blowup_ratio=DEFAULT_BLOWUP_RATIO, scope="group", statistic="gradient", maximize=False,
                        backend="auto")
        for key, value in defaults.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            for key in defaults:
                group.setdefault(key, self.defaults[key])
            group.setdefault("step", 0)
            if "window_state" not in group:
                group["window_state"] = self._window_state(None, torch.device("cpu"))
            if "window_energy" not in group:
                group["window_energy"] = torch.zeros(3, dtype=torch.float64)
            if "alpha" not in group:  # written before α moved out of group["lr"] (then the live α tensor)
                alpha = group["lr"]
                group["alpha"] = self._alpha_tensor(alpha, alpha.device if isinstance(alpha, Tensor) else torch.device("cpu"))
                start = group.get("initial_lr", alpha)
                group["lr"] = group["initial_lr"] = float(start) if isinstance(start, Tensor) else start

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; the given dict is not modified.

        torch's loader casts every floating-point state tensor to its parameter's dtype,
        which would round fp32 state of bf16 parameters; TLR moves these entries itself.
        """
        state_dict = dict(state_dict)
        for index, group in enumerate(state_dict.get("param_groups", [])):
            missing = [k for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov") if k not in group]
            if missing:
                raise ValueError(
                    f"not a TLR (or SGD) state_dict: param group {index} has no {', '.join(map(repr, missing))} "
                    f"(its keys: {sorted(k for k in group if k != 'params')})"
                )
        kept: dict[Any, dict[str, Tensor]] = {}
        state = {}
        for key, entry in state_dict["state"].items():
            entry = dict(entry)
            kept[key] = {k: entry.pop(k) for k in _STATE_KEYS if isinstance(entry.get(k), Tensor)}
            state[key] = entry
        state_dict["state"] = state
        # torch's loader ends in __setstate__, which forgets the process group (a copy cannot
        # hold one): this optimizer keeps its own
        shard_group, lost = self._shard_group, self._shard_group_lost
        super().load_state_dict(state_dict)
        self._shard_group, self._shard_group_lost = shard_group, lost
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for k, value in kept.get(saved_id, {}).items():
                dtype = {"alpha": torch.float32, "window_start": p.dtype}.get(k, state_dtype(p.dtype))
                self.state[p][k] = value.to(device=p.device, dtype=dtype, copy=True)
        for index, group in enumerate(self.param_groups):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group["alpha"] = self._alpha_tensor(group["alpha"], device)  # a copy of its own, on the parameters' device
            if isinstance(group["step"], Tensor):  # written by the Triton path: keep it where it will run
                try:
                    on_triton = bool(group["params"]) and _resolve_backend(group["backend"], device, index) == "triton"
                except RuntimeError:  # an impossible Triton request: step() reports it
                    on_triton = False
                group["step"] = group["step"].to(device, torch.int64, copy=True) if on_triton else int(group["step"])
            group["window_state"] = self._window_state(group.get("window_state"), device)  # a copy of its own
            group["window_energy"] = self._window_energy(group.get("window_energy"), device, group["alpha"])

    # ------------------------------------------------------------------ step
    def _check_group(self, index: int, group: dict[str, Any]):
        """Everything step() can reject, checked before any tensor is modified.

        Returns the schedule factor, the device of the group's first tensor with a gradient
        (None: nothing to update), whether the group holds DTensors, every parameter's
        ``grad`` (None included) and the group's step plan when its parameters are those
        the plan was built for (else None; ``_StepPlan.fits`` checks the rest). Hyper-parameters
        are validated when they change. Values on the CPU are read (that costs no
        synchronisation): a tensor lr, and α set by hand (``group["alpha"].fill_(...)``),
        which must stay > 0. On a GPU they are not.
        """
        lr, initial_lr = group["lr"], group["initial_lr"]
        known = self._factors.get(id(group))
        if known is not None and known[0] is lr and known[1] is initial_lr:  # numbers checked when they were set
            factor = known[2]
        else:
            factor = schedule_factor(lr, initial_lr, index)
            if isinstance(factor, Tensor):  # a tensor can change in place: computed every step
                if functional.host_reads_free(factor.device):
                    schedule_factor(float(lr), float(initial_lr), index)
            else:
                self._factors[id(group)] = (lr, initial_lr, factor)
        alpha = group["alpha"]
        if isinstance(alpha, Tensor) and functional.host_reads_free(alpha.device):
            if group["scope"] == "tensor":  # one read for them all
                alphas = [alpha] + [st["alpha"] for p in group["params"]
                                    if "alpha" in (st := self.state.get(p, {})) and st["alpha"].device == alpha.device]
                low, high = (float(x) for x in torch.stack(alphas).aminmax())
            else:
                low = high = float(alpha)
            if not (_ALPHA_MIN <= low and high <= _ALPHA_MAX):
                bad = low if not _ALPHA_MIN <= low else high
                raise ValueError(f"Invalid α in group {index}: {bad} (α must stay > 0 and a normal float32)")
        signature = (tuple(group[k] for k in _HYPER_KEYS) if torch.compiler.is_compiling()  # dynamo traces no itemgetter
                     else _HYPER_VALUES(group))
        validated = self._validated.get(id(group))
        if validated is None or validated[0] != signature:
            hyper = _hyperparameters(group)
            check_hyperparameters(**hyper)
            validated = self._validated[id(group)] = (signature, _step_config(hyper))
        params = group["params"]
        plan = None if torch.compiler.is_compiling() else self._plans.get(id(group))
        if (plan is not None and plan.record is not None and plan.group is group and plan.validated is validated
                and (found := same_layout(params, plan.record, plan.moved)) != CHANGED):
            # every tensor as at the plan's last step, which checked them, or only moved (``_StepPlan.record``)
            for device in plan.devices:
                _resolve_backend(group["backend"], device, index)
            return factor, plan.key[1], False, None, plan.present, plan, validated[1], found
        if torch.compiler.is_compiling():  # dynamo traces comprehensions, not attrgetter
            grads = [p.grad for p in params]
            present = [g is not None for g in grads]
            with_grad = [p for p, g in zip(params, grads) if g is not None]
            sparse = any(g.is_sparse for g in grads if g is not None)
            devices = {p.device for p in with_grad}
        else:  # C-level maps: this runs every step, over every parameter
            grads = list(map(_GRAD, params))
            present = list(map(operator.is_not, grads, repeat(None)))
            with_grad = list(compress(params, present))
            sparse = any(map(_IS_SPARSE, compress(grads, present)))
            devices = set(map(_DEVICE, with_grad))
        if sparse:
            i = next(i for i, g in enumerate(grads) if g is not None and g.is_sparse)
            raise RuntimeError(f"TLR does not support sparse gradients (parameter {i} of group {index})")
        first = next((p.device for p in with_grad if p.numel() > 0), None)
        if not (plan is not None and plan.group is group and len(params) == len(plan.all_params)
                and all(map(operator.is_, params, plan.all_params))):
            plan = None  # the group's parameters changed (or no step gathered them yet)
        dtensor = plan is None and any(hasattr(p, "device_mesh") for p in with_grad)  # planned groups hold none
        if group["scope"] == "group" and len(devices) > 1:
            raise RuntimeError(
                f"scope='group' shares one α across group {index}, but its parameters are on several devices "
                f"{sorted(map(str, devices))}"
            )
        for device in devices:
            _resolve_backend(group["backend"], device, index)  # raises for an impossible Triton request
        return factor, first, dtensor, grads, present, plan, validated[1], None

    def _check_state(self, index: int, group: dict[str, Any], dtensor: bool) -> None:
        """Before a group's state is gathered afresh for the Triton path: every state tensor has its
        parameter's size. (A parameter whose data was replaced by one of another size, ``p.data =
        ...``, would have the kernels run past the end of its state; another dtype or device is
        converted instead, ``_state_follows``.)"""
        for i, p in enumerate(group["params"]):
            state = self.state.get(p)
            n = (_local(p) if dtensor else p).numel()
            if not state or p.grad is None or n == 0:  # (a tensor emptied is skipped, state and all)
                continue
            for k in _STATE_KEYS[:-1]:
                t = state.get(k)
                if isinstance(t, Tensor) and t.numel() != n:
                    raise ValueError(f"the state of parameter {i} of group {index} does not fit it: {k} holds "
                                     f"{t.numel()} elements, the parameter {n} (its data was replaced by a tensor of "
                                     "another size?)")

    def _group_tensors(self, group, backend, device) -> Tensor:
        """Put the group's α, step counter and window state where this step runs; returns α."""
        lr = group["alpha"]
        if not (isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32 and lr.dim() == 0):
            group["alpha"] = lr = self._alpha_tensor(lr, device)  # a float set by hand, or parameters moved
        step = group["step"]
        if backend == "triton" and not (isinstance(step, Tensor) and step.device == device):
            group["step"] = torch.as_tensor(step, dtype=torch.int64).to(device)  # the counter lives on the device
        elif backend == "torch" and isinstance(step, Tensor):
            group["step"] = int(step)  # back from the Triton path: one host read, once
        ws = group["window_state"]
        if not (isinstance(ws, Tensor) and ws.device == device and ws.dtype == torch.int64):
            group["window_state"] = self._window_state(ws, device)  # set by hand, or parameters moved
        we = group["window_energy"]
        if not (isinstance(we, Tensor) and we.device == device and we.dtype == torch.float64 and we.shape == (4,)):
            group["window_energy"] = self._window_energy(we, device, lr)
        return lr

    def _init_group(self, group, backend, device, snapshots, dtensor, params, grads, bufs, sums, prev_sums, alphas, keys,
                    owners) -> None:
        """Gather the tensors with a gradient into the given lists; create (or convert) their state lazily.

        torch's convention (lists filled in place, nothing returned): torch.compile runs
        a method of this name eagerly instead of tracing it. ``params``/``grads`` get a
        DTensor's local shard, ``owners`` the parameter itself (the state's key), ``keys``
        the state key of its window sum. ``snapshots``: whether a window snapshot may stand
        for the window sum (``functional.window_representation``).
        """
        lr = self._group_tensors(group, backend, device)
        form = functional.snapshot_form(group["statistic"], group["momentum"], group["dampening"], group["nesterov"])

        keys_by_dtype: dict[torch.dtype, str] = {}
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:
                state = self.state.get(p)
                if state and "window_start" in state:
                    # A snapshot only holds A while α stays as it was; a window may close
                    # without this tensor, so keep its partial sum as A until it returns.
                    alpha = lr if group["scope"] == "group" else state["alpha"]
                    _ensure_window_state(p, state, "window_sum", alpha, None)
                continue
            state = self.state[p]
            if group["scope"] == "tensor":
                if "alpha" not in state or state["alpha"].device != p.device:
                    state["alpha"] = self._alpha_tensor(state.get("alpha", lr), p.device)
                alpha = state["alpha"]
            else:
                alpha = lr
            if p.dtype not in keys_by_dtype:
                keys_by_dtype[p.dtype] = window_representation(backend, p.dtype, form, snapshots)
            key = keys_by_dtype[p.dtype]
            local = _local(p) if dtensor else p  # a DTensor's shard on this rank: state and updates are per shard
            if (key not in state or "prev_window_sum" not in state
                    or (key == "window_start" and state.get("window_start_form", _POSITION_FORM) != form)):
                _ensure_window_state(local, state, key, alpha, form)
            _state_follows(local, state)  # after a conversion of the window's representation, which reads the old
            params.append(local)
            grads.append(_local(p.grad) if dtensor else p.grad)
            bufs.append(state.get("momentum_buffer"))
            sums.append(state[key])
            prev_sums.append(state["prev_window_sum"])
            keys.append(key)
            owners.append(p)  # a DTensor's shard is a new tensor at every step: the state stays keyed by p
            if group["scope"] == "tensor":
                alphas.append(alpha)
        if group["scope"] == "group":
            alphas.append(lr)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler hands ``grad_scale``/``found_inf`` to step() when every group runs on the Triton path."""
        devices = [(g, g["params"][0].device) for g in self.param_groups if g["params"]]
        try:
            return bool(devices) and all(_resolve_backend(g["backend"], d, 0) == "triton" for g, d in devices)
        except RuntimeError:
            return False

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refuse_a_lost_shard_group()
        checked = [self._check_group(index, group) for index, group in enumerate(self.param_groups)]
        # Whether the state maps every parameter to the same dict as when the last step()
        # returned: identity comparisons over its keys and values (a lookup per parameter
        # would hash each one in Python).
        seen, state = self._state_seen, self.state
        state_unchanged = (seen is not None and seen[0] is state and len(state) == len(seen[1])
                           and all(map(operator.is_, state, seen[1])) and all(map(operator.is_, state.values(), seen[2])))
        self._state_seen = None  # an exception below leaves no stale record
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        # Everything that can raise before anything changes: the groups' paths, plans and state
        prepared = []
        for index, (group, (factor, device, dtensor, grads_all, present, plan, config, found)) in enumerate(
                zip(self.param_groups, checked)):
            backend = "torch" if device is None else _resolve_backend(group["backend"], device, 0)
            mesh_group = _dtensor_group(group, index) if dtensor else None
            if mesh_group is not None and self._shard_group is not None:
                raise ValueError(f"group {index} holds DTensor parameters: their shards are summed over their mesh, "
                                 "so shard_group must not be given")
            shard_group = mesh_group if mesh_group is not None else self._shard_group
            if shard_group is not None:
                if backend != "torch":
                    raise NotImplementedError(
                        f"shard_group is implemented on the PyTorch path only (group {index} resolved to Triton); "
                        "pass backend='torch'"
                    )
                # a rank with nothing to update still joins the group's collective
                device = device or _collective_device(group, shard_group)
            key = None
            if device is not None:
                snapshots = functional.snapshots_allowed(factor)
                if isinstance(factor, Tensor):  # non_blocking: a CPU tensor lr must not sync the host with a GPU
                    factor = factor.to(dtype=torch.float32).to(device, non_blocking=True)
                key = (backend, device, snapshots, group["statistic"], group["momentum"], group["dampening"],
                       group["nesterov"], group["scope"])
                if plan is not None:
                    self._group_tensors(group, backend, device)
                    # the shortcut holds for a plan checked by the last step() only
                    if not plan.fits(self.state, group, present, key,
                                     state_unchanged and plan.last_step == self._steps - 1, found is not None):
                        plan = None
                        if found is not None:  # the state changed: gather afresh
                            grads_all, found = list(map(_GRAD, group["params"])), None
                if plan is None and backend == "triton" and not torch.compiler.is_compiling():
                    self._check_state(index, group, dtensor)  # (torch's ops check sizes themselves)
            prepared.append((index, group, factor, device, dtensor, grads_all, plan, config, backend, mesh_group,
                             shard_group, key, found))
        for index, group, factor, device, dtensor, grads_all, plan, config, backend, mesh_group, shard_group, key, \
                found in prepared:
            if device is None:  # nothing to update; the step still counts
                if isinstance(group["step"], Tensor):
                    advance_step(group["step"], found_inf)
                else:
                    group["step"] += 1
                continue
            snapshots = key[2]
            steady = found is not None  # every tensor as at the plan's last step, or only moved (_check_group)
            if plan is not None:
                params, bufs, sums, prev_sums, alphas, keys, owners = (
                    plan.params, plan.bufs, plan.sums, plan.prevs, plan.alphas, plan.keys, plan.owners)
                grads = None if steady else plan.pick(grads_all)  # None: the launcher reads them where it must
                buckets, states = plan.buckets, plan.states
                rebuilt = False
            else:
                params, grads, bufs, sums, prev_sums, alphas, keys, owners = [], [], [], [], [], [], [], []
                self._init_group(group, backend, device, snapshots, dtensor, params, grads, bufs, sums, prev_sums, alphas,
                                 keys, owners)
                buckets, states = None, [self.state[p] for p in owners]
                rebuilt = True
                if not dtensor and not torch.compiler.is_compiling():  # the lists are the plan's: tlr() fills them
                    # on the CPU, A and P in two flat buffers: the guard's ‖A‖² at every unit's end
                    # is one exact reduction instead of one per tensor
                    flat = (_flat_windows(states, keys, sums, prev_sums,
                                          copy=len(params) == sum(p.numel() > 0 for p in group["params"]))
                            if backend == "torch" and group["scope"] == "group" and shard_group is None
                            and functional.host_reads_free(device) else None)
                    plan = self._plans[id(group)] = _StepPlan(group, grads_all, key, owners, states, params, bufs,
                                                              sums, prev_sums, alphas, keys)
                    plan.flat = flat
                    buckets = plan.buckets
            new_buffers = group["momentum"] != 0 and any(map(operator.is_, bufs, repeat(None)))
            tlr(
                params,
                grads,
                bufs,
                sums,
                prev_sums,
                alphas,
                config,
                step=group["step"],
                window_state=group["window_state"],
                window_energy=group["window_energy"],
                lr_factor=factor,
                backend=backend,
                grad_scale=grad_scale if backend == "triton" else None,
                found_inf=found_inf if backend == "triton" else None,
                shard_group=shard_group,
                sharded_tensors=mesh_group is not None,
                buckets=buckets,
                state_token=plan.serial if plan is not None else None,
                flat_windows=plan.flat if plan is not None else None,
                layout_unchanged=steady,
                addresses=plan.addresses() if found == MOVED else None,
                keep=plan.launches if plan is not None else None,
            )
            if rebuilt or backend == "torch" or new_buffers:
                # new buffers; on the PyTorch path also swapped sums and buffers reused as u
                for state, b, a, prev, k in zip(states, bufs, sums, prev_sums, keys):
                    state[k], state["prev_window_sum"] = a, prev
                    if b is not None:
                        state["momentum_buffer"] = b
            if plan is not None:
                plan.last_step = self._steps
                if found == MOVED:  # the launches took the new addresses: so does the record
                    plan.commit_moved()
                if backend == "triton" and not steady:  # this step checked the tensors: the next may skip that
                    plan.validated, plan.devices = self._validated[id(group)], {p.device for p in params}
                    plan.record = _layout_record(group["params"])
            if backend == "torch":
                group["step"] += 1  # the Triton path advances its device counter itself
        if len(self._plans) > len(self.param_groups):  # a group was removed: drop what its plan holds
            current = {id(group) for group in self.param_groups}
            self._plans = {k: plan for k, plan in self._plans.items() if k in current}
        self._steps += 1
        if not torch.compiler.is_compiling():  # the plans' shortcut (step plans are not used in a traced step)
            self._state_seen = (self.state, list(self.state), list(self.state.values()))
        return loss
