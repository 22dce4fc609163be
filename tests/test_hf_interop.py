"""Hugging Face interop (GPT-2 and Llama): imported and exported models give the logits
transformers gives, and export -> import -> generate round-trips."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from trustgen import io, runs
from trustgen.api import load
from trustgen.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer
from trustgen.errors import TrustgenError
from trustgen.hf import export_hf, import_hf
from trustgen.models.gpt import GPT, GPTConfig

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 4
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train([TEXT], vocab_size=300)


def perturb(model: torch.nn.Module) -> None:
    """Fresh norms are ones and zeros and fresh biases zeros; nudge every tensor so that a mix-up
    of any two of them shows in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def hf_model(vocab_size: int, activation: str = "gelu_new", tied: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size,
                        activation_function=activation, tie_word_embeddings=tied,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    perturb(model)
    return model


def save_hf(model: GPT2LMHeadModel, tokenizer: Tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def save_run(model: GPT, tokenizer: Tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True)
    io.atomic_write_bytes(folder / "model.safetensors", io.weights_bytes(model))
    tokenizer.save(folder / "tokenizer.json")
    runs.write_run_config(folder, "gpt", model.config, tokenizer.kind)
    return folder


def load_ours(run: Path) -> GPT:
    model, _, _ = runs.load_run_model(run)
    return model.eval()


def max_diff(ours: GPT, theirs: GPT2LMHeadModel, vocab_size: int, block_size: int) -> float:
    ids = torch.randint(vocab_size, (3, block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize(("activation", "tied"), [("gelu_new", True), ("gelu_pytorch_tanh", True),
                                                  ("gelu", False)])
def test_import_matches_transformers(tokenizer: BPETokenizer, tmp_path: Path, activation: str,
                                     tied: bool) -> None:
    theirs = hf_model(tokenizer.vocab_size, activation, tied)
    folder = save_hf(theirs, tokenizer, tmp_path / "hf")
    import_hf(folder, tmp_path / "run")

    assert max_diff(load_ours(tmp_path / "run"), theirs, tokenizer.vocab_size, 64) < TOLERANCE
    config = runs.read_run_config(tmp_path / "run")
    assert config["source"] == {"format": "hf-gpt2", "path": str(folder)}
    assert config["model"]["tie_embeddings"] is tied


def test_import_reads_the_hub_layout(tokenizer: BPETokenizer, tmp_path: Path) -> None:
    """The hub's gpt2 file has no `transformer.` prefix and carries causal-mask buffers."""
    theirs = hf_model(tokenizer.vocab_size)
    folder = save_hf(theirs, tokenizer, tmp_path / "hf")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    import_hf(folder, tmp_path / "run")

    assert max_diff(load_ours(tmp_path / "run"), theirs, tokenizer.vocab_size, 64) < TOLERANCE


def test_export_of_an_import_loads_in_transformers(tokenizer: BPETokenizer, tmp_path: Path) -> None:
    import_hf(save_hf(hf_model(tokenizer.vocab_size), tokenizer, tmp_path / "hf"), tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "export")

    theirs, info = GPT2LMHeadModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(load_ours(tmp_path / "run"), theirs.eval(), tokenizer.vocab_size, 64) < TOLERANCE
    assert (tmp_path / "export" / "tokenizer.json").read_text() == (tmp_path / "run" / "tokenizer.json").read_text()
    text = "Whether 'tis nobler"
    assert AutoTokenizer.from_pretrained(tmp_path / "export")(text)["input_ids"] == tokenizer.encode(text)

    # And back again: the weights survive both conversions bit for bit.
    import_hf(tmp_path / "export", tmp_path / "again")
    before, after = load_ours(tmp_path / "run").state_dict(), load_ours(tmp_path / "again").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("mlp", "tied"), [("gelu", True), ("gelu_tanh", False)])
def test_export_of_a_trustgen_model_matches(tmp_path: Path, mlp: str, tied: bool) -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=16, mlp=mlp,
                       position="learned", norm="layernorm", bias=True,
                       tie_embeddings=tied, norm_eps=1e-6, dropout=0.1)
    ours = GPT(config).eval()
    perturb(ours)
    export_hf(save_run(ours, ByteTokenizer(), tmp_path / "run"), tmp_path / "export")

    # A byte tokenizer goes out as a byte-level BPE without merges: the same 256 ids.
    text = "Whether 'tis nobler, señor?\n"
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)
    hf_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf_config["layer_norm_epsilon"] == 1e-6 and hf_config["resid_pdrop"] == 0.1
    theirs, info = GPT2LMHeadModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert max_diff(ours, theirs.eval(), 256, 32) < TOLERANCE


def test_imported_run_generates_what_transformers_generates(tokenizer: BPETokenizer, tmp_path: Path) -> None:
    theirs = hf_model(tokenizer.vocab_size)
    import_hf(save_hf(theirs, tokenizer, tmp_path / "hf"), tmp_path / "run")
    prompt = "To be, or not"
    ours = load(tmp_path / "run", device="cpu").generate(prompt, max_new_tokens=10, temperature=0)[0]

    ids = torch.tensor([tokenizer.encode(prompt)])
    out = theirs.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert ours == tokenizer.decode(out[0, ids.shape[1]:].tolist())


# -- user mistakes --------------------------------------------------------------------------

@pytest.fixture
def hf_folder(tokenizer: BPETokenizer, tmp_path: Path) -> Path:
    return save_hf(hf_model(tokenizer.vocab_size), tokenizer, tmp_path / "hf")


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_import_of_a_missing_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match="is not a folder"):
        import_hf(tmp_path / "nowhere", tmp_path / "run")


def test_import_refuses_pickle_weights(hf_folder: Path, tmp_path: Path) -> None:
    (hf_folder / "model.safetensors").unlink()
    (hf_folder / "pytorch_model.bin").write_bytes(b"a pickle we must never open")
    with pytest.raises(TrustgenError, match=r"only pytorch_model\.bin.*needs model\.safetensors"):
        import_hf(hf_folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_refuses_other_model_types(hf_folder: Path, tmp_path: Path) -> None:
    edit_config(hf_folder, model_type="bert")
    with pytest.raises(TrustgenError, match=r"'bert' model; only GPT-2 \('gpt2'\) and Llama"):
        import_hf(hf_folder, tmp_path / "run")


def test_import_refuses_an_unknown_activation(hf_folder: Path, tmp_path: Path) -> None:
    edit_config(hf_folder, activation_function="relu")
    with pytest.raises(TrustgenError, match="activation 'relu'"):
        import_hf(hf_folder, tmp_path / "run")


def test_import_reports_corrupt_weights(hf_folder: Path, tmp_path: Path) -> None:
    (hf_folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(TrustgenError, match="not a valid safetensors file"):
        import_hf(hf_folder, tmp_path / "run")


def test_import_does_not_overwrite_a_run(hf_folder: Path, tmp_path: Path) -> None:
    import_hf(hf_folder, tmp_path / "run")
    with pytest.raises(TrustgenError, match="already holds a model"):
        import_hf(hf_folder, tmp_path / "run")


def test_export_refuses_a_model_neither_format_expresses(tmp_path: Path) -> None:
    config = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=16, position="rope",
                       norm="layernorm", mlp="gelu")
    run = save_run(GPT(config), ByteTokenizer(), tmp_path / "run")
    with pytest.raises(TrustgenError, match=r"cannot be exported: GPT-2 needs .* \(it has position='rope'\), "
                                            r"and Llama needs .* \(it has norm='layernorm', mlp='gelu'\)"):
        export_hf(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# -- round trips of the models trustgen trains -------------------------------------------------

GPT2_STYLE = {"position": "learned", "norm": "layernorm", "mlp": "gelu_tanh", "bias": True}
CHAR_TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\r\n"


@pytest.mark.parametrize("bias", [True, False])
def test_the_default_gpt_exports_as_llama(tmp_path: Path, bias: bool) -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=24, bias=bias,
                       tie_embeddings=bias, rope_theta=500.0)
    assert (config.position, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu")
    ours = GPT(config).eval()
    perturb(ours)
    written = export_hf(save_run(ours, ByteTokenizer(), tmp_path / "run"), tmp_path / "export")

    assert written.architecture == "LlamaForCausalLM"
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert isinstance(theirs, LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(ours, theirs.eval(), 256, 32) < TOLERANCE


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("shape", ["default", "gpt2"])
def test_export_import_generate_round_trips(tokenizer: BPETokenizer, tmp_path: Path, kind: str,
                                            shape: str) -> None:
    tok = CharTokenizer(CHAR_TEXT) if kind == "char" else tokenizer
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32,
                       **(GPT2_STYLE if shape == "gpt2" else {}))
    ours = GPT(config).eval()
    perturb(ours)
    written = export_hf(save_run(ours, tok, tmp_path / "run"), tmp_path / "export")
    assert written.architecture == ("GPT2LMHeadModel" if shape == "gpt2" else "LlamaForCausalLM")
    assert written.describe().count("tokenizer.json") == 2  # listed, and said what it holds

    # transformers alone: its tokenizer gives our ids, its model our logits and greedy tokens.
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    prompt = "Whether 'tis"
    ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tok.encode(prompt)
    assert max_diff(ours, theirs, tok.vocab_size, 48) < TOLERANCE
    out = theirs.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]

    # and back: the import generates the same text, from bit-identical weights.
    assert import_hf(tmp_path / "export", tmp_path / "again") == ("gpt2" if shape == "gpt2" else "llama")
    again = load_ours(tmp_path / "again")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert runs.read_run_config(tmp_path / "again")["tokenizer"] == kind
    text = load(tmp_path / "again", device="cpu").generate(prompt, max_new_tokens=12, temperature=0)[0]
    assert text == hf_tokenizer.decode(out.tolist()) == tok.decode(out.tolist())


def test_import_refuses_llama_options_trustgen_lacks(tmp_path: Path) -> None:
    config = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=16)
    export_hf(save_run(GPT(config), ByteTokenizer(), tmp_path / "run"), tmp_path / "export")
    edit_config(tmp_path / "export", num_key_value_heads=1, hidden_act="gelu")
    with pytest.raises(TrustgenError, match=r"Llama options .*hidden_act='gelu'.*num_key_value_heads=1"):
        import_hf(tmp_path / "export", tmp_path / "again")


@pytest.mark.slow
def test_cli_exports_the_trained_default_and_says_what_it_wrote(run: Path, tmp_path: Path) -> None:
    from tests.test_cli import trustgen

    result = trustgen("export", str(run), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "as LlamaForCausalLM: config.json, model.safetensors, tokenizer.json" in result.stdout
    assert "WordLevel tokenizer" in result.stdout
    back = trustgen("import", str(tmp_path / "hf"), "--out", str(tmp_path / "again"))
    assert back.returncode == 0 and "imported the llama model" in back.stdout
