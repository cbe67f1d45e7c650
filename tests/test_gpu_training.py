"""CUDA only (marker ``gpu``, skipped without CUDA; ``bash benchmarks/gpu/check.sh`` runs them): training paths the
CPU cannot check. A few ``fit`` steps with ``strategy: fsdp`` and ``ddp`` on one device (Lightning refuses FSDP on
the CPU), ``bf16-mixed`` for every model family through its config (autocast really active: a plain ``nn.Linear``
/ ``nn.Conv2d`` returns bf16), and ``OOMRecovery`` on a real CUDA out-of-memory: a batch sized from the card's
free memory to overflow it, recovered by splitting, with the loss equal to the unsplit batch's and the update
equal to a gradient accumulated over other micro-batches.
"""

import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import cli
from callbacks.oom_recovery import OOMRecovery
from models.utils.checkpoint import safe_load
from tests.cli_helpers import REPO, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false"]
GPT_FAST = ["--data.max_windows", "16", "--data.batch_size", "8", "--data.seq_len", "32",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--model.sample_tokens", "8"]
CONTINUAL_TINY = ["--data.image_size", "16", "--data.epochs_per_task", "1", "--data.batch_size", "16",
                  "--data.glyph_classes", "4", "--data.glyph_images_per_class", "40", "--data.init_cls", "2",
                  "--data.increment", "2", "--model.num_classes", "4", "--model.img_size", "16",
                  "--model.patch_size", "8",
                  "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2, global_pool: avg}",
                  "--model.pretrain.classes", "4", "--model.pretrain.images_per_class", "4",
                  "--model.pretrain.steps", "2", "--model.pretrain.batch_size", "8",
                  "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
TRACKNET_SMALL = ["--data.synthetic.num_clips", "4", "--data.synthetic.frames_per_clip", "8",
                  "--data.synthetic.width", "128", "--data.synthetic.height", "64", "--data.batch_size", "4",
                  "--data.num_workers", "0", "--trainer.limit_val_batches", "1"]
PHASE1_TINY = ["--model.config.d_model", "32", "--model.config.n_layers", "2", "--model.config.intermediate_size",
               "64", *GPT_FAST]
PHASE2_TINY = ["--model.config.d_model", "16", "--model.config.n_heads", "2", "--model.config.head_dim", "8",
               "--model.config.n_layers", "1", "--model.config.chunk_size", "8", "--model.config.bk_chunk_size", "8",
               "--data.seq_len", "24", "--data.batch_size", "2", "--data.max_windows", "6",
               "--model.sample_tokens", "4", "--trainer.limit_val_batches", "2", "--model.warmup_steps", "1"]

#: one config per family (continual SEMA and Nested LoRA, TrackNet QLoRA, GPT, Phase 1, Phase 2, ViT classifier)
FAMILIES = {
    "sema_nested": CONTINUAL_TINY,
    "sema_adapter": [*CONTINUAL_TINY, "--model.expansion_layers", "[-1]"],
    "tracknet_qlora": TRACKNET_SMALL,
    "gpt_pretrain": GPT_FAST,
    "phase1_lm": PHASE1_TINY,
    "phase2_small": PHASE2_TINY,
    "vit_lora_digits": ["--trainer.limit_val_batches", "1"],
}


class MixedPrecisionProbe(L.Callback):
    """Output dtypes of the first plain ``nn.Linear`` / ``nn.Conv2d`` and the training losses of a run."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.losses: list[float] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        linear = next(m for m in pl_module.modules() if type(m) in (nn.Linear, nn.Conv2d))
        linear.register_forward_hook(lambda mod, inputs, out: self.dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.item())


@pytest.mark.parametrize("config", list(FAMILIES))
def test_bf16_mixed_fits_every_family(in_tmp, monkeypatch, config):
    probe = MixedPrecisionProbe()
    defaults = cli.trainer_defaults
    monkeypatch.setattr(cli, "trainer_defaults", lambda: {**defaults(), "callbacks": [*defaults()["callbacks"], probe]})
    run = run_cli(["fit", "--config", str(REPO / "configs" / f"{config}.yaml"), *GPU, *FAMILIES[config],
                   "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2"])
    assert run.trainer.precision == "bf16-mixed" and run.trainer.strategy.root_device.type == "cuda"
    assert torch.bfloat16 in probe.dtypes  # autocast was on around the model's matmuls
    logged = [v.item() for k, v in run.trainer.callback_metrics.items() if "loss" in k and v.numel() == 1]
    assert probe.losses or logged
    assert all(math.isfinite(v) for v in probe.losses + logged)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_fit_with_strategy_on_one_device(tmp_path, strategy):
    """The README's ``trainer.strategy`` choices through the CLI (own process: one process group per run)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "cli", "fit", "--config", str(REPO / "configs/gpt_pretrain.yaml"),
                          *GPU, *GPT_FAST, "--trainer.strategy", strategy, "--trainer.max_steps", "3"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "runs" / "gpt_pretrain" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = safe_load(ckpt)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------- real CUDA OOM recovery
class MemoryHog(L.LightningModule):
    """``depth`` element-wise layers ``x <- tanh(w_l * x + b_l)`` on features computed from sample indices: each
    sample saves ``depth * width`` floats for the backward and costs almost no arithmetic, so a batch sized from the
    card's free memory overflows it quickly. The batch is the index tensor (split by ``OOMRecovery``).

    Args:
        n_samples: samples in the single training batch.
        depth: layers.
        width: features per sample.
    """

    def __init__(self, n_samples: int, depth: int = 64, width: int = 1024) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.n_samples = n_samples
        self.w = nn.Parameter(1.0 + 0.05 * torch.randn(depth, width, generator=g))
        self.b = nn.Parameter(0.05 * torch.randn(depth, width, generator=g))
        self.register_buffer("freq", torch.linspace(1e-3, 1.0, width))
        self.step_losses: list[torch.Tensor] = []

    def loss_of(self, idx: torch.Tensor) -> torch.Tensor:
        x = torch.sin(idx.float()[:, None] * self.freq)
        for w, b in zip(self.w, self.b):
            x = torch.tanh(x * w + b)
        return x.sum(1).square().mean() / x.shape[1]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.loss_of(batch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.step_losses.append(outputs["loss"].detach())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([torch.arange(self.n_samples)], batch_size=None)


def _chunked(model: MemoryHog, idx: torch.Tensor, chunks: int, grad: bool) -> tuple[float, list[torch.Tensor]]:
    """Mean loss over ``idx`` (and its gradient) accumulated over ``chunks`` pieces."""
    total, grads = 0.0, [torch.zeros_like(p) for p in model.parameters()]
    for part in idx.chunk(chunks):
        weight = len(part) / len(idx)
        with torch.set_grad_enabled(grad):
            loss = model.loss_of(part)
        if grad:
            for acc, g in zip(grads, torch.autograd.grad(loss * weight, list(model.parameters()))):
                acc += g
        total += loss.item() * weight
    return total, grads


def test_oom_recovery_on_a_real_cuda_out_of_memory(tmp_path):
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    probe = MemoryHog(1).to(device)
    before = torch.cuda.memory_allocated(device)
    kept = probe.loss_of(torch.arange(4096, device=device))  # holds its saved activations
    per_sample = (torch.cuda.memory_allocated(device) - before) / 4096
    del kept, probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    n = int(2.5 * free / per_sample)  # the whole batch needs 2.5x the free memory: out of memory for sure

    model = MemoryHog(n).to(device)
    w0 = [p.detach().clone() for p in model.parameters()]
    idx = torch.arange(n, device=device)
    unsplit_loss, _ = _chunked(model, idx, 1, grad=False)  # the whole batch at once (no graph kept)
    _, ref_grads = _chunked(model, idx, 16, grad=True)  # accumulated over 16 pieces, not the callback's split
    del idx
    torch.cuda.empty_cache()

    cb = OOMRecovery(max_retries=8)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=tmp_path)
    trainer.fit(model)
    assert trainer.global_step == 1
    assert cb.recoveries and cb.recoveries[0]["old_micro_batch"] == n  # the real OOM hit the whole batch first
    assert cb.micro_batch_size < n and cb.recoveries[-1]["accumulation"] == math.ceil(n / cb.micro_batch_size)
    assert model.step_losses[0].item() == pytest.approx(unsplit_loss, rel=1e-4)
    for p0, p, g in zip(w0, model.parameters(), ref_grads):  # SGD lr 1: the update is minus the gradient
        torch.testing.assert_close(p0 - p.detach().to(device), g, rtol=1e-3, atol=1e-6)  # (fit ends on the CPU)
