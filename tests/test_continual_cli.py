"""Whole task sequences through the CLI: every continual config, results.json, TensorBoard, resume, DDP."""

import json

import pytest
import torch

from tests.cli_helpers import run_ddp
from tests.continual_helpers import QUIET, REPO, TINY_DATA, TINY_MODEL, run_cli, write_cifar100


def _results(root, name):
    return json.loads((root / "runs" / name / "version_0" / "results.json").read_text())


def test_nested_sequence_metrics_steps_and_tensorboard(in_tmp):
    run_cli(["fit", "--config", str(REPO / "configs/sema_nested.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET,
             "--model.slow_update_interval", "3", "--trainer.limit_train_batches", "4"])
    res = _results(in_tmp, "sema_nested")
    R = res["accuracy_matrix"]
    assert [len(r) for r in R] == [1, 2, 3, 4, 5] and res["tasks_finished"] == 5
    assert all(0.0 <= a <= 1.0 for row in R for a in row)
    from models.metrics import continual as cm
    assert res["forgetting"] == pytest.approx(cm.forgetting(R)) and res["bwt"] == pytest.approx(cm.backward_transfer(R))
    assert res["avg_incremental_acc"] == pytest.approx(sum(res["acc_seen"]) / 5)
    # 4 batches per task: fast steps every batch; slow at batch 3 and at the task's last batch (window closed)
    assert res["fast_steps"] == 20 and res["slow_steps"] == 5 * 2
    assert [e["task"] for e in res["consolidations"]] == [0, 1, 2, 3, 4]
    assert all(0.0 <= e["truncation_error_max"] < 1.0 for e in res["consolidations"])
    assert res["trainable_params"]["slow"] > 0 and res["trainable_params"]["fast"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(in_tmp / "runs" / "sema_nested" / "version_0"), size_guidance={"images": 0}).Reload()
    assert "cl/accuracy_matrix" in ev.Tags()["images"]
    scalars = set(ev.Tags()["scalars"])
    for tag in ("cl/avg_incremental_acc", "cl/forgetting", "cl/bwt", "lr/fast", "lr/slow", "lr/head",
                "train/slow_interval", "consolidation/truncation_error_max", "params/trainable",
                "nested/slow_delta_norm", "cl/old_acc", "cl/new_acc", "adapters/relative_delta"):
        assert tag in scalars, tag
    for tag in ("cl/accuracy_matrix", "cl/task_confusion", "cl/old_new"):
        assert tag in ev.Tags()["images"], tag
    import yaml
    init = yaml.safe_load((REPO / "configs/sema_nested.yaml").read_text())["model"]["init_args"]
    # each tag reads its own parameter group (lr/fast was the head's lr before): its cosine decay stays below its
    # own peak lr and reaches above half of it (lr_head, lr_fast and lr_slow differ by 10x each)
    for tag, key in (("lr/fast", "lr_fast"), ("lr/head", "lr_head"), ("lr/slow", "lr_slow")):
        values = [e.value for e in ev.Scalars(tag)]
        assert 0.5 * init[key] < max(values) <= init[key] * (1 + 1e-6), (tag, max(values), init[key])  # float32
    assert res["relative_delta"] > 0 and "acc_adapters_off" in res
    ckpt = torch.load(in_tmp / "runs/sema_nested/version_0/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20


@pytest.mark.parametrize("config,adapter,tasks", [
    ("sema_lora.yaml", "lora", 5), ("sema_adapter.yaml", "sema", 5), ("continual_simplecil.yaml", "none", 5),
    ("continual_ranpac.yaml", "none", 5), ("continual_aper.yaml", "aper", 5),
    ("continual_aper_ridge.yaml", "aper", 5), ("continual_joint.yaml", "lora", 1),
    ("continual_multidomain.yaml", "sema", 5)])
def test_other_configs_run_the_sequence(in_tmp, config, adapter, tasks):
    extra = ["--model.expansion_layers", "[-1]"] if adapter == "sema" else []  # the tiny ViT has one block
    extra += {"continual_joint.yaml": ["--data.init_cls", "10", "--data.epochs_per_task", "1"],
              "continual_multidomain.yaml": ["--data.domain_classes", "[2, 2, 2, 4]"]}.get(config, [])
    run_cli(["fit", "--config", str(REPO / "configs" / config), *TINY_MODEL, *TINY_DATA, *QUIET, *extra])
    folder = in_tmp / "runs" / config.removesuffix(".yaml") / "version_0"
    res = json.loads((folder / "results.json").read_text())
    assert res["adapter_type"] == adapter and len(res["accuracy_matrix"]) == tasks
    assert all((folder / f"{name}.png").is_file() for name in ("accuracy_matrix", "task_confusion", "old_new"))
    assert "acc_adapters_off" in res and len(res["task_records"]) == tasks
    if adapter == "sema":
        assert res["sema_layout"] and all(isinstance(e["layer"], int) for e in res["expansions"])
    if res["classifier"] != "linear":  # the statistics classifier is fitted and classifies after every task
        assert res["classifier"] == ("ridge" if "ranpac" in config or "ridge" in config else "ncm")


def test_cifar100_vitb_config_smoke_with_tiny_override(in_tmp):
    root = write_cifar100(in_tmp / "data", per_class_train=2, per_class_test=1)
    cli = run_cli(["fit", "--config", str(REPO / "configs/sema_cifar100_vitb.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.precision", "32-true", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
             "--trainer.limit_val_batches", "1",
             "--model.backbone", "vit_tiny_patch16_224", "--model.pretrained_file", "null", *TINY_MODEL,
             "--data.root", str(root), "--data.image_size", "16", "--data.num_workers", "0",
             "--model.expansion_layers", "[-1]", "--data.val_fraction", "0.5", "--data.epochs_per_task", "1",
             "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 1 and cli.model.hparams.num_classes == 100
    assert len(cli.model.R) == 1 and len(cli.model.R[0]) == 1  # task 0 (10 classes) scored after its one epoch
    assert _results(in_tmp, "sema_cifar100_vitb")["adapter_type"] == "sema"


def test_resume_mid_sequence_keeps_task_and_matrix(in_tmp):
    common = ["fit", "--config", str(REPO / "configs/sema_nested.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET,
              "--data.epochs_per_task", "2"]
    run_cli(common + ["--trainer.max_epochs", "5"])  # stops in the middle of task 2 (epochs 4-5)
    first = _results(in_tmp, "sema_nested")
    assert len(first["accuracy_matrix"]) == 2  # task 2 is unfinished, so it has no row yet
    ckpt = in_tmp / "runs/sema_nested/version_0/checkpoints/last.ckpt"
    state = torch.load(ckpt, weights_only=False)["continual"]
    assert state["task"] == 2 and state["finished_task"] == 1 and len(state["R"]) == 2
    cli = run_cli(common + ["--ckpt_path", str(ckpt)])
    module = cli.model
    assert module.R[:2] == first["accuracy_matrix"]
    assert len(module.R) == 5 and module.finished_task == 4
    assert cli.trainer.global_step == 10 * 2  # 5 tasks x 2 epochs x 2 batches, counted across the resume
    from callbacks.consolidation import TaskBoundaryConsolidation
    (cons,) = [c for c in cli.trainer.callbacks if isinstance(c, TaskBoundaryConsolidation)]
    assert [e["task"] for e in cons.events] == [0, 1, 2, 3, 4]  # restored events, none repeated
    assert _results(in_tmp, "sema_nested")["accuracy_matrix"] == first["accuracy_matrix"]  # run 1's file kept
    assert json.loads(next((in_tmp / "runs/sema_nested").glob("version_1/results.json")).read_text())[
        "accuracy_matrix"] == module.R


@pytest.mark.parametrize("override,message", [
    (["--model.num_classes", "12"], "num_classes"),
    (["--trainer.max_epochs", "9"], "max_epochs"),
    (["--model.adapter_type", "lora"], "TaskBoundaryConsolidation"),
])
def test_bad_settings_fail_before_training(in_tmp, capsys, override, message):
    args = ["fit", "--config", str(REPO / "configs/sema_nested.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET, *override]
    if message == "TaskBoundaryConsolidation":
        args += ["--trainer.callbacks+=TaskBoundaryConsolidation"]
    with pytest.raises(SystemExit) as e:  # cli.py: one error line; the files of the failed run are removed
        run_cli(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()
    assert not list(in_tmp.rglob("results.json")) and not list(in_tmp.rglob("*.ckpt"))


@pytest.mark.slow
def test_ddp_two_processes_nested_lora(in_tmp):
    """2 CPU processes (gloo): the sequence finishes and every rank ends with the same adapters."""
    script = in_tmp / "ddp_run.py"
    script.write_text(
        "import sys, torch, os\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import cli as adaptlab_cli\n"
        "cli = adaptlab_cli.main(sys.argv[1:])  # sys.argv kept: Lightning relaunches this script per rank\n"
        "rank = cli.trainer.global_rank\n"
        "state = {k: v for k, v in cli.model.state_dict().items() if 'adapters' in k or k.startswith('model.head')}\n"
        "torch.save({'state': state, 'fast': cli.trainer.callbacks[0].fast_steps, 'R': cli.model.R}, "
        "f'rank{rank}.pt')\n"
    )
    args = ["fit", "--config", str(REPO / "configs/sema_nested.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET,
            "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu",
            "--model.slow_update_interval", "2"]
    run_ddp([str(script), *args], cwd=in_tmp, timeout=300)
    r0, r1 = torch.load(in_tmp / "rank0.pt"), torch.load(in_tmp / "rank1.pt")
    assert len(r0["R"]) == 5 and r0["R"] == r1["R"]
    assert r0["fast"] == r1["fast"] == 5 * 2
    for k, v in r0["state"].items():
        torch.testing.assert_close(v, r1["state"][k], msg=k)
    assert any("slow" in k and v.abs().sum() > 0 for k, v in r0["state"].items())
    assert _results(in_tmp, "sema_nested")["tasks_finished"] == 5


def test_sema_resume_rebuilds_expanded_adapters(in_tmp):
    """A threshold below every z-score forces an expansion at each new task; the checkpoint must rebuild them."""
    common = ["fit", "--config", str(REPO / "configs/sema_adapter.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET,
              "--model.expansion_layers", "[-1]", "--model.expansion_threshold", "-1000"]
    run_cli(common + ["--trainer.max_epochs", "3"])
    ckpt = in_tmp / "runs/sema_adapter/version_0/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=False)["continual"]["sema_layout"] == {"0": [0, 1, 2]}
    cli = run_cli(common + ["--ckpt_path", str(ckpt)])
    assert cli.model.model.method.layout() == {0: [0, 1, 2, 3, 4]}
    assert [(e["task"], e["layer"]) for e in cli.model.method.expansions] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    assert len(cli.model.R) == 5


#: SEMA on a 2-block backbone, both blocks expandable, a threshold below every z-score (both layers expand at every
#: new task), a short descriptor phase.
SEMA_TWO_LAYERS = ["fit", "--config", str(REPO / "configs/sema_adapter.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET,
                   "--model.backbone_kwargs", "{depth: 2, embed_dim: 32, num_heads: 2, global_pool: avg}",
                   "--model.expansion_layers", "[0, 1]", "--model.expansion_threshold", "-1000",
                   "--model.descriptor_epochs", "2"]


def _sema(state: dict, layer: int, kind: str, k: int) -> dict:
    prefix = f"model.backbone.blocks.{layer}.mlp.sema.{kind}.{k}."
    return {n[len(prefix):]: v for n, v in state.items() if n.startswith(prefix)}


@pytest.mark.parametrize("order", ["layerwise", "joint"])
def test_sema_expansion_order_in_a_whole_sequence(in_tmp, order):
    """Both layers expand at each new task. Layer by layer, every later task gets one extra phase of
    ``epochs_per_task`` Lightning epochs (5 + 4 = 9 epochs): the shallow layer's new adapter trains there through
    ``training_step`` and the trainer's optimizers (``global_step`` counts its batches), then its descriptor is
    fitted and it is frozen before the deep layer is tested, so only the deep adapter trains in the task's regular
    epochs; jointly, both train then (5 epochs). The layerwise run stops after task 0, then after task 1's layer
    phase (the descriptor fit and the deep layer's test still due), and resumes in place each time."""
    args = SEMA_TWO_LAYERS + ["--model.expansion_order", order]
    folder = in_tmp / "runs/sema_adapter/version_0"
    ckpt = folder / "checkpoints/last.ckpt"
    if order == "layerwise":
        run_cli(args + ["--trainer.max_epochs", "1"])
        task0 = torch.load(ckpt, weights_only=False)
        cli = run_cli(args + ["--trainer.max_epochs", "2", "--ckpt_path", "last"])
        assert cli.trainer.global_step == 4  # 2 batches of task 0, 2 of task 1's layer phase
        layer_phase = torch.load(ckpt, weights_only=False)
        state = layer_phase["continual"]
        assert (state["task"], state["phase"], state["phase_trains"]) == (1, 0, True)
        assert state["sema_layout"] == {"0": [0, 1], "1": [0]} and state["sema_trained_between"] == []
        new = _sema(layer_phase["state_dict"], 0, "adapters", 1)
        assert new["up.weight"].abs().sum() > 0  # created as a no-op (zero up-projection), trained since
        assert _sema(layer_phase["state_dict"], 0, "descriptors", 1)["count"] == 0  # fitted as the next phase starts
        for layer in (0, 1):  # the task-0 adapters and router rows did not move
            for kind in ("adapters", "router"):
                for name, value in _sema(task0["state_dict"], layer, kind, 0).items():
                    assert torch.equal(value, _sema(layer_phase["state_dict"], layer, kind, 0)[name]), (layer, name)
        cli = run_cli(args + ["--ckpt_path", "last"])
        assert cli.model.model.method.closed == {(0, t) for t in range(1, 5)}
        for name, value in new.items():  # closed at the end of its phase: frozen from then on
            assert torch.equal(value, _sema(cli.model.state_dict(), 0, "adapters", 1)[name]), name
    else:
        cli = run_cli(args)
    assert not (in_tmp / "runs/sema_adapter/version_1").exists()  # resumed in place
    epochs = 9 if order == "layerwise" else 5
    assert cli.trainer.max_epochs == epochs and cli.trainer.current_epoch == epochs
    assert cli.trainer.global_step == 2 * epochs  # every scheduled epoch trained its 2 batches
    res = json.loads((folder / "results.json").read_text())
    assert res["expansion_order"] == order and res["sema_layout"] == {"0": [0, 1, 2, 3, 4], "1": [0, 1, 2, 3, 4]}
    adapter = 2 * 32 * 16 + 16 + 32 + 33  # down + up + the new router row
    if order == "layerwise":
        assert [(e["task"], e["layer"], e["steps"]) for e in res["sema_trained_between"]] == [
            (t, 0, 2) for t in range(1, 5)]  # 1 epoch of 2 batches (trainer.limit_train_batches)
        assert res["trainable_params"]["fast"] == adapter  # the deep layer's adapter only
    else:
        assert res["sema_trained_between"] == [] and res["trainable_params"]["fast"] == 2 * adapter
    final = torch.load(ckpt, weights_only=False)
    for layer in (0, 1):  # every adapter trained (non-zero up-projection) and closed (descriptor fitted)
        for k in range(5):
            assert final["state_dict"][f"model.backbone.blocks.{layer}.mlp.sema.adapters.{k}.up.weight"].abs().sum() > 0
            assert final["state_dict"][f"model.backbone.blocks.{layer}.mlp.sema.descriptors.{k}.count"] > 0


def test_sema_layerwise_skips_the_phases_of_layers_that_do_not_expand(in_tmp):
    """No layer expands (threshold above every z-score): the layer phases are scheduled (9 epochs) but skipped
    (their epochs end at the first batch), so only the 5 regular task epochs train."""
    cli = run_cli(SEMA_TWO_LAYERS + ["--model.expansion_order", "layerwise", "--model.expansion_threshold", "1000"])
    assert cli.trainer.current_epoch == 9 and cli.trainer.global_step == 2 * 5
    res = _results(in_tmp, "sema_adapter")
    assert res["expansions"] == [] and res["sema_trained_between"] == [] and res["tasks_finished"] == 5


def test_sema_layerwise_with_one_expandable_layer_is_the_joint_order(in_tmp):
    """With one expandable layer there is nothing to train between two tests: both orders run the same sequence,
    bit for bit (weights, optimizer states, accuracy matrix, expansions)."""
    args = SEMA_TWO_LAYERS + ["--model.expansion_layers", "[-1]"]
    runs = {}
    for order in ("joint", "layerwise"):
        cli = run_cli(args + ["--model.expansion_order", order])
        runs[order] = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=False)
        assert cli.trainer.current_epoch == 5 and runs[order]["continual"]["expansions"]
    joint, layerwise = runs["joint"], runs["layerwise"]
    assert joint["continual"] == layerwise["continual"]
    assert joint["state_dict"].keys() == layerwise["state_dict"].keys()
    for name, value in joint["state_dict"].items():
        assert torch.equal(value, layerwise["state_dict"][name]), name
    for a, b in zip(joint["optimizer_states"], layerwise["optimizer_states"], strict=True):
        for k, state in a["state"].items():
            assert all(torch.equal(v, b["state"][k][n]) for n, v in state.items() if torch.is_tensor(v)), k


def test_last_checkpoint_holds_the_final_consolidated_model_and_full_matrix(in_tmp):
    """Tasks finish on their last batch, before the epoch's checkpoint: ``last.ckpt`` of a finished run has the
    whole accuracy matrix, every consolidation event and the weights after the last consolidation (fast B = 0)."""
    cli = run_cli(["fit", "--config", str(REPO / "configs/sema_nested.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET])
    ckpt = torch.load(in_tmp / "runs/sema_nested/version_0/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["continual"]["R"] == cli.model.R and len(ckpt["continual"]["R"]) == 5
    assert ckpt["continual"]["finished_task"] == 4
    (cons,) = [v for k, v in ckpt["callbacks"].items() if "TaskBoundaryConsolidation" in k]
    assert [e["task"] for e in cons["events"]] == [0, 1, 2, 3, 4]
    final = cli.model.state_dict()
    fast_b = [k for k in final if k.endswith("adapters.fast.lora_B")]
    assert fast_b and all(ckpt["state_dict"][k].abs().sum() == 0 for k in fast_b)
    assert any(ckpt["state_dict"][k.replace("fast", "slow")].abs().sum() > 0 for k in fast_b)
    for k, v in final.items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, msg=k)


def test_aper_phases_lengthen_the_first_task_only(in_tmp):
    """``aper_phases: 3``: task 0 trains 3 phases (3x its batches, fresh optimizers each), later tasks one; the
    adapter is trained in every phase of task 0 and frozen afterwards."""
    base = ["fit", "--config", str(REPO / "configs/continual_aper.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET]
    one = run_cli(base + ["--model.aper_phases", "1"])
    assert one.trainer.current_epoch == 5 and one.trainer.global_step == 2 * 5
    three = run_cli(base + ["--model.aper_phases", "3"])
    assert three.trainer.current_epoch == 7 and three.trainer.global_step == 2 * 7
    moved = {n: p for n, p in three.model.model.backbone.named_parameters() if three.model.method.is_adapter(n)}
    assert moved and not any(p.requires_grad for p in moved.values())
    assert three.model.method.relative_delta() != one.model.method.relative_delta()
