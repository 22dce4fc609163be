"""Continuous batching at the model level: sequences that join and leave a shared cache get the
same logits as when each is decoded alone."""

import pytest
import torch

from trustgen.models.gpt import GPT, GPTConfig
from trustgen.models.rnn import CharRNN, RNNConfig
from trustgen.sample.kv_cache import decoding_for

MODELS = {
    "gpt-rope": lambda: GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=64, position="rope")),
    "gpt-learned": lambda: GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=64,
                                         position="learned")),
    "lstm": lambda: CharRNN(RNNConfig(vocab_size=50, n_layer=2, hidden_size=32, embed_size=16, cell="lstm")),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("joins", [{0: 0, 1: 2, 2: 3}, {0: 0, 1: 0, 2: 0}], ids=["staggered", "together"])
def test_joining_and_leaving_a_batch_changes_no_logits(name: str, joins: dict[int, int]) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]] if joins[1] else [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    steps = [6, 3, 5]  # sequences leave at different times
    feeds = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        alone = []
        for i, prompt in enumerate(prompts):
            logits, state = decoding_for(model).prefill(model, [prompt], 64)
            out = [logits[0]]
            for t in range(steps[i]):
                out.append(decoding_for(model).decode_step(model, feeds[i, t: t + 1], state)[0])
            alone.append(out)
        batch = decoding_for(model).batch_cache(model, 4, 64)
        rows: dict[int, int] = {}
        fed: dict[int, int] = {}
        together: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}
        for clock in range(12):
            for seq, at in joins.items():
                if at == clock:
                    logits, state = decoding_for(model).prefill(model, [prompts[seq]], 64)
                    rows[seq], fed[seq] = batch.add(state), 0
                    together[seq].append(logits[0])
            active = sorted(rows, key=rows.get)
            if not active:
                continue
            logits = decoding_for(model).decode_step(model, torch.stack([feeds[s, fed[s]] for s in active]), batch)
            for seq in active:
                together[seq].append(logits[rows[seq]])
                fed[seq] += 1
            for seq in [s for s in active if fed[s] == steps[s]]:
                row, last = rows.pop(seq), batch.rows - 1
                batch.remove(row)  # the last row moves into its place
                rows.update({other: row for other, r in rows.items() if r == last})
    assert batch.rows == 0
    for seq in range(3):
        assert len(together[seq]) == len(alone[seq])
        for a, b in zip(alone[seq], together[seq], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_full_batch_and_an_overlong_sequence_are_clear_errors() -> None:
    from trustgen.errors import TrustgenError

    model = GPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, n_embd=16, block_size=8)).eval()
    with torch.inference_mode():
        batch = decoding_for(model).batch_cache(model, 1, 8)
        batch.add(decoding_for(model).prefill(model, [[1, 2, 3, 4, 5, 6, 7]], 8)[1])
        with pytest.raises(TrustgenError, match="batch is full"):
            batch.add(decoding_for(model).prefill(model, [[1]], 8)[1])
        decoding_for(model).decode_step(model, torch.tensor([1]), batch)
        with pytest.raises(TrustgenError, match="capacity of 8 tokens"):
            decoding_for(model).decode_step(model, torch.tensor([1]), batch)
