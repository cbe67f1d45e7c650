"""OOMRecovery: fake out-of-memory errors at chosen steps; the run must equal a clean one."""

import csv
import logging

import pytest
import torch

from callbacks.oom_recovery import OOMRecovery, is_out_of_memory, split_batch
from tests.recovery_helpers import N_SAMPLES, ManualStepper, Regressor, trainer

# 30 samples, batch 8: 4 steps per epoch (8, 8, 8, 6); step 3 is the last (short) batch of epoch 0
FAULTS = dict(oom_forward={0: 4, 3: 2, 5: 4}, oom_backward={2: 4, 7: 5})


def fit(tmp_path, manual=False, callbacks=(), **faults):
    model = Regressor(manual=manual, **faults)
    stepper = ManualStepper() if manual else None
    cbs = [*callbacks, *([stepper] if stepper else [])]
    t = trainer(tmp_path, cbs)
    t.fit(model)
    return model, t, stepper


def assert_same_run(clean, faulty):
    for a, b in zip(clean.parameters(), faulty.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert faulty.epoch_ids == [list(range(N_SAMPLES))] * 2  # every sample exactly once per epoch
    assert faulty.epoch_losses[-1] == pytest.approx(clean.epoch_losses[-1], rel=1e-4)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_fake_oom_keeps_effective_batch_and_every_sample_once(tmp_path, manual, caplog):
    clean, clean_t, clean_stepper = fit(tmp_path / "clean", manual)
    cb = OOMRecovery()
    with caplog.at_level(logging.WARNING, logger="callbacks.oom_recovery"):
        faulty, t, stepper = fit(tmp_path / "faulty", manual, [cb], **FAULTS)
    assert_same_run(clean, faulty)
    if manual:  # optimizer steps unchanged by recoveries (stepping at on_train_batch_end: global_step stays 0)
        assert stepper.steps == clean_stepper.steps == 8
    else:
        assert t.global_step == clean_t.global_step == 8
    # step 0: 8 -> 4; step 3 (batch of 6): 4 -> 2; later faults fit in micro-batch 2
    assert [(r["old_micro_batch"], r["new_micro_batch"], r["accumulation"]) for r in cb.recoveries] == [
        (8, 4, 2), (4, 2, 3)]
    if not manual:
        assert [r["step"] for r in cb.recoveries] == [0, 3]
    assert cb.micro_batch_size == 2
    assert faulty.micro_sizes[-3:] == [2, 2, 2]  # the short last batch, split into 3 micro-batches
    assert "micro-batch 8 -> 4" in caplog.text and "accumulation 3" in caplog.text
    rows = list(csv.DictReader(open(t.logger.log_dir + "/metrics.csv")))
    assert [float(r["oom/micro_batch"]) for r in rows if r.get("oom/micro_batch")] == [4, 2]


def test_cpu_allocator_error_is_recovered_and_other_errors_propagate(tmp_path):
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    clean, *_ = fit(tmp_path / "clean")
    faulty, *_ = fit(tmp_path / "cpu", callbacks=[OOMRecovery()], oom_forward={1: 3}, cpu_oom_message=True)
    assert_same_run(clean, faulty)
    with pytest.raises(torch.OutOfMemoryError):  # without the callback the fault is real
        fit(tmp_path / "none", oom_forward={1: 3})


def test_gives_up_with_clear_error_and_checkpoint(tmp_path):
    cb = OOMRecovery(max_retries=2)
    model = Regressor(oom_forward={1: 0})  # nothing fits at step 1
    t = trainer(tmp_path, [cb], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match=r"out of memory at step 1 with micro-batch 2 after 2 retries") as e:
        t.fit(model)
    assert "oom-stop.ckpt" in str(e.value)
    ckpt = torch.load(str(e.value).split("checkpoint saved to ")[1].split(". ")[0], weights_only=False)
    assert ckpt["global_step"] == 1
    assert ckpt["callbacks"]["OOMRecovery"]["micro_batch_size"] == 2


def test_micro_batch_1_is_the_floor(tmp_path):
    with pytest.raises(RuntimeError, match="micro-batch 1"):
        trainer(tmp_path, [OOMRecovery(max_retries=10)]).fit(Regressor(oom_forward={0: 0}))


def test_state_dict_round_trip_and_split_batch():
    cb = OOMRecovery()
    cb.micro_batch_size, cb.recoveries = 3, [{"step": 4, "old_micro_batch": 6, "new_micro_batch": 3, "accumulation": 2}]
    other = OOMRecovery()
    other.load_state_dict(cb.state_dict())
    assert other.micro_batch_size == 3 and other.recoveries == cb.recoveries
    parts = split_batch({"x": torch.arange(5), "scale": torch.tensor(2.0), "name": "a"}, 2)
    assert [s for _, s in parts] == [2, 2, 1]
    assert torch.equal(parts[2][0]["x"], torch.tensor([4])) and parts[2][0]["scale"] == 2.0
    with pytest.raises(ValueError, match="max_retries"):
        OOMRecovery(max_retries=0)


def test_activation_checkpointing_switched_on_for_timm_backbone(tmp_path):
    from lightning_modules.image_classifier import ImageClassifier

    class Faulty(ImageClassifier):
        def training_step(self, batch, batch_idx):
            if batch[0].shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (fake)")
            return super().training_step(batch, batch_idx)

    model = Faulty(img_size=16, patch_size=8, lora_r=2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    cb = OOMRecovery(activation_checkpointing=True)
    trainer(tmp_path, [cb], max_epochs=1, logger=False).fit(model, loader)
    assert model.backbone.grad_checkpointing and cb.micro_batch_size == 2
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
