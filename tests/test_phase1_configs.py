"""Smoke tests of configs/phase1_lm.yaml and the GPU presets (phase1_8gb/10gb/24gb.yaml, tiny overrides) through
the CLI, with the TensorBoard signals, generation in predict, and the stability error path."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.phase1_lm import Phase1LanguageModel
from models.lm.phase1 import NumericalInstabilityError, Phase1Config, estimate_memory, get_preset_config
from tests.cli_helpers import REPO, run_cli

FAST = ["--data.max_windows", "16", "--data.batch_size", "8", "--data.seq_len", "32",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1", "--model.sample_tokens", "8"]
TINY = ["--model.config.d_model", "32", "--model.config.n_layers", "2", "--model.config.intermediate_size", "64"]


def _scalars(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_phase1_lm_config_fits_logs_health_and_predicts_with_the_state(in_tmp):
    run = run_cli(["fit", "--config", str(REPO / "configs/phase1_lm.yaml"), "--trainer.max_steps", "3", *FAST, *TINY])
    model = run.model
    cfg = model.config
    assert cfg.bk_enabled and cfg.ar_ssm_enabled and cfg.htt_enabled and cfg.ar_ssm_max_rank == 16
    assert not cfg.use_gradient_checkpointing  # from the nested `memory` group
    tags = _scalars(in_tmp / "runs" / "phase1_lm" / "version_0")
    assert {"train/loss", "val/loss", "val/perplexity", "health/bk_bound_ratio", "health/bk_transfer_log10_condition",
            "phase1/ar_ssm_effective_rank", "phase1/bk_bound_ratio", "train/gate_l1"} <= tags
    assert float(run.trainer.callback_metrics["phase1/bk_bound_ratio"]) <= 1.0 + 1e-3
    ckpt = in_tmp / "runs" / "phase1_lm" / "version_0" / "checkpoints" / "last.ckpt"
    pred = run_cli(["predict", "--config", str(REPO / "configs/phase1_lm.yaml"), "--ckpt_path", str(ckpt),
                    "--trainer.limit_predict_batches", "1", "--model.generation.max_new_tokens", "5", *FAST, *TINY])
    out = pred.trainer.predict_loop.predictions[0]
    assert out["nll"].shape == (8,) and out["tokens"].sum() == 8 * 32
    samples = json.loads(next((in_tmp / "runs").rglob("predictions.json")).read_text())["samples"]
    assert len(samples) == 1 and samples[0]["prompt"] == pred.model.hparams.sample_prompt


@pytest.mark.parametrize("file", ["phase1_8gb.yaml", "phase1_10gb.yaml", "phase1_24gb.yaml"])
def test_preset_configs_size_from_the_memory_model_and_run_tiny(in_tmp, file):
    name = file.removeprefix("phase1_").removesuffix(".yaml")
    path = REPO / "configs" / file
    text = yaml.safe_load(path.read_text())
    nested = text["model"]["init_args"]["phase1"]
    config = Phase1Config.from_nested(nested)
    assert config == get_preset_config(name)
    assert config.n_seq == text["data"]["init_args"]["seq_len"] and config.batch_size == text["data"]["init_args"][
        "batch_size"]
    budget = float(name[:-2])
    assert 0.5 * budget < estimate_memory(config)["total_gb"] <= 0.8 * budget  # uses the GPU, leaves headroom
    tiny = json.dumps({"preset": name, "model": {"d_model": 32, "n_layers": 1, "intermediate_size": 64},
                       "ar_ssm": {"max_rank": 16, "min_rank": 4}, "htt": {"rank": 16}})
    run = run_cli(["fit", "--config", str(path), "--model.phase1", tiny, "--trainer.max_steps", "2",
                   "--trainer.val_check_interval", "2", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                   *FAST])
    assert run.model.config.use_gradient_checkpointing and run.model.config.htt_enabled
    assert (in_tmp / "runs" / f"phase1_{name}" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_broken_bound_raises_without_stability_monitor_and_reports_inf_with_it():
    torch.manual_seed(0)
    module = Phase1LanguageModel(Phase1Config(d_model=16, n_layers=1, ar_ssm_enabled=False, htt_enabled=False,
                                              use_gradient_checkpointing=False))
    bk = module.model.blocks[0].bk
    batch = {"input_ids": torch.randint(0, 256, (2, 16)), "labels": torch.randint(0, 256, (2, 16))}
    module.training_step(batch, 0)
    assert float(module.health_signals()["bk_bound_ratio"]) <= 1.0 + 1e-3
    with torch.no_grad():
        bk.in_proj.weight[0, 0] = float("nan")  # a blown-up weight: g turns NaN
    with pytest.raises(NumericalInstabilityError, match="StabilityMonitor"):
        module.training_step(batch, 1)
    assert module.health_signals()["bk_bound_ratio"] == float("inf")
