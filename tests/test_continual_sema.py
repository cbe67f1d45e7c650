"""SEMA: residual-stream mixture, linear descriptors and their statistics, the per-sample |z| expansion rule,
router rows frozen per adapter, expansion on a shifted task and not on a repeated one, the layer-by-layer order
through the method's phase hooks."""

import torch

from datamodules.digits import load_digits_tensors
from models.adapters.sema import RepresentationDescriptor, SEMALayer, expansion_decisions
from models.continual.base import TaskContext
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
    for row in layer.router:
        torch.nn.init.normal_(row.weight)
    h = torch.randn(3, 5, 8)
    logits = torch.cat([h.mean(1) @ row.weight.t() + row.bias for row in layer.router], -1)
    w = logits.softmax(-1)
    ref = w[:, 0, None, None] * layer.adapters[0](h) + w[:, 1, None, None] * layer.adapters[1](h)
    torch.testing.assert_close(layer(h), ref)
    assert layer.created_task == [0, 1] and len(layer.router) == 2


def test_adapters_read_the_residual_stream_beside_the_mlp():
    model = _model()
    block = model.backbone.blocks[1]
    layer = model.method.layers[1]
    torch.nn.init.normal_(layer.adapters[0].up.weight)
    x = torch.randn(2, 5, 32)
    attn_out = x + block.attn(block.norm1(x))
    ref = attn_out + block.mlp.mlp(block.mlp.norm(attn_out)) + layer.adapters[0](attn_out)
    model.eval()
    torch.testing.assert_close(block(x), ref)


def test_descriptor_is_linear_on_token_averaged_features():
    d = RepresentationDescriptor(6, hidden=3)
    f = torch.randn(4, 6)
    W = d.decoder.weight @ d.encoder.weight
    b = d.decoder.weight @ d.encoder.bias + d.decoder.bias
    torch.testing.assert_close(d.sample_errors(f), (f @ W.t() + b - f).square().mean(-1))
    d.record(torch.tensor([1.0, 3.0]))
    errors = d.sample_errors(f)
    mean, std = 2.0, torch.tensor([1.0, 3.0]).std().item()
    assert abs(d.zscore(f) - float(((errors - mean).abs() / std).mean())) < 1e-5


def test_descriptor_ring_buffer_statistics():
    d = RepresentationDescriptor(4, hidden=3, buffer_size=5)
    d.record(torch.tensor([1.0, 2.0, 3.0]))
    d.record(torch.tensor([4.0, 5.0, 6.0, 7.0]))  # wraps: keeps the last five
    mean, std = d.stats()
    assert sorted(d.errors.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert abs(mean - 5.0) < 1e-6 and abs(std - torch.tensor([3.0, 4, 5, 6, 7]).std().item()) < 1e-6


def test_expansion_rule():
    # per batch, the smallest z over the descriptors; expand when any batch's exceeds the threshold
    assert expansion_decisions([[3.0, 2.5], [2.8, 4.0]], 2.0) == (True, 2.8)
    assert expansion_decisions([[3.0, 0.5], [2.8, 4.0]], 2.0) == (True, 2.8)  # batch 1 is unusual for both
    assert expansion_decisions([[3.0, 0.5], [1.0, 4.0]], 2.0) == (False, 1.0)  # each batch fits one descriptor


def test_expands_on_out_of_distribution_task_not_on_a_repeated_one():
    model = _model()
    x, _ = load_digits_tensors(16)
    seen = x[:192]
    model.set_trainable(0)
    errors = model.method.fit_descriptors(_batches(seen), task=0, epochs=30, lr=1e-2,
                                        generator=torch.Generator().manual_seed(0))
    assert set(errors) == {0, 1, 2} and all(int(d.count) == 192 for d in model.method.layers[2].descriptors)
    assert model.method.layout() == {0: [0], 1: [0], 2: [0]}

    repeated = model.method.expand(1, _batches(x[:192]), threshold=2.0)
    assert set(repeated) == {1, 2} and not any(e for _, e in repeated.values())
    assert all(z < 2.0 for z, _ in repeated.values())
    assert model.method.layout() == {0: [0], 1: [0], 2: [0]}
    shifted = model.method.expand(1, _batches(-3.0 * x[192:384] + 1.5), threshold=2.0)
    assert all(e and z > 2.0 for z, e in shifted.values())
    assert model.method.layout() == {0: [0], 1: [0, 1], 2: [0, 1]}  # block 0 is not an expansion layer

    groups = model.set_trainable(1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    new, old = model.method.layers[2].adapters[1], model.method.layers[2].adapters[0]
    assert all(id(p) in trainable for p in new.parameters())
    assert not any(id(p) in trainable for p in old.parameters())
    assert not any(id(p) in trainable for p in model.method.layers[2].descriptors[0].parameters())
    assert all(id(p) in trainable for p in model.method.layers[2].router[1].parameters())  # only the new router row
    assert not any(id(p) in trainable for p in model.method.layers[2].router[0].parameters())
    assert groups["descriptors"] and not model.method.layers[0].adapters[0].down.weight.requires_grad
    assert not any(id(p) in {id(q) for q in groups["head"] + groups["fast"]} for p in groups["descriptors"])

    # a fresh model rebuilds the layout before loading the state dict (checkpoint resume)
    fresh = _model()
    fresh.method.restore_layout({str(k): v for k, v in model.method.layout().items()})
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


_FITTED: list = []


def _gen() -> torch.Generator:
    """New adapters' initialisation from a fixed generator (not the global random state)."""
    return torch.Generator().manual_seed(5)


def _fitted_model_and_shifted_batches() -> tuple[ContinualViT, list[torch.Tensor]]:
    """A model whose task-0 descriptors are fitted (built once, copied per call) and a shifted task's batches."""
    import copy

    x, _ = load_digits_tensors(16)
    if not _FITTED:
        model = _model()
        model.set_trainable(0)
        model.method.fit_descriptors(_batches(x[:128]), task=0, epochs=10, lr=1e-2,
                                   generator=torch.Generator().manual_seed(0))
        _FITTED.append(model)
    return copy.deepcopy(_FITTED[0]), _batches(-3.0 * x[192:320] + 1.5)


def _ctx(model: ContinualViT, shifted: list[torch.Tensor], phase: int, logged: dict) -> TaskContext:
    """Task 1's context: its training images are ``shifted``; logged scalars land in ``logged``."""
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in shifted]
    return TaskContext(model, 1, lambda split, size, shuffle: data, phase=phase, steps=3, log=logged.update)


def _stand_in_training(model: ContinualViT, layer: int) -> None:
    """Stands in for a phase's training: a deterministic non-zero up-projection of ``layer``'s task-1 adapter."""
    with torch.no_grad():
        up = model.method.layers[layer].adapters[1].up
        up.weight.copy_(0.01 * torch.randn(up.weight.shape, generator=torch.Generator().manual_seed(layer)))


def _layerwise(model: ContinualViT, shifted: list[torch.Tensor], threshold: float, events: list | None = None
               ) -> tuple[dict[int, tuple[float, bool]], list[bool]]:
    """Task 1 layer by layer through SEMA's task and phase hooks (what the LightningModule calls around each
    phase's epochs), a stand-in for each trained phase; returns ``{layer: (score, expanded)}`` and which phases
    trained."""
    method = model.method
    method.order, method.threshold, method.descriptor_epochs = "layerwise", threshold, 2
    logged: dict[str, float] = {}
    method.on_task_start(_ctx(model, shifted, 0, logged))
    trains = []
    for phase in range(method.phases(1)):
        trains.append(method.on_phase_start(_ctx(model, shifted, phase, logged)))
        layer = method.expansion_layers[phase]
        if trains[-1] and method.open_adapters(layer, 1):
            if events is not None:
                events.append(("train", layer))
            _stand_in_training(model, layer)
        if phase < method.phases(1) - 1:
            method.on_phase_end(_ctx(model, shifted, phase, logged))
    expanded = {e["layer"] for e in method.expansions if e["task"] == 1}
    return {i: (logged[f"sema/z_layer{i}"], i in expanded) for i in method.expansion_layers}, trains


def test_layerwise_order_trains_a_layer_before_testing_the_next():
    """SEMA-CL's order: layer 1 expands, its new adapter trains in its own phase and its descriptor is fitted
    (closing it), and only then is layer 2 tested, on features that pass through the trained adapter; the last
    expansion stays open for the task's regular epochs (the last phase). The joint order tests layer 2 on the
    unexpanded model at the task start, in one phase."""
    import copy

    model, shifted = _fitted_model_and_shifted_batches()
    joint = copy.deepcopy(model)
    events: list[tuple[str, int]] = []
    zscores = model.method.zscores

    def spy_zscores(batches, layers=None):
        events.append(("test", *layers))
        return zscores(batches, layers)

    model.method.zscores = spy_zscores
    assert model.method.phases(0) == 1 and joint.method.phases(1) == 1
    layerwise, trains = _layerwise(model, shifted, threshold=2.0, events=events)
    del model.method.zscores
    assert model.method.phases(1) == 2 and trains == [True, True]
    joint_out = joint.method.expand(1, shifted, threshold=2.0, generator=_gen())

    assert events == [("test", 1), ("train", 1), ("test", 2), ("train", 2)]  # layer 1 trained before layer 2's test
    assert all(e for _, e in layerwise.values()) and all(e for _, e in joint_out.values())
    assert layerwise[1][0] == joint_out[1][0]  # the same model up to layer 1's test
    assert abs(layerwise[2][0] - joint_out[2][0]) > 1e-3  # layer 2 saw the trained layer-1 adapter
    # layer 1's new adapter is closed (frozen from now on); layer 2's is open and trains in the task's epochs
    assert model.method.closed == {(1, 1)} and joint.method.closed == set()
    assert model.method.trained_between == [{"task": 1, "layer": 1, "steps": 3}]
    assert model.method.open_adapters(1, 1) == [] and model.method.open_adapters(2, 1) == [1]
    groups = model.set_trainable(1)
    trainable = {id(p) for p in groups["fast"]}
    assert not any(id(p) in trainable for p in model.method.layers[1].adapters[1].parameters())
    assert all(id(p) in trainable for p in model.method.layers[2].adapters[1].parameters())
    assert not any(p.requires_grad for p in model.method.layers[1].adapters[1].parameters())
    # joint: both new adapters open, and the descriptor phase at the task end fits both
    assert joint.method.open_adapters(1, 1) == [1] and joint.method.open_adapters(2, 1) == [1]
    assert set(joint.method.fit_descriptors(shifted, task=1, epochs=1)) == {1, 2}
    assert set(model.method.fit_descriptors(shifted, task=1, epochs=1)) == {2}  # layer 1's was fitted already
    # a checkpoint's state rebuilds the closed adapter (resume between two phases)
    fresh = _model()
    fresh.method.load_state(model.method.state())
    assert fresh.method.closed == {(1, 1)} and fresh.method.layout() == model.method.layout()


def test_layerwise_phase_of_a_layer_that_does_not_expand_is_skipped():
    """A layer that does not expand leaves its phase without training (the LightningModule skips its epochs); the
    last phase (the task's regular epochs) trains anyway; nothing is closed or recorded as trained between."""
    model, shifted = _fitted_model_and_shifted_batches()
    layout = model.method.layout()
    decisions, trains = _layerwise(model, shifted, threshold=1000.0)
    assert trains == [False, True] and not any(e for _, e in decisions.values())
    assert model.method.layout() == layout and model.method.closed == set() and model.method.trained_between == []


def test_layerwise_order_changes_the_deeper_decision():
    """With a threshold between the two orders' layer-2 scores (and below layer 1's), the order alone decides
    whether layer 2 expands."""
    import copy

    model, shifted = _fitted_model_and_shifted_batches()
    probes = copy.deepcopy(model), copy.deepcopy(model)
    z_joint = probes[0].method.expand(1, shifted, threshold=-1.0, generator=_gen())
    z_layer, _ = _layerwise(probes[1], shifted, threshold=-1.0)
    assert z_joint[1][0] == z_layer[1][0]
    threshold = (z_joint[2][0] + z_layer[2][0]) / 2
    assert threshold < z_joint[1][0]
    joint = copy.deepcopy(model)
    j = joint.method.expand(1, shifted, threshold=threshold, generator=_gen())
    lw, trains = _layerwise(model, shifted, threshold=threshold)
    assert j[1][1] and lw[1][1] and trains == [True, True]  # layer 1 expands in both orders
    assert j[2][1] != lw[2][1]  # layer 2's decision depends on the order
