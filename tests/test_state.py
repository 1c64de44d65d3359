"""state_dict / load_state_dict, checkpoint-resume, old checkpoints, copies, hooks, API details."""

import copy
import io

import pytest
import torch

from helpers import make_params, set_grads, twin
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tlr_triton import TLR

try:
    import triton as TRITON  # the interpreter (tests/conftest.py sets TRITON_INTERPRET)
except ImportError:
    TRITON = None

CONFIGS = [
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2, window=5),
    dict(lr=0.05, momentum=0.9, nesterov=True, window=4, scope="tensor", statistic="direction"),
    dict(lr=0.05, window=3, maximize=True),
    dict(lr=0.05, momentum=0.9, window=1, max_window=4, window_reset=0.02),  # adaptive: resumes inside a grown window
]


def run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        torch.manual_seed(1000 + t)  # gradients depend on the step only
        set_grads([params], t)
        opt.step()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key in sa["state"][k]:
            x, y = sa["state"][k][key], sb["state"][k][key]
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), (k, key)  # or a snapshot's form
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert ga.keys() == gb.keys()
        for key in ga:
            assert (torch.equal(ga[key], gb[key]) if isinstance(ga[key], torch.Tensor) else ga[key] == gb[key]), key


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_mid_window_is_bit_identical(cfg, dtype):
    params = make_params(dtype=dtype)
    opt = TLR(params, **cfg)
    run(opt, params, 7)  # 7 steps: mid-window for windows 3, 4 and 5

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    saved_copy = copy.deepcopy(saved)

    resumed_params = twin(params)
    resumed = TLR(resumed_params, **cfg)
    resumed.load_state_dict(saved)
    assert_same_state(opt, resumed)
    # the loaded dict is not modified, and the loaded α is not the dict's tensor
    assert saved.keys() == saved_copy.keys()
    for g, g0 in zip(saved["param_groups"], saved_copy["param_groups"]):
        assert g.keys() == g0.keys()
        assert resumed.param_groups[0]["alpha"] is not g["alpha"]
    for k in saved["state"]:
        for key in saved["state"][k]:
            assert torch.equal(saved["state"][k][key], saved_copy["state"][k][key])

    run(opt, params, 9, start=7)
    run(resumed, resumed_params, 9, start=7)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    assert_same_state(opt, resumed)


def test_state_dtypes_are_fp32_for_half_params_and_survive_loading():
    params = [torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True), torch.randn(5, dtype=torch.float16, requires_grad=True)]
    opt = TLR(params, momentum=0.9, scope="tensor", window=2)
    run(opt, params, 3)
    clone = TLR(twin(params), momentum=0.9, scope="tensor", window=2)
    clone.load_state_dict(opt.state_dict())
    for o in (opt, clone):
        for st in o.state.values():
            for key in ("momentum_buffer", "window_sum", "prev_window_sum", "alpha"):
                assert st[key].dtype == torch.float32, key
        assert o.param_groups[0]["alpha"].dtype == torch.float32 and o.param_groups[0]["alpha"].dim() == 0
    assert_same_state(opt, clone)


def test_older_state_dict_without_new_keys_still_loads():
    params = make_params()
    opt = TLR(params, momentum=0.9, window=3)
    run(opt, params, 4)
    old = opt.state_dict()
    for g in old["param_groups"]:
        for key in ("bound", "window", "scope", "statistic", "maximize", "backend", "step"):
            del g[key]
    fresh_params = twin(params)
    fresh = TLR(fresh_params, momentum=0.9, window=3)
    fresh.load_state_dict(old)
    g = fresh.param_groups[0]
    assert (g["bound"], g["window"], g["scope"], g["statistic"], g["step"]) == (0.25, fresh.defaults["window"], "group", "gradient", 0)
    run(fresh, fresh_params, 3)
    assert all(torch.isfinite(p).all() for p in fresh_params)


def test_lr_tensor_is_copied_and_behaves_like_a_float():
    lr = torch.tensor(0.05, dtype=torch.float64)
    a, b = make_params(), None
    b = twin(a)
    opt_t, opt_f = TLR(a, lr=lr, window=2), TLR(b, lr=0.05, window=2)
    for t in range(6):
        set_grads([a, b], t)
        opt_t.step()
        opt_f.step()
    assert lr.item() == 0.05  # the caller's tensor is never updated in place
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(opt_t.param_groups[0]["alpha"], opt_f.param_groups[0]["alpha"])


def test_alpha_lives_in_group_lr_or_state():
    params = make_params()
    opt = TLR([{"params": params[:4]}, {"params": params[4:], "scope": "tensor"}], lr=0.1, window=1)
    handle = opt.param_groups[0]["alpha"]
    for t in range(4):
        torch.manual_seed(t)
        g = torch.randn(())
        for p in params:
            p.grad = torch.full_like(p, float(g))
        opt.step()
    assert opt.param_groups[0]["alpha"] is handle  # updated in place: loggers holding it see the live α
    assert handle.dtype == torch.float32 and handle.dim() == 0
    assert float(handle) != pytest.approx(0.1)
    for p in params[4:]:
        if p.numel():
            assert opt.state[p]["alpha"].dim() == 0 and float(opt.state[p]["alpha"]) != pytest.approx(0.1)
    assert float(opt.param_groups[1]["alpha"]) == pytest.approx(0.1)  # scope "tensor": the starting α


def test_deepcopy_and_repr():
    params = make_params()
    opt = TLR(params, momentum=0.9)
    run(opt, params, 2)
    dup = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {"defaults", "state", "param_groups"} and public <= vars(dup).keys()
    assert_same_state(opt, dup)
    text = repr(opt)
    assert text.startswith("TLR (") and "window: auto" in text and "statistic: gradient" in text


def _pickled(opt):
    import pickle

    return pickle.loads(pickle.dumps(opt))


def _saved(opt):
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", [copy.deepcopy, _pickled, _saved], ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("cfg", CONFIGS + [dict(lr=0.05, momentum=0.9)], ids=range(len(CONFIGS) + 1))
def test_a_copy_steps_and_continues_bit_identically(how, cfg):
    params = make_params()
    opt = TLR(params, **cfg)
    run(opt, params, 4)
    dup = how(opt)
    dup_params = [p for g in dup.param_groups for p in g["params"]]
    assert all(p is not q for p, q in zip(params, dup_params))
    run(opt, params, 7, start=4)
    run(dup, dup_params, 7, start=4)
    assert all(torch.equal(p, q) for p, q in zip(params, dup_params))
    assert_same_state(opt, dup)


def test_a_copy_of_a_sharded_optimizer_refuses_to_step_alone():
    """A process group is not copied: the copy says so instead of silently using local statistics."""
    params = make_params()
    opt = TLR(params, shard_group=object())  # never used: no step is taken on the original
    dup = copy.deepcopy(opt)
    assert dup.shard_group is None
    set_grads([dup.param_groups[0]["params"]], 0)
    before = [p.detach().clone() for p in dup.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="shard_group"):
        dup.step()
    assert all(torch.equal(p, q) for p, q in zip(before, dup.param_groups[0]["params"]))
    dup.shard_group = None  # this process alone, said explicitly
    dup.step()
    plain = copy.deepcopy(TLR(make_params()))
    assert plain.shard_group is None and not plain._shard_group_lost


def test_step_hooks_and_state_dict_hooks_still_work():
    params = make_params()
    opt = TLR(params)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    h3 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    run(opt, params, 1)
    opt.state_dict()
    assert calls == ["global", "pre", "post", "sd"]
    for h in (h1, h2, h3):
        h.remove()
    run(opt, params, 1)
    assert calls == ["global", "pre", "post", "sd"]


def test_named_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = TLR(model.named_parameters(), momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model2 = copy.deepcopy(model)
    opt2 = TLR(model2.named_parameters(), momentum=0.9)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["param_names"] == sd["param_groups"][0]["param_names"]


def test_add_param_group_later_gets_its_own_alpha():
    a, b = make_params(), make_params()
    opt = TLR(a, lr=0.1)
    opt.add_param_group({"params": b, "lr": 0.2, "window": 2})
    assert opt.param_groups[1]["alpha"] is not opt.param_groups[0]["alpha"]
    assert float(opt.param_groups[1]["alpha"]) == pytest.approx(0.2) and opt.param_groups[1]["step"] == 0


def test_alpha_is_float32_whatever_the_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params = [torch.randn(3, requires_grad=True)]
        opt = TLR(params, lr=0.1, scope="tensor")
        run(opt, params, 2)
        assert opt.param_groups[0]["alpha"].dtype == torch.float32
        assert opt.state[params[0]]["alpha"].dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


class _NoPlans(TLR):
    """TLR gathering its lists afresh at every step (the step plan never reused)."""

    def step(self, closure=None):
        self._plans.clear()
        return super().step(closure)


@pytest.mark.parametrize("cfg", [dict(lr=0.05, momentum=0.9, weight_decay=1e-2),  # the default adaptive window
                                 dict(lr=0.05, momentum=0.9, window=3, scope="tensor"),
                                 pytest.param(dict(lr=0.05, momentum=0.9, weight_decay=1e-2, backend="triton"),
                                              marks=pytest.mark.skipif(TRITON is None, reason="triton not installed"))])
def test_step_plan_is_rebuilt_by_whatever_it_depends_on(cfg):
    """A step reuses the lists the previous one gathered (no _init_group) only while nothing
    they came from changed; every change below sends it back, and the run stays bit-identical
    to one that gathers afresh at every step. On the Triton path the launcher's address tables
    are keyed on the plan while it serves: a new plan means new tables, read afresh."""
    params = make_params(dtype=torch.float32)
    other = twin(params)
    opt, ref = TLR(params, **cfg), _NoPlans(other, **cfg)
    gathers = []
    original = TLR._init_group

    def counting(self, *args, **kwargs):
        gathers.append(self)
        return original(self, *args, **kwargs)

    events = {
        3: lambda o, ps: None,                                                     # nothing: the plan serves
        5: "skip",                                                                 # a gradient missing, then back
        8: lambda o, ps: o.state[ps[0]].__setitem__("momentum_buffer", torch.zeros_like(ps[0])),  # a hand edit
        10: lambda o, ps: o.load_state_dict(o.state_dict()),                       # state replaced
        12: lambda o, ps: o.param_groups[0].__setitem__("statistic", "direction"),  # hyper-parameters change
        14: lambda o, ps: o.state.__setitem__(ps[1], {}),                          # a state entry dropped
        16: lambda o, ps: o.state.pop(o.param_groups[0]["params"].pop(), None),    # the group shrinks
        18: lambda o, ps: setattr(ps[1], "data", ps[1].data.to(torch.bfloat16)),   # a dtype changes in place
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TLR, "_init_group", counting)
        for t in range(22):
            event = events.get(t)
            if callable(event):
                for o, ps in ((opt, params), (ref, other)):
                    event(o, ps)
            torch.manual_seed(1000 + t)
            set_grads([params, other], t, skip=(2,) if event == "skip" else ())
            before = sum(o is opt for o in gathers)
            opt.step()
            ref.step()
            rebuilt = sum(o is opt for o in gathers) > before
            assert rebuilt == (t == 0 or event is not None and t != 3 or events.get(t - 1) == "skip"), t
            for p, q in zip(params, other):
                assert torch.equal(p, q), t
    assert_same_state(opt, ref)


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_window_sums_live_in_two_flat_buffers_on_the_cpu_and_copies_own_theirs():
    """On the CPU the PyTorch path keeps a group's A and P as consecutive slices of two flat
    buffers (one exact reduction per unit's end instead of one per tensor); the roles swap at
    every closing. state_dict() and copies hand out window sums of their own (pickle writes
    a slice's whole buffer: one copy per tensor), and the next step lays them out again."""
    params = make_params(dtype=torch.float32)
    opt = TLR(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    run(opt, params, 5)
    live = [p for p in params if p.numel() > 0]

    def layout(o, ps):
        sums = [o.state[p]["window_sum"] for p in ps]
        prevs = [o.state[p]["prev_window_sum"] for p in ps]
        for tensors in (sums, prevs):
            assert len({_storage(t) for t in tensors}) == 1
            assert [t.storage_offset() for t in tensors] == [sum(t.numel() for t in tensors[:i])
                                                             for i in range(len(tensors))]
        assert _storage(sums[0]) != _storage(prevs[0])
        return _storage(sums[0]), _storage(prevs[0])

    a, p = layout(opt, live)
    closed = False
    for t in range(5, 30):  # a closing swaps the buffers' roles
        run(opt, params, 1, start=t)
        closed = closed or layout(opt, live) == (p, a)
    assert closed
    own = lambda t: t.untyped_storage().nbytes() == t.nbytes  # noqa: E731
    for entry in opt.state_dict()["state"].values():
        assert own(entry["window_sum"]) and own(entry["prev_window_sum"])
    import pickle

    many = [torch.randn(1000, requires_grad=True) for _ in range(20)]
    big = TLR(many, lr=0.05, momentum=0.9)
    for _ in range(2):
        for q in many:
            q.grad = torch.randn(1000)
        big.step()
    state_bytes = sum(t.nbytes for e in big.state.values() for t in e.values() if isinstance(t, torch.Tensor))
    assert len(pickle.dumps(big)) < 1.5 * state_bytes + 20_000  # one copy per tensor: 20 × the buffers
    for dup in (copy.deepcopy(opt), _pickled(opt), _saved(opt)):
        dup_live = [q for q in dup.param_groups[0]["params"] if q.numel() > 0]
        assert all(own(dup.state[q]["window_sum"]) for q in dup_live)
        for q in dup_live:
            q.grad = torch.ones_like(q)
        dup.step()
        layout(dup, dup_live)


def test_gradients_that_come_and_go_do_not_copy_the_flat_window_buffers():
    """A step without some tensor's gradient (a mixture of experts) reduces tensor by tensor
    instead of laying the buffers out again for the tensors present; when every gradient is
    back the buffers serve as before (no closing in between: a closing without a tensor swaps
    the others' buffers, and the next full step lays them out once)."""
    params = make_params(dtype=torch.float32)
    opt = TLR(params, lr=0.05, momentum=0.9, window=1000)
    live = [p for p in params if p.numel() > 0]

    def storages():
        return {_storage(opt.state[p][k]) for p in live for k in ("window_sum", "prev_window_sum")}

    run(opt, params, 1)
    first = storages()
    assert len(first) == 2
    for t in range(1, 12):
        torch.manual_seed(1000 + t)
        set_grads([params], t, skip=(2,) if t % 2 else ())
        opt.step()
        assert storages() == first, t


def test_load_state_dict_keeps_the_shard_group():
    """torch's load_state_dict ends in __setstate__, which a copy uses to forget the process
    group; loading a checkpoint into a sharded optimizer must keep summing over its group."""
    group = object()  # stands for a process group: never used by a step here
    p = torch.randn(3, requires_grad=True)
    opt = TLR([p], shard_group=group)
    opt.load_state_dict(opt.state_dict())
    assert opt.shard_group is group
