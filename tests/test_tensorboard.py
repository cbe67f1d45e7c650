"""TensorBoard output of a CLI run: one clean hparams entry with real metrics, LR curves where a schedule exists,
throughput and peak memory per epoch."""

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from callbacks.tensorboard import batch_size_and_tokens, flat_hparams
from tests.cli_helpers import REPO, run_cli

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1"]


def events(run: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def hparams_session(ea: EventAccumulator) -> tuple[dict, list[str]]:
    content = ea.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    start = [d.session_start_info for d in data.values() if d.HasField("session_start_info")]
    exp = [d.experiment for d in data.values() if d.HasField("experiment")]
    assert len(start) == 1 and len(exp) == 1, "one hparams entry per run"
    params = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start[0].hparams.items()}
    return params, [m.name.tag for m in exp[0].metric_infos]


def test_flat_hparams_drops_jsonargparse_noise():
    params = {"lr": 0.1, "_instantiator": "x", "_class_path": "y", "pretrain": {"steps": 3, "cache_dir": None},
              "model": {"class_path": "a.b.Net", "init_args": {"depth": 2, "sizes": [1, 2]}}}
    assert flat_hparams(params) == {"lr": 0.1, "pretrain.steps": 3, "pretrain.cache_dir": "None", "model": "Net",
                                    "model.depth": 2, "model.sizes": "[1, 2]"}


def test_digits_run_has_real_hparams_and_performance(in_tmp, one_thread):
    cli = run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"), "--model.pretrain", "null",
                   "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches",
                   "1", *QUIET])
    ea = events(Path(cli.trainer.log_dir))
    params, metrics = hparams_session(ea)
    assert params["lr"] == 0.003 and params["lora_r"] == 8 and params["finetune"] == "lora"
    assert not [k for k in params if "_instantiator" in k or "_class_path" in k]
    assert "val/acc" in metrics and "params/trainable" in metrics and "hp_metric" not in metrics
    scalars = set(ea.Tags()["scalars"])
    assert "hp_metric" not in scalars
    assert {"perf/samples_per_sec", "perf/steps_per_sec", "perf/peak_rss_mib"} <= scalars
    samples = ea.Scalars("perf/samples_per_sec")[0].value * ea.Scalars("perf/epoch_seconds")[0].value
    assert abs(samples - 3 * 64) < 1e-3  # three batches of 64
    assert not [t for t in scalars if t.startswith("lr-")]  # no schedule, no learning-rate curve


def test_warmup_schedule_gets_a_learning_rate_curve(in_tmp, one_thread):
    cli = run_cli(["fit", "--config", str(REPO / "configs/gpt_pretrain.yaml"), "--data.max_windows", "16",
                   "--data.batch_size", "8", "--data.seq_len", "32", "--trainer.limit_val_batches", "1",
                   "--model.sample_tokens", "8", "--trainer.max_steps", "3", *QUIET])
    ea = events(Path(cli.trainer.log_dir))
    lr = [s for t in ea.Tags()["scalars"] if t.startswith("lr-") for s in ea.Scalars(t)]
    assert len(lr) == 3 and lr[0].value < lr[-1].value  # warming up


def test_batch_size_and_tokens():
    ids = torch.zeros(4, 16, dtype=torch.long)
    assert batch_size_and_tokens({"input_ids": ids, "labels": ids}) == (4, 64)
    assert batch_size_and_tokens((torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))) == (8, 0)
    assert batch_size_and_tokens([]) == (0, 0)
