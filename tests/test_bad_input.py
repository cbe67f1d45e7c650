"""Bad input across the CLI: one clear ``error:`` line naming the key or file, before any training, with
existing ``runs/`` output left byte-identical. Extend ``CASES`` with ``(config, extra args, expected text)``.

Paths in args may use the files made by ``FILES`` (relative to the test's working directory).
"""

from pathlib import Path

import pytest

from tests.cli_helpers import REPO, run_cli

DIGITS = "configs/vit_lora_digits.yaml"
TRACKNET = "configs/tracknet_lora.yaml"
GPT = "configs/gpt_pretrain.yaml"
NESTED = "configs/sema_nested.yaml"
#: a tiny glyph pre-training, so cases that fail after the model is built (data errors) stay fast
TINY_PRETRAIN = ["--model.pretrain.classes", "2", "--model.pretrain.images_per_class", "2",
                 "--model.pretrain.steps", "1",
                 "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2, global_pool: avg}"]

#: files created in the working directory before each case
FILES = {
    "typo.yaml": "trainer:\n  max_epoch: 2\n",
    "broken.yaml": "model: [a, b\ndata: 1\n",
    "garbage.safetensors": "\x00\x01 not a safetensors file",
    "a_directory/keep": "",
}

CASES = [
    # unknown keys
    (DIGITS, ["--model.lora_rank", "3"], "'lora_rank' is not accepted"),
    (DIGITS, ["--config", "typo.yaml"], "trainer.max_epoch"),
    (DIGITS, ["--trainer.callbacks+=StabilityMonitor", "--trainer.callbacks.spike_factr", "3"], "spike_factr"),
    # wrong types / values
    (DIGITS, ["--model.lora_r", "abc"], "model.lora_r: Expected a <class 'int'>"),
    (DIGITS, ["--trainer.max_epochs", "x"], "trainer.max_epochs"),
    (DIGITS, ["--model.finetune", "lorax"], "model.finetune"),
    # missing or unreadable files
    ("missing.yaml", [], "config file 'missing.yaml' does not exist"),
    ("broken.yaml", [], "config file 'broken.yaml' is not valid YAML"),
    ("a_directory", [], "config file 'a_directory' cannot be read"),
    (DIGITS, ["--model.pretrained_file", "/missing.safetensors"], "pretrained_file '/missing.safetensors' does not exist"),
    (DIGITS, ["--model.pretrained_file", "garbage.safetensors"], "pretrained_file 'garbage.safetensors' could not be loaded"),
    (DIGITS, ["--ckpt_path", "missing.ckpt"], "ckpt_path 'missing.ckpt' does not exist"),
    # impossible sizes and names
    (DIGITS, ["--model.lora_r", "100000"], "model (ImageClassifier): LoRA rank `r`=100000 is larger than the layer"),
    (DIGITS, ["--data.batch_size", "0"], "data (DigitsDataModule): batch_size must be positive"),
    (DIGITS, ["--model.backbone", "nonexistent"], "unknown timm model 'nonexistent'"),
    (DIGITS, ["--model.lora_target_modules", "[nonexistent_layer]"], "matched no nn.Linear"),
    (DIGITS, ["--model.img_size", "0"], "model (ImageClassifier)"),
    # other families: missing data roots, unreadable sources, impossible sizes
    (TRACKNET, ["--data.data_root", "/missing_clips"], "data_root '/missing_clips' does not exist"),
    (TRACKNET, ["--data.batch_size", "0"], "data (TrackNetDataModule)"),
    (GPT, ["--data.source", "files", "--data.include", "null", "--data.paths", "[/missing_dir/*.txt]"], "/missing_dir/*.txt"),
    (GPT, ["--model.config.skip2lora_enabled", "true", "--model.config.skip2lora_block_indices", "[99]"],
     "skip2lora_block_indices"),
    (GPT, ["--model.config.n_embd", "130"], "n_embd"),
    # recovery callbacks validate their arguments too
    (DIGITS, ["--trainer.callbacks+=StabilityMonitor", "--trainer.callbacks.lr_factor", "0"],
     "trainer.callbacks[0] (StabilityMonitor): lr_factor must be in (0, 1]"),
    (DIGITS, ["--trainer.callbacks+=OOMRecovery", "--trainer.callbacks.max_retries", "0"],
     "(OOMRecovery): max_retries must be >= 1"),
    # continual learning: the glyph backbone and the glyph sequence
    (NESTED, ["--model.pretrained_file", "garbage.safetensors"],
     "model.pretrain and model.pretrained_file are exclusive"),
    (NESTED, ["--model.pretrain.steps", "0"], "pretrain.steps must be positive"),
    (NESTED, [*TINY_PRETRAIN, "--data.glyph_classes", "1000"], "glyph_classes must be in [2,"),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config, args, expected", CASES, ids=[f"{Path(c).stem}:{' '.join(a)[:40]}" for c, a, _ in CASES])
def test_bad_input_fails_clearly_before_training(in_tmp, capsys, config, args, expected):
    for name, text in FILES.items():
        (in_tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (in_tmp / name).write_text(text)
    run = in_tmp / "runs" / Path(config).stem / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"precious weights")
    (run / "events.out.tfevents.1").write_bytes(b"precious logs")
    before = snapshot(in_tmp / "runs")
    config_path = str(REPO / config) if config.startswith("configs/") else config
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", config_path, *args, "--trainer.max_steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err[-2000:]
    assert snapshot(in_tmp / "runs") == before
