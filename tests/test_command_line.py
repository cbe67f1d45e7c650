"""The ``python -m`` tools' shared helpers (``models/utils/command_line.py``): bad input is one ``error:`` line with
status 2, and a config section's ``init_args`` are read whatever the file lacks."""

import pytest

from datamodules.glyph_backbone import main as glyph_backbone_main
from models.utils.command_line import config_init_args


def test_a_tool_ends_bad_input_in_one_line(tmp_path, capsys):
    config = tmp_path / "no_pretrain.yaml"
    config.write_text("model:\n  init_args: {img_size: 32}\n")
    for path, expected in ((config, f"error: {config} has no model.init_args.pretrain\n"),
                           (tmp_path / "missing.yaml", "error: [Errno 2] No such file or directory")):
        with pytest.raises(SystemExit) as stopped:
            glyph_backbone_main(["--config", str(path)])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err


@pytest.mark.parametrize("text, expected", [
    ("data:\n  init_args: {seq_len: 8}\n", {"seq_len": 8}),
    ("data:\n  class_path: X\n", {}),
    ("model: {}\n", {}),
    ("data: [1, 2]\n", {}),
    ("", {}),
    ("just a string\n", {}),
])
def test_config_init_args_of_any_file(tmp_path, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    assert config_init_args(tmp_path / "c.yaml", "data") == expected
