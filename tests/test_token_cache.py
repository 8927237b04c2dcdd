"""Tests of ncn.token_cache: fingerprinted uint16 caches, invalidation, splits, parallel builds.

Small temporary `.txt` corpora and a temporary cache dir; never ~/.cache.
Run: pytest tests/test_token_cache.py  (offline, a few seconds)
"""

import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from ncn import token_cache
from ncn.sources import TextFiles
from ncn.tokenizer import EOT_TOKEN, gpt2_encoding

DOCS = {
    "a.txt": "The first story is about a cat.\nIt sat on the mat, and purred.\n" * 40,
    "b.txt": "Ünïcödé in the second document — café, 日本語.\n" * 30,
    "nested/c.txt": "A third text, in a subfolder, which the recursive search must find.\n" * 50,
    "nested/deeper/d.txt": "Fourth: numbers 12345 and symbols #*_ stay as they are in user text.\n" * 20,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "texts"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "notes.md").write_text("not a .txt file")
    return root


def _tokens(path):
    return np.fromfile(path, dtype=np.uint16)


def _prepare(root, cache, **kw):
    return token_cache.prepare(TextFiles(str(root)), cache, gpt2_encoding(), **kw)


def test_build_contents_and_meta(corpus, tmp_path):
    cache = tmp_path / "cache"
    info = _prepare(corpus, cache, val_fraction=0.25, split_seed=3)
    assert not info.cache_hit
    assert info.cache_dir.parent == cache and info.cache_dir.name == f"text_files-{info.meta['fingerprint'][:16]}"
    meta = json.loads((info.cache_dir / "meta.json").read_text())
    assert meta == info.meta
    assert sorted(p.name for p in info.cache_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    enc = gpt2_encoding()
    # 4 documents, 25 % -> 1 whole document in val, chosen by the seed; the rest in file order.
    val_names = meta["split"]["val_names"]
    assert (meta["split"]["train_documents"], meta["split"]["val_documents"], len(val_names)) == (3, 1, 1)
    train_names = [n for n in sorted(DOCS) if n not in val_names]
    expected_train = [t for n in train_names for t in enc.encode_ordinary(DOCS[n]) + [EOT_TOKEN]]
    expected_val = enc.encode_ordinary(DOCS[val_names[0]]) + [EOT_TOKEN]
    assert _tokens(info.cache_dir / "train.bin").tolist() == expected_train
    assert _tokens(info.cache_dir / "val.bin").tolist() == expected_val
    assert meta["tokens"] == {"train": len(expected_train), "val": len(expected_val)}
    assert (info.train_tokens, info.val_tokens) == (len(expected_train), len(expected_val))
    assert meta["text_bytes"] == sum(len(t.encode()) for t in DOCS.values())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["eot"] == 50256
    assert (meta["split"]["rule"], meta["split"]["seed"]) == ("documents", 3)
    assert meta["version"] == token_cache.CACHE_VERSION
    line = info.summary()
    assert "4 documents (3 train / 1 val)" in line and f"train {len(expected_train):,}" in line
    assert line.endswith(str(info.cache_dir))


def test_second_prepare_is_a_fast_hit(corpus, tmp_path):
    first = _prepare(corpus, tmp_path / "cache")
    start = time.perf_counter()
    second = _prepare(corpus, tmp_path / "cache")
    assert time.perf_counter() - start < 1.0
    assert second.cache_hit and second.cache_dir == first.cache_dir and second.meta == first.meta
    assert "cache hit" in second.summary()


def test_changes_invalidate(corpus, tmp_path):
    cache = tmp_path / "cache"
    base = _prepare(corpus, cache).cache_dir
    assert _prepare(corpus, cache, val_fraction=0.5).cache_dir != base  # split fraction
    assert _prepare(corpus, cache, split_seed=7).cache_dir != base  # split seed
    enc = gpt2_encoding()
    other = tiktoken.Encoding(
        name="gpt2-other",
        pat_str=enc._pat_str,
        mergeable_ranks=enc._mergeable_ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    assert token_cache.prepare(TextFiles(str(corpus)), cache, other).cache_dir != base  # tokenizer
    (corpus / "b.txt").write_text(DOCS["b.txt"] + "one more line\n", encoding="utf-8")  # content
    changed = _prepare(corpus, cache)
    assert changed.cache_dir != base and not changed.cache_hit
    assert changed.meta["text_bytes"] == sum(len(t.encode()) for t in DOCS.values()) + len("one more line\n")
    (corpus / "b.txt").write_text(DOCS["b.txt"], encoding="utf-8")  # restored content: the old cache again
    again = _prepare(corpus, cache)
    assert again.cache_hit and again.cache_dir == base
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 5


def test_corrupt_cache_and_stale_temp_dir_are_rebuilt(corpus, tmp_path):
    cache = tmp_path / "cache"
    info = _prepare(corpus, cache)
    good = _tokens(info.cache_dir / "train.bin")
    with open(info.cache_dir / "train.bin", "r+b") as f:
        f.truncate(100)  # e.g. a full disk
    (cache / f".tmp-{info.cache_dir.name}-999999").mkdir()  # left by a killed build
    rebuilt = _prepare(corpus, cache)
    assert not rebuilt.cache_hit and rebuilt.cache_dir == info.cache_dir
    assert np.array_equal(_tokens(rebuilt.cache_dir / "train.bin"), good)


def test_single_file_uses_token_tail_split(tmp_path):
    text = "".join(f"Line {i}: a single long document without siblings.\n" for i in range(300))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    source = TextFiles(str(tmp_path / "one.txt"))
    info = token_cache.prepare(source, tmp_path / "cache", gpt2_encoding(), val_fraction=0.1)
    all_ids = gpt2_encoding().encode_ordinary(text) + [EOT_TOKEN]
    n_val = math.ceil(0.1 * len(all_ids))
    assert info.meta["split"]["rule"] == "token_tail"
    assert (info.train_tokens, info.val_tokens) == (len(all_ids) - n_val, n_val)
    assert _tokens(info.cache_dir / "train.bin").tolist() + _tokens(info.cache_dir / "val.bin").tolist() == all_ids


def test_seeded_document_split_is_deterministic(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document number {i}\n", encoding="utf-8")
    names = {}
    for seed in (0, 0, 1):
        info = _prepare(root, tmp_path / f"cache{seed}", val_fraction=0.05, split_seed=seed)
        assert (info.meta["split"]["train_documents"], info.meta["split"]["val_documents"]) == (38, 2)
        names.setdefault(seed, info.meta["split"]["val_names"])
        assert info.meta["split"]["val_names"] == names[seed]
    expected = [f"doc{i:02d}.txt" for i in sorted(np.random.default_rng(0).permutation(40)[:2])]
    assert names[0] == expected and names[1] != names[0]


def _race_worker(root, cache, barrier, results):
    barrier.wait()  # both processes start preparing the cold cache at the same moment
    info = _prepare(root, cache, num_proc=1)
    results.put((str(info.cache_dir), info.cache_hit, info.meta["created"], info.train_tokens))


def test_two_processes_build_one_cache(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    for i in range(60):  # ~3 MB: building takes long enough for the two processes to overlap
        (root / f"part{i:02d}.txt").write_text(f"Chapter {i}. " + "All work and no play makes a dull model. " * 1200)
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")  # datasets and the tokenizer are already imported here
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(root, cache, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    dirs, hits, created, train = zip(*out)
    assert len(set(dirs)) == 1 and len(set(created)) == 1 and len(set(train)) == 1
    assert sorted(hits) == [False, True]  # one built, the other waited on the lock and reused it
    name = Path(dirs[0]).name
    assert sorted(p.name for p in cache.iterdir()) == [name, f"{name}.lock"]  # no temp dir left
    single = _prepare(root, cache)
    assert single.cache_hit and single.train_tokens == train[0]
    assert _tokens(single.cache_dir / "train.bin").size == train[0]
