"""Bad input: a clear error naming the value, raised before anything is modified."""

import copy
import math
import re

import pytest
import torch

from tlr_triton import TLR
from tlr_triton.reference import HypergradientSGD, NaiveTLR, ReferenceTLR


def params():
    return [torch.randn(3, requires_grad=True)]


BAD = [
    (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    (dict(lr=math.nan), ValueError, "Invalid learning rate: nan"),
    (dict(lr=math.inf), ValueError, "Invalid learning rate: inf"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(-1.0)), ValueError, "Invalid learning rate: -1.0"),
    (dict(lr="0.1"), TypeError, "Invalid learning rate: '0.1'"),
    # α is trained by multiplying it: from 0 (or a value that is 0 in float32) it would never move
    (dict(lr=0.0), ValueError, "Invalid learning rate: 0.0 (lr is the initial α"),
    (dict(lr=1e-50), ValueError, "Invalid learning rate: 1e-50"),
    (dict(lr=torch.tensor(0.0)), ValueError, "Invalid learning rate: 0.0"),
    (dict(lr=None), TypeError, "Invalid learning rate: None"),
    (dict(momentum=-0.1), ValueError, "Invalid momentum value: -0.1"),
    (dict(momentum=1.0), ValueError, "Invalid momentum value: 1.0"),
    (dict(momentum=math.nan), ValueError, "Invalid momentum value: nan"),
    (dict(momentum=0.9, dampening=-0.5), ValueError, "Invalid dampening value: -0.5"),
    (dict(momentum=0.9, dampening=1.5), ValueError, "Invalid dampening value: 1.5"),
    (dict(dampening=math.inf), ValueError, "Invalid dampening value: inf"),
    (dict(weight_decay=-1e-4), ValueError, "Invalid weight_decay value: -0.0001"),
    (dict(weight_decay=math.nan), ValueError, "Invalid weight_decay value: nan"),
    (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov momentum requires"),
    (dict(bound=0.0), ValueError, "Invalid bound: 0.0"),
    (dict(bound=-1.0), ValueError, "Invalid bound: -1.0"),
    (dict(bound=math.inf), ValueError, "Invalid bound: inf"),
    (dict(window=0), ValueError, "Invalid window: 0"),
    (dict(window=-3), ValueError, "Invalid window: -3"),
    (dict(window=2.5), TypeError, "Invalid window: 2.5"),
    (dict(window=10.0), TypeError, "Invalid window: 10.0"),
    (dict(window=True), TypeError, "Invalid window: True"),
    (dict(window="adaptive"), TypeError, "Invalid window: 'adaptive'"),
    (dict(max_window=2), ValueError, "Invalid max_window: 2 (expected >= the window, 3)"),
    (dict(window=8, max_window=4), ValueError, "Invalid max_window: 4"),
    (dict(max_window=12.0), TypeError, "Invalid max_window: 12.0"),
    (dict(window_reset=-0.1), ValueError, "Invalid window_reset: -0.1"),
    (dict(window_reset=math.nan), ValueError, "Invalid window_reset: nan"),
    (dict(scope="layer"), ValueError, "Invalid scope: 'layer'"),
    (dict(statistic="displacement"), ValueError, "Invalid statistic: 'displacement'"),
    (dict(backend="cuda"), ValueError, "Invalid backend: 'cuda'"),
    (dict(maximize="yes"), TypeError, "Invalid maximize: 'yes'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_hyperparameter(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        TLR(params(), **kwargs)
    # validated before super().__init__: even without parameters the hyper-parameter error comes first
    with pytest.raises(error, match=re.escape(message)):
        TLR(None, **kwargs)
    if "backend" not in kwargs:  # the reference validates the same way
        with pytest.raises(error, match=re.escape(message)):
            ReferenceTLR(params(), **kwargs)


@pytest.mark.parametrize("kwargs,error,message", BAD[:20], ids=[str(b[0]) for b in BAD[:20]])
def test_bad_group_override(kwargs, error, message):
    """A param group's own value is validated too, and a failed add_param_group adds nothing."""
    opt = TLR(params())
    group = {"params": params(), **kwargs}
    before = dict(group)
    with pytest.raises(error):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1
    assert group == before


def test_bad_value_set_on_group_after_construction_fails_at_step_before_any_change():
    a, b = params(), params()
    opt = TLR([{"params": a}, {"params": b}], lr=0.1)
    for p in a + b:
        p.grad = torch.ones_like(p)
    opt.param_groups[1]["window"] = 0
    before = [p.detach().clone() for p in a + b]
    with pytest.raises(ValueError, match="Invalid window: 0"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a + b, before))
    assert len(opt.state) == 0 and opt.param_groups[0]["step"] == 0


def test_params_errors():
    with pytest.raises(TypeError, match="iterable of Tensors"):
        TLR(torch.randn(3, requires_grad=True))
    with pytest.raises(ValueError, match="empty parameter list"):
        TLR([])
    with pytest.raises(TypeError, match="not a set"):
        TLR({torch.randn(3, requires_grad=True)})
    with pytest.raises(TypeError, match="ordered collections"):
        TLR([{"params": {torch.randn(3, requires_grad=True)}}])
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        TLR([torch.randn(3, requires_grad=True), 3.0])
    with pytest.raises(ValueError, match="non-leaf"):
        TLR([torch.randn(3, requires_grad=True) * 2])
    p = torch.randn(3, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        TLR([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        TLR([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.int32, torch.bool])
def test_non_real_float_params_rejected(dtype):
    p = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=f"parameter 0 of the new group has dtype {dtype}"):
        TLR([p])


def test_sparse_gradient_rejected_before_any_change():
    dense, emb = torch.randn(3, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    opt = TLR([dense, emb], lr=0.1)
    dense.grad = torch.ones(3)
    emb.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (5, 2), check_invariants=True)
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(parameter 1 of group 0\)"):
        opt.step()
    assert torch.equal(dense, before) and len(opt.state) == 0


def test_group_scope_on_several_devices_rejected():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="several devices"):
        TLR([a, b])
    TLR([a, b], scope="tensor")  # one α per tensor: fine
    TLR([{"params": [a]}, {"params": [b]}])  # one group per device: fine


def test_baselines_validate():
    with pytest.raises(ValueError, match="Invalid meta_lr"):
        NaiveTLR(params(), meta_lr=-1.0)
    with pytest.raises(ValueError, match="Invalid meta_lr"):
        HypergradientSGD(params(), meta_lr=math.nan)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        HypergradientSGD(params(), lr=-1.0)
    with pytest.raises(RuntimeError, match="needs a closure"):
        NaiveTLR(params()).step()


def test_alpha_set_out_of_range_by_hand_fails_at_step_before_any_change():
    """A negative α would be gradient ascent, 0 would stop training for good (read on the CPU, where it is free)."""
    a = params()
    opt = TLR(a, lr=0.1)
    a[0].grad = torch.ones(3)
    before = a[0].detach().clone()
    for bad in (-0.1, 0.0):
        opt.param_groups[0]["alpha"].fill_(bad)
        with pytest.raises(ValueError, match=re.escape(f"Invalid α in group 0: {bad}")):
            opt.step()
        assert torch.equal(a[0], before)


def test_state_dict_of_another_optimizer_is_refused_before_any_change():
    a = params()
    adam = torch.optim.Adam(a, lr=1e-3)
    a[0].grad = torch.ones(3)
    adam.step()
    opt = TLR(a, lr=0.1, momentum=0.9)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="not a TLR \\(or SGD\\) state_dict: param group 0 has no 'momentum'"):
        opt.load_state_dict(adam.state_dict())
    after = opt.state_dict()
    assert after["param_groups"][0]["step"] == before["param_groups"][0]["step"]
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items())
    opt.step()  # still usable
