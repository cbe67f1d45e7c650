"""SEMA: mixture forward, descriptor statistics, expansion on a shifted task and not on a repeated one."""

import torch

from datamodules.digits import load_digits_tensors
from models.adapters.sema import RepresentationDescriptor, SEMALayer, expansion_decisions
from models.vision.continual_vit import ContinualViT


def _model() -> ContinualViT:
    torch.manual_seed(0)
    return ContinualViT(adapter_type="sema", img_size=16, patch_size=8, num_classes=10,
                        backbone_kwargs=dict(depth=3, embed_dim=32, num_heads=2, global_pool="avg"),
                        expansion_layers=(-2, -1), sema_descriptor_hidden=16)


def _batches(x: torch.Tensor, size: int = 32) -> list[torch.Tensor]:
    return list(x.split(size))


def test_layer_mixes_adapters_with_router_weights():
    layer = SEMALayer(8, bottleneck=4, descriptor_hidden=6)
    for a in layer.adapters:
        torch.nn.init.normal_(a.up.weight)
    layer.add_adapter(task=1)
    torch.nn.init.normal_(layer.adapters[1].up.weight)
    torch.nn.init.normal_(layer.router.weight)
    h = torch.randn(3, 5, 8)
    w = layer.router(h.mean(1)).softmax(-1)
    ref = w[:, 0, None, None] * layer.adapters[0](h) + w[:, 1, None, None] * layer.adapters[1](h)
    torch.testing.assert_close(layer(h), ref)
    assert layer.created_task == [0, 1] and layer.router.out_features == 2


def test_descriptor_ring_buffer_statistics():
    d = RepresentationDescriptor(4, hidden=3, buffer_size=5)
    d.record(torch.tensor([1.0, 2.0, 3.0]))
    d.record(torch.tensor([4.0, 5.0, 6.0, 7.0]))  # wraps: keeps the last five
    mean, std = d.stats()
    assert sorted(d.errors.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert abs(mean - 5.0) < 1e-6 and abs(std - torch.tensor([3.0, 4, 5, 6, 7]).std().item()) < 1e-6


def test_expansion_rule():
    assert expansion_decisions([[3.0, 2.5], [2.8, 4.0]], 2.0) == (True, 2.65)
    assert expansion_decisions([[3.0, 0.5], [2.8, 4.0]], 2.0)[0] is False  # one descriptor fits batch 0 well


def test_expands_on_out_of_distribution_task_not_on_a_repeated_one():
    model = _model()
    x, _ = load_digits_tensors(16)
    seen = x[:192]
    groups = model.set_trainable(0)
    opt = torch.optim.Adam(groups["descriptors"], lr=1e-2)
    model.train()
    for _ in range(8):  # train the task-0 descriptors on the seen data
        for xb in _batches(seen):
            model(xb)
            loss = model.auxiliary_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.sema_record(_batches(seen), task=0)
    assert model.sema_layout() == {0: [0], 1: [0], 2: [0]}

    repeated = model.sema_expand(1, _batches(x[:192]), threshold=2.0)
    assert set(repeated) == {1, 2} and not any(e for _, e in repeated.values())
    assert all(z < 2.0 for z, _ in repeated.values())
    assert model.sema_layout() == {0: [0], 1: [0], 2: [0]}
    shifted = model.sema_expand(1, _batches(-3.0 * x[192:384] + 1.5), threshold=2.0)
    assert all(e and z > 2.0 for z, e in shifted.values())
    assert model.sema_layout() == {0: [0], 1: [0, 1], 2: [0, 1]}  # block 0 is not an expansion layer

    groups = model.set_trainable(1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    new, old = model.sema[2].adapters[1], model.sema[2].adapters[0]
    assert all(id(p) in trainable for p in new.parameters())
    assert not any(id(p) in trainable for p in old.parameters())
    assert not any(id(p) in trainable for p in model.sema[2].descriptors[0].parameters())
    assert all(id(p) in trainable for p in model.sema[2].router.parameters())
    assert groups["descriptors"] and not model.sema[0].adapters[0].down.weight.requires_grad

    # a fresh model rebuilds the layout before loading the state dict (checkpoint resume)
    fresh = _model()
    fresh.restore_sema_layout({str(k): v for k, v in model.sema_layout().items()})
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x[:4]), model(x[:4]))


def test_bad_layer_indices_are_named():
    import pytest

    with pytest.raises(ValueError, match="expansion_layers"):
        ContinualViT(adapter_type="sema", img_size=16, patch_size=8,
                     backbone_kwargs=dict(depth=2, embed_dim=16, num_heads=2), expansion_layers=(5,))
    with pytest.raises(ValueError, match="expansion_layers"):  # no SEMA layer to expand there
        ContinualViT(adapter_type="sema", img_size=16, patch_size=8,
                     backbone_kwargs=dict(depth=2, embed_dim=16, num_heads=2), sema_layers=(0,), expansion_layers=(1,))
