"""``Phase1Config``: sizes and feature switches of the Phase 1 language model, flat or in the guide's nested form.

Flat fields are what :func:`models.lm.phase1.model.create_phase1_model` reads. The nested YAML form

.. code-block:: yaml

    phase1:
      enabled: true
      preset: 8gb            # 8gb | 10gb | 24gb | custom
      model: {vocab_size: 256, d_model: 512, n_layers: 8, n_seq: 1024, batch_size: 8}
      bk: {enabled: true, eta: 1.0, chunk_size: 256}
      ar_ssm: {enabled: true, max_rank: 32, min_rank: 4, l1_regularization: 0.001, use_fused_scan: true}
      htt: {enabled: true, rank: 16, num_cores: 2, phase_encoding: true}
      lns: {enabled: false}
      stability: {enabled: true, threshold: 0.001}
      memory: {gradient_checkpointing: true, target_vram_gb: 8.0}

maps onto the same fields (:meth:`Phase1Config.from_nested`; :meth:`Phase1Config.to_nested` goes back). A
preset fills the sizes first (:func:`models.lm.phase1.presets.get_preset_config`), then the other groups
override; ``preset: custom`` with ``memory.target_vram_gb`` and no ``model.d_model``/``model.n_layers`` (nor
flat ``d_model``/``n_layers``) picks the sizes for that budget from the memory model. ``enabled: false``
switches every Phase 1 feature off (the baseline: dense embedding, MLP-only blocks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from models.quant.lns import LNS_FORMATS

#: nested group -> {nested key: flat field}
NESTED_KEYS: dict[str, dict[str, str]] = {
    "model": {k: k for k in ("vocab_size", "d_model", "n_layers", "n_seq", "batch_size", "norm_class", "norm_eps",
                             "mlp_class", "intermediate_size", "bias", "dropout", "tie_embeddings")},
    "bk": {"enabled": "bk_enabled", "eta": "bk_eta", "chunk_size": "bk_chunk_size"},
    "ar_ssm": {"enabled": "ar_ssm_enabled", "max_rank": "ar_ssm_max_rank", "min_rank": "ar_ssm_min_rank",
               "l1_regularization": "ar_ssm_l1_regularization", "use_fused_scan": "ar_ssm_use_fused_scan",
               "conv_kernel": "ar_ssm_conv_kernel", "curriculum_steps": "ar_ssm_curriculum_steps"},
    "htt": {"enabled": "htt_enabled", "rank": "htt_rank", "num_cores": "htt_num_cores",
            "phase_encoding": "htt_phase_encoding"},
    "lns": {"enabled": "lns_enabled", "format": "lns_format", "target_modules": "lns_target_modules"},
    "stability": {"enabled": "stability_monitoring_enabled", "threshold": "stability_threshold"},
    "memory": {"gradient_checkpointing": "use_gradient_checkpointing", "target_vram_gb": "target_vram_gb"},
}
PRESET_NAMES = ("8gb", "10gb", "24gb", "custom")


def _yaml_float(name: str, field_name: str, value: Any) -> Any:
    """YAML 1.1 (``yaml.safe_load``) reads ``1e-6`` (no dot) as a string: accept it for float fields."""
    annotation = str(Phase1Config.__dataclass_fields__[field_name].type)
    if isinstance(value, str) and "float" in annotation:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    return value


@dataclass
class Phase1Config:
    """Phase 1 language model: blocks of [BK resolvent mixer and/or AR-SSM] + MLP (pre-norm residuals),
    dense or tensor-train (HTT) embedding, optional LNS linears at inference.

    Sizes: ``vocab_size``, ``d_model``, ``n_layers``, ``n_seq`` (training sequence length; the model is
    recurrent, so longer inputs work too), ``batch_size`` (the micro-batch the memory model assumes).
    ``norm_class``/``mlp_class``/``intermediate_size`` (default ``4 * d_model``)/``bias`` pick the layers
    through ``models.layers.create``. ``tie_embeddings``: the output head is the embedding (the TT cores when
    ``htt_enabled``), else a separate ``lm_head`` linear.
    BK mixer: ``bk_enabled``, ``bk_eta`` (Im z; |g| <= 1/eta), ``bk_chunk_size`` (parallel scan chunk).
    AR-SSM: ``ar_ssm_*`` as in :class:`models.layers.ar_ssm.ARSSM`; ``ar_ssm_curriculum_steps`` > 0 grows the
    active rank from ``min_rank`` to ``max_rank`` over that many optimizer steps (0: full rank throughout).
    HTT: ``htt_enabled``, ``htt_rank``, ``htt_num_cores``, ``htt_phase_encoding``
    (:class:`models.layers.tt_embedding.TTEmbedding`).
    LNS: ``lns_enabled`` swaps ``lns_target_modules`` (default: MLP and BK projections) for ``LNSLinear``
    (full precision in training, LNS ``lns_format`` emulation in eval).
    Stability: ``stability_monitoring_enabled`` records the BK bound / conditioning each forward;
    ``stability_threshold`` is the relative tolerance on the bound |g| <= 1/eta (float rounding).
    Memory: ``use_gradient_checkpointing`` (recompute each block in the backward), ``target_vram_gb`` (the
    budget presets are sized for).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_seq: int = 256
    batch_size: int = 8
    norm_class: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    mlp_class: Literal["GptNeoxMLP", "LLaMAMLP"] = "GptNeoxMLP"
    intermediate_size: int | None = None
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    bk_enabled: bool = True
    bk_eta: float = 1.0
    bk_chunk_size: int = 256
    ar_ssm_enabled: bool = True
    ar_ssm_max_rank: int = 32
    ar_ssm_min_rank: int = 4
    ar_ssm_l1_regularization: float = 1e-3
    ar_ssm_use_fused_scan: bool = True
    ar_ssm_conv_kernel: int = 4
    ar_ssm_curriculum_steps: int = 0
    htt_enabled: bool = True
    htt_rank: int = 16
    htt_num_cores: int = 2
    htt_phase_encoding: bool = True
    lns_enabled: bool = False
    lns_format: str = "lns8-g8"
    lns_target_modules: list[str] | None = None
    stability_monitoring_enabled: bool = True
    stability_threshold: float = 1e-3
    use_gradient_checkpointing: bool = True
    target_vram_gb: float = 8.0

    def check_ranks(self) -> None:
        """No more rank than width is useful (or built). Checked when the model is built, not in ``__post_init__``:
        the flat ``config`` is constructed (with default ranks) before the nested ``phase1`` group is applied."""
        for key, on in (("ar_ssm_max_rank", self.ar_ssm_enabled), ("htt_rank", self.htt_enabled)):
            if on and getattr(self, key) > self.d_model:
                raise ValueError(f"config.{key} ({getattr(self, key)}) must not exceed the model width "
                                 f"config.d_model ({self.d_model})")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN/inf pass every comparison below: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config.{f.name} must be a finite number, got {value}")
        if self.norm_eps <= 0 or self.ar_ssm_l1_regularization < 0:
            raise ValueError(f"config.norm_eps must be > 0 and config.ar_ssm_l1_regularization >= 0, got "
                             f"{self.norm_eps}, {self.ar_ssm_l1_regularization}")
        for key in ("vocab_size", "d_model", "n_layers", "n_seq", "batch_size", "bk_chunk_size", "htt_rank",
                    "ar_ssm_conv_kernel"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config.{key} must be positive, got {getattr(self, key)}")
        if not 1 <= self.ar_ssm_min_rank <= self.ar_ssm_max_rank:
            raise ValueError(f"config.ar_ssm_min_rank/ar_ssm_max_rank need 1 <= min <= max, got "
                             f"{self.ar_ssm_min_rank}, {self.ar_ssm_max_rank}")
        if self.bk_eta <= 0:
            raise ValueError(f"config.bk_eta must be > 0, got {self.bk_eta}")
        if self.htt_num_cores < 2:
            raise ValueError(f"config.htt_num_cores must be >= 2, got {self.htt_num_cores}")
        if self.lns_format not in LNS_FORMATS:
            raise ValueError(f"config.lns_format must be one of {sorted(LNS_FORMATS)}, got {self.lns_format!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.dropout must be in [0, 1), got {self.dropout}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"config.intermediate_size must be positive or null, got {self.intermediate_size}")
        if self.stability_threshold < 0 or self.target_vram_gb <= 0 or self.ar_ssm_curriculum_steps < 0:
            raise ValueError("config.stability_threshold and config.ar_ssm_curriculum_steps must be >= 0 and "
                             f"config.target_vram_gb > 0, got {self.stability_threshold}, "
                             f"{self.ar_ssm_curriculum_steps}, {self.target_vram_gb}")
        choices = {"norm_class": ("LayerNorm", "RMSNorm"), "mlp_class": ("GptNeoxMLP", "LLaMAMLP")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config.{key} must be one of {allowed}, got {getattr(self, key)!r}")

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.d_model

    @property
    def any_feature(self) -> bool:
        """Whether any Phase 1 feature is on (a config with none is the baseline)."""
        return self.bk_enabled or self.ar_ssm_enabled or self.htt_enabled or self.lns_enabled

    def replace(self, **changes: Any) -> Phase1Config:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------ nested form
    @classmethod
    def from_nested(cls, nested: dict[str, Any], base: Phase1Config | None = None,
                    given: Collection[str] | None = None) -> Phase1Config:
        """The guide's ``phase1:`` mapping (with or without the outer ``phase1`` key) -> a config.

        ``base`` supplies every field the mapping does not set. Unknown keys raise ``ValueError`` naming them.
        ``given``: the fields of ``base`` that were set explicitly (``cli.py`` knows them from what the config
        files and command line contained); ``None``: those that differ from the defaults (a field set to its
        default cannot be told from an unset one then). A given field that the group or its preset would
        replace with another value is refused, naming both keys.
        """
        from models.lm.phase1.presets import fit_to_budget, get_preset_config

        if set(nested) == {"phase1"}:
            nested = nested["phase1"] or {}
        allowed = {"enabled", "preset", *NESTED_KEYS}
        unknown = sorted(set(nested) - allowed)
        if unknown:
            raise ValueError(f"phase1.{unknown[0]} is not a Phase 1 option; allowed: {sorted(allowed)}")
        preset = nested.get("preset", "custom")
        if preset not in PRESET_NAMES:
            raise ValueError(f"phase1.preset must be one of {PRESET_NAMES}, got {preset!r}")
        defaults = cls()
        fields = [f.name for f in dataclasses.fields(cls)]
        if base is None:
            given = []
        elif given is None:
            given = [f for f in fields if getattr(base, f) != getattr(defaults, f)]
        else:
            given = [f for f in fields if f in given]  # field order: the first conflict named is stable
        config = get_preset_config(preset) if preset != "custom" else (base or defaults)
        changes: dict[str, Any] = {}
        for group, keys in NESTED_KEYS.items():
            values = nested.get(group) or {}
            if not isinstance(values, dict):
                raise ValueError(f"phase1.{group} must be a mapping, got {values!r}")
            for key, value in values.items():
                if key not in keys:
                    raise ValueError(f"phase1.{group}.{key} is not a Phase 1 option; allowed: {sorted(keys)}")
                field = keys[key]
                value = _yaml_float(f"phase1.{group}.{key}", field, value)
                _check_nested_type(f"phase1.{group}.{key}", value, getattr(defaults, field), field)
                if field in given and getattr(base, field) != value:
                    _refuse_both(field, getattr(base, field), f"phase1.{group}.{key}", value)
                changes[field] = value
        if not nested.get("enabled", True):
            for field in ("bk_enabled", "ar_ssm_enabled", "htt_enabled", "lns_enabled"):
                if field in given and getattr(base, field):
                    _refuse_both(field, True, "phase1.enabled", False)
                changes[field] = False
        config = dataclasses.replace(config, **changes)
        replaced_by = None  # what replaced flat values the group does not set
        if preset != "custom":
            replaced_by = f"phase1.preset {preset!r} sets every field"
        elif "target_vram_gb" in changes and not {"d_model", "n_layers"} & set(changes):
            config = fit_to_budget(config)
            replaced_by = "phase1.memory.target_vram_gb picks the sizes when phase1.model sets no d_model/n_layers"
        for field in given if replaced_by else []:  # the user's flat value would be lost: refuse
            if field not in changes and getattr(base, field) != getattr(config, field):
                raise ValueError(f"config.{field} ({getattr(base, field)!r}) would be ignored: {replaced_by}; set "
                                 f"it inside the phase1 group ({_nested_name(field)}) instead")
        config.check_ranks()
        return config

    def to_nested(self) -> dict[str, Any]:
        """The nested form (``phase1:`` mapping without the outer key); ``from_nested`` inverts it."""
        out: dict[str, Any] = {"enabled": True, "preset": "custom"}
        for group, keys in NESTED_KEYS.items():
            out[group] = {key: getattr(self, name) for key, name in keys.items()}
        return out


def _refuse_both(field: str, flat: Any, nested_key: str, value: Any) -> NoReturn:
    raise ValueError(f"config.{field} ({flat!r}) and {nested_key} ({value!r}) set the same option; set it in one "
                     "place (the phase1 group is applied on top of config)")


def _nested_name(field: str) -> str:
    """``phase1.<group>.<key>`` of a flat field (the flat name when no group covers it)."""
    for group, keys in NESTED_KEYS.items():
        for key, name in keys.items():
            if name == field:
                return f"phase1.{group}.{key}"
    return f"config.{field}"


_OPTIONAL_INT = {"intermediate_size"}


def _check_nested_type(name: str, value: Any, default: Any, field: str) -> None:
    """The nested group is a plain mapping (jsonargparse cannot type it): check each value against its field's
    kind (bool, int, number, text, list; NaN refused in ``__post_init__``)."""
    if value is None and (default is None or field in _OPTIONAL_INT):
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int) or field in _OPTIONAL_INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # lns_target_modules: null or a list of names
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
            type(default) if field not in _OPTIONAL_INT else int, "a list of names")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
