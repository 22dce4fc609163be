"""Federated training: partitions, the client's local step (FedProx, determinism), the ServerApp's
rounds in-process (a resume is bit-exact), and one real Flower federation on loopback
(SuperLink + 2 SuperNodes, TLS) whose model loads."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.test_cli import trustgen
from trustgen import api, io
from trustgen.data.text import Document
from trustgen.data.tokenizers import CharTokenizer
from trustgen.errors import TrustgenError
from trustgen.federated.client import proximal_wrap, train_locally
from trustgen.federated.launch import flower_command
from trustgen.federated.partition import HELD_OUT_EVERY, partition, speeches
from trustgen.models.registry import build_model, family_of, model_config

HAS_FLOWER = importlib.util.find_spec("flwr") is not None


def play(n_speakers: int = 3, speeches_each: int = 40) -> str:
    blocks = [f"SPEAKER {'ABC'[i % n_speakers]}:\nline {i} of the play, spoken with care\nand a second verse"
              for i in range(n_speakers * speeches_each)]
    return "Title\n\n" + "\n\n".join(blocks) + "\n"


def test_partitions_hand_out_every_speech_once_and_hold_out_every_tenth() -> None:
    docs = [Document("play-a", text=play()), Document("play-b", text=play(2, 50))]
    units = speeches(docs)
    assert len(units) == 220
    for scheme in ("iid", "by-play", "dirichlet:0.3"):
        parts = partition(docs, 2, scheme, seed=0)
        held = sum(p.train.count("SPEAKER") + p.val.count("SPEAKER") for p in parts)
        assert held == len(units), scheme
    by_speaker = partition(docs, 3, "by-speaker", seed=0)
    names = [p.name for p in by_speaker]  # LEAF: each role a client, the largest roles first
    assert set(names[:2]) == {"SPEAKER A (play-b)", "SPEAKER B (play-b)"} and names[2].endswith("(play-a)")
    assert all({block.split(":")[0] for block in p.train.strip().split("\n\n")} == {p.name.split(" (")[0]}
               for p in by_speaker)
    assert by_speaker[0].val.count("SPEAKER") == 50 // HELD_OUT_EVERY


@pytest.mark.parametrize("scheme", ["dirichlet:0", "dirichlet:x", "by-chapter"])
def test_bad_partitions_are_one_sentence(scheme: str) -> None:
    with pytest.raises(TrustgenError, match="--partition"):
        partition([Document("p", text=play())], 2, scheme, seed=0)


def tiny_settings() -> dict:
    tokenizer = CharTokenizer.train([play()])
    model = model_config("gpt", {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
                                 "vocab_size": tokenizer.vocab_size}).to_dict()
    train = api.train_config({"data": "unused", "max_steps": 1, "batch_size": 4, "warmup_steps": 0,
                              "precision": "fp32", "device": "cpu"}).to_dict()
    return {"family": "gpt", "model": model, "train": train, "tokenizer": tokenizer.to_json(), "local_steps": 3}


@pytest.mark.slow
def test_local_training_repeats_bit_for_bit_and_fedprox_pulls_towards_the_global_model(tmp_path: Path) -> None:
    # A resumed federation repeats a lost round only if a client's round is a pure function
    # of (weights, round, client).
    (tmp_path / "train.txt").write_text(play())
    (tmp_path / "val.txt").write_text(play(1, 5))
    settings = tiny_settings()
    start = {k: v.clone() for k, v in build_model("gpt", family_of("gpt").make_config(settings["model"]))
             .state_dict().items()}
    first, metrics = train_locally(start, settings, tmp_path, partition_id=1, server_round=2)
    again, _ = train_locally(start, settings, tmp_path, partition_id=1, server_round=2)
    other_round, _ = train_locally(start, settings, tmp_path, partition_id=1, server_round=3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other_round[k]) for k in first)
    assert metrics["partition-id"] == 1 and metrics["num-examples"] == 3 * 4
    assert metrics["global-train-loss"] > 0  # the received model's loss on the first batch: q-FedAvg's weight

    def distance(state: dict) -> float:
        return sum((state[k] - start[k]).norm().item() for k in start)

    prox, _ = train_locally(start, settings, tmp_path, partition_id=1, server_round=2, proximal_mu=50.0)
    assert distance(prox) < 0.5 * distance(first)


def test_the_proximal_term_is_its_gradient() -> None:
    # One SGD step on a zero loss gradient: only the proximal gradient mu * (w - w0) moves w.
    layer = torch.nn.Linear(2, 2, bias=False)
    anchor = {"weight": torch.zeros(2, 2)}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    proximal_wrap(1.0, anchor)(layer, {"model": optimizer}, None)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros(2, 2)
    optimizer.step()
    assert torch.allclose(layer.weight.detach(), before * 0.9)


@pytest.mark.skipif(not HAS_FLOWER, reason="flwr is not installed (pip install 'trustgen[federated]')")
def test_qfedavg_weighs_the_clients_the_global_model_serves_worse_more() -> None:
    # Two clients move the weights (0, 0) by the same distance in different directions; client
    # 1's loss under the global model is 4 times client 0's.
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from trustgen.federated.server import make_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp has

    def aggregate(q: float) -> torch.Tensor:
        strategy = make_strategy({"strategy": "qfedavg", "q": q, "min_clients": 2}, client_lr=0.1)
        strategy.current_arrays = ArrayRecord({"w": torch.zeros(2)})  # what configure_train keeps
        replies = [Message(RecordDict({"arrays": ArrayRecord({"w": torch.tensor(w)}), "metrics": MetricRecord(
            {"global-train-loss": loss, "num-examples": 10, "partition-id": i})}), dst_node_id=i + 1,
            message_type="train") for i, (w, loss) in enumerate((([1.0, 0.0], 1.0), ([0.0, 1.0], 4.0)))]
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays.to_torch_state_dict()["w"].float()

    assert torch.allclose(aggregate(0.0), torch.tensor([0.5, 0.5]))  # q = 0: equal weights
    for q in (1.0, 5.0):
        w = aggregate(q)
        assert w[1] > w[0] > 0  # towards the worse-served client, in proportion loss**q
        assert (w[1] / w[0]).item() == pytest.approx(4.0**q, rel=1e-4)


def test_missing_flower_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match=r"pip install 'trustgen\[federated\]'"):
        flower_command("flower-no-such-command")
    if not HAS_FLOWER:  # nothing is written before the check
        with pytest.raises(TrustgenError, match="needs Flower"):
            api.federate(tmp_path / "f", clients=2, rounds=1)
        assert not (tmp_path / "f").exists()


def test_bad_federation_settings_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match="--strategy fedsgd is not a strategy"):
        api.federate(tmp_path / "f", strategy="fedsgd")
    with pytest.raises(TrustgenError, match="--min-clients"):
        api.federate(tmp_path / "f", clients=2, min_clients=3)
    with pytest.raises(TrustgenError, match="--q must not be negative"):
        api.federate(tmp_path / "f", strategy="qfedavg", q=-1)
    with pytest.raises(TrustgenError, match="--secure-aggregation takes fedavg or fedprox"):
        api.federate(tmp_path / "f", strategy="qfedavg", secure_aggregation=True)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLOWER, reason="flwr is not installed (pip install 'trustgen[federated]')")
def test_a_loopback_federation_with_tls_trains_and_loads(tmp_path: Path) -> None:
    # One real federation: a SuperLink, 2 SuperNodes, 2 rounds. Resuming is the ServerApp's
    # business, tested without the processes below (a resumed run's only difference).
    out, corpus = tmp_path / "fed", tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "play.txt").write_text(play(2, 30))
    result = trustgen("federate", "--data", str(corpus), "--out", str(out), "--clients", "2", "--rounds", "2",
                      "--partition", "by-speaker", "--local-steps", "2", "--batch-size", "4", "--block-size", "16",
                      "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    superlink_log = (out / "federation" / "logs" / "superlink.log").read_text()
    assert "running on https://127.0.0.1" in superlink_log  # TLS, with the run's own CA
    assert "2 rounds, global held-out loss" in result.stdout
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"]
    for row in rows:
        clients = [float(row["client_0_val_loss"]), float(row["client_1_val_loss"])]
        assert float(row["worst_val_loss"]) == max(clients) and float(row["best_val_loss"]) == min(clients)
        assert min(clients) <= float(row["val_loss"]) <= max(clients) and int(row["bytes"]) > 0
    assert json.loads((out / "federation_state.json").read_text())["round"] == 2
    assert (out / "loss.png").exists()
    [text] = api.load(out).generate("SPEAKER A:", max_new_tokens=10, seed=0)  # the continuation
    assert len(text) == 10
    result = trustgen("federate", "--out", str(out), "--resume", "--rounds", "2", "--quiet")
    assert result.returncode == 0 and "2 rounds" in result.stdout  # nothing left to run: no launch


def small_federation(run_dir: Path, rounds: int, strategy: str = "fedadam", **options: object) -> list[Path]:
    """A run directory ready for its rounds: two clients' folders cut from a small play."""
    from trustgen.federated.run import prepare_federation
    from trustgen.federated.settings import federated_settings

    corpus = run_dir.parent / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "play.txt").write_text(play(2, 30))
    config = api.train_config({"data": str(corpus), "max_steps": 2, "batch_size": 4, "warmup_steps": 0,
                               "precision": "fp32", "device": "cpu"}, "gpt")
    fed = federated_settings(clients=2, rounds=rounds, partition_scheme="by-speaker", strategy=strategy, local_steps=2,
                             min_clients=None, proximal_mu=0.0, server_lr=0.01, round_timeout=60, tls=False,
                             **options)
    return prepare_federation(run_dir, config, "gpt", {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}, fed)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLOWER, reason="flwr is not installed (pip install 'trustgen[federated]')")
def test_a_resumed_federation_repeats_the_uninterrupted_one_bit_for_bit(tmp_path: Path) -> None:
    # The ServerApp's rounds with the ClientApp in this process (tests/federated_grid.py):
    # 2 rounds straight vs 1 round, a restart from what was committed, and round 2. FedAdam,
    # so the server optimizer's moments must survive the restart too.
    from tests.federated_grid import LocalGrid
    from trustgen.federated.run import resume_settings
    from trustgen.federated.server import run_rounds

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_rounds(LocalGrid(small_federation(straight, rounds=2)), straight)
    run_rounds(LocalGrid(small_federation(resumed, rounds=1)), resumed)
    assert (resumed / "model.safetensors").read_bytes() != (straight / "model.safetensors").read_bytes()
    _, folders = resume_settings(resumed, rounds=2)
    run_rounds(LocalGrid(folders), resumed)
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert (resumed / "server_optimizer.safetensors").read_bytes() == \
        (straight / "server_optimizer.safetensors").read_bytes()
    with open(straight / "metrics.csv") as a, open(resumed / "metrics.csv") as b:
        drop_time = [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(a)]
        assert drop_time == [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(b)]
    assert len(drop_time) == 2


def test_client_dp_clips_the_update_and_adds_the_gaussian_mechanisms_noise() -> None:
    from trustgen.federated.client import noise_multiplier, privatize_update

    old = {"w": torch.zeros(200, 100), "steps": torch.tensor(3)}
    new = {"w": torch.full((200, 100), 0.1), "steps": torch.tensor(4)}  # update norm 0.1 * sqrt(20000) ~ 14.1
    out, norm = privatize_update(new, old, clip=1.0, epsilon=0.5, delta=1e-5,
                                 generator=torch.Generator().manual_seed(0))
    assert norm == pytest.approx(0.1 * 20000**0.5, rel=1e-6)
    noise = torch.randn(200, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = noise_multiplier(0.5, 1e-5)
    assert sigma == pytest.approx((2 * torch.log(torch.tensor(1.25e5)).item()) ** 0.5 / 0.5)
    clipped = new["w"].double() / norm  # the update scaled to norm 1
    assert torch.allclose(out["w"].double(), clipped + noise * sigma, atol=1e-5)
    assert (out["w"].double() - clipped).std().item() == pytest.approx(sigma, rel=0.03)
    assert torch.equal(out["steps"], new["steps"])  # integer buffers are not weights
    # without a generator the noise is the OS's: the server cannot replay it
    a, _ = privatize_update(new, old, 1.0, 0.5, 1e-5)
    b, _ = privatize_update(new, old, 1.0, 0.5, 1e-5)
    assert not torch.equal(a["w"], b["w"])
    small = {"w": torch.full((200, 100), 1e-4), "steps": torch.tensor(4)}  # norm 0.014 < clip: not scaled
    out, _ = privatize_update(small, old, 1.0, 1.0, 1e-5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["w"].double(), small["w"].double() + noise * noise_multiplier(1.0, 1e-5), atol=1e-5)


@pytest.mark.parametrize(("precision", "bytes_per_weight", "tolerance"), [("bf16", 2, 2**-8), ("int8", 1, 1 / 254)])
def test_compressed_updates_decode_to_the_weights_within_their_precision(precision: str, bytes_per_weight: int,
                                                                         tolerance: float) -> None:
    from trustgen.federated.compress import decode_update, encode_update

    gen = torch.Generator().manual_seed(0)
    old = {"w": torch.randn(64, 64, generator=gen), "n": torch.tensor([7])}
    new = {"w": old["w"] + 0.01 * torch.randn(64, 64, generator=gen), "n": torch.tensor([8])}
    sent = encode_update(new, old, precision)
    assert sent["w"].element_size() == bytes_per_weight and sent["w"].dtype != torch.float32
    back = decode_update(sent, old, precision)
    update = new["w"] - old["w"]
    error = (back["w"] - new["w"]).abs().max().item()
    assert error <= tolerance * update.abs().max().item() * 1.01 + 1e-6
    assert error > 0 and torch.equal(back["n"], new["n"])


def test_bad_privacy_and_precision_settings_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match=r"--client-dp-epsilon must be in \(0, 1\]"):
        api.federate(tmp_path / "f", clients=2, client_dp_epsilon=4.0)
    with pytest.raises(TrustgenError, match="--update-precision fp8 is not one of fp32, bf16, int8"):
        api.federate(tmp_path / "f", clients=2, update_precision="fp8")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLOWER, reason="flwr is not installed (pip install 'trustgen[federated]')")
def test_client_dp_and_int8_updates_in_a_federation_report_epsilon_and_fewer_bytes(tmp_path: Path) -> None:
    from tests.federated_grid import LocalGrid
    from trustgen.federated.run import summarize
    from trustgen.federated.server import run_rounds

    plain, private = tmp_path / "plain" / "run", tmp_path / "private" / "run"
    for run_dir, options in ((plain, {}), (private, {"client_dp_epsilon": 0.5, "client_dp_clip": 0.1,
                                                     "update_precision": "int8"})):
        run_dir.parent.mkdir()
        grid = LocalGrid(small_federation(run_dir, rounds=2, strategy="fedavg", **options))
        run_rounds(grid, run_dir)
    summary = summarize(private)
    assert summary["client_dp"]["epsilon_spent"] == {"client_0": 1.0, "client_1": 1.0}  # 2 rounds x 0.5
    assert summary["client_dp"]["delta_spent"] == {"client_0": 2e-5, "client_1": 2e-5}
    assert "client_dp" not in summarize(plain)
    # a round sends the weights 4 times (train, evaluate) and receives 2 updates: int8 updates
    # take 4 + 2/4 weights' bytes instead of 6 (less saved on a tiny model: names and headers)
    assert summary["bytes_per_round"] < 0.85 * summarize(plain)["bytes_per_round"]
    updates = [r["arrays"] for r in grid.received if "arrays" in r]
    assert {a.dtype for u in updates for k, a in u.items() if "#" not in k} == {"int8"}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLOWER, reason="flwr is not installed (pip install 'trustgen[federated]')")
def test_secure_aggregation_masks_each_update_and_unmasks_their_average(tmp_path: Path) -> None:
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from tests.federated_grid import LocalGrid
    from trustgen.federated.server import client_settings, run_rounds
    from trustgen.runs import load_run_model, read_run_config

    plain, secure = tmp_path / "plain" / "run", tmp_path / "secure" / "run"
    grids = {}
    for run_dir, on in ((plain, False), (secure, True)):
        run_dir.parent.mkdir()
        grids[on] = LocalGrid(small_federation(run_dir, rounds=1, strategy="fedavg", secure_aggregation=on))
        initial = load_run_model(run_dir)[0].state_dict()  # the same seed: the same in both
        run_rounds(grids[on], run_dir)
    # the server's view: one masked vector per client, nothing like that client's update
    masked = [r[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for r in grids[True].received
              if RECORD_KEY_CONFIGS in r and Key.MASKED_PARAMETERS in r[RECORD_KEY_CONFIGS]]
    assert len(masked) == 2
    assert not any(len(arrays) for r in grids[True].received for arrays in r.array_records.values())
    settings = json.loads(client_settings(secure, read_run_config(secure)))
    for i, vectors in enumerate(masked):
        new, _ = train_locally(initial, settings, secure / "clients" / f"client-{i}", i, server_round=1)
        update = torch.cat([(new[k] - initial[k]).flatten() for k in initial])
        seen = torch.cat([torch.from_numpy(bytes_to_ndarray(b).astype("float64")).flatten() for b in vectors[1:]])
        assert seen.numel() == update.numel() and update.abs().max() < 1
        assert seen.std() > 1e8  # spread over [0, 2**32) by the masks, where the update is < 1
    # the unmasked average is FedAvg's, up to SecAgg+'s 22-bit quantization
    a, b = (io.read_tensors(d / "model.safetensors") for d in (plain, secure))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert not all(torch.equal(a[k], initial[k]) for k in a)
