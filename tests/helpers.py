"""Shared test helpers: twin parameter sets, lockstep stepping, state comparison."""

from __future__ import annotations

import torch

from tlr_triton import TLR
from tlr_triton.functional import snapshot_to_sum
from tlr_triton.reference import ReferenceTLR

# Odd sizes on purpose: 0-dim, 1, a prime, 3-D, a zero-size tensor in between.
SHAPES = [(5, 3), (), (1,), (0,), (7,), (2, 3, 4), (0, 5), (13,)]


def make_params(shapes=SHAPES, dtype=torch.float64, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device).requires_grad_() for s in shapes]


def twin(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(param_lists, step, dtype=None, skip=(), signal=0.0, scale=1.0):
    """The same random gradient on each twin; parameters whose index is in `skip` get None.

    ``signal`` adds that multiple of a fixed direction (all ones) to the noise, so that
    consecutive windows agree (a large Newton step) instead of being independent;
    ``scale`` multiplies the whole gradient (a jump of it trips the blow-up guard).
    """
    first = param_lists[0]
    grads = [None if i in skip else scale * (torch.randn(p.shape, dtype=dtype or p.dtype) + signal)
             for i, p in enumerate(first)]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype).clone()
    return grads


def window_state(opt, p):
    """opt.state[p], with A in place of a window snapshot S (the Triton path's; ``functional.snapshot_to_sum``)."""
    st = dict(opt.state.get(p, {}))
    if "window_start" in st:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        alpha = group["alpha"] if group["scope"] == "group" else st["alpha"]
        b = st.get("momentum_buffer")
        st["window_sum"] = snapshot_to_sum(st.pop("window_start").double(), p.detach().double(),
                                           None if b is None else b.double(), alpha.double(),
                                           st.pop("window_start_form", (0.0, 1.0)))
    return st


def snapshot_atol(opt, p):
    """A recovered from a window snapshot (and P, a recovered A) carries the rounding of S and of
    w - α·κ·b, amplified by c/α: a few ulps of the largest of them, times c/α (the reconstruction's
    precision, not an error; α of this window, within a factor 1.25 of the last one's)."""
    st = opt.state[p]
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    alpha = float(group["alpha"] if group["scope"] == "group" else st["alpha"])
    kappa, c = st.get("window_start_form", (0.0, 1.0))
    b = st.get("momentum_buffer")
    size = max(float(p.detach().abs().max()), float(st["window_start"].abs().max()),
               0.0 if b is None else alpha * kappa * float(b.abs().max()))
    return 8 * torch.finfo(p.dtype).eps * size * c / alpha


def alpha_of(opt, group_index, p):
    group = opt.param_groups[group_index]
    if group["scope"] == "group":
        return float(group["alpha"])
    return float(opt.state[p]["alpha"])


def assert_matches_reference(opt, ref, params, ref_params, rtol=None, atol=None, msg="", alpha_rtol=None):
    """Parameters, every state tensor and every α of `opt` equal the reference's."""
    kw = {} if rtol is None else dict(rtol=rtol, atol=atol)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p.detach().double(), q.detach().double(), **kw, msg=lambda m: f"{msg} param {i}: {m}")
        st, rst = window_state(opt, p), dict(ref.state.get(q, {}))
        assert set(st) == set(rst), f"{msg} param {i}: state keys {sorted(st)} vs reference {sorted(rst)}"
        for key in st:
            if key == "alpha":
                continue
            key_kw = dict(kw)
            if key in ("window_sum", "prev_window_sum") and kw and "window_start" in opt.state.get(p, {}):
                key_kw["atol"] = max(kw["atol"], snapshot_atol(opt, p))
            torch.testing.assert_close(
                st[key].double(), rst[key].double(), **key_kw, msg=lambda m: f"{msg} param {i} state {key!r}: {m}"
            )
    for gi, (g, rg) in enumerate(zip(opt.param_groups, ref.param_groups)):
        assert int(g["step"]) == rg["step"]
        done, k = (int(x) for x in g["window_state"])
        assert (done, k) == (rg["units_done"], rg["units"]), f"{msg} group {gi} window state {(done, k)} vs reference"
        for p, q in zip(g["params"], rg["params"]):
            if p in opt.state and (g["scope"] == "group" or "alpha" in opt.state[p]):
                a, b = alpha_of(opt, gi, p), alpha_of(ref, gi, q)
                rel = alpha_rtol or (1e-12 if p.dtype == torch.float64 else 1e-5)
                assert abs(a - b) <= rel * abs(b), f"{msg} group {gi} alpha {a} vs reference {b}"


def lockstep(groups_spec, steps=8, dtype=torch.float64, rtol=None, atol=None, skip_at=None, signal_at=None,
             scale_at=None, after_step=None, curvature=None, alpha_rtol=None, **defaults):
    """Run TLR and ReferenceTLR side by side on the same gradients, comparing after each step.

    groups_spec: list of dicts of per-group options (each gets its own parameter list).
    ``signal_at(t)``, ``scale_at(t)``: ``set_grads``'s ``signal`` (default 0: pure noise)
    and ``scale`` (default 1) at step t.
    ``alpha_rtol``: α's relative tolerance (default 1e-12 in fp64, else 1e-5).
    ``curvature``: the gradients are ``curvature``·w + the noise (w: TLR's weights, which
    the reference's equal), a quadratic whose iterates blow up when α is too large.
    ``after_step(opt, ref)`` runs after each compared step.
    Returns (opt, ref, params, ref_params).
    """
    groups, rgroups, params, ref_params = [], [], [], []
    for spec in groups_spec:
        ps = make_params(dtype=dtype)
        qs = twin(ps)
        groups.append({"params": ps, **spec})
        rgroups.append({"params": qs, **spec})
        params += ps
        ref_params += qs
    opt = TLR(groups, **defaults)
    ref = ReferenceTLR(rgroups, **{k: v for k, v in defaults.items() if k != "backend"})
    for t in range(steps):
        skip = skip_at(t) if skip_at else ()
        grads = set_grads([params, ref_params], t, skip=skip, signal=signal_at(t) if signal_at else 0.0,
                          scale=scale_at(t) if scale_at else 1.0)
        if curvature is not None:
            for p, q, g in zip(params, ref_params, grads):
                if g is not None:
                    p.grad = q.grad = None
                    grad = (curvature * p.detach().double() + g.double()).to(p.dtype)
                    p.grad, q.grad = grad.clone(), grad.clone().to(q.dtype)
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, ref_params, rtol, atol, msg=f"step {t}:", alpha_rtol=alpha_rtol)
        if after_step:
            after_step(opt, ref)
    return opt, ref, params, ref_params
