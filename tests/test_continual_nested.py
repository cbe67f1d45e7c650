"""Nested LoRA: weight-space consolidation (truncated SVD, error measured) and the fast reset."""

import pytest
import torch
from torch import nn

from models.adapters.lora import LoRALinear
from models.adapters.nested_lora import FAST, SLOW, consolidate_layer, inject_nested_lora, nested_layers, reset_fast


def _layer(rank: int = 3, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10))
    inject_nested_lora(model, ["0"], rank=rank, lora_alpha=2.0 * rank)  # scaling 2: checks it is honoured
    layer = nested_layers(model)["0"]
    for name in (SLOW, FAST):
        with torch.no_grad():
            layer.adapters[name].lora_B.normal_()
    return layer


def test_forward_sums_base_slow_and_fast():
    layer = _layer()
    x = torch.randn(4, 12)
    s, f = layer.adapters[SLOW], layer.adapters[FAST]
    ref = layer.base(x) + 2.0 * x @ (s.lora_B @ s.lora_A).t() + 2.0 * x @ (f.lora_B @ f.lora_A).t()
    torch.testing.assert_close(layer(x), ref)


def test_consolidation_is_exact_when_the_sum_fits_the_rank():
    layer = _layer()
    with torch.no_grad():
        layer.adapters[SLOW].lora_B.zero_()  # first task: slow is still zero, the sum has rank <= r
    target = layer.adapters[SLOW].delta_weight() + 0.5 * layer.adapters[FAST].delta_weight()
    err = consolidate_layer(layer, alpha=0.5)
    assert err == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(layer.adapters[SLOW].delta_weight(), target, rtol=1e-5, atol=1e-5)


def test_consolidation_equals_weight_space_formula_up_to_the_measured_truncation():
    layer = _layer()
    s, f = layer.adapters[SLOW], layer.adapters[FAST]
    target = (s.delta_weight() + 0.7 * f.delta_weight()).detach()
    wrong = 2.0 * (s.lora_B + 0.7 * f.lora_B) @ (s.lora_A + 0.7 * f.lora_A)  # A+A, B+B: not the sum of deltas
    err = consolidate_layer(layer, alpha=0.7)
    new = s.delta_weight().detach()
    sv = torch.linalg.svdvals(target.double())
    # Eckart-Young: the best rank-3 approximation leaves exactly the tail singular values
    assert err == pytest.approx(float(sv[3:].square().sum().sqrt() / sv.square().sum().sqrt()), rel=1e-4)
    assert float(torch.linalg.matrix_norm(target - new) / torch.linalg.matrix_norm(target)) == pytest.approx(
        err, rel=1e-3
    )
    assert 0 < err < 0.9
    assert torch.linalg.matrix_rank(new) == 3
    assert float(torch.linalg.matrix_norm(wrong.detach() - target)) > 2 * float(torch.linalg.matrix_norm(new - target))
    # the returned delta is the top-3 SVD part of the target: orthogonal to the residual
    assert float((new.double() * (target.double() - new.double())).sum().abs()) < 1e-3 * float(target.square().sum())


def test_fast_reset_keeps_learning_unlike_zeroing_both():
    layer = _layer()
    before_a = layer.adapters[FAST].lora_A.clone()
    reset_fast(layer, torch.Generator().manual_seed(1))
    fast = layer.adapters[FAST]
    assert torch.count_nonzero(fast.lora_B) == 0 and torch.count_nonzero(fast.lora_A) > 0
    assert not torch.equal(fast.lora_A, before_a)
    x, y = torch.randn(64, 12), torch.randn(64, 10)
    for p in layer.parameters():
        p.requires_grad_(False)
    fast.lora_A.requires_grad_(True)
    fast.lora_B.requires_grad_(True)
    opt = torch.optim.SGD(fast.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = (layer(x) - y).square().mean()
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.9 * losses[0] and torch.count_nonzero(fast.lora_B) > 0
    # zeroing A and B instead: both gradients are exactly zero, the adapter is frozen forever
    with torch.no_grad():
        fast.lora_A.zero_()
        fast.lora_B.zero_()
    opt.zero_grad()
    (layer(x) - y).square().mean().backward()
    assert torch.count_nonzero(fast.lora_A.grad) == 0 and torch.count_nonzero(fast.lora_B.grad) == 0


def test_reset_is_reproducible_from_the_seed():
    a, b = _layer(seed=0), _layer(seed=5)
    reset_fast(a, torch.Generator().manual_seed(3))
    reset_fast(b, torch.Generator().manual_seed(3))
    assert torch.equal(a.adapters[FAST].lora_A, b.adapters[FAST].lora_A)


def test_consolidation_callback_updates_slow_resets_fast_and_its_optimizer_state():
    from types import SimpleNamespace

    from callbacks.consolidation import TaskBoundaryConsolidation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    inject_nested_lora(model, ["0", "2"], rank=2)
    layers = nested_layers(model)
    for layer in layers.values():
        with torch.no_grad():
            layer.adapters[FAST].lora_B.normal_()
    fast = [p for lora in layers.values() for p in lora.adapters[FAST].parameters()]
    slow = [p for lora in layers.values() for p in lora.adapters[SLOW].parameters()]
    opt_fast, opt_slow = torch.optim.Adam(fast), torch.optim.Adam(slow)
    model(torch.randn(3, 8)).sum().backward()
    opt_fast.step(), opt_slow.step()
    targets = {n: (lora.adapters[SLOW].delta_weight() + 0.5 * lora.adapters[FAST].delta_weight()).detach()
               for n, lora in layers.items()}
    trainer = SimpleNamespace(optimizers=[opt_fast, opt_slow], loggers=[])
    cb = TaskBoundaryConsolidation(alpha=0.5)
    cb.on_task_end(trainer, model, task=0)
    (event,) = cb.events
    errors = []
    for n, lora in layers.items():  # new slow delta = slow + 0.5 fast, up to the reported truncation
        new = lora.adapters[SLOW].delta_weight().detach()
        errors.append(float(torch.linalg.matrix_norm(new - targets[n]) / torch.linalg.matrix_norm(targets[n])))
        assert torch.count_nonzero(lora.adapters[FAST].lora_B) == 0
    assert max(errors) == pytest.approx(event["truncation_error_max"], rel=1e-3, abs=1e-6)
    assert max(errors) < 0.05  # slow moved one small Adam step: the sum is nearly rank 2
    assert len(opt_fast.state) == 0 and len(opt_slow.state) == len(slow)
    assert event["task"] == 0 and event["alpha"] == 0.5
    assert event["fast_delta_norm"] > 0 and event["slow_delta_norm"] > 0


def test_fused_forward_equals_the_sum_of_adapters_and_gradients():
    layer = _layer()
    x = torch.randn(5, 12, requires_grad=True)
    fused = layer(x)
    plain = LoRALinear.forward(layer, x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    g_fused = torch.autograd.grad(fused.square().sum(), [layer.adapters[FAST].lora_A, layer.adapters[SLOW].lora_B, x])
    g_plain = torch.autograd.grad(plain.square().sum(), [layer.adapters[FAST].lora_A, layer.adapters[SLOW].lora_B, x])
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    layer.merge()  # merged: the base weight carries both deltas, the adapters are skipped
    torch.testing.assert_close(layer(x), plain, rtol=1e-4, atol=1e-5)
