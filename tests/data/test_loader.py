"""The token loader: (x, y) shift, epochs that visit every window once, determinism, bit-exact resume,
disjoint ranks whose union is the one-rank stream, the weighted mixture, val batches and bad input.

The shards hold consecutive integers, so a row is identified by its first token and a correct row has
x[t + 1] == x[t] + 1 == y[t].
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ember.common import artifacts
from ember.common.errors import UserError
from ember.data.loader import MixtureLoader, TokenLoader, open_loader, val_batches

T = 16


def make_tokens(folder, shards: dict[str, list[np.ndarray]], tokenizer_sha="abc", vocab=65536):
    """A token folder in the format `ember tokenize` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, arrays in shards.items():
        files = []
        for i, a in enumerate(arrays):
            name = f"{split}_{i:05d}.bin"
            a.astype(np.uint16).tofile(folder / name)
            files.append({"file": name, "tokens": len(a), "documents": 1})
        splits[split] = {"shards": files, "tokens": sum(len(a) for a in arrays), "documents": len(arrays)}
    artifacts.write_json(folder / "meta.json", {"dtype": "uint16", "vocab_size": vocab, "eos_id": 1,
                                                "tokenizer_sha256": tokenizer_sha, "splits": splits})
    return folder


@pytest.fixture
def tokens(tmp_path):
    # train: two shards of 10 and 14 windows (+ a 5-token tail that no window uses); val: 8 windows
    return make_tokens(tmp_path / "a", {"train": [np.arange(0, 10 * T + 1), np.arange(1000, 1000 + 14 * T + 5)],
                                        "val": [np.arange(5000, 5000 + 8 * T + 1)]})


def starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def check_rows(x, y):
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
    assert torch.equal(y, x + 1)  # targets = inputs shifted by one token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # a window never crosses a shard boundary


def all_window_starts():
    return sorted([i * T for i in range(10)] + [1000 + i * T for i in range(14)])


def test_batches_are_shifted_windows_and_an_epoch_visits_each_once(tokens):
    loader = TokenLoader(tokens, "train", batch_size=4, seq_len=T, seed=0)
    assert loader.data.n_windows == 24 and loader.vocab_size == 65536
    seen = []
    for _ in range(6):  # 6 x 4 = 24 windows = one epoch
        x, y = loader.next_batch()
        assert x.shape == (4, T)
        check_rows(x, y)
        seen += starts(x)
    assert sorted(seen) == all_window_starts()
    assert loader.epoch == 1.0
    nxt = [starts(loader.next_batch()[0]) for _ in range(6)]
    assert sorted(sum(nxt, [])) == all_window_starts() and sum(nxt, []) != seen  # epoch 2: a new order


def test_deterministic_for_a_seed(tokens):
    run = lambda seed: [starts(TokenLoader(tokens, batch_size=3, seq_len=T, seed=seed).next_batch()[0])]
    a = TokenLoader(tokens, batch_size=3, seq_len=T, seed=7)
    b = TokenLoader(tokens, batch_size=3, seq_len=T, seed=7)
    assert all(torch.equal(a.next_batch()[0], b.next_batch()[0]) for _ in range(20))
    assert run(1) != run(2)


@pytest.mark.parametrize("n", [0, 3, 7, 13])
def test_resume_reproduces_the_following_batches_bit_exactly(tokens, n):
    ref = TokenLoader(tokens, batch_size=5, seq_len=T, seed=3)
    for _ in range(n):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # as saved in a checkpoint (JSON)
    expected = [ref.next_batch() for _ in range(8)]  # crosses epoch boundaries (24 windows / 5 per batch)
    resumed = TokenLoader(tokens, batch_size=5, seq_len=T, seed=3)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_their_union_is_the_single_rank_stream(tokens, world):
    B = 2
    single = TokenLoader(tokens, batch_size=B, seq_len=T, seed=5)
    ranks = [TokenLoader(tokens, batch_size=B, seq_len=T, seed=5, rank=r, world_size=world) for r in range(world)]
    for step in range(10):  # 10 * world * 2 windows: several epochs
        per_rank = [starts(l.next_batch()[0]) for l in ranks]
        one = sum((starts(single.next_batch()[0]) for _ in range(world)), [])
        assert sum(per_rank, []) == one  # union over ranks at step s = one rank's next `world` batches
        if step < 24 // (B * world):  # inside the first epoch: no window is seen twice across ranks
            flat = sum(per_rank, [])
            assert len(set(flat)) == len(flat)


def test_resume_with_another_world_size(tokens):
    """The cursor is global: a 2-rank checkpoint resumes on 1 rank at the same place of the stream."""
    two = [TokenLoader(tokens, batch_size=2, seq_len=T, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for l in two:
            l.next_batch()
    one = TokenLoader(tokens, batch_size=2, seq_len=T, seed=1)
    one.load_state_dict(two[0].state_dict())
    ref = TokenLoader(tokens, batch_size=2, seq_len=T, seed=1)
    for _ in range(6):
        ref.next_batch()
    assert torch.equal(one.next_batch()[0], ref.next_batch()[0])


def test_state_of_other_data_is_refused(tokens, tmp_path):
    other = make_tokens(tmp_path / "b", {"train": [np.arange(0, 30 * T + 1)]})
    state = TokenLoader(tokens, batch_size=2, seq_len=T).state_dict()
    with pytest.raises(UserError, match="n_windows"):
        TokenLoader(other, batch_size=2, seq_len=T).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        TokenLoader(tokens, batch_size=2, seq_len=T, seed=9).load_state_dict(state)


# ---------------------------------------------------------------------------- mixture

@pytest.fixture
def mixture_folders(tmp_path):
    a = make_tokens(tmp_path / "a", {"train": [np.arange(0, 200 * T + 1)]})
    b = make_tokens(tmp_path / "b", {"train": [np.arange(20000, 20000 + 200 * T + 1)]})
    return a, b


def mixture(folders, weights, B=8, rank=0, world=1, seed=0):
    return MixtureLoader([(TokenLoader(f, batch_size=B, seq_len=T, seed=seed, rank=rank, world_size=world), w)
                          for f, w in zip(folders, weights)], seed=seed)


def test_mixture_follows_weights(mixture_folders):
    mix = mixture(mixture_folders, [0.7, 0.3])
    rows = torch.cat([mix.next_batch()[0] for _ in range(50)])  # 400 rows
    check_rows(rows, rows + 1)
    share_a = (rows[:, 0] < 20000).float().mean().item()
    assert 0.62 < share_a < 0.78
    # each source's rows are that source's own stream, in order, without repeats
    a_rows = [s for s in starts(rows) if s < 20000]
    ref = TokenLoader(mixture_folders[0], batch_size=len(a_rows), seq_len=T, seed=0)
    assert a_rows == starts(ref.next_batch()[0])


def test_mixture_resume_and_ranks(mixture_folders):
    ref = mixture(mixture_folders, [0.5, 0.5])
    for _ in range(4):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [ref.next_batch()[0] for _ in range(5)]
    resumed = mixture(mixture_folders, [0.5, 0.5])
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()[0], x) for x in expected)
    # two ranks with batch 4 = the two halves of one rank with batch 8
    single = mixture(mixture_folders, [0.5, 0.5], B=8)
    ranks = [mixture(mixture_folders, [0.5, 0.5], B=4, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        x = single.next_batch()[0]
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), x)
    with pytest.raises(UserError, match="weights"):
        mixture(mixture_folders, [0.2, 0.8]).load_state_dict(state)


def test_mixture_refuses_different_tokenizers(tmp_path):
    a = make_tokens(tmp_path / "a", {"train": [np.arange(0, 4 * T + 1)]}, tokenizer_sha="one")
    b = make_tokens(tmp_path / "b", {"train": [np.arange(0, 4 * T + 1)]}, tokenizer_sha="two")
    with pytest.raises(UserError, match="different tokenizers"):
        open_loader([a, b], [1, 1], batch_size=2, seq_len=T)


def test_open_loader(mixture_folders):
    assert isinstance(open_loader(mixture_folders[0], batch_size=2, seq_len=T), TokenLoader)
    mix = open_loader(list(mixture_folders), [3, 1], batch_size=2, seq_len=T)
    assert isinstance(mix, MixtureLoader) and mix.weights.tolist() == [0.75, 0.25] and mix.vocab_size == 65536


# ---------------------------------------------------------------------------- val and bad input

def test_val_batches_are_fixed_and_split_over_ranks(tokens):
    a = [starts(x) for x, y in val_batches(tokens, 2, T)]
    assert a == [starts(x) for x, y in val_batches(tokens, 2, T)]  # the same every call
    assert sum(a, []) == [5000 + i * T for i in range(8)]  # every window once, in order
    r = [[starts(x) for x, _ in val_batches(tokens, 2, T, rank=k, world_size=2)] for k in range(2)]
    assert sorted(sum(sum(r, []), [])) == sum(a, []) and len(r[0]) == len(r[1]) == 2
    assert len(list(val_batches(tokens, 2, T, max_batches=3))) == 3
    x, y = next(val_batches(tokens, 100, T))  # more than the split holds: one smaller batch
    assert x.shape == (8, T)
    check_rows(x, y)


def test_val_batches_of_several_folders_take_turns(tokens, tmp_path):
    other = make_tokens(tmp_path / "b", {"val": [np.arange(9000, 9000 + 2 * T + 1)]})
    got = [starts(x)[0] for x, _ in val_batches([tokens, other], 2, T)]
    assert got == [5000, 9000, 5000 + 2 * T, 5000 + 4 * T, 5000 + 6 * T]


def test_bad_token_folders(tmp_path, tokens):
    with pytest.raises(UserError, match="no token shards"):
        TokenLoader(tmp_path / "nothing")
    with pytest.raises(UserError, match="fewer than seq_len"):
        TokenLoader(tokens, seq_len=10_000)
    with pytest.raises(UserError, match="no split 'test'"):
        TokenLoader(tokens, "test", seq_len=T)
    with pytest.raises(UserError, match="rank"):
        TokenLoader(tokens, seq_len=T, rank=2, world_size=2)
    with open(tokens / "train_00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="truncated"):
        TokenLoader(tokens, seq_len=T)


def test_accepts_the_stage_folder(tokens, tmp_path):
    stage = tmp_path / "run" / "tokenize"
    stage.mkdir(parents=True)
    tokens.rename(stage / "tokens")
    assert TokenLoader(stage, seq_len=T).data.n_windows == 24
