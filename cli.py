"""adaptlab's command line: ``python -m cli {fit,validate,test,predict} --config configs/<name>.yaml``.

LightningCLI in subclass mode: any LightningModule, LightningDataModule or Callback of the project (or of
Lightning) can be named in a YAML by class path or, for project classes, by bare class name. Defaults:
TensorBoard logs under ``runs/<config name>/version_N``, a progress bar, and a ``ModelCheckpoint`` that
always keeps ``last.ckpt`` (its options live under the ``checkpoint:`` key).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

#: Project packages whose modules are imported so their classes can be named by short name in YAML.
PROJECT_PACKAGES = ("lightning_modules", "datamodules", "callbacks")
RUNS_DIR = "runs"


def import_project_modules() -> None:
    """Import every module of the project packages (registers their classes with jsonargparse)."""
    for pkg_name in PROJECT_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            importlib.import_module(info.name)


class AdaptLabCLI(LightningCLI):
    """LightningCLI with adaptlab's defaults (checkpointing, log directory naming)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def before_instantiate_classes(self) -> None:
        """Name the TensorBoard run after the config file unless the YAML names it."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger") if cfg is not None else None
        init_args = getattr(logger, "init_args", None) if logger is not None else None
        if init_args is None or init_args.get("name") not in (None, "lightning_logs"):
            return
        configs = [c for c in (cfg.get("config") or []) if c is not None]
        init_args["name"] = Path(str(configs[-1])).stem if configs else "adaptlab"


def trainer_defaults() -> dict[str, Any]:
    return {
        "default_root_dir": RUNS_DIR,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": RUNS_DIR, "name": None},
        },
    }


def main(args: list[str] | None = None, run: bool = True) -> AdaptLabCLI:
    """Entry point; ``args`` lets tests drive the CLI in-process."""
    import_project_modules()
    return AdaptLabCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
