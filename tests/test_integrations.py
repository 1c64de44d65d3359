"""TLR in the training stack: LR schedulers, α restart and history, AMP (CPU autocast), torch.compile."""

import copy

import pytest
import torch
from torch import nn

from helpers import assert_matches_reference, make_params, set_grads, twin
from tlr_triton import TLR, TLRAdamW
from tlr_triton.alpha_tools import AlphaHistory, AlphaRestart, alphas
from tlr_triton.reference import ReferenceTLR, ReferenceTLRAdamW


def run(opts_and_params, steps, start=0, each=None):
    for t in range(start, start + steps):
        set_grads([ps for _, ps in opts_and_params], t)
        for opt, _ in opts_and_params:
            opt.step()
        if each:
            each(t)


# ----------------------------------------------------------------------------- schedulers
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=14),
    "warmup then cosine (SequentialLR)": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=4),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8)], milestones=[4]),
}


@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_scheduler_multiplies_the_trained_alpha(name, scope):
    """Any torch scheduler (chainable or closed-form) writes group["lr"]; the step size is then
    α · lr / initial_lr while α keeps training: as the reference, with the same scheduler on it."""
    params = make_params()
    ref_params = twin(params)
    opt = TLR(params, lr=0.05, momentum=0.9, window=2, scope=scope)
    ref = ReferenceTLR(ref_params, lr=0.05, momentum=0.9, window=2, scope=scope)
    scheds = [SCHEDULERS[name](o) for o in (opt, ref)]
    lrs, alphas_seen = [], []
    for t in range(12):
        set_grads([params, ref_params], t)
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, ref_params, msg=f"{name} step {t}")
        for sched in scheds:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        alphas_seen.append(float(alphas(opt)[0]))
    assert all(isinstance(lr, float) for lr in lrs)  # what loggers read is a number
    assert len(set(lrs)) > 3  # the schedule moved ...
    assert len(set(alphas_seen)) > 3 and alphas_seen[-1] != pytest.approx(0.05)  # ... and α kept training


def test_manual_lr_drop_scales_alpha_like_a_scheduler():
    """The idiom `for g in opt.param_groups: g["lr"] *= 0.1` divides the step size by ten, α unchanged."""
    params = make_params()
    manual_params = twin(params)
    opt = TLR(params, lr=0.05, momentum=0.9, window=2)
    manual = TLR(manual_params, lr=0.05, momentum=0.9, window=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.1)

    def each(t):
        sched.step()
        if (t + 1) % 4 == 0:
            for g in manual.param_groups:
                g["lr"] *= 0.1

    run([(opt, params), (manual, manual_params)], 12, each=each)
    assert opt.param_groups[0]["lr"] == pytest.approx(manual.param_groups[0]["lr"])
    assert torch.equal(opt.param_groups[0]["alpha"], manual.param_groups[0]["alpha"])
    assert all(torch.allclose(p, q, rtol=1e-12, atol=1e-12) for p, q in zip(params, manual_params))


def test_tensor_lr_is_a_schedule_channel_on_the_device():
    """A tensor lr (for torch.compile or CUDA graphs): schedulers fill_ it; on a GPU TLR never reads it."""
    params = make_params()
    ref_params = twin(params)
    opt = TLR(params, lr=torch.tensor(0.05), momentum=0.9, window=2)
    ref = ReferenceTLR(ref_params, lr=0.05, momentum=0.9, window=2)
    for t in range(6):
        set_grads([params, ref_params], t)
        opt.step()
        ref.step()
        assert_matches_reference(opt, ref, params, ref_params, msg=f"step {t}")
        opt.param_groups[0]["lr"].mul_(0.8)
        ref.param_groups[0]["lr"] *= 0.8
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


# ----------------------------------------------------------------------------- α restart
@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_alpha_restart_restarts_only_alphas_below_the_threshold(scope, forbid_host_reads, monkeypatch):
    params = make_params()
    opt = TLR([{"params": params[:4]}, {"params": params[4:]}], lr=0.05, momentum=0.9, window=1, scope=scope)
    restart = AlphaRestart(opt, threshold=1e-3)
    run([(opt, params)], 3)
    live = alphas(opt) if scope == "group" else [opt.state[p]["alpha"] for p in params if p in opt.state]
    live[0].fill_(1e-4)   # below: restarted to the start value
    live[-1].fill_(0.02)  # above: kept
    forbid_host_reads()
    restart.step()  # no host read
    monkeypatch.undo()
    torch.testing.assert_close(live[0], torch.tensor(0.05))
    torch.testing.assert_close(live[-1], torch.tensor(0.02))
    assert int(restart.restarts) == 1


def test_alpha_restart_value_and_validation():
    params = make_params()
    opt = TLR(params, lr=0.05)
    restart = AlphaRestart(opt, threshold=0.1, value=0.3)
    restart.step()
    assert float(opt.param_groups[0]["alpha"]) == pytest.approx(0.3) and int(restart.restarts) == 1
    for bad in (dict(threshold=0.0), dict(threshold=float("nan")), dict(threshold=1e-3, value=-1.0)):
        with pytest.raises(ValueError, match="Invalid"):
            AlphaRestart(opt, **bad)


# ----------------------------------------------------------------------------- α history
@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_alpha_history_records_every_step_on_the_device(scope, forbid_host_reads, monkeypatch):
    params = make_params()
    opt = TLR(params, lr=0.05, momentum=0.9, window=1, scope=scope)
    twin_params = twin(params)
    shadow = TLR(twin_params, lr=0.05, momentum=0.9, window=1, scope=scope)
    history = AlphaHistory(opt, chunk=4)  # 10 steps: three chunks
    grads = [[torch.randn_like(p) for p in params] for _ in range(10)]
    expected = []
    for gs in grads:
        for p, q, g in zip(params, twin_params, gs):
            p.grad, q.grad = g, g.clone()
        shadow.step()
        expected.append(torch.stack([a.float() for a in alphas(shadow)]).clone())
    forbid_host_reads()
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    with pytest.raises(AssertionError):
        history.read()  # reading is the one synchronisation, and the fixture forbids it
    monkeypatch.undo()
    got = history.read()
    assert got.shape == (10, len(expected[0]))
    torch.testing.assert_close(got, torch.stack(expected))
    assert len({tuple(r.tolist()) for r in got}) > 1  # α moved during the run


def test_alpha_history_values_every_and_remove():
    params = make_params()
    opt = TLR(params, lr=0.05, momentum=0.9, window=1, scope="tensor")
    history = AlphaHistory(opt, every=2, chunk=3)
    seen = []
    for t in range(9):
        set_grads([params], t)
        opt.step()
        if t % 2 == 0:
            seen.append([float(a) for a in alphas(opt)])
    got = history.read()
    assert got.shape == (5, len(params)) and got.device.type == "cpu"
    torch.testing.assert_close(got, torch.tensor(seen))
    history.remove()
    opt.step()
    assert history.read().shape[0] == 5
    with pytest.raises(ValueError, match="Invalid every"):
        AlphaHistory(opt, every=0)


# ----------------------------------------------------------------------------- AMP
OPTIMIZERS = {"TLR": lambda ps: TLR(ps, lr=0.05, momentum=0.9, window=2),
              "TLRAdamW": lambda ps: TLRAdamW(ps, lr=0.01, weight_decay=1e-2, window=2)}


def _amp_run(skip_inf_at=None, inject_at=None, steps=8, make=OPTIMIZERS["TLR"]):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    data = torch.Generator().manual_seed(1)
    snapshots = {}
    for t in range(steps):
        x, y = torch.randn(16, 6, generator=data), torch.randint(0, 3, (16,), generator=data)
        if t == skip_inf_at:
            continue
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if t == inject_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
            snapshots["before"] = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()])
        scaler.step(opt)
        scaler.update()
        if t == inject_at:
            snapshots["after"] = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()])
    return model, opt, snapshots


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_with_cpu_autocast_skips_the_inf_step_and_matches_a_run_without_it(name):
    model, opt, snaps = _amp_run(inject_at=4, make=OPTIMIZERS[name])
    (sd0, w0), (sd1, w1) = snaps["before"], snaps["after"]
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))  # the inf step changed no weight ...
    assert sd0["param_groups"][0]["step"] == sd1["param_groups"][0]["step"]  # ... no counter ...
    assert torch.equal(sd0["param_groups"][0]["alpha"], sd1["param_groups"][0]["alpha"])  # ... no α ...
    for k in sd0["state"]:
        for key in sd0["state"][k]:
            x, y = sd0["state"][k][key], sd1["state"][k][key]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # ... no state (TLRAdamW: a host count)
    # The run matches one that never saw that batch (the scaler's scale is a power of two,
    # so scaled and unscaled gradients agree exactly).
    clean, clean_opt, _ = _amp_run(skip_inf_at=4, make=OPTIMIZERS[name])
    for p, q in zip(model.parameters(), clean.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.param_groups[0]["alpha"], clean_opt.param_groups[0]["alpha"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_model_trains_with_tlr(name):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="eager")
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses = []
    for net, store in ((compiled, losses), (eager, [])):
        opt = OPTIMIZERS[name](net.parameters())
        for _ in range(12):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            store.append(float(loss))
    assert losses[-1] < 0.95 * losses[0]
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(window=3), dict()], ids=["fixed window", "window auto"])
def test_compiled_step_does_not_recompile_at_closing_steps(cfg):
    """torch.compile(opt.step) on the PyTorch path: a few graphs while warming up, then none."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params = make_params(dtype=torch.float32)
    ref_params = twin(params)
    opt = TLR(params, lr=0.05, momentum=0.9, weight_decay=1e-2, backend="torch", **cfg)
    ref = ReferenceTLR(ref_params, lr=0.05, momentum=0.9, weight_decay=1e-2, **cfg)
    step = torch.compile(opt.step, backend="eager")
    graphs = []
    for t in range(24):
        set_grads([params, ref_params], t)
        step()
        ref.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[9], graphs  # no new graph over the last 14 steps (several closings)
    assert graphs[-1] <= 6, graphs
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.double(), q.double(), rtol=1e-5, atol=1e-5)
    assert float(opt.param_groups[0]["alpha"]) == pytest.approx(ref.param_groups[0]["alpha"], rel=1e-5)


@pytest.mark.parametrize("cfg", [dict(), dict(scope="tensor", amsgrad=True, maximize=True, window=2),
                                 dict(window=1, max_window=4)],
                         ids=["defaults", "tensor-amsgrad-maximize", "adaptive-window"])
def test_compiled_tlr_adamw_step_follows_the_reference_without_recompiling(cfg):
    """torch.compile(opt.step) of TLRAdamW: the float64 reference's weights and α over 24 steps
    (eight or more closings), and no new graph once warmed up (α and the step counter are
    tensors on the device: a closing is data, not a new trace)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params = make_params(dtype=torch.float32)
    ref_params = twin(params)
    opt = TLRAdamW(params, lr=1e-2, weight_decay=1e-2, **cfg)
    ref = ReferenceTLRAdamW(ref_params, lr=1e-2, weight_decay=1e-2, **cfg)
    step = torch.compile(opt.step, backend="eager")
    graphs = []
    for t in range(24):
        set_grads([params, ref_params], t)
        step()
        ref.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[9], graphs
    assert graphs[-1] <= 6, graphs
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.double(), q.double(), rtol=2e-5, atol=2e-5)
    if opt.param_groups[0]["scope"] == "group":
        assert float(opt.param_groups[0]["alpha"]) == pytest.approx(ref.param_groups[0]["alpha"], rel=2e-5)
        assert float(opt.param_groups[0]["alpha"]) != 1e-2  # α was trained
    else:
        trained = [(p, q) for p, q in zip(params, ref_params) if p.numel() > 0]  # empty tensors have no state
        for p, q in trained:
            assert float(opt.state[p]["alpha"]) == pytest.approx(ref.state[q]["alpha"], rel=2e-5)
        assert any(float(opt.state[p]["alpha"]) != 1e-2 for p, _ in trained)


def test_built_and_stepped_inside_a_compiled_function():
    """Dynamo drops attributes an Optimizer subclass sets before Optimizer.__init__ (torch's
    dynamo-wrapped optimizer tests build optimizers this way): TLR sets none there."""

    def build_and_step():
        p = torch.nn.Parameter(torch.ones(2, 3))
        p.grad = torch.ones_like(p)
        opt = TLR([p], lr=0.01)
        opt.step()
        return p

    out = torch.compile(build_and_step, backend="eager")()
    torch.testing.assert_close(out.detach(), torch.full((2, 3), 0.99))
