"""Contract over configs/: every shipped config parses and validates (keys, types, class paths) by name as a user
runs it, and every one has a named test that fits it for a step or two (GPU-sized ones with tiny overrides), so
a config cannot rot and a new config without a smoke test fails here."""

import ast

import pytest

from tests.cli_helpers import REPO

#: config -> the test (file::function) that runs ``fit`` with it; GPU-sized configs with tiny overrides on the CPU.
SMOKE_TESTS = {
    "continual_aper": "test_continual_cli.py::test_other_configs_run_the_sequence",
    "continual_aper_ridge": "test_continual_cli.py::test_other_configs_run_the_sequence",
    "continual_joint": "test_continual_cli.py::test_other_configs_run_the_sequence",
    "continual_multidomain": "test_continual_cli.py::test_other_configs_run_the_sequence",
    "continual_ranpac": "test_continual_cli.py::test_other_configs_run_the_sequence",
    "continual_simplecil": "test_continual_cli.py::test_other_configs_run_the_sequence",
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


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    """The CLI's parser (built once: building it per config costs seconds), as ``adaptlab fit`` uses it."""
    import os
    import sys

    import cli

    cwd, argv = os.getcwd(), sys.argv
    os.chdir(tmp_path_factory.mktemp("parser"))
    sys.argv = ["cli"]
    try:
        return cli.main(["--config", "vit_lora_digits", "--model.backbone_kwargs",
                         "{depth: 1, embed_dim: 32, num_heads: 2}"], run=False).parser
    finally:
        os.chdir(cwd)
        sys.argv = argv


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_validates_by_name(config, parser, capsys):
    """Every key is an argument of its class, every class path resolves, every value has its type."""
    import cli

    args = cli.resolve_config_names(["--config", config])
    assert args[1] == str(REPO / "configs" / f"{config}.yaml")
    cfg = parser.parse_args(args)  # an invalid config exits with one error line
    assert cfg.model.class_path.count(".") >= 2 and cfg.data.class_path.count(".") >= 2
    assert not capsys.readouterr().err


def test_a_rotten_config_is_caught(parser, tmp_path, capsys):
    bad = (REPO / "configs" / "vit_lora_digits.yaml").read_text().replace("lora_r:", "lora_rank:")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(tmp_path / "bad.yaml")])
    assert "lora_rank" in capsys.readouterr().err
