"""StabilityMonitor: NaN/Inf and spikes in the loss, gradients and health signals; rollback and stop."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.stability import DivergenceError, StabilityMonitor
from tests.cli_helpers import run_ddp
from tests.recovery_helpers import ManualStepper, Regressor, trainer


class ParamRecorder(L.Callback):
    """Parameters and learning rate after every batch."""

    def __init__(self):
        self.params, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(pl_module.net.weight.detach().clone())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(tmp_path, monitor, manual=False, epochs=15, **faults):
    model = Regressor(manual=manual, **faults)
    rec = ParamRecorder()
    t = trainer(tmp_path, [monitor, rec] + ([ManualStepper()] if manual else []), max_epochs=epochs)
    t.fit(model)
    return model, t, rec


def monitor(**kw):
    kw = {"min_history": 3, "snapshot_every": 2, "spike_factor": 20.0, **kw}
    return StabilityMonitor(**kw)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("fault", ["nan_loss", "nan_grad", "loss_spike", "signal_spike"])
def test_single_fault_is_rolled_back_and_run_completes(tmp_path, manual, fault, caplog):
    clean, *_ = fit(tmp_path / "clean", monitor(), manual)
    assert clean.epoch_ids[-1] == list(range(30))
    faults = {"nan_loss": dict(nan_loss_steps={9}), "nan_grad": dict(nan_grad_steps={9}),
              "loss_spike": dict(loss_spikes={9}), "signal_spike": dict(signal_faults={9: 1e4})}[fault]
    mon = monitor()
    model, t, rec = fit(tmp_path / "faulty", mon, manual, **faults)
    expected = {"nan_loss": "loss is nan", "nan_grad": "gradient of parameter 'net.weight' is not finite",
                "loss_spike": "loss spiked", "signal_spike": "health signal 'bound' spiked"}[fault]
    assert mon.failures == 1 and expected in mon.first_failure and expected in caplog.text
    assert mon.lr_scale == 0.5 and rec.lrs[8] == 0.1 and rec.lrs[9] == 0.05 and rec.lrs[-1] == 0.05
    # rolled back to the snapshot taken after the 8th good batch (steps 0-7), i.e. the weights after step 7
    torch.testing.assert_close(rec.params[9], rec.params[7])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.epoch_ids == [list(range(30))] * 15
    assert model.epoch_losses[-1] == pytest.approx(clean.epoch_losses[-1], rel=0.1)


def test_consecutive_failures_stop_with_checkpoint_naming_first_divergence(tmp_path):
    mon = monitor(max_consecutive_failures=3)
    model = Regressor(signal_faults={6: float("inf")}, nan_grad_steps={7}, nan_loss_steps={8})
    rec = ParamRecorder()
    t = trainer(tmp_path, [mon, rec], max_epochs=5)
    with pytest.raises(DivergenceError, match=r"3 times in a row.*first diverged: health signal 'bound' is inf"):
        t.fit(model)
    ckpt = torch.load(tmp_path / "diverged.ckpt", weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["net.weight"], rec.params[5])  # snapshot after step 5
    assert ckpt["callbacks"]["StabilityMonitor"]["failures"] == 3
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_logs_grad_norm_param_norm_and_health_signals(tmp_path):
    model, t, rec = fit(tmp_path, monitor(), epochs=1)
    rows = list(csv.DictReader(open(t.logger.log_dir + "/metrics.csv")))
    for key in ("stability/grad_norm", "stability/param_norm", "health/bound", "stability/lr_scale"):
        assert any(r.get(key) for r in rows), key
    last = [r for r in rows if r.get("stability/param_norm")][-1]
    # measured after the last backward, before its optimizer step
    assert float(last["health/bound"]) == pytest.approx(float(rec.params[-2].norm()), rel=1e-4)


def test_monitor_only_and_state_round_trip(tmp_path):
    mon = monitor(recover=False, max_consecutive_failures=5)
    model, _, rec = fit(tmp_path, mon, epochs=3, loss_spikes={9})
    assert mon.failures == 1 and mon.lr_scale == 1.0 and rec.lrs[-1] == 0.1
    assert not torch.equal(rec.params[9], rec.params[7])  # no rollback, update skipped only
    torch.testing.assert_close(rec.params[9], rec.params[8])
    other = StabilityMonitor()
    other.load_state_dict(mon.state_dict())
    assert other.failures == 1 and list(other.history["loss"]) == list(mon.history["loss"])
    with pytest.raises(ValueError, match="lr_factor"):
        StabilityMonitor(lr_factor=0)


@pytest.mark.slow
def test_ddp_two_processes_with_rank_local_faults(tmp_path):
    """OOM on rank 1 only and a loss spike on rank 0 only: ranks must stay identical."""
    run_ddp([str(Path(__file__).with_name("ddp_recovery_script.py")), str(tmp_path)], cwd=tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]) and torch.isfinite(w).all(), name
    assert r0["global_step"] == r1["global_step"] == 16
    assert r0["oom"]["micro_batch_size"] is None and r1["oom"]["micro_batch_size"] == 4
    assert r0["stability"]["failures"] == r1["stability"]["failures"] == 1
    assert "loss spiked" in r0["stability"]["first_failure"]
    assert r1["stability"]["first_failure"] == "another rank diverged"
    assert r0["stability"]["lr_scale"] == r1["stability"]["lr_scale"] == 0.5


def test_fp16_grad_scaler_path(tmp_path):
    """With a fp16 GradScaler, a NaN step is skipped by the scaler (its scale halves) and rolled back;
    OOM recovery under the scaler still matches a clean scaled run."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from callbacks.oom_recovery import OOMRecovery

    def amp():
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))]

    mon = monitor()
    t = trainer(tmp_path / "nan", [mon], max_epochs=3, plugins=amp())
    model = Regressor(nan_loss_steps={5})
    t.fit(model)
    assert mon.failures == 1 and "loss is nan" in mon.first_failure
    assert t.precision_plugin.scaler.get_scale() == 512.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = list(csv.DictReader(open(t.logger.log_dir + "/metrics.csv")))
    assert [float(r["stability/loss_scale"]) for r in rows if r.get("stability/loss_scale")][-1] == 512.0

    clean = Regressor()
    trainer(tmp_path / "clean", max_epochs=2, plugins=amp()).fit(clean)
    faulty = Regressor(oom_forward={0: 4, 3: 2})
    trainer(tmp_path / "oom", [OOMRecovery()], max_epochs=2, plugins=amp()).fit(faulty)
    for a, b in zip(clean.parameters(), faulty.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
