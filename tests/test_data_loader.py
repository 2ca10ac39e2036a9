"""TokenLoader and Dataset.open: windows, exact resume, disjoint DDP ranks, checksums, tokenizer check.

The datasets here are synthetic token streams written with `write_dataset`, in which every
non-EOT token is distinct, so a window's first token says where in the stream it starts.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.data.loader import TokenLoader
from scratchlm.data.shards import Dataset, write_dataset
from scratchlm.errors import UserError

VOCAB = 1 << 16
EOT = VOCAB - 1
FINGERPRINT = "ab" * 32


def make_docs(rng, n_docs, start=0, max_len=40):
    docs, next_id = [], start
    for _ in range(n_docs):
        length = int(rng.integers(1, max_len))
        docs.append(np.arange(next_id, next_id + length))
        next_id += length
    return docs, next_id


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    train, end = make_docs(rng, 150)
    val, _ = make_docs(rng, 20, start=end)
    out = tmp_path_factory.mktemp("ds")
    # Small shards so windows cross shard boundaries.
    return write_dataset(out, {"train": train, "val": val}, vocab_size=VOCAB, eot_id=EOT,
                         tokenizer_sha256=FINGERPRINT, shard_tokens=333)


def stream(dataset, split="train"):
    return dataset.tokens(split).astype(np.int64)


_positions: dict = {}


def window_starts(dataset, inputs):
    """Stream position of each row, found through the row's first non-EOT token."""
    if dataset.path not in _positions:
        _positions[dataset.path] = {int(t): i for i, t in enumerate(stream(dataset)) if t != EOT}
    position = _positions[dataset.path]
    starts = []
    for row in inputs.tolist():
        k = next(i for i, t in enumerate(row) if t != EOT)
        starts.append(position[row[k]] - k)
    return starts


def test_shards_form_the_written_stream(dataset):
    rng = np.random.default_rng(0)
    train, _ = make_docs(rng, 150)
    expected = np.concatenate([np.concatenate([[EOT], d]) for d in train])
    assert np.array_equal(stream(dataset), expected)
    assert [d.tolist() for d in dataset.iter_documents("train")] == [d.tolist() for d in train]
    assert len(dataset.shard_records("train")) > 3
    assert dataset.num_docs("train") == 150
    assert dataset.index["dtype"] == "uint16"


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_windows_are_slices_of_the_stream(dataset, mode):
    s = stream(dataset)
    loader = TokenLoader(dataset, seq_len=16, batch_size=4, mode=mode, seed=3)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (4, 16) and y.shape == (4, 16)
        for row_x, row_y, start in zip(x, y, window_starts(dataset, x)):
            assert torch.equal(row_x, torch.from_numpy(s[start:start + 16]))
            assert torch.equal(row_y, torch.from_numpy(s[start + 1:start + 17]))


@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_gives_identical_batches(dataset, mode, world_size):
    def loaders():
        return [TokenLoader(dataset, seq_len=8, batch_size=5, mode=mode, seed=7, rank=r,
                            world_size=world_size, with_doc_ids=True) for r in range(world_size)]

    straight = loaders()
    # Long enough to cross several epoch boundaries (the stream holds ~4,000 tokens).
    reference = [[tuple(t.clone() for t in ld.next_batch()) for _ in range(60)] for ld in straight]
    first = loaders()
    for ld in first:
        for _ in range(23):
            ld.next_batch()
    states = [json.loads(json.dumps(ld.state_dict())) for ld in first]
    assert all(s == states[0] for s in states)  # ranks share one state
    resumed = loaders()
    for ld, state in zip(resumed, states):
        ld.load_state_dict(state)
        for step in range(23, 60):
            batch = ld.next_batch()
            for got, want in zip(batch, reference[ld.rank][step]):
                assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_see_disjoint_windows_covering_an_epoch(dataset, mode):
    world, batch, seq = 3, 2, 10
    loaders = [TokenLoader(dataset, seq_len=seq, batch_size=batch, mode=mode, seed=1, rank=r,
                           world_size=world) for r in range(world)]
    per_epoch = loaders[0].windows_in_epoch(0)
    seen = {r: [] for r in range(world)}
    step = 0
    while loaders[0].epoch == 0:
        for ld in loaders:
            x, _ = ld.next_batch()
            for b, start in enumerate(window_starts(dataset, x)):
                if step * batch * world + b * world + ld.rank < per_epoch:  # epoch 0 slots
                    seen[ld.rank].append(start)
        step += 1
    sets = [set(v) for v in seen.values()]
    for a in range(world):
        for b in range(a + 1, world):
            assert not sets[a] & sets[b]
    all_starts = sorted(s for v in seen.values() for s in v)
    assert len(all_starts) == len(set(all_starts))  # no window twice within the epoch
    offsets = {s % seq for s in all_starts}
    assert len(offsets) == 1  # one grid per epoch: windows never overlap
    assert len(all_starts) == per_epoch
    assert per_epoch >= (len(stream(dataset)) - 1) // seq - 1  # at most one window lost to the offset
    if mode == "sequential":
        assert all_starts == list(range(0, per_epoch * seq, seq))


def test_random_mode_reshuffles_each_epoch(dataset):
    loader = TokenLoader(dataset, seq_len=64, batch_size=1, mode="random", seed=5)
    epochs = {}
    while loader.epoch < 3:
        e = loader.epoch
        epochs.setdefault(e, []).extend(window_starts(dataset, loader.next_batch()[0]))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    other = TokenLoader(dataset, seq_len=64, batch_size=5, mode="random", seed=6)
    assert window_starts(dataset, other.next_batch()[0]) != epochs[0][:5]


def test_doc_ids_number_documents_inside_each_window(dataset):
    loader = TokenLoader(dataset, seq_len=32, batch_size=4, with_doc_ids=True)
    x, _, doc_ids = loader.next_batch()
    for row, ids in zip(x.tolist(), doc_ids.tolist()):
        expected, current = [], 0
        for token in row:
            current += token == EOT  # the EOT opens the next document
            expected.append(current)
        assert ids == expected


def test_verify_tokenizer(dataset):
    loader = TokenLoader(dataset, seq_len=8, batch_size=1)
    loader.verify_tokenizer(FINGERPRINT, VOCAB)
    loader.verify_tokenizer(FINGERPRINT, VOCAB + 64)  # a padded embedding is fine
    with pytest.raises(UserError, match="tokenized with tokenizer"):
        loader.verify_tokenizer("cd" * 32, VOCAB)
    with pytest.raises(UserError, match="vocab_size"):
        loader.verify_tokenizer(FINGERPRINT, VOCAB - 1)


def test_state_from_another_sequence_is_refused(dataset):
    state = TokenLoader(dataset, seq_len=8, batch_size=1, seed=1).state_dict()
    with pytest.raises(UserError, match="seed"):
        TokenLoader(dataset, seq_len=8, batch_size=1, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="seq_len"):
        TokenLoader(dataset, seq_len=9, batch_size=1, seed=1).load_state_dict(state)


def test_split_too_small_for_one_window(dataset):
    with pytest.raises(UserError, match="fewer than one window"):
        TokenLoader(dataset, split="val", seq_len=10_000, batch_size=1)
    with pytest.raises(UserError, match="rank"):
        TokenLoader(dataset, rank=2, world_size=2)


def _copy(dataset, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(dataset.path, target)
    return target


def test_corrupted_shard_fails_checksum(dataset, tmp_path):
    path = _copy(dataset, tmp_path)
    shard = path / dataset.index["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[11] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        Dataset.open(path)
    with pytest.raises(UserError, match="checksum"):
        TokenLoader(path, seq_len=8, batch_size=1)


def test_truncated_or_missing_shard_is_detected(dataset, tmp_path):
    path = _copy(dataset, tmp_path)
    shard = path / dataset.index["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        Dataset.open(path, verify=False)
    shard.unlink()
    with pytest.raises(UserError, match="missing"):
        Dataset.open(path)


def test_directory_without_complete_index_is_refused(dataset, tmp_path):
    path = _copy(dataset, tmp_path)
    (path / "index.json").unlink()
    with pytest.raises(UserError, match="not a complete dataset"):
        Dataset.open(path)
    (path / "index.json").write_text('{"version": 1, "dtype": "uint16"')
    with pytest.raises(UserError, match="not valid JSON"):
        Dataset.open(path)
    (path / "index.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(UserError, match="field"):
        Dataset.open(path)


@settings(max_examples=15, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 69_998), max_size=30), min_size=1, max_size=12),
       shard_tokens=st.integers(3, 50))
def test_shard_writer_cuts_one_stream_at_a_fixed_size(docs, shard_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        ds = write_dataset(tmp, {"train": docs}, vocab_size=70_000, eot_id=69_999,
                           tokenizer_sha256=FINGERPRINT, shard_tokens=shard_tokens)
        ds = Dataset.open(tmp)  # checksums as written
        assert ds.index["dtype"] == "uint32"
        sizes = [r["tokens"] for r in ds.shard_records("train")]
        assert all(size == shard_tokens for size in sizes[:-1]) and 0 < sizes[-1] <= shard_tokens
        expected = [t for doc in docs for t in [69_999, *doc]]
        assert ds.tokens("train").tolist() == expected
        assert [d.tolist() for d in ds.iter_documents("train")] == docs
        assert sum(r["docs"] for r in ds.shard_records("train")) == len(docs)
