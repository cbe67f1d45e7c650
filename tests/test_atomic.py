"""models.utils.atomic.atomic_path: the target is replaced whole on success and untouched on failure."""

import pytest

from models.utils.atomic import atomic_path


def test_success_replaces_target_and_creates_folder(tmp_path):
    target = tmp_path / "new" / "results.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("v1")
    assert target.read_text() == "v1"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_failure_leaves_target_untouched_and_no_temp_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("precious")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
