"""TrackNet model pieces: ViT input widening, decoder shapes, losses, peak detection and the metrics."""

import pytest
import torch
from safetensors.torch import save_file

from datamodules.tracknet import render_heatmap
from models.metrics.tracknet import TrackNetMetrics, centroid_radius, classify, detect_peaks
from models.vision.tracknet import HeatmapDecoder, TrackNetViT, heatmap_figure, heatmap_loss, prediction_figure
from models.vision.vit import create_vit

pytestmark = pytest.mark.usefixtures("one_thread")




def test_pretrained_rgb_filters_are_repeated_per_frame(tmp_path):
    torch.manual_seed(0)
    rgb = create_vit("vit_tiny_patch16_224", img_size=32)
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = TrackNetViT("vit_tiny_patch16_224", (32, 48), num_frames=3, pretrained_file=str(tmp_path / "w.safetensors"),
                        patch_size=16, decoder_channels=(192, 16), decoder_upsample=(2,), heatmap_size=(24, 16))
    w9, w3 = model.backbone.patch_embed.proj.weight, rgb.patch_embed.proj.weight
    assert w9.shape[1] == 9
    torch.testing.assert_close(w9, w3.repeat(1, 3, 1, 1) / 3)
    # Consequence: three identical frames give the pretrained RGB patch embedding.
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(model.backbone.patch_embed.proj(x.repeat(1, 3, 1, 1)),
                               rgb.patch_embed.proj(x), atol=1e-5, rtol=1e-5)


def test_output_is_one_logit_map_at_heatmap_size():
    torch.manual_seed(0)
    model = TrackNetViT("vit_tiny_patch16_224", (32, 64), num_frames=2, patch_size=8,
                        decoder_channels=(64, 32, 16), decoder_upsample=(2, 2), heatmap_size=(64, 32))
    assert model.grid == (4, 8) and isinstance(model.decoder.proj, torch.nn.Conv2d)  # 192 -> 64 projection
    assert model(torch.randn(2, 6, 32, 64)).shape == (2, 1, 32, 64)
    odd = TrackNetViT("vit_tiny_patch16_224", (32, 64), num_frames=1, patch_size=8,
                      decoder_channels=(192, 8), decoder_upsample=(2,), heatmap_size=(50, 20))
    assert odd(torch.randn(1, 3, 32, 64)).shape == (1, 1, 20, 50)  # resized when stages miss the size
    with pytest.raises(ValueError, match=r"expected input \(B, 6, 32, 64\)"):
        model(torch.randn(1, 9, 32, 64))


def test_decoder_config_errors():
    with pytest.raises(ValueError, match="decoder.upsample needs one factor per stage"):
        HeatmapDecoder(192, [192, 64, 32], [2])
    with pytest.raises(ValueError, match="decoder.channels"):
        HeatmapDecoder(192, [], [])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        TrackNetViT("vit_tiny_patch16_224", (30, 64), patch_size=8, decoder_channels=(8,), decoder_upsample=())


@pytest.mark.parametrize("kind", ["bce", "focal"])
def test_losses_prefer_the_right_map_over_an_empty_one(kind):
    target = render_heatmap(10, 6, True, (24, 12), 1.5)[None]
    good = torch.logit(target.clamp(0.02, 0.98))
    empty = torch.full_like(target, -4.0)
    wrong = torch.logit(render_heatmap(3, 2, True, (24, 12), 1.5)[None].clamp(0.02, 0.98))
    lg, le, lw = (heatmap_loss(x, target, kind) for x in (good, empty, wrong))
    assert lg < le and lg < lw
    # Plain BCE (pos_weight 1) would rather predict nothing than a misplaced ball: weighting matters.
    assert heatmap_loss(empty, target, "bce", pos_weight=1.0) < heatmap_loss(wrong, target, "bce", pos_weight=1.0)
    with pytest.raises(ValueError, match="loss"):
        heatmap_loss(good, target, "mse")


def test_detect_peaks_subpixel_and_threshold():
    hm = torch.stack([render_heatmap(17.3, 9.6, True, (40, 20), 1.5), torch.full((1, 20, 40), 0.3)])
    xy, found = detect_peaks(hm, threshold=0.5, radius=centroid_radius(1.5))
    assert found.tolist() == [True, False]
    assert (xy[0] - torch.tensor([17.3, 9.6])).abs().max() < 0.05
    corner = render_heatmap(0, 0, True, (20, 10), 1.0)[None]  # at the border the window is zero-padded: the
    assert detect_peaks(corner, radius=3)[0][0].abs().max() < 0.6  # cut-off blob pulls the centroid inward


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_centroid_peak_is_unbiased_on_maps_with_known_centres(sigma):
    """Rendered Gaussians at sub-pixel centres (a grid of offsets, away from the border): the window of
    centroid_radius(sigma) finds every centre within 0.05 px; the old 3x3 window was off by > 0.2 px."""
    offsets = torch.linspace(-0.5, 0.5, 11)
    centres = [(40 + dx, 20 + dy) for dx in offsets.tolist() for dy in offsets.tolist()]
    maps = torch.stack([render_heatmap(x, y, True, (96, 48), sigma) for x, y in centres])
    truth = torch.tensor(centres)
    xy, found = detect_peaks(maps, 0.5, "centroid", centroid_radius(sigma))
    assert found.all() and (xy - truth).abs().max() < 0.05
    old, _ = detect_peaks(maps, 0.5, "centroid", radius=1)
    assert (old - truth).abs().max() > 0.2


def test_component_peak_is_tracknetv3s_bounding_box_centre():
    hm = torch.zeros(3, 1, 20, 40)
    hm[0, 0, 5:8, 10:15] = 0.9  # one 5x3 region: centre (12, 6)
    hm[1, 0, 2, 2] = 0.99  # a one-pixel region with the highest value ...
    hm[1, 0, 10:14, 20:26] = 0.7  # ... loses to the larger region: centre (22.5, 11.5)
    xy, found = detect_peaks(hm, 0.5, "component")
    assert found.tolist() == [True, True, False]
    assert xy[:2].tolist() == [[12.0, 6.0], [22.5, 11.5]]
    disk = render_heatmap(17.0, 9.0, True, (40, 20), 2.5, "disk")[None]
    assert detect_peaks(disk, 0.5, "component")[0][0].tolist() == [17.0, 9.0]
    with pytest.raises(ValueError, match="peak"):
        detect_peaks(hm, 0.5, "argmax")


def test_tolerance_scale_makes_small_heatmaps_comparable():
    """One heat-map pixel at 128x72 is 4 px at TrackNetV3's 512x288."""
    pred, true = torch.tensor([[11.0, 5.0]]), torch.tensor([[10.0, 5.0]])
    args = (pred, torch.tensor([True]), true, torch.tensor([True]))
    scale = torch.tensor([[512 / 128, 288 / 72]])
    assert classify(*args, tolerance=4.0, scale=scale)["tp"].item()
    assert classify(*args, tolerance=3.9, scale=scale)["fp1"].item()
    assert classify(*args, tolerance=1.0)["tp"].item()  # unscaled: heat-map pixels


def _maps(points, size=(32, 16)):
    """Probability maps with one sharp peak (0.9) per given point, or nothing (None)."""
    maps = torch.zeros(len(points), 1, size[1], size[0])
    for i, p in enumerate(points):
        if p is not None:
            maps[i, 0, p[1], p[0]] = 0.9
    return maps


def test_metrics_on_hand_made_cases_for_every_outcome():
    metric = TrackNetMetrics(threshold=0.5, tolerance=4.0)
    #         TP (3 px off)  FP1 (6 px off)  FP2 (no ball)  TN          FN            TP (exact)
    preds = _maps([(10, 5), (20, 10), (3, 3), None, None, (30, 15)])
    true_xy = torch.tensor([[13.0, 5.0], [14.0, 10.0], [0, 0], [0, 0], [8.0, 8.0], [30.0, 15.0]])
    visible = torch.tensor([True, True, False, False, True, True])
    outcomes = classify(*detect_peaks(preds, 0.5), true_xy, visible, 4.0)
    assert [k for i in range(6) for k, m in outcomes.items() if m[i]] == ["tp", "fp1", "fp2", "tn", "fn", "tp"]
    metric.update(preds[:3], true_xy[:3], visible[:3])  # two updates accumulate
    metric.update(preds[3:], true_xy[3:], visible[3:])
    out = metric.compute()
    assert [int(out[k]) for k in ("tp", "fp1", "fp2", "tn", "fn")] == [2, 1, 1, 1, 1]
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["precision"] == pytest.approx(2 / 4)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    metric.reset()
    assert all(int(getattr(metric, k)) == 0 for k in ("tp", "fp1", "fp2", "tn", "fn"))
    with pytest.raises(ValueError, match="threshold"):
        TrackNetMetrics(threshold=1.5)


def test_tolerance_boundary_is_inclusive():
    xy = torch.tensor([[4.0, 0.0]])
    out = classify(xy, torch.tensor([True]), torch.zeros(1, 2), torch.tensor([True]), tolerance=4.0)
    assert bool(out["tp"][0])
    out = classify(xy, torch.tensor([True]), torch.zeros(1, 2), torch.tensor([True]), tolerance=3.9)
    assert bool(out["fp1"][0])


def test_heatmap_figure_has_titled_axes_marks_and_colour_bars():
    frames = torch.zeros(2, 9, 16, 32)
    fig = heatmap_figure(frames, torch.rand(2, 1, 8, 16), torch.rand(2, 1, 8, 16), (0.5,) * 3, (0.25,) * 3,
                         pred_xy=torch.tensor([[5.0, 4.0], [0.0, 0.0]]), found=torch.tensor([True, False]),
                         true_xy=torch.tensor([[6.0, 4.0], [1.0, 2.0]]), visible=torch.tensor([True, True]),
                         labels=["a frame 3", "b frame 7"])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    titles = [ax.get_title() for ax in panels]
    assert titles[:3] == ["a frame 3\npredicted: (5.0, 4.0), true: (6.0, 4.0)", "predicted heat map", "true heat map"]
    assert titles[3] == "b frame 7\npredicted: none, true: (1.0, 2.0)"
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 4  # one per heat map
    marks = [(line.get_label(), line.get_xdata()[0], line.get_ydata()[0]) for line in panels[0].lines]
    assert marks == [("predicted", 5.0, 4.0), ("true", 6.0, 4.0)]
    assert panels[0].get_xlabel() == "x (px)" and panels[0].get_ylabel() == "y (px)"


def test_prediction_figure_marks_where_the_ball_is():
    frames = torch.zeros(3, 9, 16, 32)
    pred = torch.tensor([[5.0, 4.0], [20.0, 8.0], [0.0, 0.0]])
    fig = prediction_figure(frames, pred, torch.tensor([True, True, False]), (0.0,) * 3, (1.0,) * 3,
                            true_xy=torch.tensor([[10.0, 8.0], [0.0, 0.0], [0.0, 0.0]]),
                            visible=torch.tensor([True, False, False]), ncol=2)
    assert len(fig.axes) == 3 and fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 2)
    assert [len(ax.lines) for ax in fig.axes] == [2, 1, 0]  # nothing found, nothing drawn
    assert (fig.axes[1].lines[0].get_xdata()[0], fig.axes[1].lines[0].get_ydata()[0]) == (20.0, 8.0)
    assert fig.axes[2].get_title() == "sample 2\npredicted: none, true: none"


def test_centroid_ignores_background_and_a_second_blob():
    """A constant background and a neighbouring blob pulled the plain window centroid by ~0.1 and ~1 px; the
    median subtraction and the descending region keep it near the true centre (margins measured: 0.02 / 0.26)."""
    g = torch.Generator().manual_seed(0)
    centres = (torch.rand(50, 2, generator=g) - 0.5) + torch.tensor([40.0, 30.0])
    clean = torch.stack([render_heatmap(x, y, True, (96, 64), 2.0) for x, y in centres.tolist()])
    second = torch.stack([render_heatmap(x + 7, y + 1, True, (96, 64), 2.0) for x, y in centres.tolist()])
    r = centroid_radius(2.0)
    for maps, bound in ((clean + 0.05, 0.05), (torch.maximum(clean, 0.6 * second), 0.4)):
        xy, found = detect_peaks(maps, 0.5, "centroid", r)
        assert found.all() and (xy - centres).norm(dim=1).max() < bound


SEED_MODEL_KEYS = """\
model_name: vit_heatmap
pretrained_model_name: vit_small_patch16_dinov3   # any timm ViT; weights from a local file when given
backbone: {freeze: true, patch_size: 16, pretrained_file: null}
decoder: {channels: [384, 256, 128, 64], upsample: [2, 2, 2]}
heatmap: {size: [256, 144], sigma: 2.0}
lora: {enabled: false, r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: null, bias: none, task_type: FEATURE_EXTRACTION}
quantization: {enabled: false, quant_type: nf4, compute_dtype: bfloat16, skip_modules: [], mode: manual, compress_statistics: true, use_double_quant: true}
"""  # noqa: E501  (the original TrackNet issue's model block, verbatim)


def _from_yaml(block: str):
    from jsonargparse import ArgumentParser

    from lightning_modules.tracknet import HeatmapTracker

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(HeatmapTracker, "model")
    cfg = parser.parse_string("model:\n" + "".join(f"  {line}\n" for line in block.splitlines()))
    return parser.instantiate_classes(cfg).model


def test_original_config_block_loads_with_r_as_lora_r():
    model = _from_yaml(SEED_MODEL_KEYS)
    assert model.lora_cfg.lora_r == 16 and not model.lora_cfg.enabled
    model = _from_yaml(SEED_MODEL_KEYS.replace("enabled: false, r: 16", "enabled: true, r: 4"))
    assert model.lora_cfg.lora_r == 4
    ranks = {m.lora_A.shape[0] for m in model.modules() if hasattr(m, "lora_A")} or {
        p.shape[0] for n, p in model.named_parameters() if n.endswith("lora_A")}
    assert ranks == {4}
    with pytest.raises(Exception, match="lora.r \\(4\\) and lora.lora_r \\(8\\) disagree"):
        _from_yaml(SEED_MODEL_KEYS.replace("enabled: false, r: 16", "enabled: true, r: 4, lora_r: 8"))


def test_unknown_backbone_names_get_useful_suggestions():
    from models.vision.vit import create_vit

    with pytest.raises(ValueError, match="Hugging Face repository id.*vit_small_patch16_dinov3"):
        create_vit("facebook/dinov3-vits16-pretrain-lvd1689m")
    with pytest.raises(ValueError, match="did you mean: vit_small_patch16_224"):
        create_vit("vit_smal_patch16_224")
