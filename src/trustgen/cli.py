"""The `trustgen` command line: argument parsing and printing only; the API does the work."""

from __future__ import annotations

import json
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Any

import typer

from trustgen.errors import TrustgenError

app = typer.Typer(
    help="Train, sample and inspect small generative models you can trust.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

Opt = typer.Option


def _print_version(value: bool) -> None:
    if value:
        from trustgen import __version__

        typer.echo(f"trustgen {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, Opt("--version", help="Print trustgen's version and exit.", is_eager=True,
                                 callback=_print_version)] = False,
) -> None:
    """Train, sample and inspect small generative models you can trust."""


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


THREADS_HELP = "CPU threads (default: PyTorch's, fewer while other processes keep the cores busy)."


# The commands that compute with torch: main() measures the machine's load before they load it.
COMPUTE_COMMANDS = frozenset({"train", "generate", "serve", "demo"})
_idle_at_start: int | None = None  # cores left idle when main() started a compute command


def _set_threads(threads: int | None, recorded: int | None = None) -> None:
    """torch's CPU threads: --threads; else the count a resumed run trained with (`recorded`:
    sums split over other thread counts round differently, and a resume must continue exactly);
    else torch's own count lowered to the cores other processes leave idle (`cores.idle_cores`:
    on a loaded machine one thread trained several times faster than two; on an idle one two
    were faster)."""
    import torch

    from trustgen import cores

    if threads is not None:
        if threads < 1:
            raise TrustgenError(f"--threads must be at least 1, got {threads}.")
        torch.set_num_threads(threads)
        return
    if recorded is not None:
        torch.set_num_threads(recorded)
        return
    idle = _idle_at_start if _idle_at_start is not None else cores.idle_cores()
    # Without a word: a line on stderr would break the one-line errors scripts read.
    torch.set_num_threads(min(torch.get_num_threads(), idle))


def choose_openmp_wait(argv: list[str], environ: MutableMapping[str, str]) -> None:
    """Before a compute command loads torch: on a busy machine, OpenMP threads that wait at the
    end of a parallel region sleep at once (`OMP_WAIT_POLICY=PASSIVE`) instead of spinning, since
    spinning stole the cores from the threads being waited for; on an idle machine libgomp's
    default (spin a little, then sleep) stays, since sleeping costs a wake-up per region and
    made the GAN's step about half as fast there. A user's own setting wins."""
    global _idle_at_start
    from trustgen import cores

    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMPUTE_COMMANDS:
        return
    _idle_at_start = cores.idle_cores()
    if _idle_at_start < cores.usable_cores():
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


DEMO_PROMPT = "ROMEO:"


@app.command()
def demo(
    out: Annotated[Path, Opt(help="Run directory to create.")] = Path("runs/demo"),
    time_budget: Annotated[str, Opt(help="How long to train, e.g. 90s, 5m.")] = "5m",
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Train a small GPT on the built-in Shakespeare for a few minutes, print watermarked samples,
    then sign one, verify it, and show that an edited copy is still recognised as generated."""
    from trustgen import api
    from trustgen.io import atomic_write_text
    from trustgen.safety.trust import DEFAULT_TEXT_WATERMARK, sidecar_path, summary_line, verify

    _set_threads(None)
    if (out / "config.json").exists():
        typer.echo(f"{out} already holds a run; sampling from it (delete it to train afresh).", err=True)
    else:
        typer.echo(f"Training a character-level GPT on Shakespeare for {time_budget} into {out} ...", err=True)
        summary = api.train(out, data="shakespeare", time_budget=time_budget, device=device)
        typer.echo(f"validation loss on Hamlet, Macbeth, The Tempest and Julius Caesar: "
                   f"{summary['final_val_loss']:.3f} nats/char after {summary['step']} steps", err=True)
    model = api.load(out, device=device)
    texts = model.generate(DEMO_PROMPT, n=2, seed=1, watermark=DEFAULT_TEXT_WATERMARK, max_new_tokens=400,
                           temperature=0.8, top_p=0.95)
    for i, text in enumerate(texts):
        typer.echo(f"--- sample {i + 1} ---\n{DEMO_PROMPT}{text}\n")
    sample = out / "samples" / "sample-1.txt"
    sample.parent.mkdir(exist_ok=True)
    typer.echo(texts[0].save(sample).summary())
    # An edited copy (every eighth word replaced) with the original's manifest beside it.
    words = (DEMO_PROMPT + texts[0]).split(" ")
    edited = sample.with_name("sample-1-edited.txt")
    atomic_write_text(edited, " ".join("and" if i % 8 == 7 else w for i, w in enumerate(words)))
    atomic_write_text(sidecar_path(edited), sidecar_path(sample).read_text(encoding="utf-8"))
    typer.echo(summary_line(verify(edited)))
    # A quick audit (fewer samples and windows than `trustgen audit`, no fairness probes) so
    # the demo stays within a minute or so of its training budget.
    report = api.audit(out, samples=20, extraction_prompts=10, mia_examples=100, heldout_tokens=10_000,
                       fairness=False, device=device)
    rows = {row["name"]: row for row in report["summary"]}
    typer.echo(_audit_line(rows, "bits_per_char", "held-out bits/char") + ", "
               + _audit_line(rows, "distinct_2", "distinct-2") + ", " + _audit_line(rows, "self_bleu", "self-BLEU"))
    typer.echo(_audit_line(rows, "memorized_fraction", "50-char spans copied from training") + ", "
               + _audit_line(rows, "mia_auc", "membership-inference AUC"))
    typer.echo(f"audit report: {report['paths'][1]} (full audit: trustgen audit {out})")


def _audit_line(rows: dict[str, Any], name: str, label: str) -> str:
    from trustgen.evaluate.report import fmt

    row = rows[name]
    reference = f" (human text {fmt(row['reference'])})" if row.get("reference") is not None else ""
    return f"{label} {fmt(row['value'])}{reference}{' FLAGGED' if row['flag'] else ''}"


@app.command()
def train(
    data: Annotated[str | None, Opt(help="Text: 'shakespeare' (default), a text file, a folder of .txt/.md, or "
                                         "a glob. Images: 'mnist' (default), 'digits', or a folder of images "
                                         "(sub-folders name classes). Music: 'bach' (Bach's chorales) or a "
                                         "folder of four-voice .mid/.musicxml/.mxl files.")] = None,
    out: Annotated[Path | None, Opt(help="Run directory to create.")] = None,
    model: Annotated[str | None, Opt(help="Model family: gpt (default) or rnn (text), gan or vae (images).")] = None,
    tokenizer: Annotated[str | None, Opt(help="char, byte or bpe.")] = None,
    vocab_size: Annotated[int | None, Opt(help="BPE vocabulary size.")] = None,
    scrub_pii: Annotated[bool, Opt(help="Text: replace e-mail addresses, phone numbers, payment cards, IP "
                                        "addresses and IBANs with placeholders before training.")] = False,
    canaries: Annotated[int | None, Opt(help="Text: insert N random secrets (1, 10 and 100 copies in turn) into the "
                                             "training data, recorded in RUN/canaries.json, for trustgen audit.")] = None,
    counterfactual_augment: Annotated[str | None, Opt(help="Text: fairness mitigation; 'gender' adds a copy of every "
                                                           "training document with gendered words swapped.")] = None,
    time_budget: Annotated[str | None, Opt(help="Train for this long, e.g. 90s, 5m, 1h (default 5m "
                                                "unless --max-steps is given).")] = None,
    max_steps: Annotated[int | None, Opt(help="Train for this many optimizer steps.")] = None,
    resume: Annotated[Path | None, Opt(help="Continue this run from its last checkpoint.")] = None,
    init_from: Annotated[Path | None, Opt(help="Start from this run's weights (fine-tuning).")] = None,
    freeze_layers: Annotated[int | None, Opt(help="With --init-from: freeze the embeddings and first K blocks.")] = None,
    batch_size: Annotated[int | None, Opt(help="Rows (token windows or images) per micro-batch.")] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate (a GAN's generator).")] = None,
    d_lr: Annotated[float | None, Opt(help="gan: the discriminator's learning rate.")] = None,
    grad_clip: Annotated[float | None, Opt(help="Clip the gradient norm at this value (default 1; 0 turns "
                                                "clipping off).")] = None,
    warmup_steps: Annotated[int | None, Opt(help="Steps of linear learning-rate warmup.")] = None,
    eval_interval: Annotated[int | None, Opt(help="Evaluate and checkpoint every N steps.")] = None,
    checkpoint_every: Annotated[float | None, Opt(help="Checkpoint at least every this many seconds (default 30), "
                                                      "so a stopped run can be resumed.")] = None,
    val_fraction: Annotated[float | None, Opt(help="Share of documents held out (user data).")] = None,
    seed: Annotated[int | None, Opt(help="Seed of the weights, the data order and the split: the same seed gives the same run.")] = None,
    precision: Annotated[str | None, Opt(help="auto, bf16 or fp32.")] = None,
    compile: Annotated[bool | None, Opt("--compile/--no-compile", help="Use torch.compile.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda, cuda:N.")] = None,
    block_size: Annotated[int | None, Opt(help="Context length.")] = None,
    n_layer: Annotated[int | None, Opt(help="gpt, rnn: transformer blocks or recurrent layers.")] = None,
    n_head: Annotated[int | None, Opt(help="gpt only.")] = None,
    n_embd: Annotated[int | None, Opt(help="gpt only.")] = None,
    position: Annotated[str | None, Opt(help="gpt: learned or rope.")] = None,
    norm: Annotated[str | None, Opt(help="gpt: layernorm or rmsnorm.")] = None,
    mlp: Annotated[str | None, Opt(help="gpt: gelu, gelu_tanh or swiglu.")] = None,
    cell: Annotated[str | None, Opt(help="rnn: rnn, gru or lstm.")] = None,
    hidden_size: Annotated[int | None, Opt(help="rnn only.")] = None,
    dropout: Annotated[float | None, Opt(help="gpt, rnn: dropout probability (0 turns it off).")] = None,
    image_size: Annotated[int | None, Opt(help="Images: resize to this many pixels square (folders: 64).")] = None,
    conditional: Annotated[bool, Opt(help="gan, vae: condition on the class, to generate from a prompt.")] = False,
    latent_dim: Annotated[int | None, Opt(help="gan, vae: size of the latent vector.")] = None,
    clusters: Annotated[int | None, Opt(help="gan: condition an unconditional GAN on this many clusters "
                                             "of its images (default 20; 0 turns it off).")] = None,
    width: Annotated[int | None, Opt(help="gan, vae: channels at full resolution (doubling per halving).")] = None,
    beta: Annotated[float | None, Opt(help="vae: weight of the KL term (beta-VAE).")] = None,
    decoder: Annotated[str | None, Opt(help="vae: bernoulli or gaussian.")] = None,
    prior: Annotated[str | None, Opt(help="vae: mixture (fitted to the training images' codes when training "
                                          "ends; the default) or standard (N(0, I)).")] = None,
    dp_epsilon: Annotated[float | None, Opt(help="Train with differential privacy (DP-SGD) to this epsilon; "
                                                 "see docs/privacy.md.")] = None,
    dp_delta: Annotated[float | None, Opt(help="With --dp-epsilon: delta (default 1/N^1.1, N private examples).")] = None,
    max_grad_norm: Annotated[float | None, Opt(help="With --dp-epsilon: per-example gradient clipping bound.")] = None,
    dp_accountant: Annotated[str | None, Opt(help="With --dp-epsilon: prv (tighter) or rdp.")] = None,
    dp_unit: Annotated[str | None, Opt(help="Text, with --dp-epsilon: what epsilon protects: window (one window "
                                            "of block_size+1 tokens) or document.")] = None,
    threads: Annotated[int | None, Opt(help=THREADS_HELP)] = None,
    quiet: Annotated[bool, Opt(help="No progress bars.")] = False,
) -> None:
    """Train a text or image model, or continue one with --resume.

    Examples:

      trustgen train --data shakespeare --out runs/shk --time-budget 5m

      trustgen train --data my_texts/ --tokenizer bpe --model gpt --out runs/mine

      trustgen train --model vae --data mnist --out runs/vae

      trustgen train --resume runs/shk
    """
    from trustgen import api
    from trustgen.runs import recorded_threads

    settings = _drop_none(
        data=data, tokenizer=tokenizer, vocab_size=vocab_size, scrub_pii=scrub_pii or None, canaries=canaries,
        counterfactual_augment=counterfactual_augment,
        time_budget=time_budget, max_steps=max_steps,
        init_from=str(init_from) if init_from else None, freeze_layers=freeze_layers, batch_size=batch_size,
        grad_accum=grad_accum, learning_rate=lr, discriminator_lr=d_lr, grad_clip=grad_clip, warmup_steps=warmup_steps,
        eval_interval=eval_interval, checkpoint_interval=checkpoint_every, val_fraction=val_fraction, seed=seed,
        precision=precision, compile=compile,
        device=device, image_size=image_size, dp_epsilon=dp_epsilon, dp_delta=dp_delta, max_grad_norm=max_grad_norm,
        dp_accountant=dp_accountant, dp_unit=dp_unit)
    if dp_epsilon is None and any(v is not None for v in (dp_delta, max_grad_norm, dp_accountant, dp_unit)):
        raise TrustgenError("--dp-delta, --max-grad-norm, --dp-accountant and --dp-unit need --dp-epsilon.")
    _set_threads(threads, recorded=recorded_threads(resume) if resume is not None else None)
    model_settings = _drop_none(
        block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, position=position,
        norm=norm, mlp=mlp, cell=cell, hidden_size=hidden_size, dropout=dropout, latent_dim=latent_dim,
        clusters=clusters, width=width, beta=beta, decoder=decoder, prior=prior, conditional=conditional or None)
    if resume is not None:
        extra = set(settings) - {"time_budget", "max_steps", "device", "checkpoint_interval"}
        if extra or model_settings or model or out is not None:
            raise TrustgenError("--resume continues a run as it was configured; only --time-budget, "
                                "--max-steps, --device and --checkpoint-every may be given with it.")
        summary = api.resume(resume, progress=not quiet, **settings)
        out = resume
    else:
        if out is None:
            raise TrustgenError("say where to write the run with --out DIR.")
        if model_settings and init_from:
            raise TrustgenError("--init-from takes the model's shape from that run; drop the model options.")
        summary = api.train(out, model=model, model_config=model_settings or None, progress=not quiet, **settings)
    line = f"{out}: {summary['step']} steps in {summary['elapsed_s']:.0f}s"
    if summary["final_val_loss"] is not None:
        line += f", validation loss {summary['final_val_loss']:.4f} (best {summary['best_val_loss']:.4f})"
    typer.echo(line)
    if "privacy" in summary:
        from trustgen.training.privacy import describe

        typer.echo(describe(summary["privacy"]))


TEXT_SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                         "no_repeat_ngram", "beams", "stop", "stream", "as_json", "precision")


def _given_options(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among `names` (parameter names) that the command line set, as spelled there.
    (By the source's name: typer carries its own copy of click's ParameterSource.)"""
    return [param.opts[0] for param in ctx.command.params
            if param.name in names and getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"]


@app.command()
def federate(
    out: Annotated[Path, Opt(help="Run directory to create (or continue, with --resume).")],
    data: Annotated[str | None, Opt(help="Text corpus in play form (speeches start with 'NAME:'): 'shakespeare' "
                                         "(the default), a file, a folder or a glob; images: 'mnist' (the "
                                         "default), 'digits' or a folder.")] = None,
    model: Annotated[str, Opt(help="Model family: gpt or rnn (text), vae or gan (images).")] = "gpt",
    clients: Annotated[int, Opt(help="Number of data owners (one SuperNode each).")] = 8,
    rounds: Annotated[int, Opt(help="Federated rounds (with --resume: the new total).")] = 40,
    partition: Annotated[str | None, Opt(help="How the data is split among clients: text iid, by-play, by-speaker "
                                              "(LEAF, the default) or dirichlet:A (e.g. dirichlet:0.3); images iid "
                                              "(the default) or dirichlet:A over their classes.")] = None,
    strategy: Annotated[str, Opt(help="fedavg, fedprox, fedadam or qfedavg.")] = "fedavg",
    local_steps: Annotated[int, Opt(help="Optimizer steps each client trains per round.")] = 50,
    min_clients: Annotated[int | None, Opt(help="A round goes ahead with this many clients (default: all).")] = None,
    mu: Annotated[float, Opt(help="fedprox: weight of the proximal term.")] = 0.01,
    server_lr: Annotated[float, Opt(help="fedadam: the server's learning rate.")] = 0.01,
    q: Annotated[float, Opt(help="qfedavg: fairness; clients weigh loss**q (0: FedAvg).")] = 0.1,
    round_timeout: Annotated[float, Opt(help="Seconds to wait for the clients of one round.")] = 3600,
    tls: Annotated[bool, Opt("--tls/--no-tls", help="Encrypt the federation's traffic with a private CA "
                                                     "(--no-tls: plain loopback).")] = True,
    resume: Annotated[bool, Opt(help="Continue OUT from its last committed round.")] = False,
    client_dp_epsilon: Annotated[float | None, Opt(help="Client-side DP: each client's update is "
                                                        "(epsilon, 1e-5)-DP per round, epsilon in (0, 1].")] = None,
    client_dp_clip: Annotated[float, Opt(help="Client-side DP: L2 bound of a client's update.")] = 1.0,
    update_precision: Annotated[str, Opt(help="How clients send updates: fp32, bf16 or int8.")] = "fp32",
    secure_aggregation: Annotated[bool, Opt(help="SecAgg+: the server sees only the sum of the clients' "
                                                 "updates.")] = False,
    batch_size: Annotated[int | None, Opt(help="Rows per local micro-batch.")] = None,
    lr: Annotated[float | None, Opt(help="Clients' peak learning rate.")] = None,
    seed: Annotated[int | None, Opt(help="Seed of the partition, the weights and every client's batches.")] = None,
    block_size: Annotated[int | None, Opt(help="Context length.")] = None,
    n_layer: Annotated[int | None, Opt(help="Transformer blocks or recurrent layers.")] = None,
    n_head: Annotated[int | None, Opt(help="gpt only.")] = None,
    n_embd: Annotated[int | None, Opt(help="gpt only.")] = None,
    image_size: Annotated[int | None, Opt(help="Images: side in pixels (default: the data's).")] = None,
    width: Annotated[int | None, Opt(help="vae, gan: channels at full resolution.")] = None,
    quiet: Annotated[bool, Opt(help="No per-round lines.")] = False,
) -> None:
    """Train one model across many data owners with Flower (a SuperLink and SuperNodes on this
    machine); the result is a normal run directory. Needs pip install 'trustgen[federated]'.

    Examples:

      trustgen federate --data shakespeare --clients 8 --rounds 40 --partition by-speaker --out runs/fed

      trustgen federate --model vae --data mnist --clients 4 --rounds 20 --partition dirichlet:0.5 --out runs/fedvae

      trustgen federate --out runs/fed --resume --rounds 60
    """
    from trustgen import api

    settings = _drop_none(data=data, batch_size=batch_size, learning_rate=lr, seed=seed, image_size=image_size)
    model_settings = _drop_none(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, width=width)
    summary = api.federate(out, model=model, model_config=model_settings or None, clients=clients, rounds=rounds,
                           partition=partition, strategy=strategy, local_steps=local_steps, min_clients=min_clients,
                           proximal_mu=mu, server_lr=server_lr, round_timeout=round_timeout, tls=tls, resume=resume,
                           client_dp_epsilon=client_dp_epsilon, client_dp_clip=client_dp_clip,
                           update_precision=update_precision, secure_aggregation=secure_aggregation, q=q,
                           progress=not quiet, **settings)
    held_out = (f"global held-out loss {summary['final_val_loss']:.4f} (clients: worst "
                f"{summary['worst_client_val_loss']:.4f}, best {summary['best_client_val_loss']:.4f}, "
                f"std {summary['std_client_val_loss']:.4f})" if summary["final_val_loss"] is not None
                else f"discriminator loss {summary['final_d_loss']:.4f}, generator loss {summary['final_g_loss']:.4f}")
    typer.echo(f"{out}: {summary['rounds']} rounds, {held_out}, {summary['bytes_per_round'] / 1e6:.1f} MB per round")
    if "client_dp" in summary:
        typer.echo("client DP, epsilon spent (delta per round 1e-5): " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary["client_dp"]["epsilon_spent"].items()))


@app.command()
def generate(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="Run directory of a trained model.")],
    prompt: Annotated[list[str] | None, Opt(help="Prompt text; repeat for a batch of prompts.")] = None,
    n: Annotated[int, Opt("-n", help="Samples per prompt.")] = 1,
    max_tokens: Annotated[int, Opt(help="Most new tokens per sample.")] = 256,
    temperature: Annotated[float, Opt(help="0 is greedy.")] = 1.0,
    top_k: Annotated[int | None, Opt(help="Sample among the K likeliest tokens only.")] = None,
    top_p: Annotated[float | None, Opt(help="Nucleus sampling: among the likeliest tokens whose probabilities sum to P.")] = None,
    min_p: Annotated[float | None, Opt(help="Drop tokens less likely than P times the likeliest one.")] = None,
    typical_p: Annotated[float | None, Opt(help="Locally typical sampling with probability mass P.")] = None,
    repetition_penalty: Annotated[float | None, Opt(help="Above 1: tokens already in the text become less likely.")] = None,
    no_repeat_ngram: Annotated[int | None, Opt(help="Forbid repeating n-grams of this size.")] = None,
    beams: Annotated[int, Opt(help="Beam search width (1 samples).")] = 1,
    stop: Annotated[list[str] | None, Opt(help="Stop at this string; repeatable.")] = None,
    seed: Annotated[int | None, Opt(help="Seed of the sampling: the same seed gives the same text.")] = None,
    stream: Annotated[bool, Opt(help="Print text as it is generated.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print a JSON list of samples.")] = False,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, Opt(help="auto (bf16 where fast), fp32, bf16 or int8 (weight-only).")] = "auto",
    watermark: Annotated[str | None, Opt(help="Text: kgw (default), synthid (distortion-free) or none. Images: spectral "
                                              "(default) or none.")] = None,
    keystore: Annotated[Path | None, Opt(help="Keystore folder (default ~/.trustgen/keys or $TRUSTGEN_KEYSTORE).")] = None,
    out: Annotated[Path | None, Opt(help="Text: write it here (NAME-2.txt... for several samples). Images: a "
                                         "folder for one PNG per image, or a .png file (the strip of --interpolate).")] = None,
    policy: Annotated[Path | None, Opt(help="A content policy (TOML): rules that block, redact or warn on "
                                            "prompts and outputs.")] = None,
    grid: Annotated[Path | None, Opt(help="Images: write all images as one grid picture (.png).")] = None,
    interpolate: Annotated[int | None, Opt(help="Images: walk the latent space in this many steps (-n walks).")] = None,
    bars: Annotated[int, Opt(help="Music: the most bars of a new piece.")] = 16,
    min_bars: Annotated[int, Opt(help="Music: the fewest bars of a new piece (the model may not end it sooner).")] = 0,
    sign: Annotated[bool, Opt("--sign/--no-sign", help="Sign the files written (--out, --grid) with a provenance "
                                                       "manifest: C2PA in images, FILE.manifest.json beside text.")] = True,
    threads: Annotated[int | None, Opt(help=THREADS_HELP)] = None,
) -> None:
    """Generate text (watermarked with your key unless --watermark none) or images from a trained model.

    Examples:

      trustgen generate runs/shk --prompt "ROMEO:" -n 3 --temperature 0.8 --top-p 0.95

      trustgen generate runs/shk --prompt "ROMEO:" --out romeo.txt   (signed: romeo.txt.manifest.json)

      trustgen generate runs/gan -n 64 --grid samples.png --seed 1

      trustgen generate runs/bach -n 4 --out chorales/   (.mid, .musicxml, .wav and .png per piece)

      trustgen generate runs/bach --prompt melody.mid --out harmonized/   (or --prompt "67:4 69:4 71:8")
    """
    from trustgen import api

    if n < 1:
        raise TrustgenError(f"-n must be at least 1, got {n}.")
    _set_threads(threads)
    rules = None
    if policy is not None:
        from trustgen.safety.policy import Policy

        rules = Policy.from_toml(policy)
    is_run = (run / "config.json").exists()
    is_music = is_run and api.is_music_run(run)
    music_only = _given_options(ctx, ("bars", "min_bars"))
    if music_only and is_run and not is_music:
        raise TrustgenError(f"{', '.join(music_only)} only apply to music models; this run is not one.")
    if is_run and api.is_image_run(run):
        text_only = _given_options(ctx, TEXT_SAMPLING_OPTIONS)
        if text_only:
            raise TrustgenError(f"{', '.join(text_only)} only apply to text models; an image model takes -n, --seed, "
                                "--prompt (a class), --out, --grid and --interpolate.")
        _generate_images(run, prompt, rules, n, seed, out, grid, interpolate, watermark, keystore, sign, device)
        return
    if is_music:
        _generate_music(run, prompt, n, min_bars, bars, temperature, top_p, seed, out, watermark, keystore, sign,
                        device)
        return
    if grid is not None or interpolate is not None:
        raise TrustgenError("--grid and --interpolate are for image models; this run is a text model.")
    from trustgen.safety.trust import DEFAULT_TEXT_WATERMARK

    settings = _drop_none(
        max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        typical_p=typical_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram,
        num_beams=beams, stop=tuple(stop or ()), seed=seed)
    api.sample_config(settings)  # validate before loading the model
    model = api.load(run, device=device, precision=precision)
    trust = {"watermark": watermark or DEFAULT_TEXT_WATERMARK, "keystore": keystore}
    prompts = prompt or [api.DEFAULT_PROMPT]
    if rules is not None:  # what is printed and saved is the prompt as the model saw it
        prompts = [rules.check_prompt(p).text for p in prompts]
    if stream:
        for p in prompts:
            for i in range(n):
                sys.stdout.write(p)
                run_settings = {**settings, "seed": None if seed is None else seed + i}
                for piece in model.stream(p, policy=rules, **trust, **run_settings):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n\n")
        return
    texts = model.generate(prompts, n=n, policy=rules, progress=sys.stderr.isatty(), **trust, **settings)
    rows = [(p, t) for p, t in zip((p for p in prompts for _ in range(n)), texts, strict=True)]
    if out is not None:
        for i, text in enumerate(texts):
            saved = text.save(out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}"), sign=sign)
            typer.echo(f"wrote {saved.path}" + (f" and {saved.manifest.name}" if saved.manifest else ""), err=True)
        return
    if as_json:
        typer.echo(json.dumps([{"prompt": p, "text": t} for p, t in rows], ensure_ascii=False, indent=2))
        return
    for i, (p, text) in enumerate(rows):
        if len(rows) > 1:
            typer.echo(f"--- sample {i + 1} ---")
        typer.echo(p + text)
        typer.echo("")


def _generate_images(run: Path, prompts: list[str] | None, rules: Any, n: int, seed: int | None, out: Path | None,
                     grid: Path | None, steps: int | None, watermark: str | None, keystore: Path | None,
                     sign: bool, device: str) -> None:
    """Generate the pictures asked for and write them (the API watermarks, then signs, each)."""
    from trustgen import api
    from trustgen.safety.trust import DEFAULT_IMAGE_WATERMARK, IMAGE_WATERMARKS

    watermark = watermark or DEFAULT_IMAGE_WATERMARK
    if watermark not in (*IMAGE_WATERMARKS, "none"):
        raise TrustgenError(f"images take --watermark {DEFAULT_IMAGE_WATERMARK} (the default) or none, "
                            f"not {watermark!r}.")
    labels = [rules.check_prompt(p).text for p in prompts] if rules is not None and prompts else prompts
    model = api.load(run, device=device)
    if out is None and grid is None:
        raise TrustgenError("say where to write the images: --grid FILE.png, or --out FOLDER (or FILE.png).")
    for path in (grid, out if out is not None and out.suffix else None):
        if path is not None:
            api.picture_path(path)
    trust = {"watermark": watermark, "keystore": keystore}
    if steps is not None:
        walks = model.interpolate(steps, n, prompt=labels, seed=seed, **trust)
        for target in (t for t in (grid, out) if t is not None):
            walks.save_grid(target, sign=sign)
            typer.echo(f"wrote {target} ({len(walks) // steps} walks of {steps} steps)", err=True)
        return
    images = model.generate(n, prompt=labels, seed=seed, **trust)
    if grid is not None:
        written = images.save_grid(grid, sign=sign)
        typer.echo(f"wrote {grid} ({len(images)} images; {_marked_words([written], sign)})", err=True)
    if out is not None:
        names = images.save(out, sign=sign, progress=sys.stderr.isatty())
        typer.echo(f"wrote {len(names)} images to {out} ({_marked_words(names, sign)})", err=True)


def _marked_words(written: list[Any], sign: bool) -> str:
    """What the written pictures carry: a picture is called watermarked only when it is."""
    marked = sum(artifact.watermark is not None for artifact in written)
    notes = sorted({artifact.note for artifact in written if artifact.note}) or ["not watermarked"]
    words = (["watermarked"] if marked == len(written) else notes if not marked
             else [f"{marked} of {len(written)} watermarked", *(f"the others {note}" for note in notes)])
    return ", ".join(words + (["with C2PA manifests"] if sign else []))


def _generate_music(run: Path, prompts: list[str] | None, n: int, min_bars: int, bars: int, temperature: float,
                    top_p: float | None, seed: int | None, out: Path | None, watermark: str | None,
                    keystore: Path | None, sign: bool, device: str) -> None:
    """Compose (or harmonize the melody given as --prompt) and write each piece's files."""
    from trustgen import api
    from trustgen.data.music import read_melody
    from trustgen.safety.trust import DEFAULT_TEXT_WATERMARK

    if out is None:
        raise TrustgenError("say where to write the pieces: --out FOLDER.")
    if prompts is not None and len(prompts) > 1:
        raise TrustgenError("give one melody to harmonize (--prompt FILE.mid or a note list), not several.")
    melody = read_melody(prompts[0]) if prompts else None
    model = api.load(run, device=device)
    pieces = api.compose(model, n, melody=melody, min_bars=min_bars, bars=bars,
                         watermark=watermark or DEFAULT_TEXT_WATERMARK, keystore=keystore, temperature=temperature, **_drop_none(top_p=top_p, seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    for i, piece in enumerate(pieces):
        piece.save(out / f"piece-{i + 1}", sign=sign)
    extras = [what for what, done in (("watermarked", pieces[0].watermark), ("signed", sign)) if done]
    typer.echo(f"wrote {len(pieces)} piece(s) to {out} as .mid, .musicxml, .wav and .png"
               + (f" ({', '.join(extras)})" if extras else ""), err=True)


@app.command()
def detect(
    file: Annotated[Path, typer.Argument(help="A text, image, WAV or score (.mid, .musicxml) file to test.")],
    run: Annotated[Path | None, Opt(help="Run directory whose tokenizer made the text (default: every "
                                          "tokenizer your keystore has watermarked with).")] = None,
    scheme: Annotated[str | None, Opt(help="kgw, synthid, or the retired gumbel and kgw-selfhash "
                                           "(default: kgw and synthid).")] = None,
    keystore: Annotated[Path | None, Opt(help="Keystore folder.")] = None,
    window: Annotated[int, Opt(help="Tokens per window when searching inside longer text.")] = 200,
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
    show: Annotated[bool, Opt("--highlight", help="Print the text with watermarked tokens in green.")] = False,
    html: Annotated[Path | None, Opt(help="Write the highlighted text as an HTML page here.")] = None,
) -> None:
    """Test a text or an image for your watermark: a p-value and a verdict (needs no model).

    Exit codes: 0 watermarked, 1 no watermark found, 3 too short to tell (fewer scored tokens than
    a fully watermarked text would need to reach p < 0.001: 6 with the default schemes), 2 error.
    """
    from trustgen.safety.trust import (
        AUDIO_WATERMARK,
        DETECT_EXIT_CODES,
        DETECTABLE_TEXT_WATERMARKS,
        TOO_SHORT,
        Keystore,
        artifact_text,
        detect_audio,
        detect_pixels,
        detect_text,
        is_wav,
        read_image,
    )

    if scheme is not None and scheme not in DETECTABLE_TEXT_WATERMARKS:
        raise TrustgenError(f"unknown watermark scheme {scheme!r}; choose {', '.join(DETECTABLE_TEXT_WATERMARKS)}.")
    if not file.is_file():
        raise TrustgenError(f"{file} does not exist.")
    if is_wav(file):
        found_audio = detect_audio(file, Keystore(keystore))
        typer.echo(json.dumps(found_audio.to_dict(), indent=2) if as_json else
                   f"{found_audio.verdict}: {AUDIO_WATERMARK} key {found_audio.key_id}, z = {found_audio.z_score:.2f}, "
                   f"p = {found_audio.p_value:.2e} (corrected for {found_audio.alignments} alignments"
                   f"{f' and {found_audio.keys_tried} keys' if found_audio.keys_tried > 1 else ''}) over "
                   f"{found_audio.seconds:.1f} s")
        raise typer.Exit(DETECT_EXIT_CODES[found_audio.verdict])
    pixels = read_image(file)
    if pixels is not None:
        found_image = detect_pixels(pixels, Keystore(keystore))
        if as_json:
            typer.echo(json.dumps(found_image.to_dict(), indent=2))
        else:
            tried = f", best of {found_image.keys_tried} keys" if found_image.keys_tried > 1 else ""
            typer.echo(f"{found_image.verdict}: spectral key {found_image.key_id}, p = {found_image.p_value:.2e} "
                       f"(corrected{tried}) over {found_image.coefficients} frequencies; best match: "
                       f"{found_image.geometry}")
        raise typer.Exit(DETECT_EXIT_CODES[found_image.verdict])
    found = detect_text(artifact_text(file), Keystore(keystore), run=run, scheme=scheme, window=window)
    if html is not None:
        from trustgen.io import atomic_write_text

        atomic_write_text(html, found.highlight(html=True))
    if show:
        typer.echo(found.highlight(), color=True)
    signs = f"; {found.tampering.describe()}" if found.tampering.suspected else ""
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=2))
    elif found.verdict == TOO_SHORT:
        typer.echo(f"{TOO_SHORT}: {found.whole.scored} scored tokens, at least {found.minimum} are needed "
                   f"before a watermark could show{signs}")
    else:
        tried = f" (best of {found.candidates} tokenizer/scheme pairs, corrected)" if found.candidates > 1 else ""
        typer.echo(f"{found.verdict}: {found.scheme} key {found.key_id}, z = {found.whole.z_score:.2f}, "
                   f"p = {found.p_value:.2e}{tried} over {found.whole.scored} scored tokens; best {window}-token "
                   f"window p = {found.window.p_value:.2e}{signs}")
    raise typer.Exit(DETECT_EXIT_CODES[found.verdict])


@app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="A generated image (PNG/JPEG) or text file.")],
    keystore: Annotated[Path | None, Opt(help="Keystore folder (its CA is trusted, and its watermark key tested).")] = None,
    trust: Annotated[list[Path] | None, Opt(help="Trust this CA certificate (PEM) instead; repeatable.")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """Check a file's signed manifest (who signed it, is it intact) and its watermark.

    Exit codes (the JSON's "status"): 0 verified (unmodified, good signature, trusted CA),
    3 modified, 4 untrusted (good signature, unknown CA), 5 invalid (manifest broken or not
    trustgen's), 6 missing (no manifest), 2 error. The watermark is reported beside it; it
    never changes the exit code.
    """
    from trustgen.safety.trust import VERIFY_EXIT_CODES, summary_line, verify

    report = verify(file, keystore, trust)
    typer.echo(json.dumps(report, indent=2) if as_json else summary_line(report))
    raise typer.Exit(VERIFY_EXIT_CODES[report["status"]])


keys_app = typer.Typer(help="Manage your keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    keystore: Annotated[Path | None, Opt(help="Keystore folder.")] = None,
    name: Annotated[str | None, Opt(help="Signer name in the certificate (default: trustgen local signer "
                                         "(user@host)).")] = None,
    new_signer: Annotated[bool, Opt("--new-signer", help="Make a new signing key and local CA (when the old key is "
                                                         "lost); the old CA is kept as ca-retired-*.pem.")] = False,
) -> None:
    """Create the keystore: a secret watermark key and a signing key with its local CA and
    certificate (each kept if it exists; nothing is ever replaced but with --new-signer)."""
    from trustgen.safety.keys import Keystore

    store = Keystore(keystore)
    retired = set(store.retired_anchors())
    key = store.init(signer_name=name, new_signer=new_signer)
    for path in sorted(set(store.retired_anchors()) - retired):
        typer.echo(f"the old CA is kept as {path}; files it signed now verify as untrusted")
    typer.echo(f"watermark key {key.key_id} in {store.path}")
    typer.echo(f"signer '{store.signing_identity().name}'; share {store.path / 'ca.pem'} with those who "
               "verify your files (trustgen verify --trust ca.pem)")


@keys_app.command("import")
def keys_import(
    key: Annotated[Path, Opt(help="Your signing private key (PEM, Ed25519 or ECDSA P-256, unencrypted).")],
    chain: Annotated[Path, Opt(help="Its certificate chain (PEM): your certificate first, then its CA(s).")],
    keystore: Annotated[Path | None, Opt(help="Keystore folder.")] = None,
) -> None:
    """Sign with your own key and certificate chain instead of the local CA."""
    from trustgen.safety.keys import Keystore

    identity = Keystore(keystore).import_signing_identity(key, chain)
    typer.echo(f"signer '{identity.name}' ({identity.algorithm}) imported")


@app.command()
def info(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """Show a run's config, parameter count, data, losses and pictures."""
    from trustgen import api

    details = api.load(run, device="cpu").info()
    if as_json:
        typer.echo(json.dumps(details, indent=2))
        return
    model = details["model"]
    typer.echo(f"run          {run}")
    typer.echo(f"family       {details['family']}")
    typer.echo(f"parameters   {details['parameters']:,}")
    if "tokenizer" in details:
        typer.echo(f"tokenizer    {details['tokenizer']['kind']} ({details['tokenizer']['vocab_size']} tokens)")
    typer.echo("model        " + ", ".join(f"{k}={v}" for k, v in model.items()))
    data = details.get("data") or {}
    if "train_tokens" in data:
        typer.echo(f"data         {data['source']}: {data['train_tokens']:,} training and "
                   f"{data['val_tokens']:,} validation tokens from {data['documents']} documents")
    elif "train_images" in data:
        classes = f", classes {', '.join(data['classes'])}" if data.get("classes") else ""
        skipped = f", {len(data['skipped_files'])} unreadable files skipped" if data.get("skipped_files") else ""
        typer.echo(f"data         {data['source']}: {data['train_images']:,} training and {data['val_images']:,} "
                   f"held-out images, {data['image_size']}x{data['image_size']}x{data['channels']}{classes}{skipped}")
    if details.get("step") is not None:
        seen = (f"{details['tokens_seen']:,} tokens" if "tokens_seen" in details
                else f"{details.get('images_seen', 0):,} images")
        typer.echo(f"trained      {details['step']} steps, {seen}, {details['training_seconds']:.0f}s")
    if details.get("best_val_loss") is not None:
        typer.echo(f"val loss     best {details['best_val_loss']:.4f}"
                   + (f", final {details['final_val_loss']:.4f}" if details.get("final_val_loss") else ""))
    evaluation = details.get("evaluation")
    if evaluation:
        typer.echo(f"evaluated    FID {evaluation['model']['fid']:.2f} on {evaluation['samples']} samples "
                   f"(floor {evaluation['floor']['fid']:.2f}); trustgen evaluate {run} for the full report")
    if details.get("privacy"):
        typer.echo(f"privacy      {details['privacy']}")
    if details.get("pictures"):
        typer.echo("pictures     " + ", ".join(str(run / name) for name in details["pictures"]))
    typer.echo(f"model id     {details['model_id']}")


@app.command("runs")
def list_runs(
    folder: Annotated[Path, typer.Argument(help="Folder holding run directories.")] = Path("runs"),
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """List the run directories in a folder, newest first: model, data, steps, loss and date.

    Example:

      trustgen runs runs/
    """
    import datetime

    from trustgen.runs import find_runs

    found = find_runs(folder)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        typer.echo(f"no run directories in {folder}")
        return
    typer.echo(f"{'run':<32} {'model':<6} {'data':<20} {'steps':>7} {'val loss':>9}  changed")
    for run in found:
        loss = "" if run["val_loss"] is None else f"{run['val_loss']:.4f}"
        changed = datetime.datetime.fromtimestamp(run["changed"]).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{run['run']:<32} {run['family']:<6} {run['data'] or ''!s:<20} {run['steps'] or '':>7} "
                   f"{loss:>9}  {changed}")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory of an image or music model.")],
    n: Annotated[int | None, Opt("-n", help="Samples to generate and measure (default 5000 images, 20 pieces).")] = None,
    bars: Annotated[int, Opt(help="Music: the most bars of each piece.")] = 16,
    seed: Annotated[int, Opt(help="Seed of the samples.")] = 0,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """Measure an image model's samples: FID, KID, precision/recall, density/coverage, classes,
    beside the floor of held-out real images (written to RUN/evaluation.json). A music model:
    held-out NLL per token and musical statistics beside Bach's held-out chorales (written to
    RUN/music_evaluation.json)."""
    from trustgen import api
    from trustgen.evaluate.images import MIN_SAMPLES, format_report

    if (run / "config.json").exists() and api.is_music_run(run):
        from trustgen.evaluate.music import format_music_report

        if n is not None and n < 2:
            raise TrustgenError(f"-n must be at least 2 pieces, got {n}.")
        music = api.evaluate_music(run, n=n or 20, bars=bars, seed=seed, device=device)
        typer.echo(json.dumps(music, indent=2) if as_json else format_music_report(music))
        return
    n = 5000 if n is None else n
    if n < MIN_SAMPLES:
        raise TrustgenError(f"-n must be at least {MIN_SAMPLES}, got {n}.")
    model = api.load(run, device=device)
    if not isinstance(model, api.ImageModel):
        raise TrustgenError("evaluate measures image and music models; a text run's held-out loss is in: "
                            "trustgen info RUN")
    report = model.evaluate(n, seed=seed, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(format_report(report))
    if "conditional_accuracy" in report:
        typer.echo(f"the domain classifier agrees with the requested class for "
                   f"{report['conditional_accuracy']:.1%} of the samples")


@app.command()
def audit(
    run: Annotated[Path, typer.Argument(help="Run directory (text or image model).")],
    samples: Annotated[int, Opt(help="Samples to generate and measure.")] = 500,
    max_tokens: Annotated[int, Opt(help="Text: tokens per sample.")] = 200,
    temperature: Annotated[float, Opt(help="Text: sampling temperature of the samples.")] = 1.0,
    top_p: Annotated[float | None, Opt(help="Text: nucleus sampling of the samples.")] = None,
    seed: Annotated[int, Opt(help="Seed of samples, prompts and candidates.")] = 0,
    fail_on: Annotated[str | None, Opt(help="Exit with status 1 when a measure crosses a threshold: comma-separated "
                                            "METRIC>VALUE (or >=, <, <=), e.g. \"memorized_fraction>0.01,mia_auc>0.6\".")] = None,
    out: Annotated[Path | None, Opt(help="Folder for report.html and report.json (default RUN/audit).")] = None,
    fairness: Annotated[bool, Opt("--fairness/--no-fairness", help="Text: run the fairness probes.")] = True,
    canary_candidates: Annotated[int, Opt(help="Text: random secrets each canary is ranked against.")] = 10_000,
    mia_examples: Annotated[int, Opt(help="Text: training and held-out windows for membership inference.")] = 1000,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, Opt("--json", help="Print the summary rows as JSON.")] = False,
) -> None:
    """Audit a run: quality, diversity, memorization, canaries, membership inference and fairness
    (text), or image metrics and class balance; writes an HTML report and report.json."""
    from trustgen import api

    if samples < 2:
        raise TrustgenError(f"--samples must be at least 2, got {samples}.")
    if canary_candidates < 100 or mia_examples < 10:
        raise TrustgenError("--canary-candidates must be at least 100 and --mia-examples at least 10.")
    if not (run / "config.json").is_file():
        raise TrustgenError(f"{run} is not a run directory (it has no config.json).")
    report = api.audit(run, samples=samples, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, fail_on=fail_on, out=out, device=device, fairness=fairness, progress=not as_json,
                       canary_candidates=canary_candidates, mia_examples=mia_examples)
    if as_json:
        typer.echo(json.dumps(report["summary"], indent=2))
    else:
        from trustgen.evaluate.report import fmt

        for row in report["summary"]:
            reference = f"  (reference {fmt(row['reference'])})" if row.get("reference") is not None else ""
            typer.echo(f"{row['name']:<28} {fmt(row['value']):>10}{'  FLAG' if row['flag'] else ''}{reference}")
        typer.echo(f"report: {report['paths'][1]}")
    if report["failed"]:
        typer.echo(f"audit failed: {'; '.join(report['failed'])}", err=True)
        raise SystemExit(1)


@app.command()
def sweep(
    run: Annotated[Path, typer.Argument(help="Run directory of a text model.")],
    temperature: Annotated[str, Opt(help="Temperatures: a range start:stop:step or a list x,y,z.")] = "0.5:1.5:0.1",
    top_p: Annotated[str | None, Opt(help="top-p values (range or list); none: no top-p.")] = None,
    min_p: Annotated[str | None, Opt(help="min-p values (range or list); none: no min-p.")] = None,
    samples: Annotated[int, Opt(help="Samples per setting.")] = 50,
    max_tokens: Annotated[int, Opt(help="Tokens per sample.")] = 200,
    prompt: Annotated[str, Opt(help="Prompt every sample continues.")] = "\n",
    seed: Annotated[int, Opt(help="Seed of the samples.")] = 0,
    out: Annotated[Path | None, Opt(help="Folder for sweep.json and sweep.png (default RUN/sweep).")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """Draw the quality-diversity trade-off over temperature / top-p / min-p and recommend the
    settings on its frontier (table, RUN/sweep/sweep.json and sweep.png)."""
    from trustgen.evaluate.sweep import format_sweep, parse_values
    from trustgen.evaluate.sweep import sweep as run_sweep

    temperatures = parse_values(temperature, "--temperature")
    top_ps = parse_values(top_p, "--top-p") if top_p else [None]
    min_ps = parse_values(min_p, "--min-p") if min_p else [None]
    from trustgen import api  # after the cheap checks: importing torch takes seconds

    model = api.load(run, device=device)
    if not isinstance(model, api.TextModel):
        raise TrustgenError("sweep measures text sampling settings; this run is an image model.")
    result = run_sweep(model, temperatures, top_ps, min_ps, samples=samples, max_new_tokens=max_tokens,
                       prompt=prompt, seed=seed, out=out or run / "sweep")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(format_sweep(result))
    typer.echo(f"wrote {', '.join(result['files'])}")


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A local Hugging Face GPT-2 or Llama folder.")],
    out: Annotated[Path, Opt(help="Run directory to create.")],
) -> None:
    """Import a local Hugging Face GPT-2 or Llama model folder as a run directory."""
    from trustgen import hf

    model_type = hf.import_hf(path, out)
    typer.echo(f"imported the {model_type} model {path} into {out}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    out: Annotated[Path, Opt(help="Folder to write.")],
    format: Annotated[str, Opt(help="Export format: hf.")] = "hf",
) -> None:
    """Export a GPT run for Hugging Face transformers: GPT-2 format for GPT-2-shaped models,
    Llama format for the default one (RoPE, RMSNorm, SwiGLU), with its tokenizer."""
    from trustgen import hf

    if format != "hf":
        raise TrustgenError(f"unknown export format {format!r}; the supported format is hf.")
    written = hf.export_hf(run, out)
    typer.echo(f"exported {run} to {out} as {written.describe()}")


@app.command()
def serve(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to serve (text, image and music models); each is "
                                                    "named by its folder.")],
    host: Annotated[str, Opt(help="Address to bind; the default answers only this machine.")] = "127.0.0.1",
    port: Annotated[int, Opt(help="Port to listen on.")] = 8000,
    api_key_file: Annotated[Path | None, Opt(help="Require these bearer keys (one per line, or sha256:HEX).")] = None,
    max_concurrency: Annotated[int, Opt(help="Sequences decoded together per model.")] = 16,
    queue_limit: Annotated[int, Opt(help="Requests that may wait per model; beyond it: 429.")] = 64,
    rate_limit: Annotated[float, Opt(help="Requests per minute per API key.")] = 600.0,
    keystore: Annotated[Path | None, Opt(help="Keystore folder (watermark and signing keys).")] = None,
    threads: Annotated[int | None, Opt(help=THREADS_HELP)] = None,
    stream_interval: Annotated[float | None, Opt(help="Seconds between streamed chunks after the first token; what "
                                                      "is generated meanwhile goes out together (default 0.02; 0: "
                                                      "every token alone).")] = None,
) -> None:
    """Serve runs over an OpenAI-compatible HTTP API, with a playground page at /."""
    import uvicorn

    from trustgen.serve.app import create_app, read_api_keys, server_config

    if not runs:
        raise TrustgenError("name at least one run directory to serve.")
    for run in runs:
        if not (run / "config.json").is_file():
            raise TrustgenError(f"{run} is not a run directory (it has no config.json).")
    if not 0 < port < 65536:
        raise TrustgenError(f"--port must lie in 1..65535, got {port}.")
    if max_concurrency < 1 or queue_limit < 1 or rate_limit <= 0:
        raise TrustgenError("--max-concurrency and --queue-limit must be at least 1 and --rate-limit positive.")
    _set_threads(threads)
    keys = read_api_keys(api_key_file) if api_key_file is not None else []
    server = create_app(runs, api_keys=keys, keystore=keystore, max_batch=max_concurrency, max_queue=queue_limit,
                        rate_limit=rate_limit, **({} if stream_interval is None else {"stream_interval": stream_interval}))
    guard = f"{len(keys)} API key(s)" if keys else "no API key (anyone who can reach it may use it)"
    typer.echo(f"serving {', '.join(server.state.models)} on http://{host}:{port}/ with {guard}", err=True)
    uvicorn.Server(server_config(server, host, port)).run()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    import logging
    import os

    choose_openmp_wait(sys.argv[1:], os.environ)  # libgomp reads it once, when torch loads it

    class Plain(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            message = record.getMessage()
            if record.exc_info:  # what went wrong, for the operator (the client was told to look here)
                message += "\n" + self.formatException(record.exc_info)
            return f"warning: {message}" if record.levelno >= logging.WARNING else message

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Plain())
    logger = logging.getLogger("trustgen")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        app()
    except TrustgenError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except OSError as exc:
        typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
