"""Every third-party package the code imports is declared in pyproject.toml (a dependency or an extra)."""

import ast
import re
import sys
import warnings

import pytest

import cli
from tests.cli_helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

FIRST_PARTY = {"models", "lightning_modules", "datamodules", "callbacks", "cli"}
#: import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "fontTools": "fonttools",
                "lightning_utilities": "lightning-utilities", "fla": "fla-core"}


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower() for spec in specs}


def imported() -> dict[str, str]:
    files = [REPO / "cli.py"] + [p for d in FIRST_PARTY - {"cli"} for p in sorted((REPO / d).rglob("*.py"))]
    found: dict[str, str] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, str(f.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    missing = {name: where for name, where in imported().items()
               if DISTRIBUTION.get(name, name).lower() not in declared()}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_private_api_users_have_ceilings():
    """cli.py and callbacks/ use Lightning and jsonargparse internals: the next major release is excluded."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = {re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0]: d for d in deps}
    assert "<3" in spec["lightning"] and "<5" in spec["jsonargparse"]


def test_no_deprecation_warning_at_startup(in_tmp, monkeypatch):
    """jsonargparse's ``instantiate_classes`` warned on every run ("removed in v5.0.0"): no deprecation warning is
    raised from adaptlab's own code (``python -m cli`` shows those; Lightning's own ones are hidden by default)."""
    monkeypatch.setattr(sys, "argv", ["cli"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["--config", str(REPO / "configs" / "vit_lora_digits.yaml"), "--model.pretrain", "null"], run=False)
    ours = [f"{w.filename}: {w.message}" for w in caught
            if issubclass(w.category, DeprecationWarning) and str(REPO) in str(w.filename)]
    assert not ours
