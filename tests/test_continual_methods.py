"""Continual methods and classifiers: the registry contract over every method, and each baseline's defining
property on tiny inputs (NCM = class means, RanPAC's incremental ridge = the closed-form batch solve, APER frozen
after task 0)."""

import numpy as np
import pytest
import torch

from models.continual import METHODS
from models.continual.base import method_names
from models.continual.classifiers import NCMClassifier, RidgeClassifier
from models.metrics import continual as cm
from models.vision.continual_vit import ContinualViT

TINY = dict(img_size=16, patch_size=8, num_classes=6,
            backbone_kwargs=dict(depth=2, embed_dim=16, num_heads=2, global_pool="avg"))
SETTINGS = dict(lora_r=2, nested_lora_r=2, expansion_layers=(-1,), sema_descriptor_hidden=8)


def _model(method: str, **kw) -> ContinualViT:
    torch.manual_seed(0)
    return ContinualViT(adapter_type=method, **TINY, **SETTINGS, **kw)


@pytest.mark.parametrize("method", method_names())
def test_every_method_builds_trains_its_groups_and_switches_off(method):
    """Contract of every registered method: its groups are parameters of the model and train; with its adapters
    off the backbone computes exactly what the bare pre-trained backbone computes."""
    model = _model(method)
    bare = _model("none")
    bare.backbone.load_state_dict({k: v for k, v in model.backbone.state_dict().items()
                                   if k in bare.backbone.state_dict()}, strict=False)
    groups = model.set_trainable(0)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids and p.requires_grad for ps in groups.values() for p in ps)
    with torch.no_grad():  # move every adapter away from its no-op initialisation
        for name, p in model.backbone.named_parameters():
            if model.method.is_adapter(name):
                p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(3, 3, 16, 16)
    model.eval(), bare.eval()
    with torch.no_grad(), model.adapters_off():
        off = model.features(x)
    ref = bare.features(x)
    expected = torch.cat([ref, ref], -1) if off.shape[-1] == 2 * ref.shape[-1] else ref
    torch.testing.assert_close(off, expected)
    if method != "none" and groups["fast"]:
        assert not torch.allclose(model.features(x), expected)  # the adapters do act
        assert model.method.relative_delta() > 0


def test_registry_names_the_shipped_methods():
    assert {"none", "lora", "nested_lora", "sema", "aper"} <= set(method_names()) == set(METHODS)
    with pytest.raises(ValueError, match="adapter_type must be one of"):
        _model("no_such_method")


def test_ncm_prototypes_are_the_class_means_and_classify_by_cosine():
    g = torch.Generator().manual_seed(0)
    f1, y1 = torch.randn(20, 5, generator=g), torch.arange(2).repeat(10)
    f2, y2 = torch.randn(12, 5, generator=g) + 3, 2 + torch.arange(2).repeat(6)
    ncm = NCMClassifier(5, 6)
    ncm.fit_task(f1, y1, 2)
    ncm.fit_task(f2, y2, 4)
    f, y = torch.cat([f1, f2]), torch.cat([y1, y2])
    means = torch.stack([f[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(ncm.prototypes()[:4].float(), means)
    q = torch.randn(7, 5, generator=g)
    cos = torch.nn.functional.cosine_similarity(q[:, None], means[None], dim=-1)
    torch.testing.assert_close(ncm(q), cos)
    assert ncm(q).shape == (7, 4)


def test_ridge_incremental_statistics_equal_the_batch_closed_form():
    """RanPAC: G and C accumulated task by task give exactly the batch solve (W^T H^T H W + lambda I)^-1 ...;
    with several lambdas the validation picks one of them and the weights are the solve at that lambda."""
    g = torch.Generator().manual_seed(0)
    f1, y1 = torch.randn(30, 6, generator=g), torch.arange(3).repeat(10)
    f2, y2 = torch.randn(20, 6, generator=g), 3 + torch.arange(2).repeat(10)
    inc = RidgeClassifier(6, 5, ridge_dim=40, seed=1, lambdas=(0.3,))
    inc.fit_task(f1, y1, 3)
    inc.fit_task(f2, y2, 5)
    batch = RidgeClassifier(6, 5, ridge_dim=40, seed=1, lambdas=(0.3,))
    f, y = torch.cat([f1, f2]), torch.cat([y1, y2])
    h = torch.relu(f @ batch.projection).double()
    Y = torch.nn.functional.one_hot(y, 5).double()
    W = torch.linalg.solve(h.t() @ h + 0.3 * torch.eye(40, dtype=torch.float64), h.t() @ Y)
    torch.testing.assert_close(inc.W.double(), W, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inc(f), (torch.relu(f @ inc.projection) @ W.float()), rtol=1e-4, atol=1e-4)
    picked = RidgeClassifier(6, 5, ridge_dim=40, seed=1)
    info = picked.fit_task(f, y, 5, val=(f[:10], y[:10]))
    assert info["ridge/lambda"] in picked.lambdas
    torch.testing.assert_close(picked.W.double(), RidgeClassifier.solve(picked.G, picked.C, info["ridge/lambda"]),
                               rtol=1e-4, atol=1e-4)


def test_aper_adapts_on_task_zero_only_with_concatenated_features():
    model = _model("aper", classifier="ncm")
    assert model.head.in_features == 2 * model.backbone_dim
    g0 = model.set_trainable(0)
    assert g0["fast"] and all(p.requires_grad for p in g0["fast"])
    g1 = model.set_trainable(1)
    assert g1["fast"] == [] and g1["backbone"] == []
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]  # backbone and adapter frozen after task 0


def test_statistics_classifier_classifies_in_eval_once_fitted():
    model = _model("none", classifier="ncm")
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x, 2), model.head(model.features(x))[:, :2])  # not fitted yet: the head
    model.fit_classifier([(x, torch.tensor([0, 1] * 4))], n_seen=2)
    torch.testing.assert_close(model(x, 2), model.classifier(model.features(x)))
    model.train()
    torch.testing.assert_close(model(x, 2), model.head(model.features(x))[:, :2])  # training: the head


def test_old_new_accuracy_and_task_confusion_by_hand():
    conf = np.array([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 4, 0], [1, 0, 0, 3]])
    out = cm.old_new_accuracy(conf, task_offset=2, n_seen=4)
    assert out == pytest.approx({"old_acc": 5 / 8, "new_acc": 7 / 8, "old_to_new": 2 / 8})
    t = cm.task_confusion(conf, [2, 2])
    np.testing.assert_allclose(t, [[6 / 8, 2 / 8], [1 / 8, 7 / 8]])
