"""``predict`` of the image families: from the checkpoint ``fit`` wrote to a named CSV whose path is printed."""

import csv
from pathlib import Path

from tests.cli_helpers import REPO, run_cli
from tests.continual_helpers import QUIET, TINY_DATA, TINY_MODEL


def read_predictions(out: str) -> tuple[Path, list[dict]]:
    line = next(t for t in out.splitlines() if t.startswith("predict: wrote"))
    path = Path(line.split(" to ", 1)[1].split(" (accuracy")[0])
    with open(path, newline="", encoding="utf-8") as fh:
        return path, list(csv.DictReader(fh))


def test_digits_predict_from_fit_checkpoint(in_tmp, one_thread, capsys):
    config = str(REPO / "configs" / "vit_lora_digits.yaml")
    run_cli(["fit", "--config", config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    ckpt = in_tmp / "runs" / "vit_lora_digits" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    cli = run_cli(["predict", "--config", config, "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"])
    path, rows = read_predictions(capsys.readouterr().out)
    assert path == (Path(cli.trainer.log_dir) / "predictions.csv").resolve() and path.is_file()
    test_set = cli.datamodule.test_set
    assert len(rows) == len(test_set) and len({r["id"] for r in rows}) == len(rows)
    assert all(r["id"].startswith("digits:") and r["class"] in set("0123456789") for r in rows)
    assert all(0.1 <= float(r["probability"]) <= 1 for r in rows)  # the max of 10 softmax probabilities
    # true_class is the label of the sample the id names (scikit-learn's digits, by index)
    from sklearn.datasets import load_digits

    target = load_digits().target
    assert all(int(r["true_class"]) == target[int(r["id"].split(":")[1])] for r in rows)


def test_continual_predict_from_fit_checkpoint(in_tmp, one_thread, capsys):
    config = str(REPO / "configs" / "sema_nested.yaml")
    run_cli(["fit", "--config", config, *TINY_MODEL, *TINY_DATA, *QUIET])
    ckpt = in_tmp / "runs" / "sema_nested" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    run_cli(["predict", "--config", config, *TINY_MODEL, *TINY_DATA, "--trainer.enable_progress_bar", "false",
             "--ckpt_path", str(ckpt)])
    path, rows = read_predictions(capsys.readouterr().out)
    assert path.parent == in_tmp / "runs" / "sema_nested" / "version_1"
    # 10 glyph classes x 40 images, 20 % test: every test image of every task, named by class and index
    assert len(rows) == 80 and len({r["id"] for r in rows}) == 80
    for r in rows:
        code, _ = r["id"].removeprefix("glyph:U+").split(":")
        assert chr(int(code, 16)) == r["true_class"]
    assert {r["true_class"] for r in rows} >= {r["class"] for r in rows}
