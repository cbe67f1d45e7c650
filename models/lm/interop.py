"""The project's GPT in and out of other ecosystems: Hugging Face GPT-2 and LitGPT checkpoint folders.

* **Hugging Face GPT-2** (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin``; a local folder,
  nothing is downloaded): ``GPT2LMHeadModel`` keys with or without the ``transformer.`` prefix. GPT-2's
  ``Conv1D`` stores weights as ``(in, out)``: they are transposed; the fused ``c_attn`` is split into our
  ``query``/``key``/``value``; ``gelu_new`` is ``gelu_approximate: tanh``; positions are learned; the head is
  tied to the embedding (our untied ``lm_head`` starts as a copy; an export writes ``tie_word_embeddings``
  only when the two are still equal).
* **LitGPT** (``lit_model.pth`` + ``model_config.yaml``): ``transformer.h.<i>.attn.qkv`` holds the query, key
  and value rows one after the other (``n_query_groups == n_head``), rotary positions on the whole head
  (``rotary_percentage: 1``), sequential residuals (``parallel_residual: false``).

Both directions refuse what the other side cannot express (a rotary GPT to GPT-2, learned positions to LitGPT,
adapters that are not merged) with one sentence naming the field. A ``tokenizer.json`` travels alongside.

Command line (export a trained checkpoint; LoRA adapters are merged into the weights first)::

    python -m models.lm.interop --ckpt runs/gpt_pretrain/checkpoints/last.ckpt --to hf --out gpt2-export \
        [--tokenizer tokenizer.json]
    python -m models.lm.interop --ckpt <lora last.ckpt> --to adapters --out lora-adapters
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml

from models.lm.gpt import ARCH_FIELDS, GPT, Config, load_backbone_state, read_state_dict
from models.utils.checkpoint import safe_load
from models.utils.command_line import errors_as_one_line

HF_CONFIG, HF_WEIGHTS, HF_BIN = "config.json", "model.safetensors", "pytorch_model.bin"
LIT_CONFIG, LIT_WEIGHTS = "model_config.yaml", "lit_model.pth"
OUR_CONFIG = "adaptlab_config.json"
#: GPT-2 activation names -> our ``gelu_approximate``
HF_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": None, "gelu": "none"}


class InteropError(ValueError):
    """A checkpoint folder this converter cannot represent faithfully (the message names the field)."""


def detect_format(folder: str | Path) -> str | None:
    """``hf`` (``config.json``), ``litgpt`` (``lit_model.pth``), ``merged`` (this project's export:
    ``adaptlab_config.json`` + ``model.safetensors``) or ``None``."""
    folder = Path(folder)
    if (folder / LIT_WEIGHTS).is_file():
        return "litgpt"
    if (folder / OUR_CONFIG).is_file() and (folder / HF_WEIGHTS).is_file():
        return "merged"
    if (folder / HF_CONFIG).is_file():
        return "hf"
    return None


# ---------------------------------------------------------------------------------------------- Hugging Face
def _hf_config(raw: dict, where: str) -> Config:
    if raw.get("model_type") != "gpt2":
        raise InteropError(f"{where}: model_type {raw.get('model_type')!r} is not 'gpt2' (only GPT-2-style "
                           "checkpoints map onto the project's GPT)")
    act = raw.get("activation_function", "gelu_new")
    if HF_ACTIVATIONS.get(act) is None:
        raise InteropError(f"{where}: activation_function {act!r} is not supported ({sorted(HF_ACTIVATIONS)[:-1]})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if raw.get(key, ok) != ok:
            raise InteropError(f"{where}: {key}={raw[key]!r} has no counterpart in the project's GPT")
    return Config(n_layer=raw["n_layer"], n_head=raw["n_head"], n_embd=raw["n_embd"], block_size=raw["n_positions"],
                  vocab_size=raw["vocab_size"], bias=True, norm_class="LayerNorm",
                  norm_eps=raw.get("layer_norm_epsilon", 1e-5), mlp_class="GptNeoxMLP",
                  intermediate_size=raw.get("n_inner"), gelu_approximate=HF_ACTIVATIONS[act], position="learned")


def _read_weights(folder: Path, names: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except Exception as e:  # safetensors' own error type
                raise InteropError(f"{str(path)!r} is not a readable safetensors file ({e})") from e
        obj = safe_load(path, what=what)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # LitGPT's training checkpoints
            obj = obj["model"]
        if not isinstance(obj, dict):
            raise InteropError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
        return obj
    if (folder / "model.safetensors.index.json").is_file():
        raise InteropError(f"{str(folder)!r} holds a sharded checkpoint; only single-file weights are supported")
    raise FileNotFoundError(f"{what} folder {str(folder)!r} has none of {list(names)}")


def read_hf_gpt2(folder: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """A GPT-2 folder as (our :class:`Config`, our state dict)."""
    folder = Path(folder).expanduser()
    where = f"Hugging Face checkpoint {str(folder)!r}"
    try:
        raw = json.loads((folder / HF_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"{where}: {HF_CONFIG} cannot be read ({e})") from e
    config = _hf_config(raw, where)
    hf = {k.removeprefix("transformer."): v for k, v in _read_weights(folder, (HF_WEIGHTS, HF_BIN), where).items()}
    out: dict[str, torch.Tensor] = {}
    d = config.n_embd
    unknown = []
    for key, value in hf.items():
        parts = key.split(".")
        if key in ("wte.weight", "wpe.weight") or key.startswith("ln_f."):
            out[key] = value
        elif key == "lm_head.weight":
            out[key] = value
        elif parts[0] == "h" and len(parts) >= 4:
            i, rest = parts[1], ".".join(parts[2:])
            prefix = f"blocks.{i}."
            if rest in ("attn.bias", "attn.masked_bias"):
                continue  # causal-mask buffers of old checkpoints
            names = {"ln_1": "norm_1", "ln_2": "norm_2"}
            if parts[2] in names:
                out[prefix + names[parts[2]] + "." + parts[3]] = value
            elif rest == "attn.c_attn.weight":
                for name, w in zip(("query", "key", "value"), value.t().split(d, 0)):
                    out[f"{prefix}attn.{name}.weight"] = w.contiguous()
            elif rest == "attn.c_attn.bias":
                for name, b in zip(("query", "key", "value"), value.split(d, 0)):
                    out[f"{prefix}attn.{name}.bias"] = b.contiguous()
            elif rest in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
                ours = {"attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}[rest[:-7]]
                out[f"{prefix}{ours}.weight"] = value.t().contiguous()
            elif rest in ("attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
                ours = {"attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}[rest[:-5]]
                out[f"{prefix}{ours}.bias"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise InteropError(f"{where}: weights with no counterpart in a GPT-2: {unknown[:5]}")
    if raw.get("tie_word_embeddings", True):
        out["lm_head.weight"] = out["wte.weight"].clone()  # tied: our head starts as the embedding
    elif "lm_head.weight" not in out:
        raise InteropError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight")
    return config, out


def _no_adapters(model: GPT, target: str) -> None:
    keys = [k for k in model.state_dict() if ".base." in k or ".adapters." in k or k.startswith("skip2lora.")]
    if keys:
        raise InteropError(f"the GPT has adapters ({keys[0]}, ...): merge LoRA first (export merges it; Skip2-LoRA "
                           f"has no {target} counterpart: export it with --to adapters)")


def write_hf_gpt2(model: GPT, folder: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``model`` as a GPT-2 folder (``config.json`` + ``model.safetensors`` [+ ``tokenizer.json``])."""
    from safetensors.torch import save_file

    c = model.config
    for key, need in (("position", "learned"), ("norm_class", "LayerNorm"), ("mlp_class", "GptNeoxMLP"),
                      ("bias", True)):
        if getattr(c, key) != need:
            raise InteropError(f"config.{key}={getattr(c, key)!r} cannot be written as GPT-2 (it needs {need!r}); "
                               "export it with --to litgpt or keep the project's checkpoint")
    _no_adapters(model, "GPT-2")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tied = torch.equal(state["lm_head.weight"], state["wte.weight"])
    hf: dict[str, torch.Tensor] = {"transformer.wte.weight": state["wte.weight"],
                                   "transformer.wpe.weight": state["wpe.weight"],
                                   "transformer.ln_f.weight": state["ln_f.weight"],
                                   "transformer.ln_f.bias": state["ln_f.bias"]}
    if not tied:
        hf["lm_head.weight"] = state["lm_head.weight"]
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
            for leaf in ("weight", "bias"):
                hf[f"{h}{theirs}.{leaf}"] = state[f"{p}{ours}.{leaf}"]
        hf[f"{h}attn.c_attn.weight"] = torch.cat([state[f"{p}attn.{n}.weight"] for n in ("query", "key", "value")]).t()
        hf[f"{h}attn.c_attn.bias"] = torch.cat([state[f"{p}attn.{n}.bias"] for n in ("query", "key", "value")])
        for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            hf[f"{h}{theirs}.weight"] = state[f"{p}{ours}.weight"].t()
            hf[f"{h}{theirs}.bias"] = state[f"{p}{ours}.bias"]
    raw = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
           "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
           "n_inner": c.intermediate_size, "activation_function": "gelu_new" if c.gelu_approximate == "tanh"
           else "gelu", "layer_norm_epsilon": c.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
           "scale_attn_weights": True, "tie_word_embeddings": tied, "bos_token_id": None, "eos_token_id": None}
    folder = _new_folder(folder)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    (folder / HF_CONFIG).write_text(json.dumps(raw, indent=2) + "\n")
    _copy_tokenizer(tokenizer, folder)
    return folder


# ------------------------------------------------------------------------------------------------- LitGPT
#: LitGPT config keys that change the computation; anything but these values is refused on load.
LIT_NEUTRAL = {"rotary_percentage": 1.0, "parallel_residual": False, "shared_attention_norm": False,
               "lm_head_bias": False, "scale_embeddings": False, "post_attention_norm": False,
               "post_mlp_norm": False, "norm_qk": False, "attention_logit_softcapping": None,
               "final_logit_softcapping": None, "sliding_window_size": None, "rope_adjustments": None,
               "rope_condense_ratio": 1, "n_expert": 0, "attention_scores_scalar": None, "norm_1": True,
               "norm_2": True, "rope_interleave": False}


def read_litgpt(folder: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """A LitGPT folder as (our :class:`Config`, our state dict)."""
    folder = Path(folder).expanduser()
    where = f"LitGPT checkpoint {str(folder)!r}"
    try:
        raw = yaml.safe_load((folder / LIT_CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InteropError(f"{where}: {LIT_CONFIG} cannot be read ({e})") from e
    if not isinstance(raw, dict):
        raise InteropError(f"{where}: {LIT_CONFIG} is not a mapping")
    for key, neutral in LIT_NEUTRAL.items():
        if key in raw and raw[key] != neutral and not (neutral is None and not raw[key]):
            raise InteropError(f"{where}: {key}={raw[key]!r} has no counterpart in the project's GPT "
                               f"(supported: {neutral!r})")
    n_head, n_embd = raw["n_head"], raw["n_embd"]
    if raw.get("n_query_groups", n_head) != n_head:
        raise InteropError(f"{where}: n_query_groups={raw['n_query_groups']} (grouped-query attention) is not "
                           f"supported; the project's GPT has n_query_groups == n_head ({n_head})")
    if raw.get("head_size", n_embd // n_head) * n_head != n_embd:
        raise InteropError(f"{where}: head_size={raw['head_size']} is not n_embd / n_head")
    norm = raw.get("norm_class_name", "LayerNorm")
    mlp = raw.get("mlp_class_name", "GptNeoxMLP")
    vocab = raw.get("padded_vocab_size") or raw["vocab_size"]
    config = Config(n_layer=raw["n_layer"], n_head=n_head, n_embd=n_embd, block_size=raw["block_size"],
                    vocab_size=vocab, bias=raw.get("bias", True), norm_class=norm, norm_eps=raw.get("norm_eps", 1e-5),
                    mlp_class=mlp, intermediate_size=raw.get("intermediate_size"),
                    gelu_approximate=raw.get("gelu_approximate", "none") if mlp == "GptNeoxMLP" else "none",
                    position="rotary", rope_base=raw.get("rope_base", 10000))
    lit = _read_weights(folder, (LIT_WEIGHTS,), where)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in lit.items():
        k = key.removeprefix("transformer.")
        parts = k.split(".")
        if k == "wte.weight" or k == "lm_head.weight" or k.startswith("ln_f."):
            out[k] = value
        elif parts[0] == "h":
            i, rest = parts[1], ".".join(parts[2:])
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                for name, t in zip(("query", "key", "value"), value.split(n_embd, 0)):
                    out[f"blocks.{i}.attn.{name}.{parts[-1]}"] = t.contiguous()
            elif rest.startswith("attn.attn."):
                raise InteropError(f"{where}: {key} is LitGPT's older fused layout; re-save it with a current LitGPT")
            else:
                out[f"blocks.{i}.{rest}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise InteropError(f"{where}: weights with no counterpart in the project's GPT: {unknown[:5]}")
    if not config.bias:  # LitGPT's LayerNorm keeps a bias when the linears have none; ours has none then
        for key in [k for k in out if k.endswith(".bias") and ("norm" in k or k.startswith("ln_f"))]:
            if out[key].abs().max() > 0:
                raise InteropError(f"{where}: {key} is non-zero but the config has bias: false")
            del out[key]
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["wte.weight"].clone()
    return config, out


def write_litgpt(model: GPT, folder: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``model`` as a LitGPT folder (``lit_model.pth`` + ``model_config.yaml`` [+ ``tokenizer.json``])."""
    c = model.config
    if c.position != "rotary":
        raise InteropError("config.position='learned' cannot be written as LitGPT (it has rotary positions only); "
                           "export it with --to hf")
    _no_adapters(model, "LitGPT")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    lit: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            if parts[2] == "attn" and parts[3] in ("query", "key", "value"):
                if parts[3] == "query":
                    lit[f"transformer.h.{i}.attn.qkv.{parts[4]}"] = torch.cat(
                        [state[f"blocks.{i}.attn.{n}.{parts[4]}"] for n in ("query", "key", "value")])
                continue
            lit[f"transformer.h.{i}.{rest}"] = value
        elif key == "lm_head.weight":
            lit[key] = value
        else:
            lit[f"transformer.{key}"] = value
    if not c.bias and c.norm_class == "LayerNorm":
        for name in [k for k in lit if k.endswith("norm_1.weight") or k.endswith("norm_2.weight") or
                     k == "transformer.ln_f.weight"]:
            lit[name[:-len("weight")] + "bias"] = torch.zeros_like(lit[name])
    raw = {"name": "adaptlab-gpt", "block_size": c.block_size, "vocab_size": c.vocab_size,
           "padded_vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
           "n_query_groups": c.n_head, "head_size": c.head_size, "rotary_percentage": 1.0,
           "parallel_residual": False, "shared_attention_norm": False, "bias": c.bias, "lm_head_bias": False,
           "norm_class_name": c.norm_class, "norm_eps": c.norm_eps, "mlp_class_name": c.mlp_class,
           "intermediate_size": c.mlp_size, "gelu_approximate": c.gelu_approximate, "rope_base": c.rope_base}
    folder = _new_folder(folder)
    torch.save(lit, folder / LIT_WEIGHTS)
    (folder / LIT_CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))
    _copy_tokenizer(tokenizer, folder)
    return folder


# ------------------------------------------------------------------------------------------------- common
def _new_folder(folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"--out {str(folder)!r} exists and is not empty (nothing is overwritten)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _copy_tokenizer(tokenizer: str | Path | None, folder: Path) -> None:
    if tokenizer is not None and str(tokenizer) != "bytes":
        src = Path(tokenizer).expanduser()
        if not src.is_file():
            raise FileNotFoundError(f"tokenizer {str(src)!r} does not exist")
        shutil.copyfile(src, folder / "tokenizer.json")


def read_folder(folder: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """A Hugging Face GPT-2 or LitGPT folder as (our config, our state dict)."""
    fmt = detect_format(folder)
    if fmt is None:
        raise FileNotFoundError(f"{str(folder)!r} is neither a Hugging Face folder ({HF_CONFIG}), a LitGPT folder "
                                f"({LIT_WEIGHTS}) nor a merged export ({OUR_CONFIG} + {HF_WEIGHTS})")
    if fmt == "merged":
        folder = Path(folder)
        try:
            raw = json.loads((folder / OUR_CONFIG).read_text())
            config = Config(**{f.name: raw[f.name] for f in fields(Config) if f.name in raw})
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise InteropError(f"{str(folder / OUR_CONFIG)!r} cannot be read as a GPT config ({e})") from e
        return config, _read_weights(folder, (HF_WEIGHTS,), f"merged export {str(folder)!r}")
    return read_hf_gpt2(folder) if fmt == "hf" else read_litgpt(folder)


def with_architecture(config: Config, source: Config) -> Config:
    """``config`` (adapters, dropout) with the architecture of ``source`` (a loaded folder's)."""
    arch = {k: getattr(source, k) for k in (*ARCH_FIELDS, "norm_eps", "rope_base")}
    return Config(**{**asdict(config), **arch})


def load_gpt(folder: str | Path, config: Config | None = None) -> GPT:
    """A :class:`GPT` from a Hugging Face GPT-2 or LitGPT folder (``config``: adapter options to add)."""
    source_cfg, state = read_folder(folder)
    model = GPT(with_architecture(config or Config(), source_cfg))
    load_backbone_state(model, state, asdict(source_cfg), source=f"checkpoint folder {str(folder)!r}")
    return model


def model_from_checkpoint(path: str | Path) -> GPT:
    """The GPT of a Lightning checkpoint (its saved config) with LoRA/Skip2-LoRA adapters as trained."""
    state, cfg = read_state_dict(path)
    if cfg is None:
        raise InteropError(f"{str(path)!r} has no model config (a Lightning checkpoint of GPTLanguageModel is needed)")
    known = {f.name for f in fields(Config)}
    model = GPT(Config(**{k: v for k, v in cfg.items() if k in known}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InteropError(f"{str(path)!r} does not match its own config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model


def export(model: GPT, to: str, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``model`` as ``hf``, ``litgpt``, ``merged`` (the project's format: ``model.safetensors`` +
    ``adaptlab_config.json``, LoRA merged) or ``adapters`` (adapter weights only + the config to rebuild).
    LoRA is merged into the base weights for every format but ``adapters``."""
    from safetensors.torch import save_file

    from models.adapters.lora import lora_layers, merge_and_unload

    if to == "adapters":
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                 if ".adapters." in k or k.startswith("skip2lora.")}
        if not state:
            raise InteropError("the checkpoint has no LoRA or Skip2-LoRA adapters to export")
        folder = _new_folder(out)
        save_file(state, str(folder / "adapters.safetensors"), metadata={"format": "pt"})
        (folder / OUR_CONFIG).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
        return folder
    if lora_layers(model):
        merge_and_unload(model)
    if to == "hf":
        return write_hf_gpt2(model, out, tokenizer)
    if to == "litgpt":
        return write_litgpt(model, out, tokenizer)
    if to == "merged":
        if model.skip_indices:
            raise InteropError("Skip2-LoRA branches cannot be merged into the base weights (they add every "
                               "selected block's output before the head); export them with --to adapters")
        plain = Config(**{**asdict(model.config), **{f.name: False for f in fields(Config)
                                                     if f.name.startswith("lora_") and f.type == "bool"}})
        folder = _new_folder(out)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(folder / HF_WEIGHTS), metadata={"format": "pt"})
        (folder / OUR_CONFIG).write_text(json.dumps(asdict(plain), indent=2) + "\n")
        _copy_tokenizer(tokenizer, folder)
        return folder
    raise ValueError(f"--to must be hf, litgpt, merged or adapters, got {to!r}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.lm.interop",
                                description="Export a trained GPT checkpoint (LoRA merged) to Hugging Face GPT-2, "
                                            "LitGPT, the project's merged format, or its adapters only.")
    p.add_argument("--ckpt", required=True, help="a GPTLanguageModel checkpoint (last.ckpt) or an HF/LitGPT folder")
    p.add_argument("--to", required=True, choices=("hf", "litgpt", "merged", "adapters"))
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to copy alongside the weights")
    a = p.parse_args(argv)
    with errors_as_one_line(OSError, ValueError, KeyError, RuntimeError):
        src = Path(a.ckpt).expanduser()
        model = load_gpt(src) if src.is_dir() else model_from_checkpoint(src)
        folder = export(model, a.to, a.out, a.tokenizer)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
