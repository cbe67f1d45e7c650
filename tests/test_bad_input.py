"""Bad input across the CLI: one clear ``error:`` line naming the key or file, before any training, with
existing ``runs/`` output left byte-identical. Extend ``CASES`` with ``(config, extra args, expected text)``.

Paths in args may use the files made by ``FILES`` (relative to the test's working directory).
"""

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_helpers import REPO, run_cli

DIGITS = "configs/vit_lora_digits.yaml"
TRACKNET = "configs/tracknet_lora.yaml"
GPT = "configs/gpt_pretrain.yaml"
PHASE2 = "configs/phase2_small.yaml"
PHASE1 = "configs/phase1_lm.yaml"
NESTED = "configs/sema_nested.yaml"
#: a tiny glyph pre-training, so cases that fail after the model is built (data errors) stay fast
TINY_PRETRAIN = ["--model.pretrain.classes", "2", "--model.pretrain.images_per_class", "2",
                 "--model.pretrain.steps", "1",
                 "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2, global_pool: avg}"]

def _image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 16), seed: int = 0) -> bytes:
    """A small noisy RGB image encoded as ``fmt`` (noise: the encoded data is long enough to cut in half)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _clip(folder: str, frames: dict[str, bytes], label: bytes | None = None) -> dict[str, bytes]:
    """A TrackNet v2-style clip folder: ``Label.csv`` (ball invisible in every frame) beside its frames."""
    label = label if label is not None else b"Frame,Visibility,X,Y\n" + b"".join(
        b"%d,0,,\n" % int(Path(n).stem) for n in frames)
    return {f"{folder}/Label.csv": label, **{f"{folder}/{n}": b for n, b in frames.items()}}


_PNG, _JPG = _image_bytes(), _image_bytes("JPEG")
#: files of the TrackNet and continual bad-data cases (one damaged file or folder each)
IMAGE_FILES = {
    **_clip("tn_corrupt/clip", {"0.png": _PNG, "1.png": _PNG, "2.png": b"\x89PNG\r\n\x1a\n garbage"}),
    **_clip("tn_truncated/clip", {"0.png": _PNG, "1.png": _PNG[: len(_PNG) // 2], "2.png": _PNG}),
    **_clip("tn_latin1/clip", {"0.png": _PNG}, "Frame,Visibility,X,Y\n0,0,,\n# r\xe9sum\xe9\n".encode("latin-1")),
    **_clip("tn_binary/clip", {"0.png": _PNG}, b"Frame,Visibility,X,Y\n0,0,,\n\x00\x01\x02\n"),
    "cl_corrupt/a/0.png": _PNG, "cl_corrupt/a/1.png": _PNG, "cl_corrupt/b/0.png": _PNG,
    "cl_corrupt/b/1.png": b"not an image at all",
    "cl_truncated/a/0.jpg": _JPG, "cl_truncated/a/1.jpg": _JPG, "cl_truncated/b/0.jpg": _JPG[:-200],
    "cl_truncated/b/1.jpg": _JPG,
    "cl_good/a/0.png": _PNG, "cl_good/a/1.png": _JPG, "cl_good/b/0.png": _PNG, "cl_good/b/1.png": _PNG,
    "cl_empty/a/0.png": _PNG, "cl_empty/a/1.png": _PNG, "cl_empty/b/notes.txt": b"no images here",
    "cifar_truncated/cifar-100-python/train": pickle.dumps({"data": [0] * 3072, "fine_labels": [0]})[:20],
    "cifar_truncated/cifar-100-python/test": pickle.dumps({"data": [0] * 3072, "fine_labels": [0]})[:20],
}

#: an image-folder sequence of two classes in two tasks (continual bad-data cases)
FOLDER = ["--data.dataset", "image_folder", "--data.init_cls", "1", "--data.increment", "1",
          "--data.val_fraction", "0", "--data.test_fraction", "0", "--model.num_classes", "2"]
#: one TrackNet clip folder used whole for training
ONE_CLIP = ["--data.val_fraction", "0", "--data.test_fraction", "0"]


class _RunsCode:
    """Unpickling this runs ``exec``: were it ever loaded, the test process would exit with status 99."""

    def __reduce__(self):
        return exec, ("raise SystemExit(99)",)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


#: files created in the working directory before each case (str: UTF-8 text, bytes: as is)
FILES = {
    "typo.yaml": "trainer:\n  max_epoch: 2\n",
    "broken.yaml": "model: [a, b\ndata: 1\n",
    "empty.yaml": "# nothing but a comment\n",
    "string.yaml": "configs/vit_lora_digits.yaml\n",
    "garbage.safetensors": "\x00\x01 not a safetensors file",
    "a_directory/keep": "",
    "evil.ckpt": _torch_bytes({"state_dict": {}, "hyper_parameters": _RunsCode()}),
    "plain_state_dict.ckpt": _torch_bytes({"weight": torch.zeros(2)}),
    "gpt_run.ckpt": _torch_bytes({"state_dict": {}, "hyper_parameters": {
        "_class_path": "lightning_modules.gpt.GPTLanguageModel", "lr": 0.002}}),
    "text/latin1.txt": "caf\xe9 ".encode("latin-1") * 200,
    "text/binary.txt": b"text" * 100 + b"\x00\x01\x02" + b"text" * 100,
    "text/good.txt": "hello world " * 200,
    "text/docs.jsonl": '{"text": "ok"}\n{"body": "no text field"}\n',
    "not_a_tokenizer.json": "{not json",
    "hf_folder/config.json": '{"model_type": "llama"}',
    "phase1_flat_default.yaml": "model:\n  init_args:\n    config:\n      bk_chunk_size: 256\n",  # the default
    **IMAGE_FILES,
    # a CIFAR-100 folder whose pickles would run code (exit 99) if read with plain pickle.load
    **{f"cifar_evil/cifar-100-python/{name}": pickle.dumps({"data": _RunsCode(), "fine_labels": [0]})
       for name in ("train", "test")},
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
    ("empty.yaml", [], "config file 'empty.yaml' is empty"),
    (DIGITS, ["--config", "string.yaml"], "config file 'string.yaml' must be a mapping of keys"),
    (DIGITS, ["--seed_everything", "4294967296"], "seed_everything must be in [0, 4294967295]"),
    (DIGITS, ["--seed_everything=-3"], "seed_everything must be in [0, 4294967295]"),
    (DIGITS, ["--checkpoint.every_n_train_steps=-1"], "checkpoint.every_n_train_steps must be >= 0, got -1"),
    (DIGITS, ["--model.pretrained_file", "/missing.safetensors"],
     "pretrained_file '/missing.safetensors' does not exist"),
    (DIGITS, ["--model.pretrained_file", "garbage.safetensors"],
     "pretrained_file 'garbage.safetensors' could not be loaded"),
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
    (TRACKNET, ["--data.predict_path", "/missing.mp4"], "predict_path '/missing.mp4' does not exist"),
    (TRACKNET, ["--data.gap_policy", "drop"], "gap_policy"),
    (TRACKNET, ["--model.tolerance_space", "image"], "tolerance_space"),
    (TRACKNET, ["--model.reference_size", "[512, 0]"], "reference_size"),
    (TRACKNET, ["--model.peak_method", "argmax"], "peak_method"),
    (TRACKNET, ["--model.temporal_ensemble", "true"], "temporal_ensemble needs output_frames: all"),
    (TRACKNET, ["--model.temporal_ensemble", "weight"], "temporal_ensemble needs output_frames: all"),
    (TRACKNET, ["--data.split", "by_match"], "split"),
    (TRACKNET, ["--model.heatmap.centre", "round"], "centre"),
    # (source: files no longer needs `--data.include null`)
    (GPT, ["--data.source", "files", "--data.paths", "[/missing_dir/*.txt]"], "/missing_dir/*.txt"),
    (GPT, ["--model.config.skip2lora_enabled", "true", "--model.config.skip2lora_block_indices", "[99]"],
     "skip2lora_block_indices"),
    (GPT, ["--model.config.n_embd", "130"], "n_embd"),
    # sizes that do not fit together across model and data (checked before any run folder exists)
    (GPT, ["--data.seq_len", "256"], "data.seq_len (256) exceeds model.config.block_size (128)"),
    (DIGITS, ["--data.image_size", "16"], "data.image_size (16) differs from model.img_size (32)"),
    (DIGITS, ["--model.num_classes", "5"], "the data has 10 classes but model.num_classes is 5"),
    (DIGITS, ["--model.img_size", "30", "--data.image_size", "30"],
     "`img_size` (30) is not a multiple of `patch_size`"),
    # learning rates, fractions and Trainer arguments out of range
    (DIGITS, ["--model.lr", "-0.1"], "model (ImageClassifier): `lr` must be positive"),
    (DIGITS, ["--model.weight_decay", "-1"], "`weight_decay` must be >= 0"),
    (GPT, ["--model.lr", "0"], "`lr` must be positive"),
    (DIGITS, ["--data.val_fraction", "1.5"], "data (DigitsDataModule): val_fraction"),
    (DIGITS, ["--data.test_fraction", "-0.2"], "data (DigitsDataModule): val_fraction"),
    (GPT, ["--data.val_fraction", "-0.1"], "data (TextDataModule): `val_fraction`"),
    (DIGITS, ["--trainer.max_epochs", "-5"], "trainer.max_epochs must be >= -1"),
    (DIGITS, ["--trainer.limit_val_batches", "-1"], "trainer.limit_val_batches must be >= 0"),
    (DIGITS, ["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be >= 1"),
    (DIGITS, ["--trainer.precision", "13"], "trainer.precision"),
    (DIGITS, ["--trainer.devices", "0"], "trainer: "),
    # data that cannot be read names the file
    (GPT, ["--data.source", "files", "--data.paths", "[text/latin1.txt, text/good.txt]", "--data.val_fraction", "0",
           "--data.test_fraction", "0", "--data.seq_len", "16"], "latin1.txt' is not valid UTF-8"),
    (GPT, ["--data.source", "files", "--data.paths", "[text/binary.txt, text/good.txt]", "--data.val_fraction", "0",
           "--data.test_fraction", "0", "--data.seq_len", "16"], "binary.txt' contains NUL bytes"),
    (GPT, ["--data.source", "files", "--data.paths", "[text/good.txt]"], "the val split is empty"),
    # language-model data, tokenizers, prompts and foreign checkpoints (issue 24)
    (GPT, ["--data.source", "files", "--data.paths", "[text/docs.jsonl]", "--data.split_by", "position"],
     "docs.jsonl' line 2 has no string field 'text'"),
    (GPT, ["--data.tokenizer", "missing_tokenizer.json"], "data.tokenizer: 'missing_tokenizer.json' does not exist"),
    (PHASE2, ["--data.tokenizer", "not_a_tokenizer.json"], "not_a_tokenizer.json"),
    (PHASE1, ["--model.prompt_file", "missing_prompts.txt"], "model.prompt_file 'missing_prompts.txt'"),
    (GPT, ["--model.generation.top_p", "1.5"], "generation.top_p must be in (0, 1]"),
    (GPT, ["--model.pretrained_path", "hf_folder"], "model_type 'llama' is not 'gpt2'"),
    # checkpoints: never unpickled unsafely; truncated, foreign, other model or no earlier run: one line
    (GPT, ["--model.pretrained_path", "evil.ckpt"], "'builtins.exec', which could run code"),
    (DIGITS, ["--ckpt_path", "evil.ckpt"], "'builtins.exec', which could run code"),
    (DIGITS, ["--ckpt_path", "last"], "is truncated or not a PyTorch checkpoint"),  # the "precious" last.ckpt
    (DIGITS, ["--ckpt_path", "plain_state_dict.ckpt"], "is not a Lightning checkpoint"),
    (DIGITS, ["--ckpt_path", "gpt_run.ckpt"], "model (class): 'lightning_modules.gpt.GPTLanguageModel' -> "
                                              "'lightning_modules.image_classifier.ImageClassifier'"),
    (DIGITS, ["--ckpt_path", "last", "--trainer.logger.init_args.name", "never_ran"],
     "ckpt_path 'last': no earlier run of this config"),
    # Phase 2 language model
    (PHASE2, ["--model.config.base_decay", "-0.1"], "config.base_decay must be >= 0"),
    (PHASE2, ["--model.config.d_model", "30"], "config.d_model (30) must be divisible by config.n_heads"),
    (PHASE2, ["--model.config.backend", "triton", "--model.config.resonance_damping", "0.5"],
     "config.backend 'triton' has no resonance damping"),
    (PHASE2, ["--model.config.snr_threshold", "0"], "config.snr_threshold must be positive or null"),
    (PHASE2, ["--model.config.norm_eps=-1e-5"], "config.norm_eps must be > 0, got -1e-05"),
    (PHASE2, ["--model.min_lr", "0.1"], "model (Phase2LanguageModel): `lr` must be positive and `min_lr` in [0, lr]"),
    # Phase 1 LM: unknown nested keys, impossible sizes, unknown presets
    (PHASE1, ["--model.phase1", '{"ar_ssm": {"max_rnk": 3}}'], "phase1.ar_ssm.max_rnk is not a Phase 1 option"),
    (PHASE1, ["--model.phase1", '{"preset": "4gb"}'], "phase1.preset must be one of"),
    (PHASE1, ["--model.config.ar_ssm_min_rank", "40"], "ar_ssm_min_rank"),
    (PHASE1, ["--model.config.lns_format", "lns3"], "config.lns_format"),
    # vocabulary vs data for Phase 1 / Phase 2 (byte-level data: 256 token ids)
    (PHASE1, ["--model.config.vocab_size", "100"],
     "has 256 tokens but model.config.vocab_size is 100"),
    (PHASE2, ["--model.config.vocab_size", "100"], "has 256 tokens but model.config.vocab_size is 100"),
    # Phase 1: one source of truth for a key set both flat and nested; values the nested group cannot type
    (PHASE1, ["--model.config.htt_rank", "4"], "config.htt_rank (4) and phase1.htt.rank (16) set the same option"),
    # ... also when the flat value is the default (known as given from what the files and command line contain)
    (PHASE1, ["--model.config.ar_ssm_max_rank", "32"],
     "config.ar_ssm_max_rank (32) and phase1.ar_ssm.max_rank (16) set the same option"),
    (PHASE1, ["--config", "phase1_flat_default.yaml"], "config.bk_chunk_size (256) and phase1.bk.chunk_size (128)"),
    (PHASE1, ["--model.phase1", '{"preset": "8gb"}'], "config.d_model (128) would be ignored: phase1.preset '8gb'"),
    (PHASE1, ["--model.phase1", '{"memory": {"target_vram_gb": 4.0}}'],
     "config.d_model (128) would be ignored: phase1.memory.target_vram_gb picks the sizes"),
    (PHASE1, ["--model.phase1", '{"preset": "8gb"}', "--model.config.d_model", "64"],
     "config.d_model (64) would be ignored: phase1.preset '8gb' sets every field"),
    (PHASE1, ["--model.config.norm_eps=-1e-5"], "config.norm_eps must be > 0"),
    (PHASE1, ["--model.phase1", '{"ar_ssm": {"l1_regularization": -0.1}}'],
     "config.ar_ssm_l1_regularization >= 0, got 1e-05, -0.1"),
    (PHASE1, ["--model.phase1", '{"ar_ssm": {"max_rank": 4096}}'],
     "config.ar_ssm_max_rank (4096) must not exceed the model width config.d_model (128)"),
    (PHASE1, ["--model.config.htt_rank", "500", "--model.phase1", '{"htt": {"rank": 500}}'],
     "config.htt_rank (500) must not exceed the model width"),
    (PHASE1, ["--model.phase1", '{"bk": {"eta": .nan}}'], "phase1.bk.eta must be a finite number, got nan"),
    (PHASE1, ["--model.phase1", '{"htt": {"rank": "sixteen"}}'], "phase1.htt.rank must be an integer, got 'sixteen'"),
    (PHASE1, ["--model.phase1", '{"memory": {"gradient_checkpointing": "yes"}}'],
     "phase1.memory.gradient_checkpointing must be true or false"),
    # a monitored metric nobody logs (a typo) fails before training, listing the names that are logged
    (DIGITS, ["--checkpoint.monitor", "val/los"], "checkpoint.monitor 'val/los' is not a metric that ImageClassifier"),
    (PHASE2, ["--checkpoint.monitor", "val_loss"], "checkpoint.monitor 'val_loss' is not a metric"),
    (TRACKNET, ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/F1"],
     "EarlyStopping.monitor 'val/F1' is not a metric that HeatmapTracker or its callbacks log; they log: "),
    (NESTED, [*TINY_PRETRAIN, "--checkpoint.monitor", "val/accuracy"], "val/acc, val/loss"),
    # Trainer settings a module cannot work with (TrainerCompatibility), checked before any run folder
    (NESTED, [*TINY_PRETRAIN, "--trainer.max_epochs", "40"], "trainer.max_epochs=40 exceeds it: the sequence is 10"),
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
    # image data that cannot be read names the file or folder (DataModule preflight)
    (TRACKNET, ["--data.data_root", "tn_corrupt", *ONE_CLIP], "clip/2.png' is corrupt or truncated"),
    (TRACKNET, ["--data.data_root", "tn_truncated", *ONE_CLIP], "clip/1.png' is corrupt or truncated"),
    (TRACKNET, ["--data.data_root", "tn_latin1", *ONE_CLIP], "clip/Label.csv: label file is not valid UTF-8"),
    (TRACKNET, ["--data.data_root", "tn_binary", *ONE_CLIP], "clip/Label.csv: not a readable CSV label file"),
    (TRACKNET, ["--data.data_root", "a_directory"], "data_root 'a_directory' holds no clip folders"),
    (TRACKNET, ["--data.val_fraction", "0.5", "--data.test_fraction", "0.5"], "+ test_fraction (0.5) must be < 1"),
    (TRACKNET, ["--data.synthetic.num_clips", "2"], "2 clips cannot be split with val_fraction=0.2"),
    (NESTED, [*TINY_PRETRAIN, *FOLDER, "--data.root", "cl_corrupt"], "b/1.png' is corrupt or truncated"),
    (NESTED, [*TINY_PRETRAIN, *FOLDER, "--data.root", "cl_truncated"], "b/0.jpg' is corrupt or truncated"),
    (NESTED, [*TINY_PRETRAIN, *FOLDER, "--data.root", "cl_empty"],
     "class folder 'cl_empty/b' (under data.root) has no images"),
    (NESTED, [*TINY_PRETRAIN, "--data.dataset", "cifar100", "--data.root", "cifar_truncated"],
     "train' is truncated or not a CIFAR-100 python file"),
    (NESTED, [*TINY_PRETRAIN, "--data.dataset", "cifar100", "--data.root", "cifar_evil"],
     "cifar-100-python/train' contains a pickled reference to 'builtins.exec', which could run code"),
    # model and data sizes that do not fit (LightningModule check_data, or the model's own arguments)
    (TRACKNET, ["--data.num_frames", "5"], "data.num_frames (5) differs from model.num_frames (3)"),
    (TRACKNET, ["--data.heatmap", "{size: [64, 36], sigma: 2.0}"],
     "data.heatmap.size [64, 36] differs from model.heatmap.size [128, 72]"),
    (TRACKNET, ["--data.frame_size", "[64, 32]"], "data.frame_size [64, 32] differs from model.img_size [128, 72]"),
    (TRACKNET, ["--model.img_size", "[132, 72]", "--data.frame_size", "[132, 72]"],
     "model.img_size [132, 72] ([W, H]; default: heatmap.size) is not a multiple of model.backbone.patch_size (8)"),
    (NESTED, [*TINY_PRETRAIN, "--data.glyph_classes", "10"],
     "the data has 10 classes (data.glyph_classes) but model.num_classes is 50"),
    (NESTED, [*TINY_PRETRAIN, *FOLDER, "--data.root", "cl_good", "--model.num_classes", "3"],
     "the data has 2 classes (class folders under data.root) but model.num_classes is 3"),
    (NESTED, [*TINY_PRETRAIN, "--data.init_cls", "60"], "init_cls must be in [1, 50]"),
    (NESTED, [*TINY_PRETRAIN, "--data.image_size", "16"], "data.image_size (16) differs from model.img_size (32)"),
    (NESTED, [*TINY_PRETRAIN, "--model.img_size", "30", "--data.image_size", "30"],
     "model.img_size (30) is not a multiple of model.patch_size (8)"),
    (NESTED, ["--model.pretrain", "null", "--model.patch_size", "null", "--model.img_size", "40",
              "--data.image_size", "40", "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"],
     "model.img_size (40) is not a multiple of vit_tiny_patch16_224's patch size (16"),
    (NESTED, ["--model.expansion_order", "sideways"], "expansion_order"),
    (NESTED, ["--model.adapter_type", "adapterless"], "adapter_type must be one of"),
    (NESTED, ["--model.classifier", "knn"], "classifier"),
    (NESTED, [*TINY_PRETRAIN, "--data.dataset", "multidomain", "--data.domain_classes", "[13, 17, 10, 10]"],
     "put a domain boundary inside a task"),
    (NESTED, ["--trainer.callbacks+=ContinualEvaluation", "--trainer.callbacks.split", "train"], "split"),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config, args, expected", CASES,
                         ids=[f"{Path(c).stem}:{' '.join(a)[:40]}" for c, a, _ in CASES])
def test_bad_input_fails_clearly_before_training(in_tmp, capsys, config, args, expected):
    for name, content in FILES.items():
        (in_tmp / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (in_tmp / name).write_bytes(content)
        else:
            (in_tmp / name).write_text(content)
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
