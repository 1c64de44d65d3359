"""Readable reference implementations: the ground truth the fast paths are tested against.

- ``ReferenceTLR``: SPEC.md written out tensor by tensor, computed in float64. It
  stores α rounded to float32 after each update, as ``TLR`` does (α is a float32
  tensor there), and rounds weights to the parameter's dtype after each step.
- ``NaiveTLR``: the paper's Algorithm 1 (a second forward–backward pass per step).
- ``HypergradientSGD``: the fixed-meta-rate rule of Appendix D.4 (Baydin et al., 2018).
- ``ReferenceTLRAdamW``: TLR for AdamW's direction (docs/adamw.md), fixed windows.

All four are slow on purpose: plain Python loops, host reads, no fused kernels.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from .adamw import DEFAULT_ADAMW_BOUND, check_adamw_arguments
from .optimizer import (DECAY_SHARE, DEFAULT_BLOWUP_RATIO, DEFAULT_LR, DEFAULT_WINDOW, DEFAULT_WINDOW_RESET, GROWTH,
                        MOVE_FLOOR, check_hyperparameters, window_schedule)

__all__ = ["ReferenceTLR", "ReferenceTLRAdamW", "NaiveTLR", "HypergradientSGD", "newton_factor", "next_alpha"]

_TINY = torch.finfo(torch.float32).tiny
_MAX = torch.finfo(torch.float32).max


def newton_factor(dot: float, sq: float, bound: float) -> float:
    """1 + r, r = dot / max(4·(sq - dot), dot / c); r := 0 for a non-positive denominator or non-finite r."""
    denom = max(4.0 * (sq - dot), dot / bound)
    if not denom > 0:  # also catches NaN
        return 1.0
    r = dot / denom
    return 1.0 + r if math.isfinite(r) else 1.0


def next_alpha(alpha: float, dot: float, sq: float, bound: float, cut: float = math.inf) -> float:
    """α·min(1 + r, cut), rounded to float32; the old α if the product leaves float32's normal range."""
    new = alpha * min(newton_factor(dot, sq, bound), cut)
    if not (math.isfinite(new) and _TINY <= new <= _MAX):
        return alpha
    return _f32(new)


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


class ReferenceTLR(Optimizer):
    """SPEC.md, one tensor at a time, in float64. Same arguments as ``TLR`` (no backend).

    With an int ``window`` and no ``max_window`` this is SPEC.md literally; otherwise
    windows adapt as ``TLR``'s docstring says (the default, ``window="auto"``).

    ``group["alpha"]`` (scope "group") and ``state[p]["alpha"]`` (scope "tensor") are
    Python floats here; the other state entries are float64 tensors. As in ``TLR``, the
    weights move by α · lr / initial_lr (a learning-rate schedule's factor).
    """

    def __init__(self, params, lr=DEFAULT_LR, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 bound=0.25, window=DEFAULT_WINDOW, max_window=None, window_reset=DEFAULT_WINDOW_RESET,
                 blowup_ratio=DEFAULT_BLOWUP_RATIO, scope="group", statistic="gradient", maximize=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        bound=bound, window=window, max_window=max_window, window_reset=window_reset,
                        blowup_ratio=blowup_ratio, scope=scope, statistic=statistic, maximize=maximize)
        check_hyperparameters(**defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["alpha"] = _f32(float(group["lr"]))  # TLR stores α in float32
        group.setdefault("initial_lr", float(group["lr"]))
        group.setdefault("step", 0)
        group["units_done"], group["units"] = 0, 1  # the window so far and its length, in units of W0 steps
        group["energy"] = [0.0, 0.0]  # ‖A‖² per unit of the last two closed windows (the blow-up guard's reference)
        group["weights"] = 0.0  # Σ‖w‖² at the last closing (the guard's growth test; 0: none yet)
        group["peak"] = group["alpha"]  # the largest α a window not dominated by decay moved with (decay test)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group):
        mu, tau, lam = group["momentum"], group["dampening"], group["weight_decay"]
        live = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
        directions = {}
        for p in live:
            st = self.state[p]
            w = p.detach().double()
            g = p.grad.detach().double()
            if "window_sum" not in st:
                st["window_sum"] = torch.zeros_like(w)
                st["prev_window_sum"] = torch.zeros_like(w)
            if group["scope"] == "tensor" and "alpha" not in st:
                st["alpha"] = group["alpha"]
            g = -g if group["maximize"] else g  # SPEC: only g is negated, as in torch.optim.SGD
            u = g + lam * w if lam != 0 else g  # λ = 0 means no term (0·NaN weights would be NaN)
            d = u
            if mu != 0:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = u.clone()
                else:
                    st["momentum_buffer"] = mu * st["momentum_buffer"] + (1 - tau) * u
                b = st["momentum_buffer"]
                d = u + mu * b if group["nesterov"] else b
            st["window_sum"] = st["window_sum"] + (u if group["statistic"] == "gradient" else d)
            directions[p] = d

        # The window: k units of W0 steps (k = 1 always for a fixed window); the group's
        # Newton step at a closing sets the next k (TLR's docstring, "window='auto'").
        w0, max_units = window_schedule(group["window"], group["max_window"])
        scheduled = jump = False
        cut = math.inf  # no cap on α's factor unless the blow-up guard trips
        weights = along = None  # Σ‖w‖² and Σ⟨A, w⟩ before this step's move, at unit ends the guard watches
        moving = False  # whether this unit's steps can throw the weights out (the guard watches only those)
        if live and (group["step"] + 1) % w0 == 0:  # a step with no gradient leaves the window as it is
            group["units_done"] += 1
            scheduled = group["units_done"] >= min(group["units"], max_units)
            if max_units > 1 and group["blowup_ratio"] is not None:
                weights = sum(float(p.detach().double().square().sum()) for p in live)
                along = sum(float((self.state[p]["window_sum"] * p.detach().double()).sum()) for p in live)
                # The blow-up guard: ‖A‖² per unit of the window so far against the larger of
                # the last two windows'. A jump closes the window after this step's move. It
                # counts only where α·‖A‖ per unit is at least MOVE_FLOOR·‖w‖ (α²·‖A‖² summed
                # over the tensors, α each one's scope's).
                energy = _sum_of(self.state, live, "window_sum", "window_sum") / group["units_done"]
                moved = sum(self._alpha(group, p) ** 2 * _sum_of(self.state, [p], "window_sum", "window_sum")
                            for p in live) / group["units_done"]
                moving = moved > MOVE_FLOOR ** 2 * weights
                reference = max(group["energy"])
                jump = moving and reference > 0 and energy > group["blowup_ratio"] * reference
                if jump:
                    cut = 1.0 / (1.0 + math.sqrt(energy / reference))

        if scheduled:  # α first, then the move (Algorithm 2's order)
            self._close_window(group, live, max_units, jump, cut, weights, moving, along)
        factor = float(group["lr"]) / float(group["initial_lr"])
        for p in live:
            p.copy_(p.double() - self._alpha(group, p) * factor * directions[p])
        if jump and not scheduled:  # an early close takes effect from the next step
            self._close_window(group, live, max_units, jump, cut, weights, moving, along)
        group["step"] += 1

    def _alpha(self, group, p) -> float:
        return group["alpha"] if group["scope"] == "group" else self.state[p]["alpha"]

    def _close_window(self, group, live, max_units, jump, cut, weights=None, moving=False, along=None):
        """α ← α·(1 + r) per scope (at most ``cut`` after a jump), the next window's length, P ← A, A ← 0.

        ``weights``: Σ‖w‖² before this step's move when the blow-up guard watches. Its growth
        test (where the steps are ``moving``): consecutive windows disagree (⟨A, P⟩ < 0),
        ‖A‖² per unit exceeds the last window's, and Σ‖w‖² has grown more than ``GROWTH``
        times since the last closing — iterates thrown outward, a blow-up too slow for the
        ‖A‖² test — so every α's factor is at most 1/(1 + √q), q that growth, and the next
        window is one unit long.

        ``along``: Σ⟨A, w⟩ at the same point. Its decay test: where ‖A - λ·n·w‖ <= ``DECAY_SHARE``·‖A‖
        (n the window's steps; the window mostly weight decay's pull: the data term is silent)
        no α grows past max(α, peak); elsewhere the peak becomes the largest α this window moved with.
        """
        dot = _sum_of(self.state, live, "window_sum", "prev_window_sum")
        sq = _sum_of(self.state, live, "window_sum", "window_sum")
        ceiling = math.inf
        if weights is not None:
            w0, _ = window_schedule(group["window"], group["max_window"])
            sums_u = group["statistic"] == "gradient" or group["momentum"] == 0  # A's decay part is λ·Σw
            decay = group["weight_decay"] * group["units_done"] * w0 if sums_u else 0.0  # λ·n
            if decay > 0 and sq > 0 and sq - 2 * decay * along + decay ** 2 * weights <= DECAY_SHARE ** 2 * sq:
                ceiling = group["peak"]
            else:
                group["peak"] = max([group["peak"]] + [self._alpha(group, p) for p in live])
            rising = sq / group["units_done"] > group["energy"][0]
            if moving and group["weights"] > 0 and dot < 0 and rising and weights > GROWTH * group["weights"]:
                jump, cut = True, min(cut, 1.0 / (1.0 + math.sqrt(weights / group["weights"])))
            group["weights"] = weights
        large = abs(newton_factor(dot, sq, group["bound"]) - 1.0) >= group["window_reset"]
        group["units"] = 1 if (large or jump) else min(min(group["units"], max_units) + 1, max_units)
        group["energy"] = [sq / group["units_done"], group["energy"][0]]
        group["units_done"] = 0
        scopes = [live] if group["scope"] == "group" else [[p] for p in live]
        for tensors in scopes:
            dot = _sum_of(self.state, tensors, "window_sum", "prev_window_sum")
            sq = _sum_of(self.state, tensors, "window_sum", "window_sum")
            holder = group if group["scope"] == "group" else self.state[tensors[0]]
            holder["alpha"] = min(next_alpha(holder["alpha"], dot, sq, group["bound"], cut),
                                  max(holder["alpha"], ceiling))
        for p in live:
            st = self.state[p]
            st["prev_window_sum"] = st["window_sum"]
            st["window_sum"] = torch.zeros_like(st["window_sum"])


class ReferenceTLRAdamW(Optimizer):
    """TLR for AdamW (docs/adamw.md), one tensor at a time, in float64; fixed windows, or TLR's
    adaptive window (``window="auto"``, ``max_window``, ``window_reset``: ReferenceTLR's rule)
    with the jump test of its blow-up guard (``blowup_ratio``; None: off): at a unit's end where
    ‖R‖² per unit of the window so far exceeds ``blowup_ratio`` times the larger of the last two
    closed windows', the window closes now (α first, then the move), α's factor is at most
    1/(1 + √jump) and the next window is one unit long. (Not TLR's growth and decay tests, nor
    its MOVE_FLOOR: docs/adamw.md.)

    The weights move as ``torch.optim.AdamW``'s, by α·d with d = p·m̂ + λ·w, p = 1/(√v̂ + ε)
    (α times lr / initial_lr under a schedule). α is trained by SPEC's Newton step on window
    sums of the statistic:

    - ``"gradient"`` (default): u = √p·σg + λ·w/√p, SPEC's u in the coordinates w = √p·y in
      which AdamW is SGD with momentum: no momentum tail is shared between windows;
    - ``"direction"``: u = d, the directions taken (the momentum-biased pairing, for comparison).

    ``group["alpha"]`` (scope "group") and ``state[p]["alpha"]`` (scope "tensor") are Python
    floats rounded to float32 after each update; m, v and the window sums are float64.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, bound=DEFAULT_ADAMW_BOUND, window="auto", scope="group", statistic="gradient",
                 max_window=None, window_reset=DEFAULT_WINDOW_RESET, blowup_ratio=DEFAULT_BLOWUP_RATIO):
        check_adamw_arguments(lr, betas, eps, weight_decay, amsgrad, maximize, bound, window, scope, max_window,
                              window_reset, blowup_ratio)
        if statistic not in ("gradient", "direction"):
            raise ValueError(f"Invalid statistic: {statistic!r} (expected 'gradient' or 'direction')")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, bound=bound, window=window, scope=scope, statistic=statistic,
                        max_window=max_window, window_reset=window_reset, blowup_ratio=blowup_ratio)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["alpha"] = _f32(float(group["lr"]))
        group.setdefault("initial_lr", float(group["lr"]))
        group.setdefault("step", 0)
        group["units_done"], group["units"] = 0, 1  # the adaptive window so far and its length, in units of W0 steps
        group["energy"] = [0.0, 0.0]  # ‖R‖² per unit of the last two closed adaptive windows (the guard's reference)

    def _preconditioner(self, vhat, eps):
        """p = 1/(√v̂ + ε): AdamW's. (The reduction test replaces it by 1 to get SPEC back.)"""
        return 1.0 / (vhat.sqrt() + eps)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group):
        (beta1, beta2), eps, lam = group["betas"], group["eps"], group["weight_decay"]
        live = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
        directions = {}
        for p in live:
            st = self.state[p]
            w = p.detach().double()
            g = p.grad.detach().double()
            g = -g if group["maximize"] else g
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(w), torch.zeros_like(w)
                if group["amsgrad"]:
                    st["max_exp_avg_sq"] = torch.zeros_like(w)
                st["window_sum"], st["prev_window_sum"] = torch.zeros_like(w), torch.zeros_like(w)
                if group["scope"] == "tensor":
                    st["alpha"] = group["alpha"]
            elif group["amsgrad"] and "max_exp_avg_sq" not in st:  # amsgrad turned on mid-run: max v starts at v
                st["max_exp_avg_sq"] = st["exp_avg_sq"].clone()
            st["step"] += 1
            t = st["step"]
            st["exp_avg"] = beta1 * st["exp_avg"] + (1 - beta1) * g
            st["exp_avg_sq"] = beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g
            v = st["exp_avg_sq"]
            if group["amsgrad"]:
                st["max_exp_avg_sq"] = torch.maximum(st["max_exp_avg_sq"], v)
                v = st["max_exp_avg_sq"]
            precond = self._preconditioner(v / (1 - beta2 ** t), eps)
            d = precond * (st["exp_avg"] / (1 - beta1 ** t))
            if lam != 0:  # λ = 0 means no term (0·NaN weights would be NaN)
                d = d + lam * w
            if group["statistic"] == "gradient":
                root = precond.sqrt()
                u = root * g + lam * w / root if lam != 0 else root * g
            else:
                u = d
            st["window_sum"] = st["window_sum"] + u
            directions[p] = d

        # The window: k units of W0 steps (k = 1 always for a fixed window); the group's Newton
        # step at a closing sets the next k, as ReferenceTLR's adaptive window; the jump test of
        # its blow-up guard closes it early (this class's docstring)
        w0, max_units = window_schedule(group["window"], group["max_window"])
        closes = jump = False
        cut = math.inf
        if live and (group["step"] + 1) % w0 == 0:  # a step with no gradient leaves the window as it is
            group["units_done"] += 1
            closes = group["units_done"] >= min(group["units"], max_units)
            if max_units > 1 and group["blowup_ratio"] is not None:
                energy = _sum_of(self.state, live, "window_sum", "window_sum") / group["units_done"]
                reference = max(group["energy"])
                jump = reference > 0 and energy > group["blowup_ratio"] * reference
                if jump:
                    cut = 1.0 / (1.0 + math.sqrt(energy / reference))
        if closes or jump:  # α first, then the move (Algorithm 2's order)
            dot = _sum_of(self.state, live, "window_sum", "prev_window_sum")
            sq = _sum_of(self.state, live, "window_sum", "window_sum")
            large = abs(newton_factor(dot, sq, group["bound"]) - 1.0) >= group["window_reset"]
            group["units"] = 1 if (large or jump) else min(min(group["units"], max_units) + 1, max_units)
            # (a fixed window keeps no references: an adaptive one chosen later starts its guard afresh)
            group["energy"] = [sq / group["units_done"], group["energy"][0]] if max_units > 1 else [0.0, 0.0]
            group["units_done"] = 0
            scopes = [live] if group["scope"] == "group" else [[p] for p in live]
            for tensors in scopes:
                holder = group if group["scope"] == "group" else self.state[tensors[0]]
                holder["alpha"] = next_alpha(holder["alpha"], _sum_of(self.state, tensors, "window_sum", "prev_window_sum"),
                                             _sum_of(self.state, tensors, "window_sum", "window_sum"), group["bound"], cut)
            for p in live:
                st = self.state[p]
                st["prev_window_sum"], st["window_sum"] = st["window_sum"], torch.zeros_like(st["window_sum"])
        factor = float(group["lr"]) / float(group["initial_lr"])
        for p in live:
            alpha = group["alpha"] if group["scope"] == "group" else self.state[p]["alpha"]
            p.copy_(p.double() - alpha * factor * directions[p])
        group["step"] += 1


def _sum_of(state, params, a, b) -> float:
    """Σ over ``params`` of ⟨state[p][a], state[p][b]⟩, in float64."""
    return sum(float((state[p][a] * state[p][b]).sum()) for p in params)


def _sgd_direction(state, d, group):
    """torch SGD's direction for the gradient d (weight decay already in): momentum, nesterov."""
    if group["momentum"] == 0:
        return d
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = d.clone()
    else:
        state["momentum_buffer"].mul_(group["momentum"]).add_(d, alpha=1 - group["dampening"])
    b = state["momentum_buffer"]
    return d + group["momentum"] * b if group["nesterov"] else b.clone()


class _MetaRateSGD(Optimizer):
    """torch SGD's direction with α adapted at a fixed meta-rate η: the base of both baselines."""

    def __init__(self, params, lr, momentum, dampening, weight_decay, nesterov, *, meta_lr):
        check_hyperparameters(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                              nesterov=nesterov, bound=1.0, window=1, scope="group", statistic="gradient",
                              maximize=False)
        if not (math.isfinite(meta_lr) and meta_lr >= 0):
            raise ValueError(f"Invalid meta_lr: {meta_lr}")
        super().__init__(params, dict(lr=float(lr), momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, meta_lr=meta_lr))


class NaiveTLR(_MetaRateSGD):
    """The paper's Algorithm 1: α ← α - η·∂L_α/∂α by a second forward–backward pass.

    Each ``step(closure)`` evaluates the loss and gradient at w (g), then at the trial
    point w - α·d (h), where d is the SGD direction (weight decay and momentum as in
    torch's SGD); ∂L_α/∂α = -⟨h, d⟩, so α ← α + η·⟨h, d⟩; then w ← w - α·d with the
    new α. Needs a closure that zeroes the gradients, runs forward and backward and
    returns the loss. Two passes per step; α is one Python float per group.
    """

    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 meta_lr=1e-3):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, meta_lr=meta_lr)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("NaiveTLR needs a closure: it evaluates the loss a second time at w - α·d")
        with torch.enable_grad():
            loss = closure()
        saved = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = _sgd_direction(self.state[p], p.grad + group["weight_decay"] * p, group)
                saved.append((group, p, p.detach().clone(), d))
                p.sub_(group["lr"] * d)
        with torch.enable_grad():
            closure()  # h = ∇L(w - α·d)
        hd = {}
        for group, p, _, d in saved:
            if p.grad is not None:
                hd[id(group)] = hd.get(id(group), 0.0) + float((p.grad * d).sum())
        for group in self.param_groups:
            new = group["lr"] + group["meta_lr"] * hd.get(id(group), 0.0)
            if math.isfinite(new):
                group["lr"] = new
        for group, p, w, d in saved:
            p.copy_(w - group["lr"] * d)
        return loss


class HypergradientSGD(_MetaRateSGD):
    """Fixed meta-rate rule (Appendix D.4; Baydin et al., 2018): α ← max(0, α + η·⟨g_t, g_{t-1}⟩).

    g is the gradient of the regularised loss, g + λ·w, summed over the group; then
    w moves along the SGD direction (momentum as in torch's SGD) with the new α.
    """

    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 meta_lr=1e-4):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, meta_lr=meta_lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            grads = {p: p.grad + group["weight_decay"] * p for p in live}
            dot = 0.0
            for p in live:
                st = self.state[p]
                if "prev_grad" in st:
                    dot += float((grads[p] * st["prev_grad"]).sum())
                st["prev_grad"] = grads[p].clone()
            new = max(0.0, group["lr"] + group["meta_lr"] * dot)
            if math.isfinite(new):
                group["lr"] = new
            for p in live:
                p.sub_(group["lr"] * _sgd_direction(self.state[p], grads[p], group))
        return loss
