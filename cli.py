"""adaptlab's command line: ``python -m cli {fit,validate,test,predict} --config configs/<name>.yaml``.

LightningCLI in subclass mode: any LightningModule, LightningDataModule or Callback of the project (or of
Lightning) can be named in a YAML by class path or, for project classes, by bare class name. Defaults:
TensorBoard logs under ``runs/<config name>/version_N``, a progress bar, a ``ModelCheckpoint`` that
always keeps ``last.ckpt`` (its options live under the ``checkpoint:`` key) and atomic checkpoint writes.
``--ckpt_path last`` resumes the newest run of the config in its own ``version_N`` folder.

Bad input fails before anything is written, with one line naming the key or file: config files are checked
(exist, readable, valid YAML) before parsing, jsonargparse's nested union messages are condensed, and
errors raised by a class's ``__init__`` are reported with its config key (``ADAPTLAB_TRACEBACK=1``: traceback).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import yaml
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


_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|^Subtypes:|^Errors:|Expected a <class 'NoneType'>"
    r"|^Given value type:|^Given value: (NestedArg|Namespace)|^Problem with given class_path"
)


def concise_error(message: str) -> str:
    """One line from jsonargparse's nested message: the dotted key path, then the innermost reasons."""
    keys, details = [], []
    for line in message.splitlines():
        text = line.strip().lstrip("-").strip()
        if match := re.fullmatch(r'Parser key "([^"]+)":?(.*)', text):
            keys.append(match[1])
            text = match[2].strip()
        if text and not _NOISE.search(text):
            details.append(text)
    reason = "; ".join(details)
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def fail(message: str) -> NoReturn:
    """Print one ``error:`` line to stderr and exit with status 2 (like argparse)."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


class ConciseErrorParser(LightningArgumentParser):
    """Parser whose errors are one line naming the key, instead of the full usage plus nested unions."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        fail(f"{concise_error(message)}  (every option: python -m cli <subcommand> --help)")


def check_config_files(args: list[str]) -> None:
    """Fail clearly on a ``--config`` file that is missing, unreadable or not valid YAML."""
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            continue
        try:
            yaml.safe_load(path.read_text())
        except FileNotFoundError:
            fail(f"config file {str(path)!r} does not exist")
        except OSError as e:
            fail(f"config file {str(path)!r} cannot be read: {e.strerror or e}")
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            fail(f"config file {str(path)!r} is not valid YAML: {getattr(e, 'problem', None) or e}{where}")


def find_config_key(cfg: Any, class_path: str, prefix: str = "") -> str | None:
    """Dotted key of the first entry of ``cfg`` (a config as plain dicts and lists) with this ``class_path``."""
    if isinstance(cfg, dict):
        if cfg.get("class_path") == class_path:
            return prefix
        children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in cfg.items()]
    elif isinstance(cfg, list):
        children = [(f"{prefix}[{i}]", v) for i, v in enumerate(cfg)]
    else:
        return None
    for key, value in children:
        if (found := find_config_key(value, class_path, key)) is not None:
            return found
    return None


class AdaptLabCLI(LightningCLI):
    """LightningCLI with adaptlab's defaults (checkpointing, log directory naming, resume, clear errors)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=ConciseErrorParser, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def before_instantiate_classes(self) -> None:
        """Name the TensorBoard run after the config file unless the YAML names it; resolve and check
        ``ckpt_path``."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger") if cfg is not None else None
        init_args = getattr(logger, "init_args", None) if logger is not None else None
        if init_args is not None and init_args.get("name") in (None, "lightning_logs"):
            configs = [c for c in (cfg.get("config") or []) if c is not None]
            init_args["name"] = Path(str(configs[-1])).stem if configs else "adaptlab"
        if init_args is not None and self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            self._resume_in_place(cfg, init_args)
        self._check_ckpt_path(cfg.get("ckpt_path"))

    @staticmethod
    def _check_ckpt_path(ckpt: str | None) -> None:
        """A ``ckpt_path`` that names a local file must exist (before any run folder is created)."""
        if ckpt is None or ckpt in ("last", "best", "hpc") or "://" in ckpt or ckpt.startswith("registry:"):
            return
        if not Path(ckpt).is_file():
            fail(f"ckpt_path {ckpt!r} does not exist")

    @staticmethod
    def _resume_in_place(cfg: Any, logger_args: Any) -> None:
        """``--ckpt_path last``: resume the newest ``version_N/checkpoints/last.ckpt`` and keep logging there."""
        runs = Path(str(logger_args.get("save_dir") or RUNS_DIR)) / str(logger_args["name"])
        found = sorted(
            (int(d.name.split("_")[1]), d / "checkpoints" / "last.ckpt")
            for d in runs.glob("version_*")
            if d.name.split("_")[1].isdigit() and (d / "checkpoints" / "last.ckpt").is_file()
        )
        if found and logger_args.get("version") is None:
            logger_args["version"], cfg["ckpt_path"] = found[-1][0], str(found[-1][1])

    def instantiate_classes(self) -> None:
        """Report an error raised by a class's ``__init__`` in one line naming its config key.

        ``ADAPTLAB_TRACEBACK=1`` re-raises instead (the full traceback, for debugging a class).
        """
        try:
            super().instantiate_classes()
        except Exception as e:
            match = re.search(r"class_path='([\w.]+)'", str(e))
            if match is None or os.environ.get("ADAPTLAB_TRACEBACK"):
                raise
            root = e  # the first exception in the chain that is not jsonargparse's wrapper
            while root.__cause__ is not None and "class_path=" in str(root):
                root = root.__cause__
            cfg = self.config.get(self.subcommand) if self.subcommand else self.config
            key = find_config_key(cfg.as_dict(), match[1]) or match[1]
            kind = "" if isinstance(root, (ValueError, TypeError, OSError, KeyError)) else f"{type(root).__name__}: "
            fail(f"{key} ({match[1].rsplit('.', 1)[-1]}): {kind}{root}")


def trainer_defaults() -> dict[str, Any]:
    return {
        "default_root_dir": RUNS_DIR,
        "plugins": [{"class_path": "callbacks.checkpointing.AtomicCheckpointIO"}],
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": RUNS_DIR, "name": None},
        },
    }


def main(args: list[str] | None = None, run: bool = True) -> AdaptLabCLI:
    """Entry point; ``args`` lets tests drive the CLI in-process."""
    check_config_files(sys.argv[1:] if args is None else args)
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
