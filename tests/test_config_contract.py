"""Contract over configs/: every shipped config parses and validates (keys, types, class paths) by name as a user
runs it, and every one has a named test that fits it for a step or two (GPU-sized ones with tiny overrides), so
a config cannot rot and a new config without a smoke test fails here."""

import ast

import pytest

from tests.cli_helpers import REPO, run_cli

#: config -> the test (file::function) that runs ``fit`` with it; GPU-sized configs with tiny overrides on the CPU.
SMOKE_TESTS = {
    "gpt_pretrain": "test_gpt_configs.py::test_pretrain_then_skip2lora_with_cache_then_lora",
    "lora_gpt": "test_gpt_configs.py::test_pretrain_then_skip2lora_with_cache_then_lora",
    "skip2lora_gpt": "test_gpt_configs.py::test_pretrain_then_skip2lora_with_cache_then_lora",
    "phase1_lm": "test_phase1_configs.py::test_phase1_lm_config_fits_logs_health_and_predicts_with_the_state",
    "phase1_8gb": "test_phase1_configs.py::test_preset_configs_size_from_the_memory_model_and_run_tiny",
    "phase1_10gb": "test_phase1_configs.py::test_preset_configs_size_from_the_memory_model_and_run_tiny",
    "phase1_24gb": "test_phase1_configs.py::test_preset_configs_size_from_the_memory_model_and_run_tiny",
    "phase2_small": "test_phase2_train.py::test_yaml_keys_reach_the_model_and_the_data_is_the_stdlib_text",
    "phase2_base": "test_phase2_train.py::test_gpu_sized_configs_run_with_tiny_overrides",
    "phase2_large": "test_phase2_train.py::test_gpu_sized_configs_run_with_tiny_overrides",
    "sema_nested": "test_continual_cli.py::test_nested_sequence_metrics_steps_and_tensorboard",
    "sema_lora": "test_continual_cli.py::test_other_configs_run_the_sequence",
    "sema_adapter": "test_continual_cli.py::test_other_configs_run_the_sequence",
    "sema_cifar100_vitb": "test_continual_cli.py::test_cifar100_vitb_config_smoke_with_tiny_override",
    "tracknet_lora": "test_tracknet_train.py::test_lora_config_fits_then_predicts_from_the_command_line",
    "tracknet_qlora": "test_tracknet_train.py::test_qlora_config_fits_and_predicts_from_its_checkpoint",
    "tracknet_dinov3_qlora": "test_tracknet_train.py::test_dinov3_qlora_config_smoke_with_tiny_overrides",
    "tracknet_v3_512x288": "test_tracknet_train.py::test_v3_512x288_preset_config_smoke_with_tiny_overrides",
    "vit_lora_digits": "test_cli.py::test_demo_config_trains_and_writes_events_and_last_ckpt",
    "vit_lora_digits_pretrained": "test_quickstart.py::test_pretrained_quick_start_loads_the_glyph_backbone",
    "vit_lora_digits_robust": "test_resume.py::test_robust_config_smoke",
}
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_every_config_has_a_smoke_test_that_exists():
    assert sorted(SMOKE_TESTS) == CONFIGS, "add the new config's smoke test to SMOKE_TESTS (or drop a stale entry)"
    for config, node in SMOKE_TESTS.items():
        file, func = node.split("::")
        source = (REPO / "tests" / file).read_text()
        names = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
        assert func in names, f"{config}: {node} does not exist"
        assert config in source, f"{config}: {file} never names the config"


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_validates_by_name(config, in_tmp, capsys):
    """Every key is an argument of its class, every class path resolves, every value has its type."""
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", config, "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    assert "class_path:" in out and "model:" in out and "data:" in out
    assert not (in_tmp / "runs").exists()
