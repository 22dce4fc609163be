"""Hugging Face GPT-2 interop: import a local `transformers` GPT-2 folder as a run directory, and
export a GPT run as a folder that `GPT2LMHeadModel.from_pretrained` loads.

trustgen's GPT with learned positions, LayerNorm, GELU and biases is GPT-2's architecture, so conversion only renames tensors and transposes the linear layers: GPT-2 stores
them as `Conv1D` weights of shape (in, out), `nn.Linear` as (out, in). The fused attention
projection keeps q, k, v in the same order on both sides. Weights are read and written as
safetensors only; a `pytorch_model.bin` is a pickle, and loading one can run code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from trustgen import io, runs
from trustgen.data.tokenizers import tokenizer_from_json
from trustgen.errors import TrustgenError
from trustgen.models.gpt import GPT, GPTConfig
from trustgen.models.registry import model_config

# HF activation name -> GPTConfig.mlp. "gelu_new" and "gelu_pytorch_tanh" are both the tanh
# approximation GPT-2 was trained with; "gelu" is the exact erf form.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_EXPORT_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# Per block: HF module -> our module, and whether its weight is a Conv1D (stored transposed).
_BLOCK = (
    ("ln_1", "norm1", False),
    ("attn.c_attn", "attn.qkv", True),
    ("attn.c_proj", "attn.proj", True),
    ("ln_2", "norm2", False),
    ("mlp.c_fc", "mlp.up", True),
    ("mlp.c_proj", "mlp.down", True),
)
# Causal-mask buffers that older transformers versions saved with the weights; not parameters.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# GPT2Config's defaults, for configs that leave a field out.
_HF_DEFAULTS: dict[str, Any] = {
    "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1,
    "n_inner": None, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False, "tie_word_embeddings": True,
}
EOS_TOKEN = "<|endoftext|>"


def _tensor_pairs(n_layer: int) -> list[tuple[str, str, bool]]:
    """(HF name without `transformer.`, our name, transpose) for every tensor but lm_head."""
    pairs = [("wte.weight", "wte.weight", False), ("wpe.weight", "wpe.weight", False)]
    for i in range(n_layer):
        for hf_module, our_module, conv in _BLOCK:
            pairs.append((f"h.{i}.{hf_module}.weight", f"blocks.{i}.{our_module}.weight", conv))
            pairs.append((f"h.{i}.{hf_module}.bias", f"blocks.{i}.{our_module}.bias", False))
    pairs += [("ln_f.weight", "norm_f.weight", False), ("ln_f.bias", "norm_f.bias", False)]
    return pairs


def _prepare_out(out: Path) -> None:
    """Create `out`, refusing to overwrite a model already there."""
    if out.exists() and not out.is_dir():
        raise TrustgenError(f"{out} is a file; give a folder to write into.")
    if (out / "config.json").exists():
        raise TrustgenError(f"{out} already holds a model (it has a config.json); choose another folder.")
    out.mkdir(parents=True, exist_ok=True)


# -- import ---------------------------------------------------------------------------------

def import_gpt2(path: Path, out: Path) -> None:
    """Convert the local Hugging Face GPT-2 folder `path` into the run directory `out`.

    `path` needs config.json, model.safetensors (or a sharded model.safetensors.index.json) and
    tokenizer.json. Dropout is taken from `resid_pdrop`, so fine-tuning the import (`init_from`)
    regularises like GPT-2 did.
    """
    path, out = Path(path), Path(out)
    if not path.is_dir():
        raise TrustgenError(f"{path} is not a folder; give a local Hugging Face GPT-2 model folder.")
    hf_config = {**_HF_DEFAULTS, **_read_hf_config(path / "config.json")}
    config = _config_from_hf(hf_config, path / "config.json")
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.exists():
        raise TrustgenError(
            f"{path} has no tokenizer.json; write one with transformers' "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder).")
    tokenizer_text = tokenizer_path.read_text(encoding="utf-8")
    try:
        tokenizer = tokenizer_from_json(tokenizer_text)
    except TrustgenError as exc:
        raise TrustgenError(f"{tokenizer_path}: {exc}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise TrustgenError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model only "
                            f"{config.vocab_size}.")
    model = _model_from_hf(config, _read_hf_weights(path), path)

    _prepare_out(out)
    io.atomic_write_bytes(out / "model.safetensors", io.weights_bytes(model))
    io.atomic_write_text(out / "tokenizer.json", tokenizer_text)
    # config.json last: its presence is what marks a complete run directory.
    runs.write_run_config(out, "gpt", config, tokenizer.kind,
                        {"source": {"format": "hf-gpt2", "path": str(path)}})


def _read_hf_config(path: Path) -> dict[str, Any]:
    data = io.read_json(path)
    if not isinstance(data, dict):
        raise TrustgenError(f"{path} is not a model config (it holds no JSON object).")
    return data


def _config_from_hf(hf: dict[str, Any], source: Path) -> GPTConfig:
    if hf.get("model_type") != "gpt2":
        raise TrustgenError(f"{source} describes a {hf.get('model_type')!r} model; "
                            "only GPT-2 models (model_type 'gpt2') can be imported.")
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
    if unsupported:
        raise TrustgenError(f"{source} uses GPT-2 options trustgen's GPT does not have: "
                            f"{', '.join(unsupported)}.")
    return GPTConfig.from_dict({
        "vocab_size": hf["vocab_size"], "block_size": hf["n_positions"], "n_layer": hf["n_layer"],
        "n_head": hf["n_head"], "n_embd": hf["n_embd"], "dropout": hf["resid_pdrop"],
        "position": "learned", "norm": "layernorm", "bias": True, "mlp": _ACTIVATIONS[activation], "norm_eps": hf["layer_norm_epsilon"],
        "tie_embeddings": bool(hf["tie_word_embeddings"]),
    })


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
            "GPT2LMHeadModel.from_pretrained(folder).save_pretrained(folder)).")
    raise TrustgenError(f"{path} has no model.safetensors.")


def _model_from_hf(config: GPTConfig, raw: dict[str, torch.Tensor], path: Path) -> GPT:
    # GPT2LMHeadModel saves names under `transformer.`, GPT2Model (and the hub's gpt2) without it.
    tensors = {name.removeprefix("transformer."): t for name, t in raw.items()}
    tensors = {name: t for name, t in tensors.items() if not _MASK_BUFFER.fullmatch(name)}
    pairs = _tensor_pairs(config.n_layer)
    missing = [hf_name for hf_name, _, _ in pairs if hf_name not in tensors]
    if not config.tie_embeddings and "lm_head.weight" not in tensors:
        missing.append("lm_head.weight")
    if missing:
        raise TrustgenError(f"the weights in {path} do not match its config.json: they lack "
                            f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}.")
    unknown = sorted(set(tensors) - {hf_name for hf_name, _, _ in pairs} - {"lm_head.weight"})
    if unknown:
        raise TrustgenError(f"the weights in {path} hold tensors a GPT-2 language model does not have "
                            f"({', '.join(unknown[:3])}); only GPT2LMHeadModel and GPT2Model can be imported.")
    ours = {our: (tensors[hf_name].t() if conv else tensors[hf_name]).float().contiguous()
            for hf_name, our, conv in pairs}
    if not config.tie_embeddings:
        ours["lm_head.weight"] = tensors["lm_head.weight"].float().contiguous()
    model = GPT(config)
    io.load_weights(model, ours, path)
    return model.eval()


# -- export ---------------------------------------------------------------------------------

def export_gpt2(run: Path, out: Path) -> None:
    """Write the GPT run `run` to `out` as a Hugging Face GPT-2 folder.

    `out` gets config.json and model.safetensors, which `GPT2LMHeadModel.from_pretrained(out)`
    loads, and tokenizer.json when the run's tokenizer is bpe (a byte-level BPE, which
    `AutoTokenizer.from_pretrained(out)` reads). A char or byte tokenizer has no Hugging Face
    equivalent, so for those runs only the model is exported and transformers has no tokenizer:
    encode text with trustgen's tokenizer and pass the ids.
    """
    run, out = Path(run), Path(out)
    run_config = runs.read_run_config(run)
    if run_config["family"] != "gpt":
        raise TrustgenError(f"{run} is a {run_config['family']!r} model; only GPT runs can be exported "
                            "as GPT-2.")
    config = model_config("gpt", run_config["model"])
    _check_gpt2_compatible(config, run)
    model, tokenizer, _ = runs.load_run_model(run)

    eos = None
    tokenizer_text = None
    if tokenizer.kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer_text = (run / "tokenizer.json").read_text(encoding="utf-8")
        eos = HFTokenizer.from_str(tokenizer_text).token_to_id(EOS_TOKEN)

    _prepare_out(out)
    if tokenizer_text is not None:
        io.atomic_write_text(out / "tokenizer.json", tokenizer_text)
    # "format": "pt" is the metadata transformers checks for in a safetensors file.
    io.atomic_write_bytes(out / "model.safetensors",
                          io.tensors_to_bytes(_hf_tensors(model), metadata={"format": "pt"}))
    io.write_json(out / "config.json", _hf_config(config, eos))


def _check_gpt2_compatible(config: GPTConfig, run: Path) -> None:
    problems = []
    if config.position != "learned":
        problems.append(f"position={config.position!r} (GPT-2 learns its positions)")
    if config.norm != "layernorm":
        problems.append(f"norm={config.norm!r} (GPT-2 uses layernorm)")
    if config.mlp not in _EXPORT_ACTIVATION:
        problems.append(f"mlp={config.mlp!r} (GPT-2 uses gelu or gelu_tanh)")
    if not config.bias:
        problems.append("bias=False (GPT-2 has biases in every linear and norm layer)")
    if problems:
        raise TrustgenError(f"{run} cannot be exported as GPT-2 because it uses {'; '.join(problems)}.")


def _hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    tensors = {f"transformer.{hf_name}": (state[our].t() if conv else state[our]).contiguous()
               for hf_name, our, conv in _tensor_pairs(model.config.n_layer)}
    # A tied lm_head is left out: GPT2LMHeadModel ties it to wte itself and reports nothing missing.
    if not model.config.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    return tensors


def _hf_config(config: GPTConfig, eos: int | None) -> dict[str, Any]:
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
