"""adaptlab's command line: ``python -m cli {fit,validate,test,predict} --config configs/<name>.yaml``.

LightningCLI in subclass mode: any LightningModule, LightningDataModule or Callback of the project (or of
Lightning) can be named in a YAML by class path or, for project classes, by bare class name. Defaults:
TensorBoard logs under ``runs/<config name>/version_N``, a progress bar, a ``ModelCheckpoint`` that
always keeps ``last.ckpt`` (its options live under the ``checkpoint:`` key) and atomic checkpoint writes.
``--ckpt_path last`` resumes the newest run of the config in its own ``version_N`` folder.

Bad input fails before anything is written, with one line naming the key or file: config files are checked
(exist, readable, valid YAML) before parsing, jsonargparse's nested union messages are condensed, and
errors raised by a class's ``__init__`` are reported with its config key (``ADAPTLAB_TRACEBACK=1``: traceback).
Before the Trainer touches the disk, :meth:`AdaptLabCLI.preflight` runs every check that would otherwise fire
later (the DataModule's ``preflight`` and the LightningModule's ``check_data`` hooks, ``--ckpt_path``: found,
loadable without running code, same model and data settings as the config); an error that still escapes
before the first batch removes exactly the files this process created (recorded as created, see
``models/utils/run_folder.py``). Each run reserves its own ``version_N`` atomically and locks its folders while
it runs (a second process resuming the same run is refused). SIGTERM saves ``last.ckpt`` and exits with 143.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib
import os
import pkgutil
import re
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn


def _check_own_packages() -> None:
    """Fail in one line when a package of the user's (a ``models/`` in the current folder, most often) shadows one
    of adaptlab's top-level packages; runs before any of them is imported."""
    import importlib.util

    root = Path(__file__).resolve().parent
    for name in ("models", "callbacks", "datamodules", "lightning_modules"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        where = list(spec.submodule_search_locations or []) if spec is not None else []
        if spec is not None and spec.origin is not None and not where:
            where = [spec.origin]
        if not any(Path(w).resolve() == root / name for w in where):
            found = where[0] if where else "nothing"
            sys.stderr.write(
                f"error: the name {name!r} is taken by {found} (not adaptlab's {root / name}): a package of "
                "your own shadows adaptlab's; run the `adaptlab` command instead of `python -m cli` (it does not put "
                "the current folder on the import path), or run from another folder\n")
            raise SystemExit(2)


_check_own_packages()

import lightning as L  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_only  # noqa: E402

from callbacks.checkpointing import CheckpointSaveError, RunInfo  # noqa: E402
from callbacks.exact_resume import ExactResume  # noqa: E402
from callbacks.model_checkpoint import ResumableModelCheckpoint  # noqa: E402
from callbacks.protocols import (  # noqa: E402
    DataCompatibility,
    DataPreflight,
    GivenArguments,
    LoggedMetrics,
    TrainedWeights,
    TrainerCompatibility,
)
from callbacks.signals import SigtermCheckpoint  # noqa: E402
from callbacks.tensorboard import EpochPerformance, ScheduleMonitor  # noqa: E402
from models.utils.atomic import clean_stale_temporaries  # noqa: E402
from models.utils.checkpoint import CheckpointError, safe_load  # noqa: E402
from models.utils.run_folder import RunFolder, RunFolderBusy  # noqa: E402

#: Project packages whose modules are imported so their classes can be named by short name in YAML.
PROJECT_PACKAGES = ("lightning_modules", "datamodules", "callbacks")
RUNS_DIR = "runs"
#: ``<version>@<pid>``: the ``version_N`` rank 0 took, for the processes DDP launches from it.
RUN_VERSION_ENV = "ADAPTLAB_RUN_VERSION"


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
    """Parser whose errors are one line naming the key, instead of the full usage plus nested unions.

    Options are never matched by prefix (``--trainer.max_epoch`` is an error, not ``max_epochs``), and an
    unknown class name gets "did you mean" the closest project/Lightning class names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        if re.search(r"unrecognized arguments:.*--(optimizer|lr_scheduler)\b", message, re.IGNORECASE):
            fail(f"{concise_error(message)}: each model configures its own optimizers and schedules; set their "
                 "learning rates with the model's keys (adaptlab fit --model.help <ModelClass>)")
        reason = concise_error(message)
        if match := re.search(r"Given value: (\w+)$", reason):
            close = similar_class_names(match[1])
            if close:
                fail(f"{reason.split(':')[0]}: no class {match[1]!r}; did you mean {' or '.join(close)}?")
        if match := re.search(r"unrecognized arguments: (--[\w.]+)", reason, re.IGNORECASE):
            import difflib

            options = [o for o in self._option_string_actions if o.startswith("--")]
            close = difflib.get_close_matches(match[1], options, n=3, cutoff=0.8)
            if close:
                fail(f"{reason}: did you mean {' or '.join(close)}?")
        fail(f"{reason}  (every option: python -m cli <subcommand> --help)")


def similar_class_names(name: str) -> list[str]:
    """Closest names among the classes the YAML can name by short name (project modules, Lightning callbacks)."""
    import difflib
    import inspect

    names = set()
    for pkg_name in PROJECT_PACKAGES:
        for module_name, module in list(sys.modules.items()):
            if module_name == pkg_name or module_name.startswith(pkg_name + "."):
                names |= {n for n, obj in vars(module).items()
                          if inspect.isclass(obj) and obj.__module__ == module_name}
    import lightning.pytorch.callbacks as lcb

    names |= {n for n in dir(lcb) if inspect.isclass(getattr(lcb, n))}
    return difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.7)


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
            content = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            fail(f"config file {str(path)!r} does not exist")
        except OSError as e:
            fail(f"config file {str(path)!r} cannot be read: {e.strerror or e}")
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            fail(f"config file {str(path)!r} is not valid YAML: {getattr(e, 'problem', None) or e}{where}")
        if content is None:
            fail(f"config file {str(path)!r} is empty (it needs keys such as model:, data:, trainer:)")
        if not isinstance(content, dict):
            fail(f"config file {str(path)!r} must be a mapping of keys (model:, data:, trainer: ...), not a "
                 f"{type(content).__name__} ({str(content)[:40]!r})")


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


#: Hyper-parameters that may differ between a checkpoint and the config without changing results.
IGNORED_HPARAMS = {"_instantiator", "num_workers"}
#: ... and, when only evaluating a checkpoint (validate/test/predict), also these inference-time options.
IGNORED_EVAL_HPARAMS = {"batch_size", "sample_tokens", "sample_prompt", "predict_tokens", "predict_path",
                        "predict_split", "temporal_ensemble", "threshold", "tolerance", "tolerance_space",
                        "reference_size", "peak_method", "prompts", "prompt_file", "generation"}


def plain(value: Any) -> Any:
    """A config value as plain Python (dataclasses, Namespaces, tuples and paths normalised) for comparison."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def differing_keys(saved: Any, current: Any, prefix: str, ignore: set[str]) -> list[str]:
    """Dotted keys whose values differ between two (nested) hyper-parameter dicts, as ``key: saved -> now``.

    Keys present on one side only (an argument added to or removed from the class since) are not compared."""
    saved, current = plain(saved), plain(current)
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) & set(current)):
            if key in ignore:
                continue
            out += differing_keys(saved[key], current[key], f"{prefix}.{key}", ignore)
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


class KeepConfigCallback(SaveConfigCallback):
    """``SaveConfigCallback`` that never overwrites an earlier run's ``config.yaml``: a run resumed in place
    writes ``config.resume-<k>.yaml`` beside it."""

    written: Path | None = None  #: the file this callback wrote (``cli.py`` removes it after an early failure)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir if not self.already_saved else None  # a collective under DDP: every rank asks
        saving = log_dir is not None
        if saving:
            folder, k = Path(log_dir), 1
            if (folder / self.config_filename).exists():
                while (folder / f"config.resume-{k}.yaml").exists():
                    k += 1
                self.config_filename = f"config.resume-{k}.yaml"
        super().setup(trainer, pl_module, stage)
        if saving and trainer.is_global_zero:
            self.written = Path(log_dir) / self.config_filename


class AdaptLabCLI(LightningCLI):
    """LightningCLI with adaptlab's defaults (checkpointing, log directory naming, resume, clear errors)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # auto_configure_optimizers=False: no CLI-level --optimizer/--lr_scheduler, which would silently replace the
        # optimizers a module configures (Nested LoRA's fast/slow pair, warm-up schedules); learning rates are
        # the module's own YAML keys.
        super().__init__(*args, parser_class=ConciseErrorParser, save_config_callback=KeepConfigCallback,
                         auto_configure_optimizers=False, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--allow_config_change", type=bool, default=False,
            help="Accept a --ckpt_path whose model/data settings differ from the config (they are listed otherwise "
                 "and the run is refused); the config's values are used.",
        )

    def _set_seed(self) -> None:
        """Lightning's seeding, after checking the range numpy accepts."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        seed = cfg.get("seed_everything") if cfg is not None else None
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= 2**32 - 1:
            fail(f"seed_everything must be in [0, {2**32 - 1}] (or true for a random seed), got {seed}")
        super()._set_seed()

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._given_args = args  # parsed again without defaults for the GivenArguments check
        super().parse_arguments(parser, args)

    def _check_given_arguments(self) -> None:
        """Classes that are ``GivenArguments`` check their init arguments as given (the config files and command
        line parsed again with no defaults filled in), before any is built."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        classes = {}
        for key in ("model", "data"):
            module, _, name = str(getattr(cfg.get(key), "class_path", "")).rpartition(".")
            cls = getattr(importlib.import_module(module), name, None) if module else None
            if isinstance(cls, type) and isinstance(cls, GivenArguments):
                classes[key] = cls
        if not classes:
            return
        args = self._given_args
        given = self.parser.parse_object(args, defaults=False) if isinstance(args, (dict, Namespace)) \
            else self.parser.parse_args(args, defaults=False)
        given = plain(given.get(self.subcommand) if self.subcommand else given)
        for key, cls in classes.items():
            try:
                cls.check_given_arguments(dict((given.get(key) or {}).get("init_args") or {}))
            except (ValueError, TypeError) as e:
                if os.environ.get("ADAPTLAB_TRACEBACK"):
                    raise
                fail(f"{key} ({cls.__name__}): {first_line(e)}")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would load ``--ckpt_path`` here (before any check) and silently replace the model's
        command-line/config values with the checkpoint's hyper-parameters. adaptlab does neither: the checkpoint
        is loaded safely in :meth:`preflight` and a difference is refused (``--allow_config_change`` keeps the
        config's values)."""

    def before_instantiate_classes(self) -> None:
        """Name the TensorBoard run after the config file unless the YAML names it; resolve and check
        ``ckpt_path``. Without a logger (``--trainer.logger false``) runs still get ``runs/<config>/version_N``."""
        self._check_given_arguments()
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger") if cfg is not None else None
        init_args = getattr(logger, "init_args", None) if logger is not None else None
        configs = [c for c in (cfg.get("config") or []) if c is not None]
        config_name = Path(str(configs[-1])).stem if configs else "adaptlab"
        if init_args is not None and init_args.get("name") in (None, "lightning_logs"):
            init_args["name"] = config_name
        self._log_root = None
        self._resume_version: int | None = None  # fit without a logger: the version_N folder to resume in
        if init_args is not None:
            self._log_root = Path(str(init_args.get("save_dir") or RUNS_DIR)) / str(init_args["name"])
        elif logger in (None, False):
            self._log_root = Path(str(cfg.get("trainer", {}).get("default_root_dir") or RUNS_DIR)) / config_name
        ckpt = cfg.get("ckpt_path")
        if isinstance(ckpt, str) and ckpt.startswith("~"):
            cfg["ckpt_path"] = os.path.expanduser(ckpt)
        if cfg.get("ckpt_path") == "last":
            self._resolve_last(cfg, init_args)
        self._check_ckpt_path(cfg.get("ckpt_path"))
        checkpoint = cfg.get("checkpoint") or {}
        for key, low in (("every_n_train_steps", 0), ("every_n_epochs", 0), ("save_top_k", -1)):
            value = checkpoint.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value < low:
                fail(f"checkpoint.{key} must be >= {low}, got {value}")

    @staticmethod
    def _check_ckpt_path(ckpt: str | None) -> None:
        """A ``ckpt_path`` that names a local file must exist (before any run folder is created)."""
        if ckpt is None or ckpt in ("last", "best", "hpc") or "://" in ckpt or ckpt.startswith("registry:"):
            return
        if not Path(ckpt).is_file():
            fail(f"ckpt_path {ckpt!r} does not exist")

    def _resolve_last(self, cfg: Any, logger_args: Any) -> None:
        """``--ckpt_path last``: the newest ``version_N/checkpoints/last.ckpt`` of this config (``fit`` keeps
        logging in that ``version_N``), or ``last.ckpt`` in a fixed ``checkpoint.dirpath``; none is an error."""
        found: list[tuple[int, Path]] = []
        if self._log_root is not None:
            found = sorted(
                (int(d.name.split("_")[1]), d / "checkpoints" / "last.ckpt")
                for d in self._log_root.glob("version_*")
                if d.name.split("_")[1].isdigit() and (d / "checkpoints" / "last.ckpt").is_file()
            )
        dirpath = (cfg.get("checkpoint") or {}).get("dirpath")
        fixed = Path(str(dirpath)) / "last.ckpt" if dirpath else None
        if fixed is not None and fixed.is_file():
            cfg["ckpt_path"] = str(fixed)
            info = self._run_info(fixed)
            version = info.get("version")
            if self.subcommand == "fit" and logger_args is not None and logger_args.get("version") is None \
                    and isinstance(version, int) and info.get("name") == logger_args.get("name"):
                logger_args["version"] = version
        elif found:
            version, cfg["ckpt_path"] = found[-1][0], str(found[-1][1])
            if self.subcommand == "fit" and logger_args is not None and logger_args.get("version") is None:
                logger_args["version"] = version
            elif self.subcommand == "fit" and logger_args is None:
                self._resume_version = version
        else:
            where = [str(self._log_root / "version_*" / "checkpoints" / "last.ckpt")] if self._log_root else []
            where += [str(fixed)] if fixed is not None else []
            fail(f"ckpt_path 'last': no earlier run of this config to resume (looked for {' and '.join(where)}); "
                 "drop --ckpt_path to start a new run")

    @staticmethod
    def _run_info(path: Path) -> dict:
        try:
            return dict(safe_load(path).get("adaptlab") or {})
        except Exception:
            return {}

    def instantiate_classes(self) -> None:
        """Report an error raised by a class's ``__init__`` (or the Trainer's) in one line naming its config key.

        ``ADAPTLAB_TRACEBACK=1`` re-raises instead (the full traceback, for debugging a class).
        """
        try:
            # jsonargparse >= 4.49 names it ``instantiate`` (``instantiate_classes`` warns: removed in v5)
            instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
            self.config_init = instantiate(self.config)
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
            fail(f"{key} ({match[1].rsplit('.', 1)[-1]}): {kind}{first_line(root)}")
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._check_trainer_args(self._get(self.config, "trainer") or {})
        try:
            self.trainer = self.instantiate_trainer()
        except Exception as e:
            if os.environ.get("ADAPTLAB_TRACEBACK"):
                raise
            fail(f"trainer: {first_line(e)}")

    # ------------------------------------------------------------------------------------------------------------
    # Pre-flight: everything that can be checked before the Trainer writes a run folder, a log or a checkpoint.

    def preflight(self, subcommand: str) -> None:
        """Checks run after the classes exist and before the Trainer starts; each failure is one ``error:`` line."""
        cfg = self.config[subcommand]
        model, data = self.model, self.datamodule
        stage = {"fit": "fit", "validate": "validate", "test": "test", "predict": "predict"}[subcommand]
        if isinstance(data, DataPreflight):
            self._guard("data", data, lambda: data.preflight(stage))
        if data is not None and isinstance(model, DataCompatibility):
            self._guard("model", model, lambda: model.check_data(data))
        if subcommand == "fit":
            self._check_monitors()
            if isinstance(model, TrainerCompatibility):
                self._guard("trainer", model, lambda: model.check_trainer(self.trainer, data))
        ckpt = cfg.get("ckpt_path")
        if subcommand in ("validate", "test", "predict") and ckpt is None:
            source = model.trained_weights_source() if isinstance(model, TrainedWeights) else None
            if source is None:
                fail(f"{subcommand} needs trained weights: pass --ckpt_path (e.g. {RUNS_DIR}/<config>/version_N/"
                     f"checkpoints/last.ckpt) or the model's own weights option; {type(model).__name__} would "
                     f"{'predict from' if subcommand == 'predict' else subcommand} untrained weights")
        if ckpt is not None and Path(str(ckpt)).is_file():
            self._check_checkpoint(Path(str(ckpt)), subcommand, bool(cfg.get("allow_config_change")))
        dirpath = (cfg.get("checkpoint") or {}).get("dirpath")
        if subcommand == "fit" and ckpt is None and dirpath and Path(str(dirpath)).is_dir() \
                and any(Path(str(dirpath)).glob("*.ckpt")):
            fail(f"checkpoint.dirpath {str(dirpath)!r} already holds checkpoints of an earlier run, which a new "
                 "run would shadow (last-v1.ckpt); resume it with --ckpt_path last, or set another "
                 "--checkpoint.dirpath")
        # Temporary files of a save that was killed (SIGKILL while writing): gone before this run writes.
        for folder in (self._log_root, Path(str(dirpath)) if dirpath else None):
            if folder is not None:
                clean_stale_temporaries(folder, recursive=True)

    def _check_monitors(self) -> None:
        """``monitor`` of ``ModelCheckpoint``/``EarlyStopping`` must be a metric the module or a callback logs
        (``LoggedMetrics``); skipped when the module does not say, or a callback from elsewhere may log more."""
        if not isinstance(self.model, LoggedMetrics):
            return
        names = list(self.model.logged_metrics())
        for cb in self.trainer.callbacks:
            if isinstance(cb, LoggedMetrics):
                names += cb.logged_metrics()
            elif not isinstance(cb, SaveConfigCallback) and \
                    not type(cb).__module__.startswith(("lightning.", *(f"{p}." for p in PROJECT_PACKAGES))):
                return
        config_checkpoint = self._get(self.config_init, "checkpoint")
        for i, cb in enumerate(self.trainer.callbacks):
            monitor = getattr(cb, "monitor", None) if isinstance(cb, (ModelCheckpoint, EarlyStopping)) else None
            if monitor and not any(fnmatch.fnmatchcase(monitor, n) for n in names):
                key = "checkpoint.monitor" if cb is config_checkpoint else f"{type(cb).__name__}.monitor"
                fail(f"{key} {monitor!r} is not a metric that {type(self.model).__name__} or its callbacks log; "
                     f"they log: {', '.join(sorted(set(names)))}")

    def _guard(self, key: str, obj: Any, check: Any) -> None:
        try:
            check()
        except (ValueError, TypeError, OSError, KeyError, MemoryError) as e:
            if os.environ.get("ADAPTLAB_TRACEBACK"):
                raise
            fail(f"{key} ({type(obj).__name__}): {first_line(e)}")

    @staticmethod
    def _check_trainer_args(trainer_cfg: Any) -> None:
        """Trainer arguments Lightning only checks once training runs (or never)."""
        get = trainer_cfg.get
        checks = [
            ("max_epochs", get("max_epochs"), lambda v: v is None or v >= -1, ">= -1 (-1: no limit)"),
            ("min_epochs", get("min_epochs"), lambda v: v is None or v >= 0, ">= 0"),
            ("max_steps", get("max_steps"), lambda v: v is None or v >= -1, ">= -1 (-1: no limit)"),
            ("min_steps", get("min_steps"), lambda v: v is None or v >= 0, ">= 0"),
            ("log_every_n_steps", get("log_every_n_steps"), lambda v: v is None or v >= 0, ">= 0"),
            ("accumulate_grad_batches", get("accumulate_grad_batches"), lambda v: v is None or v >= 1, ">= 1"),
            ("gradient_clip_val", get("gradient_clip_val"), lambda v: v is None or v >= 0, ">= 0"),
            ("num_sanity_val_steps", get("num_sanity_val_steps"), lambda v: v is None or v >= -1, ">= -1"),
            ("check_val_every_n_epoch", get("check_val_every_n_epoch"), lambda v: v is None or v >= 1, ">= 1 or null"),
        ]
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                     "overfit_batches", "val_check_interval"):
            checks.append((name, get(name), lambda v: v is None or v >= 0, ">= 0 (a fraction in [0, 1] or a count)"))
        for name, value, ok, rule in checks:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
                fail(f"trainer.{name} must be {rule}, got {value}")

    def _check_checkpoint(self, path: Path, subcommand: str, allow_change: bool) -> None:
        """The checkpoint loads without running code, is a Lightning checkpoint, and was made with the same
        model class and model/data settings as the config (unless ``--allow_config_change``)."""
        try:
            ckpt = safe_load(path, what="ckpt_path")
        except CheckpointError as e:
            fail(str(e))
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            fail(f"ckpt_path {str(path)!r} is not a Lightning checkpoint (no 'state_dict'); a plain state dict is "
                 "loaded through the model's own weights option")
        ignore = IGNORED_HPARAMS | (IGNORED_EVAL_HPARAMS if subcommand != "fit" else set())
        diffs = []
        saved_model = ckpt.get("hyper_parameters")
        if saved_model is not None:
            diffs += differing_keys(saved_model, dict(self.model.hparams), "model", ignore)
        saved_data = ckpt.get("datamodule_hyper_parameters")
        if saved_data is not None and self.datamodule is not None and subcommand != "predict":
            diffs += differing_keys(saved_data, dict(self.datamodule.hparams), "data", ignore)
        diffs = [d.replace("._class_path", " (class)") for d in diffs]
        if any(" (class)" in d for d in diffs):  # another class: its other keys are noise
            diffs = [d for d in diffs if " (class)" in d]
        if diffs and not allow_change:
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            fail(f"ckpt_path {str(path)!r} was made with other settings than the config: {shown}. Use the original "
                 "settings, or --allow_config_change true to continue with the config's values")

    # ------------------------------------------------------------------------------------------------------------

    def _run_subcommand(self, subcommand: str) -> None:
        """Pre-flight, take the run's folders, then run; an error before the first batch removes exactly what
        this process created (recorded as created, see :class:`RunFolder`)."""
        self.preflight(subcommand)
        run = self._claim_run_folders(subcommand)
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise
        except CheckpointSaveError as e:
            fail(str(e))
        except Exception as e:
            info = next((cb for cb in self.trainer.callbacks if isinstance(cb, RunInfo)), None)
            if os.environ.get("ADAPTLAB_TRACEBACK") or info is None or info.first_batch_done:
                raise
            self._record_written_files(run)
            run.remove_created()
            fail(f"{type(e).__name__}: {first_line(e)} (before the first batch; the files this run had created were "
                 "removed; ADAPTLAB_TRACEBACK=1 shows the traceback)")
        finally:
            run.release()
            if os.environ.get(RUN_VERSION_ENV, "").endswith(f"@{os.getpid()}"):
                del os.environ[RUN_VERSION_ENV]

    def _claim_run_folders(self, subcommand: str) -> RunFolder:
        """Create (recording what is new) and lock the folders this run writes: the logger's ``version_N``,
        reserved atomically so two runs of one config never share one (``runs/<config>/version_N`` without a
        logger), and a fixed ``checkpoint.dirpath``. Processes that DDP launches later reuse rank 0's version."""
        run, trainer, logger = RunFolder(), self.trainer, self.trainer.logger
        versioned = logger is not None and hasattr(logger, "_version") and hasattr(logger, "root_dir")
        inherited = os.environ.get(RUN_VERSION_ENV)
        if rank_zero_only.rank != 0:  # a DDP rank: rank 0 made and locked the folders
            if inherited and versioned and logger._version is None:
                logger._version = int(inherited.split("@")[0])
            return run
        folders: list[Path] = []
        try:
            if versioned:
                if logger._version is None:  # Lightning would take max(N) + 1 by listing: two runs could agree
                    logger._version = run.reserve_version(Path(logger.root_dir))
                run.make_folder(Path(logger.log_dir))
                folders.append(Path(logger.log_dir))
                if isinstance(logger.version, int):
                    os.environ[RUN_VERSION_ENV] = f"{logger.version}@{os.getpid()}"
            elif logger is None and self._log_root is not None:
                if self._resume_version is None:
                    version = run.reserve_version(self._log_root)
                else:
                    version = self._resume_version
                    run.make_folder(self._log_root / f"version_{version}")
                folder = self._log_root / f"version_{version}"
                trainer._default_root_dir = str(folder)  # checkpoints, config.yaml: this run's own folder
                folders.append(folder)
            dirpath = self._checkpoint_dir(subcommand)
            if subcommand == "fit" and dirpath is not None and not any(dirpath.is_relative_to(f) for f in folders):
                run.make_folder(dirpath)
                folders.append(dirpath)
            for folder in folders:
                run.lock(folder)
                # an earlier run in this same process (same pid in TensorBoard's file names) is not this run
                run.preexisting.update(folder.glob(f"events.out.tfevents.*.{os.getpid()}.*"))
        except RunFolderBusy as e:
            run.release()
            run.remove_created()
            fail(str(e))
        return run

    def _record_written_files(self, run: RunFolder) -> None:
        """Files this process wrote into folders it does not own (a resumed run's): its config copy and event
        file."""
        for cb in self.trainer.callbacks:
            if isinstance(cb, KeepConfigCallback):
                run.record_file(cb.written)
        log_dir = getattr(self.trainer.logger, "log_dir", None)
        if log_dir is not None:  # TensorBoard names its file events.out.tfevents.<time>.<host>.<pid>.<n>
            for p in Path(log_dir).glob(f"events.out.tfevents.*.{os.getpid()}.*"):
                if p not in run.preexisting:  # this run's (not an earlier run's of the same process)
                    run.record_file(p)

    def _checkpoint_dir(self, subcommand: str) -> Path | None:
        dirpath = (self.config[subcommand].get("checkpoint") or {}).get("dirpath")
        return Path(str(dirpath)) if dirpath else None


def first_line(e: BaseException) -> str:
    """An exception's message as one line (jsonargparse's union noise dropped; the type name when empty)."""
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    if "Parser key" in text:
        text = concise_error(text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _NOISE.search(line.strip())]
    return " ".join(lines) if lines else type(e).__name__


def trainer_defaults() -> dict[str, Any]:
    return {
        "default_root_dir": RUNS_DIR,
        "plugins": [{"class_path": "callbacks.checkpointing.AtomicCheckpointIO"}],
        "logger": {
            "class_path": "callbacks.tensorboard.AdaptLabTensorBoardLogger",
            "init_args": {"save_dir": RUNS_DIR, "name": None},
        },
        "callbacks": [SigtermCheckpoint(), RunInfo(), ExactResume(), ScheduleMonitor(), EpochPerformance()],
    }


# ----------------------------------------------------------------------------------------------------------------
# Shipped configs: ``configs/`` beside this file (a checkout or an editable install) or, after a plain
# ``pip install .``, ``<prefix>/share/adaptlab/configs`` (pyproject's data-files); addressable by bare name.


def shipped_configs_dirs() -> list[Path]:
    """Folders that may hold the shipped configs, in lookup order."""
    import sysconfig

    prefixes = [sysconfig.get_path("data"), sys.prefix]
    with contextlib.suppress(KeyError, AttributeError):
        prefixes.append(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user")))
    dirs = [Path(__file__).resolve().parent / "configs"]
    return dirs + [Path(p) / "share" / "adaptlab" / "configs" for p in dict.fromkeys(prefixes) if p]


def shipped_configs() -> dict[str, Path]:
    """Config name (file stem) -> file, from the first folder of :func:`shipped_configs_dirs` that has any."""
    for folder in shipped_configs_dirs():
        found = {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}
        if found:
            return found
    return {}


def config_description(path: Path, width: int = 110) -> str:
    """First sentence of a config file's leading comment (its description), at most ``width`` characters."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text or "--config" in text:
            break
        words.append(text)
    sentence = " ".join(words).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rsplit(" ", 1)[0] + "..."


def resolve_config_names(args: list[str]) -> list[str]:
    """``--config NAME`` (no such file here, a shipped config's name, ``.yaml`` optional) -> the shipped file.

    A name that is neither fails with one line that suggests the closest shipped names."""
    import difflib

    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            j, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--config="):
            j, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        if Path(value).exists() or "/" in value or os.sep in value:
            continue
        configs = shipped_configs()
        name = value[: -len(".yaml")] if value.endswith(".yaml") else value
        if name in configs:
            out[j] = prefix + str(configs[name])
            continue
        close = difflib.get_close_matches(name, configs, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        fail(f"config file {value!r} does not exist, and no shipped config has that name{hint} (all of them: "
             "adaptlab configs list)")
    return out


def configs_command(args: list[str]) -> None:
    """``adaptlab configs list`` | ``adaptlab configs copy NAME [DEST]`` | ``adaptlab configs show NAME``."""
    usage = "usage: adaptlab configs list | copy NAME [DEST] | show NAME"
    configs = shipped_configs()
    if args[:1] == ["list"] and len(args) == 1:
        width = max(map(len, configs), default=0)
        for name, path in configs.items():
            print(f"{name:<{width}}  {config_description(path)}")
        return
    if args[:1] in (["copy"], ["show"]) and len(args) >= 2:
        name = args[1][: -len(".yaml")] if args[1].endswith(".yaml") else args[1]
        if name not in configs:
            import difflib

            close = difflib.get_close_matches(name, configs, n=3, cutoff=0.5)
            fail(f"no shipped config named {args[1]!r}" + (f"; did you mean {' or '.join(map(repr, close))}?"
                                                           if close else " (adaptlab configs list)"))
        if args[0] == "show" and len(args) == 2:
            sys.stdout.write(configs[name].read_text())
            return
        if args[0] == "copy" and len(args) <= 3:
            dest = Path(args[2] if len(args) == 3 else ".")
            target = dest / f"{name}.yaml" if dest.is_dir() or str(dest).endswith(("/", os.sep)) else dest
            if target.exists():
                fail(f"{str(target)!r} already exists; adaptlab never overwrites it (choose another DEST)")
            if not target.parent.is_dir():
                fail(f"folder {str(target.parent)!r} does not exist")
            shutil.copyfile(configs[name], target)
            print(f"copied {name} to {target}; run it with: adaptlab fit --config {target}")
            return
    fail(usage)


def main(args: list[str] | None = None, run: bool = True) -> AdaptLabCLI | None:
    """Entry point; ``args`` lets tests drive the CLI in-process."""
    from_argv = args is None
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["configs"]:
        configs_command(args[1:])
        return None
    args = resolve_config_names(args)
    if from_argv:  # LightningCLI warns when given both args and a command line
        sys.argv[1:] = args
    check_config_files(args)
    import_project_modules()
    return AdaptLabCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=None if from_argv else args,
        run=run,
    )


def console() -> None:
    """The ``adaptlab`` console command (returns nothing: ``sys.exit(main())`` would print the CLI object)."""
    main()


if __name__ == "__main__":
    main()
