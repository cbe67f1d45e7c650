"""TrackNet LightningModule: modes, a short fit, adapter-only checkpoints, predict CSVs and the configs."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from callbacks.tracknet_predictions import TrackNetPredictionWriter
from datamodules.tracknet import TrackNetDataModule
from lightning_modules.tracknet import HeatmapTracker
from models.adapters.lora import LoRALinear, count_parameters
from models.vision.vit import create_vit
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
HEATMAP = {"size": [64, 32], "sigma": 1.5}
TINY = dict(pretrained_model_name="vit_tiny_patch16_224",
            backbone={"freeze": True, "patch_size": 8, "pretrained_file": None},
            decoder={"channels": [192, 32, 16, 8], "upsample": [2, 2, 2]}, heatmap=HEATMAP)
LORA = {"enabled": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None, "bias": "none",
        "task_type": "FEATURE_EXTRACTION"}
SMALL_DATA = ["--data.synthetic.num_clips", "4", "--data.synthetic.frames_per_clip", "8",
              "--data.synthetic.width", "128", "--data.synthetic.height", "64", "--data.batch_size", "4"]




def _data(**kw) -> TrackNetDataModule:
    args = dict(heatmap=HEATMAP, val_fraction=0.25, test_fraction=0.25, batch_size=8,
                synthetic={"num_clips": 4, "frames_per_clip": 16, "width": 128, "height": 64})
    return TrackNetDataModule(**{**args, **kw})


def _base_weights(path: Path) -> str:
    """A stand-in for a local pretrained file: one random ViT-Tiny saved once, loaded by every model."""
    torch.manual_seed(123)
    vit = create_vit("vit_tiny_patch16_224", img_size=224)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return str(path)



def test_without_lora_or_quantization_sections_full_or_frozen():
    frozen = HeatmapTracker(**TINY)
    assert not any(isinstance(m, LoRALinear) for m in frozen.modules())
    assert count_parameters(frozen) == count_parameters(frozen.model.decoder)
    full = HeatmapTracker(**{**TINY, "backbone": {**TINY["backbone"], "freeze": False}})
    assert count_parameters(full) == count_parameters(full, trainable_only=False)
    lora = HeatmapTracker(**TINY, lora=LORA)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("model.decoder.") for n in trainable)
    assert len(lora.lora_modules) == 4 * 12  # qkv, proj, fc1, fc2 of every block


def test_config_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="model_name"):
        HeatmapTracker(model_name="unet", **TINY)
    with pytest.raises(ValueError, match="quantization.enabled needs backbone.freeze"):
        HeatmapTracker(**{**TINY, "backbone": {**TINY["backbone"], "freeze": False}}, quantization={"enabled": True})
    with pytest.raises(ValueError, match="adapter_path needs lora.enabled"):
        HeatmapTracker(**TINY, adapter_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pretrained_file"):
        HeatmapTracker(
            **{**TINY, "backbone": {**TINY["backbone"], "pretrained_file": str(tmp_path / "nope.safetensors")}}
        )


def test_datamodule_mismatch_is_named(in_tmp):
    trainer = L.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"data.heatmap .* differs from model.heatmap"):
        trainer.fit(HeatmapTracker(**TINY), datamodule=_data(heatmap={"size": [64, 32], "sigma": 3.0}))
    with pytest.raises(ValueError, match="data.num_frames=2 differs"):
        trainer.fit(HeatmapTracker(**TINY), datamodule=_data(num_frames=2))


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_lora_fit_overfits_one_batch(in_tmp):
    """Trainer + LoRA + decoder learn: on one repeated batch the training loss falls well below its start.

    Training-mode losses only: an eval-mode loss after a few steps depends on the decoder's BatchNorm running
    statistics, which is what made the old criterion build-dependent. Over seeds 0-4 the last five losses
    stay below 0.48x the first; the assertion allows 0.7x. The frozen ViT weights must not move."""
    torch.manual_seed(0)
    model = HeatmapTracker(**TINY, lora=LORA, lr=5e-3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    recorder = _LossRecorder()
    trainer = L.Trainer(max_steps=40, overfit_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder])
    trainer.fit(model, datamodule=_data())
    assert len(recorder.losses) == 40
    assert max(recorder.losses[-5:]) < 0.7 * recorder.losses[0], recorder.losses
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_overfitting_one_batch_reaches_perfect_metrics(in_tmp):
    """End-to-end consistency of labels, rendered targets, peak detection and outcomes: a fully fine-tuned
    model memorises one batch of generated clips until every frame is a TP or a TN."""
    torch.manual_seed(0)
    dm = _data()
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["visible"].any() and not batch["visible"].all()
    model = HeatmapTracker(**{**TINY, "backbone": {**TINY["backbone"], "freeze": False}})
    opt = model.configure_optimizers()
    for _ in range(80):
        model._loss(model(batch["frames"]), batch["heatmap"]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        model.val_metrics.update(torch.sigmoid(model(batch["frames"])), batch["xy"], batch["visible"])
    out = model.val_metrics.compute()
    assert int(out["tp"]) == int(batch["visible"].sum()) and int(out["tn"]) == int((~batch["visible"]).sum())
    assert float(out["f1"]) == 1.0


def test_adapter_checkpoint_loads_onto_a_fresh_backbone(in_tmp):
    base = _base_weights(in_tmp / "base.safetensors")
    cfg = {**TINY, "backbone": {**TINY["backbone"], "pretrained_file": base}}
    trained = HeatmapTracker(**cfg, lora=LORA)
    with torch.no_grad():  # stand-in for training: non-zero adapters and decoder
        for n, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trained.save_adapter(in_tmp / "adapter")
    saved = load_file(str(in_tmp / "adapter" / "adapter.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # adapters only, no base weights
    torch.manual_seed(999)  # the fresh model's own random init must not matter
    fresh = HeatmapTracker(**cfg, lora=LORA, adapter_path=str(in_tmp / "adapter"))
    x = torch.randn(2, 9, 32, 64)
    trained.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), trained(x))
    untouched = HeatmapTracker(**cfg, lora=LORA).eval()
    assert not torch.allclose(untouched(x), trained(x), atol=1e-4)
    with pytest.raises(KeyError):  # a different LoRA layout is refused
        HeatmapTracker(**cfg, lora={**LORA, "target_modules": ["qkv"]}, adapter_path=str(in_tmp / "adapter"))


def test_predict_writes_one_label_csv_per_clip(in_tmp):
    dm = _data(predict_split="all")
    writer = TrackNetPredictionWriter(output_dir=str(in_tmp / "pred"))
    trainer = L.Trainer(logger=False, callbacks=[writer], enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(HeatmapTracker(**TINY, threshold=0.01), datamodule=dm)
    files = sorted((in_tmp / "pred").glob("*.csv"))
    assert [f.stem for f in files] == [f"clip_{i:04d}" for i in range(4)]
    rows = list(csv.reader(open(files[0])))
    assert rows[0] == ["Frame", "Visibility", "X", "Y"] and len(rows) == 1 + 16
    assert [int(r[0]) for r in rows[1:]] == list(range(16))
    xs, ys = [float(r[2]) for r in rows[1:] if r[1] == "1"], [float(r[3]) for r in rows[1:] if r[1] == "1"]
    assert xs and 0 <= min(xs) and max(xs) <= 128 and max(ys) <= 64  # source resolution, not 64x32
    assert any(x > 64 for x in xs) or any(y > 32 for y in ys)


def test_lora_config_fits_then_predicts_from_the_command_line(in_tmp):
    cfg = str(REPO / "configs/tracknet_lora.yaml")
    run_cli(["fit", "--config", cfg, *SMALL_DATA, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    run = in_tmp / "runs" / "tracknet_lora" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "adapter" / "decoder.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert "val/frames_pred_true" in events.Tags()["images"]
    assert {"val/f1", "val/precision", "val/recall", "val/accuracy", "val/fp2"} <= set(events.Tags()["scalars"])
    run_cli(["predict", "--config", cfg, *SMALL_DATA, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.callbacks+=TrackNetPredictionWriter", "--trainer.callbacks.output_dir", "out",
          "--trainer.enable_progress_bar", "false"])
    assert len(list((in_tmp / "out").glob("clip_*.csv"))) == 1  # the one test clip


def test_qlora_config_fits_and_predicts_from_its_checkpoint(in_tmp):
    pytest.importorskip("models.quant")
    cfg = str(REPO / "configs/tracknet_qlora.yaml")
    run_cli(["fit", "--config", cfg, *SMALL_DATA, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
          "--trainer.enable_progress_bar", "false"])
    run = in_tmp / "runs" / "tracknet_qlora" / "version_0"
    assert (run / "adapter" / "adapter.safetensors").is_file()
    # The Lightning checkpoint holds the packed 4-bit buffers and reloads into a freshly quantized model.
    run_cli(["predict", "--config", cfg, *SMALL_DATA, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.enable_progress_bar", "false"])
    assert len(list((in_tmp / "runs" / "tracknet_qlora").glob("version_*/predictions/clip_*.csv"))) == 1


def test_dinov3_qlora_config_smoke_with_tiny_overrides(in_tmp):
    pytest.importorskip("models.quant")
    # The real config with no weights file and CPU-sized inputs (an override YAML, as a user would write one).
    (in_tmp / "tiny.yaml").write_text("model:\n  init_args:\n    backbone: {freeze: true, patch_size: 16, "
                                      "pretrained_file: null}\n")
    run_cli(["fit", "--config", str(REPO / "configs/tracknet_dinov3_qlora.yaml"), "--config", "tiny.yaml", *SMALL_DATA,
          "--model.img_size", "[64, 32]",
          "--model.heatmap.size", "[32, 16]", "--data.heatmap.size", "[32, 16]", "--data.frame_size", "[64, 32]",
          "--model.decoder.channels", "[384, 32, 16]", "--model.decoder.upsample", "[2, 2]",
          "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    run = in_tmp / "runs" / "tiny" / "version_0"  # runs are named after the last --config
    assert (run / "adapter" / "adapter.safetensors").is_file()


def test_qlora_trains_only_adapters_and_reloads_onto_a_fresh_quantized_backbone(in_tmp):
    quant = pytest.importorskip("models.quant")
    base = _base_weights(in_tmp / "base.safetensors")
    cfg = {**TINY, "backbone": {**TINY["backbone"], "pretrained_file": base}, "lora": LORA,
           "quantization": {"enabled": True, "quant_type": "nf4", "compute_dtype": "float32", "mode": "manual",
                            "compress_statistics": True, "use_double_quant": True}}
    model = HeatmapTracker(**cfg)
    vit = model.model.backbone
    layers = [m for m in vit.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.base, quant.Linear4bit) for m in layers)
    fp32_bytes = sum(m.in_features * m.out_features * 4 for m in layers)
    assert quant.quantized_storage_bytes(vit) <= 0.14 * fp32_bytes
    x = torch.randn(2, 9, 32, 64)
    model(x).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n or n.startswith("model.decoder.") for n in with_grad)
    with torch.no_grad():
        for layer in layers:
            layer.adapters["default"].lora_B.normal_(0, 0.05)
    model.save_adapter(in_tmp / "adapter")
    fresh = HeatmapTracker(**cfg, adapter_path=str(in_tmp / "adapter"))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_hf_mode_without_bitsandbytes_fails_at_construction():
    pytest.importorskip("models.quant")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="bitsandbytes"):
        HeatmapTracker(**TINY, lora=LORA, quantization={"enabled": True, "mode": "hf"})
