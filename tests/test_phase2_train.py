"""Phase 2 training recipe through the CLI: configs/phase2_{small,base,large}.yaml, the YAML keys reaching the
model, the stdlib text as data, diagnostics in TensorBoard, training_history.json, epoch checkpoints, resume."""

import json
import math

import pytest
import torch
import yaml

from lightning_modules.phase2_lm import Phase2LanguageModel
from models.lm.phase2 import PRESET_SEQ_LEN, PRESETS, Phase2Config
from tests.cli_helpers import REPO, run_cli

TINY = ["--model.config.d_model", "16", "--model.config.n_heads", "2", "--model.config.head_dim", "8",
        "--model.config.n_layers", "1", "--model.config.chunk_size", "8", "--model.config.bk_chunk_size", "8",
        "--data.seq_len", "24", "--data.batch_size", "2", "--data.max_windows", "6", "--model.sample_tokens", "4",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest and fair to the other jobs on the machine."""


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"phase2_{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["small", "base", "large"])
def test_config_sizes_are_the_presets_and_the_recipe(name):
    cfg = _config(name)
    model = cfg["model"]["init_args"]
    assert {k: model["config"][k] for k in PRESETS[name]} == PRESETS[name]
    assert cfg["data"]["init_args"]["seq_len"] == PRESET_SEQ_LEN[name]
    assert cfg["data"]["init_args"]["source"] == "python_stdlib"
    assert (model["lr"], model["weight_decay"], model["min_lr"]) == (1e-4, 0.01, 1e-6)
    assert cfg["trainer"]["gradient_clip_val"] == 1.0
    assert cfg["checkpoint"]["monitor"] == "val/loss"
    diag = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("Phase2Diagnostics")]
    assert diag[0]["init_args"]["checkpoint_every_n_epochs"] == 5
    Phase2Config(**model["config"])  # every key is a field, values valid


@pytest.mark.parametrize("file", ["phase2_base.yaml", "phase2_large.yaml"])
def test_gpu_sized_configs_run_with_tiny_overrides(in_tmp, file):
    name = file.removeprefix("phase2_").removesuffix(".yaml")
    run = run_cli(["fit", "--config", str(REPO / "configs" / file), *TINY, "--trainer.max_steps", "2",
                   "--model.warmup_steps", "1"])
    assert run.trainer.global_step == 2
    assert (in_tmp / "runs" / f"phase2_{name}" / "version_0" / "training_history.json").is_file()


def test_yaml_keys_reach_the_model_and_the_data_is_the_stdlib_text(in_tmp, monkeypatch):
    """Defect: CLI flags ignored and training on random dummy data."""
    seen = []
    original = Phase2LanguageModel.training_step

    def spy(self, batch, batch_idx):
        seen.append(batch["input_ids"].clone())
        return original(self, batch, batch_idx)

    monkeypatch.setattr(Phase2LanguageModel, "training_step", spy)
    run = run_cli(["fit", "--config", str(REPO / "configs/phase2_small.yaml"), *TINY, "--trainer.max_steps", "2",
                   "--model.config.base_decay", "0.05", "--model.config.hebbian_eta", "0.5",
                   "--model.config.snr_threshold", "3.0", "--model.config.resonance_damping", "0.25",
                   "--model.lr", "3e-4", "--model.weight_decay", "0.02"])
    memory = run.model.model.blocks[0].memory
    assert (memory.base_decay, memory.snr_threshold, memory.resonance_damping) == (0.05, 3.0, 0.25)
    assert torch.equal(memory.eta, torch.full((2,), 0.5))
    assert memory.n_heads == 2 and memory.head_dim == 8 and len(run.model.model.blocks) == 1
    groups = run.trainer.optimizers[0].param_groups
    assert groups[0]["initial_lr"] == 3e-4 and groups[0]["weight_decay"] == 0.02 and groups[1]["weight_decay"] == 0
    assert len(seen) == 2 and seen[0].shape == (2, 24)
    text = bytes(run.datamodule.load_split("train").tokens.tolist())
    for batch in seen:
        for row in batch:
            assert bytes(row.tolist()) in text  # windows of the stdlib training split, not random tokens
    assert b"import" in text and b"def " in text


def test_history_checkpoints_tensorboard_and_resume(in_tmp):
    callbacks = {"trainer": {"callbacks": [
        {"class_path": "Phase2Diagnostics", "init_args": {"log_every_n_batches": 1, "checkpoint_every_n_epochs": 2}},
        {"class_path": "StabilityMonitor"}]}}
    (in_tmp / "phase2_test.yaml").write_text(yaml.safe_dump(callbacks))
    args = ["fit", "--config", str(REPO / "configs/phase2_small.yaml"), "--config", "phase2_test.yaml", *TINY,
            "--trainer.log_every_n_steps", "1"]
    run = run_cli([*args, "--trainer.max_epochs", "2"])
    version = in_tmp / "runs" / "phase2_test" / "version_0"
    ckpts = version / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} >= {"best.ckpt", "last.ckpt", "checkpoint_epoch2.ckpt"}
    assert not (ckpts / "checkpoint_epoch1.ckpt").exists()
    for name in ("last.ckpt", "checkpoint_epoch2.ckpt"):  # the checkpoints carry the history up to their epoch
        state = torch.load(ckpts / name, map_location="cpu", weights_only=False)["callbacks"]
        assert next(v for k, v in state.items() if "Phase2Diagnostics" in k)["history"]["epoch"] == [1, 2]
    history = json.loads((version / "training_history.json").read_text())
    assert history["epoch"] == [1, 2] and history["global_step"] == [3, 6]
    # the seed-003 script's keys, beside the project's
    assert history["train_losses"] == history["train_loss"] and history["val_losses"] == history["val_loss"]
    assert history["learning_rates"] == history["lr"] and history["total_epochs"] == 2
    assert history["best_val_loss"] == min(history["val_loss"])
    for key in ("train_loss", "val_loss", "lr", "gamma_mean", "gamma_min", "snr_mean", "resonance_energy",
                "stability_ratio", "fast_weight_energy", "memory_peak_mb"):
        assert len(history[key]) == 2 and all(math.isfinite(v) for v in history[key]), key
    assert history["gamma_min"][0] <= history["gamma_mean"][0] <= history["gamma_max"][0]
    assert history["lr"][1] < history["lr"][0] < 1e-4  # cosine annealing per step
    assert abs(history["val_loss"][1] - float(run.trainer.callback_metrics["val/loss"])) < 1e-6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/perplexity", "val/loss", "val/perplexity", "train/epoch_loss",
                "batch/memory_peak_mb", "batch/memory_current_mb", "train/memory_peak_mb", "health/gamma_max",
                "health/memory_over_bound"}
    for key in ("gamma_mean", "gamma_std", "gamma_min", "gamma_max", "snr_mean", "snr_low_ratio", "resonant_modes",
                "resonance_energy", "stability_ratio", "fast_weight_energy"):
        expected |= {f"batch/{key}", f"train/{key}"}
    assert expected <= tags, expected - tags
    assert len(events.Scalars("batch/gamma_mean")) == 6  # every batch here (log_every_n_batches 1)

    resumed = run_cli([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert resumed.trainer.current_epoch == 3
    more = json.loads((version / "training_history.json").read_text())
    assert more["epoch"] == [1, 2, 3] and more["global_step"] == [3, 6, 9]
    for key in history:  # continued, not restarted
        if isinstance(history[key], list):  # (best_val_loss / total_epochs: scalars of the latest epoch)
            assert more[key][:2] == history[key], key
    assert not (in_tmp / "runs" / "phase2_test" / "version_1").exists()


def test_cosine_schedule_reaches_min_lr():
    module = Phase2LanguageModel(Phase2Config(d_model=16, n_heads=2, head_dim=8, n_layers=1, bk_enabled=False),
                                 lr=1e-4, min_lr=1e-6, warmup_steps=10)
    assert module.lr_factor(0, 100) == pytest.approx(0.1)
    assert module.lr_factor(10, 100) == pytest.approx(1.0)
    assert module.lr_factor(55, 100) == pytest.approx((1 + 0.01) / 2)
    assert module.lr_factor(100, 100) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="min_lr"):
        Phase2LanguageModel(Phase2Config(bk_enabled=False), lr=1e-4, min_lr=1e-3)
