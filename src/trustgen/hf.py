"""Hugging Face interop: import a local `transformers` GPT-2 or Llama folder as a run directory,
and export a GPT run as a folder that `AutoModelForCausalLM.from_pretrained` loads.

Every GPT trustgen trains has a Hugging Face twin. With learned positions, LayerNorm, GELU and
biases it is GPT-2's architecture: conversion renames tensors and transposes the linear layers
(GPT-2 stores them as `Conv1D` weights of shape (in, out), `nn.Linear` as (out, in)). With rotary
positions, RMSNorm and SwiGLU (the default) it is Llama's: conversion renames tensors and splits
the fused attention projection into q, k and v. trustgen rotates the two halves of each head
(x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), which is transformers' `rotate_half`, so q and k
need no permutation. Weights are read and written as safetensors only; a `pytorch_model.bin` is
a pickle, and loading one can run code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trustgen import io, runs
from trustgen.data.tokenizers import Tokenizer, tokenizer_from_json
from trustgen.errors import TrustgenError
from trustgen.models.gpt import GPT, GPTConfig, swiglu_width
from trustgen.models.registry import model_config

# HF activation name -> GPTConfig.mlp. "gelu_new" and "gelu_pytorch_tanh" are both the tanh
# approximation GPT-2 was trained with; "gelu" is the exact erf form.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_EXPORT_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# Per GPT-2 block: HF module -> our module, and whether its weight is a Conv1D (stored transposed).
_GPT2_BLOCK = (
    ("ln_1", "norm1", False),
    ("attn.c_attn", "attn.qkv", True),
    ("attn.c_proj", "attn.proj", True),
    ("ln_2", "norm2", False),
    ("mlp.c_fc", "mlp.up", True),
    ("mlp.c_proj", "mlp.down", True),
)
# Per Llama layer: HF module -> our module. q, k and v are thirds of our fused attn.qkv; the
# names attn.q/k/v exist only between `_split_qkv` and `_fuse_qkv`.
_LLAMA_LAYER = (
    ("input_layernorm", "norm1"),
    ("self_attn.q_proj", "attn.q"),
    ("self_attn.k_proj", "attn.k"),
    ("self_attn.v_proj", "attn.v"),
    ("self_attn.o_proj", "attn.proj"),
    ("post_attention_layernorm", "norm2"),
    ("mlp.gate_proj", "mlp.gate"),
    ("mlp.up_proj", "mlp.up"),
    ("mlp.down_proj", "mlp.down"),
)
_LLAMA_LINEARS = {"attn.q", "attn.k", "attn.v", "attn.proj", "mlp.gate", "mlp.up", "mlp.down"}
# Causal-mask buffers that older transformers versions saved with the weights; not parameters.
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")
# GPT2Config's and LlamaConfig's defaults, for configs that leave a field out.
_GPT2_DEFAULTS: dict[str, Any] = {
    "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1,
    "n_inner": None, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False, "tie_word_embeddings": True,
}
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
}
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class Export:
    """What `export_hf` wrote: the Hugging Face architecture, the files, and how the tokenizer
    was written."""

    architecture: str
    files: tuple[str, ...]
    tokenizer: str

    def describe(self) -> str:
        return f"{self.architecture}: {', '.join(self.files)} (tokenizer.json holds {self.tokenizer})"


def _gpt2_pairs(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """(HF name, our name, transpose) for every GPT-2 tensor but lm_head."""
    pairs = [("transformer.wte.weight", "wte.weight", False), ("transformer.wpe.weight", "wpe.weight", False)]
    for i in range(config.n_layer):
        for hf_module, our_module, conv in _GPT2_BLOCK:
            pairs.append((f"transformer.h.{i}.{hf_module}.weight", f"blocks.{i}.{our_module}.weight", conv))
            pairs.append((f"transformer.h.{i}.{hf_module}.bias", f"blocks.{i}.{our_module}.bias", False))
    pairs += [("transformer.ln_f.weight", "norm_f.weight", False), ("transformer.ln_f.bias", "norm_f.bias", False)]
    return pairs


def _llama_pairs(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """(HF name, our name, transpose) for every Llama tensor but lm_head."""
    pairs = [("model.embed_tokens.weight", "wte.weight", False)]
    for i in range(config.n_layer):
        for hf_module, our_module in _LLAMA_LAYER:
            pairs.append((f"model.layers.{i}.{hf_module}.weight", f"blocks.{i}.{our_module}.weight", False))
            if config.bias and our_module in _LLAMA_LINEARS:
                pairs.append((f"model.layers.{i}.{hf_module}.bias", f"blocks.{i}.{our_module}.bias", False))
    return [*pairs, ("model.norm.weight", "norm_f.weight", False)]


def _split_qkv(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    state = dict(state)
    for i in range(n_layer):
        for kind in ("weight", "bias"):
            fused = state.pop(f"blocks.{i}.attn.qkv.{kind}", None)
            if fused is not None:
                for name, part in zip("qkv", fused.chunk(3), strict=True):
                    state[f"blocks.{i}.attn.{name}.{kind}"] = part
    return state


def _fuse_qkv(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    for i in range(n_layer):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"blocks.{i}.attn.{name}.{kind}", None) for name in "qkv"]
            if parts[0] is not None:
                state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    return state


def _prepare_out(out: Path) -> None:
    """Create `out`, refusing to overwrite a model already there."""
    if out.exists() and not out.is_dir():
        raise TrustgenError(f"{out} is a file; give a folder to write into.")
    if (out / "config.json").exists():
        raise TrustgenError(f"{out} already holds a model (it has a config.json); choose another folder.")
    out.mkdir(parents=True, exist_ok=True)


# -- import ---------------------------------------------------------------------------------

def import_hf(path: Path, out: Path) -> str:
    """Convert the local Hugging Face GPT-2 or Llama folder `path` into the run directory `out`;
    returns the model type it read ("gpt2" or "llama").

    `path` needs config.json, model.safetensors (or a sharded model.safetensors.index.json) and
    tokenizer.json (a byte-level BPE, or the character WordLevel tokenizer `export_hf` writes).
    GPT-2's dropout is taken from `resid_pdrop`, so fine-tuning the import (`init_from`)
    regularises like GPT-2 did.
    """
    path, out = Path(path), Path(out)
    if not path.is_dir():
        raise TrustgenError(f"{path} is not a folder; give a local Hugging Face GPT-2 or Llama model folder.")
    source = path / "config.json"
    hf_config = _read_hf_config(source)
    model_type = hf_config.get("model_type")
    if model_type == "gpt2":
        config = _config_from_gpt2({**_GPT2_DEFAULTS, **hf_config}, source)
        pairs, tensors = _gpt2_pairs(config), _gpt2_names(_read_hf_weights(path))
    elif model_type == "llama":
        config = _config_from_llama({**_LLAMA_DEFAULTS, **hf_config}, source)
        pairs, tensors = _llama_pairs(config), _read_hf_weights(path)
    else:
        raise TrustgenError(f"{source} describes a {model_type!r} model; only GPT-2 ('gpt2') and "
                            "Llama ('llama') models can be imported.")
    tokenizer_text, tokenizer = _read_hf_tokenizer(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise TrustgenError(f"{path / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model only "
                            f"{config.vocab_size}.")
    model = _model_from_hf(config, pairs, tensors, path)

    _prepare_out(out)
    io.atomic_write_bytes(out / "model.safetensors", io.weights_bytes(model))
    io.atomic_write_text(out / "tokenizer.json", tokenizer_text)
    # config.json last: its presence is what marks a complete run directory.
    runs.write_run_config(out, "gpt", config, tokenizer.kind,
                          {"source": {"format": f"hf-{model_type}", "path": str(path)}})
    return model_type


def _read_hf_config(path: Path) -> dict[str, Any]:
    data = io.read_json(path)
    if not isinstance(data, dict):
        raise TrustgenError(f"{path} is not a model config (it holds no JSON object).")
    return data


def _read_hf_tokenizer(path: Path) -> tuple[str, Tokenizer]:
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.exists():
        raise TrustgenError(
            f"{path} has no tokenizer.json; write one with transformers' "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder).")
    text = tokenizer_path.read_text(encoding="utf-8")
    try:
        return text, tokenizer_from_json(text)
    except TrustgenError as exc:
        raise TrustgenError(f"{tokenizer_path}: {exc}") from None


def _config_from_gpt2(hf: dict[str, Any], source: Path) -> GPTConfig:
    activation = hf["activation_function"]
    if activation not in _ACTIVATIONS:
        raise TrustgenError(f"{source} uses activation {activation!r}; trustgen's GPT supports "
                            f"{', '.join(_ACTIVATIONS)}.")
    unsupported = []
    if hf["n_inner"] not in (None, 4 * hf["n_embd"]):
        unsupported.append(f"n_inner={hf['n_inner']} (trustgen's MLP is 4 x n_embd wide)")
    if not hf["scale_attn_weights"]:
        unsupported.append("scale_attn_weights=false")
    if hf["scale_attn_by_inverse_layer_idx"]:
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if hf["add_cross_attention"]:
        unsupported.append("add_cross_attention=true")
    _refuse_options(unsupported, source, "GPT-2")
    return GPTConfig.from_dict({
        "vocab_size": hf["vocab_size"], "block_size": hf["n_positions"], "n_layer": hf["n_layer"],
        "n_head": hf["n_head"], "n_embd": hf["n_embd"], "dropout": hf["resid_pdrop"],
        "position": "learned", "norm": "layernorm", "bias": True, "mlp": _ACTIVATIONS[activation],
        "norm_eps": hf["layer_norm_epsilon"], "tie_embeddings": bool(hf["tie_word_embeddings"]),
    })


def _config_from_llama(hf: dict[str, Any], source: Path) -> GPTConfig:
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = []
    if hf["hidden_act"] != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (trustgen's SwiGLU gates with silu)")
    if hf["num_key_value_heads"] not in (None, heads):
        unsupported.append(f"num_key_value_heads={hf['num_key_value_heads']} (grouped-query attention)")
    if hf["head_dim"] not in (None, width // heads):
        unsupported.append(f"head_dim={hf['head_dim']} (trustgen's heads are hidden_size / num_attention_heads)")
    if hf["intermediate_size"] != swiglu_width(width):
        unsupported.append(f"intermediate_size={hf['intermediate_size']} (trustgen's SwiGLU is "
                           f"{swiglu_width(width)} wide for hidden_size {width})")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope_type={rope.get('rope_type', rope.get('type'))!r} (trustgen's RoPE is unscaled)")
    if hf["attention_bias"] != hf["mlp_bias"]:
        unsupported.append("attention_bias differing from mlp_bias (trustgen has one bias setting)")
    _refuse_options(unsupported, source, "Llama")
    return GPTConfig.from_dict({
        "vocab_size": hf["vocab_size"], "block_size": hf["max_position_embeddings"],
        "n_layer": hf["num_hidden_layers"], "n_head": heads, "n_embd": width,
        "dropout": hf["attention_dropout"], "position": "rope", "norm": "rmsnorm", "mlp": "swiglu",
        "bias": bool(hf["attention_bias"]), "norm_eps": hf["rms_norm_eps"],
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "tie_embeddings": bool(hf["tie_word_embeddings"]),
    })


def _refuse_options(unsupported: list[str], source: Path, architecture: str) -> None:
    if unsupported:
        raise TrustgenError(f"{source} uses {architecture} options trustgen's GPT does not have: "
                            f"{', '.join(unsupported)}.")


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return io.read_tensors(single)
    if index.exists():
        data = io.read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise TrustgenError(f"{index} is corrupt: it has no weight_map.")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(io.read_tensors(path / shard))
        return tensors
    if (path / "pytorch_model.bin").exists():
        raise TrustgenError(
            f"{path} has only pytorch_model.bin, a pickle that can run code when loaded; trustgen "
            "needs model.safetensors (where you trust the file, convert it with "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)).")
    raise TrustgenError(f"{path} has no model.safetensors.")


def _gpt2_names(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2Model (and the hub's gpt2) saves names without GPT2LMHeadModel's `transformer.`, and
    older versions saved causal-mask buffers, which are not parameters."""
    tensors = {name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": t
               for name, t in raw.items()}
    return {name: t for name, t in tensors.items() if not _MASK_BUFFER.fullmatch(name)}


def _model_from_hf(config: GPTConfig, pairs: list[tuple[str, str, bool]],
                   tensors: dict[str, torch.Tensor], path: Path) -> GPT:
    missing = [hf_name for hf_name, _, _ in pairs if hf_name not in tensors]
    if not config.tie_embeddings and "lm_head.weight" not in tensors:
        missing.append("lm_head.weight")
    if missing:
        raise TrustgenError(f"the weights in {path} do not match its config.json: they lack "
                            f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}.")
    unknown = sorted(set(tensors) - {hf_name for hf_name, _, _ in pairs} - {"lm_head.weight"})
    if unknown:
        raise TrustgenError(f"the weights in {path} hold tensors a causal language model of its config "
                            f"does not have ({', '.join(unknown[:3])}); only GPT2LMHeadModel, GPT2Model "
                            "and LlamaForCausalLM can be imported.")
    ours = {our: (tensors[hf_name].t() if transpose else tensors[hf_name]).float().contiguous()
            for hf_name, our, transpose in pairs}
    if not config.tie_embeddings:
        ours["lm_head.weight"] = tensors["lm_head.weight"].float().contiguous()
    model = GPT(config)
    io.load_weights(model, _fuse_qkv(ours, config.n_layer), path)
    return model.eval()


# -- export ---------------------------------------------------------------------------------

def export_hf(run: Path, out: Path) -> Export:
    """Write the GPT run `run` to `out` as a Hugging Face model folder and say what was written.

    A GPT-2-shaped run (learned positions, LayerNorm, GELU, biases) becomes a `GPT2LMHeadModel`,
    the default modern one (RoPE, RMSNorm, SwiGLU) a `LlamaForCausalLM`; `out` gets config.json
    and model.safetensors, which `AutoModelForCausalLM.from_pretrained(out)` loads, and
    tokenizer.json, which `AutoTokenizer.from_pretrained(out)` loads with the same ids (a char
    tokenizer as a WordLevel tokenizer of single characters, a byte tokenizer as a byte-level
    BPE without merges, a BPE tokenizer as it is).
    """
    run, out = Path(run), Path(out)
    run_config = runs.read_run_config(run)
    if run_config["family"] != "gpt":
        raise TrustgenError(f"{run} is a {run_config['family']!r} model; only GPT runs can be exported "
                            "to Hugging Face.")
    config = model_config("gpt", run_config["model"])
    architecture = _export_architecture(config, run)
    model, tokenizer, _ = runs.load_run_model(run)
    tokenizer_text, tokenizer_note = tokenizer.to_hf_json()
    eos = _eos_id(tokenizer_text) if tokenizer.kind == "bpe" else None
    if architecture == "GPT2LMHeadModel":
        tensors, hf_config = _gpt2_tensors(model), _gpt2_config(config, eos)
    else:
        tensors, hf_config = _llama_tensors(model), _llama_config(config, eos)

    _prepare_out(out)
    io.atomic_write_text(out / "tokenizer.json", tokenizer_text)
    # Without this, AutoTokenizer picks the model type's own class (GPT2Tokenizer,
    # LlamaTokenizer), which rebuilds its own pipeline from the vocabulary and splits differently.
    io.write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    # "format": "pt" is the metadata transformers checks for in a safetensors file.
    io.atomic_write_bytes(out / "model.safetensors", io.tensors_to_bytes(tensors, metadata={"format": "pt"}))
    io.write_json(out / "config.json", hf_config)
    return Export(architecture, ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
                  tokenizer_note)


def _export_architecture(config: GPTConfig, run: Path) -> str:
    """GPT2LMHeadModel or LlamaForCausalLM, whichever expresses `config`; a sentence if neither."""
    gpt2 = [f"{name}={getattr(config, name)!r}" for name, fits in (
        ("position", config.position == "learned"), ("norm", config.norm == "layernorm"),
        ("mlp", config.mlp in _EXPORT_ACTIVATION), ("bias", config.bias)) if not fits]
    llama = [f"{name}={getattr(config, name)!r}" for name, fits in (
        ("position", config.position == "rope"), ("norm", config.norm == "rmsnorm"),
        ("mlp", config.mlp == "swiglu")) if not fits]
    if not gpt2:
        return "GPT2LMHeadModel"
    if not llama:
        return "LlamaForCausalLM"
    raise TrustgenError(
        f"{run} cannot be exported: GPT-2 needs position='learned', norm='layernorm', mlp gelu or "
        f"gelu_tanh and bias=True (it has {', '.join(gpt2)}), and Llama needs position='rope', "
        f"norm='rmsnorm' and mlp='swiglu' (it has {', '.join(llama)}).")


def _eos_id(tokenizer_text: str) -> int | None:
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(tokenizer_text).token_to_id(EOS_TOKEN)


def _renamed(model: GPT, pairs: list[tuple[str, str, bool]], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {hf_name: (state[our].t() if transpose else state[our]).contiguous()
               for hf_name, our, transpose in pairs}
    # A tied lm_head is left out: transformers ties it to the embedding itself and reports
    # nothing missing.
    if not model.config.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    return tensors


def _gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    return _renamed(model, _gpt2_pairs(model.config), model.state_dict())


def _llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    return _renamed(model, _llama_pairs(model.config), _split_qkv(model.state_dict(), model.config.n_layer))


def _gpt2_config(config: GPTConfig, eos: int | None) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # older readers of GPT-2 configs look for n_ctx
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": _EXPORT_ACTIVATION[config.mlp],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        # GPT2Config's default 50256 only exists in OpenAI's vocabulary; name the real one or none.
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


def _llama_config(config: GPTConfig, eos: int | None) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": swiglu_width(config.n_embd),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters, 4.x rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        # Llama has dropout only on attention weights; trustgen's residual dropout has no twin.
        "attention_dropout": config.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        # LlamaConfig's defaults 1 and 2 are SentencePiece ids; name the real one or none.
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
    }
