"""Every constructor argument of the project's LightningModules, DataModules and callbacks has its own docstring
entry, so ``python -m cli fit --help`` shows a help line for every option (jsonargparse reads them)."""

import importlib
import inspect
import pkgutil

import docstring_parser
import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

PACKAGES = ("lightning_modules", "datamodules", "callbacks")


def _project_classes() -> list[type]:
    out = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and issubclass(
                        cls, (L.LightningModule, L.LightningDataModule, Callback)):
                    out.append(cls)
    return out


@pytest.mark.parametrize("cls", _project_classes(), ids=lambda c: c.__name__)
def test_every_init_argument_has_a_help_line(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    documented = {}
    for doc in (cls.__doc__, cls.__init__.__doc__):
        if doc:
            documented.update({p.arg_name: p.description for p in docstring_parser.parse(doc).params})
    missing = [p for p in params if not (documented.get(p) or "").strip()]
    assert not missing, f"{cls.__name__}: no docstring entry for {missing}"
