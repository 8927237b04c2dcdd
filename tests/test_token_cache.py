"""Tests of ncn.data.token_cache: fingerprinted uint16 caches, invalidation, damaged meta.json, splits by
tokens, empty documents, byte counts and bits per byte, parallel builds.

Small temporary `.txt` corpora and a temporary cache dir; never ~/.cache.
Run: pytest tests/test_token_cache.py  (offline, a few seconds)
"""

import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ncn.data import token_cache
from ncn.data.sources import TextFiles
from ncn.data.tokenizer import EOT_TOKEN, get_encoding, gpt2_encoding

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


def _prepare(root, cache, tokenizer="gpt2", **kw):
    return token_cache.prepare(TextFiles(str(root)), cache, tokenizer, **kw)


def test_build_contents_and_meta(corpus, tmp_path):
    cache = tmp_path / "cache"
    info = _prepare(corpus, cache, val_fraction=0.25, split_seed=3)
    assert not info.cache_hit
    assert info.cache_dir.parent == cache and info.cache_dir.name == f"text_files-gpt2-{info.meta['fingerprint'][:16]}"
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
    assert meta["bytes"] == {
        "train": sum(len(DOCS[n].encode()) for n in train_names),
        "val": len(DOCS[val_names[0]].encode()),
    }
    assert (info.train_bytes, info.val_bytes) == (meta["bytes"]["train"], meta["bytes"]["val"])
    assert (meta["split"]["documents_found"], meta["split"]["skipped_empty"]) == (4, 0)
    assert meta["split"]["val_document_tokens"] == [len(expected_val)]
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["eot"] == 50256
    assert (meta["split"]["rule"], meta["split"]["seed"]) == ("documents", 3)
    assert meta["version"] == token_cache.CACHE_VERSION
    line = info.summary()
    assert "4 documents (3 train / 1 val)" in line and f"gpt2 tokens train {len(expected_train):,}" in line
    assert f", {meta['text_bytes'] / 1e3:.1f} kB text, tokenized in " in line and line.endswith(str(info.cache_dir))


def test_second_prepare_is_a_fast_hit(corpus, tmp_path):
    first = _prepare(corpus, tmp_path / "cache")
    start = time.perf_counter()
    second = _prepare(corpus, tmp_path / "cache")
    assert time.perf_counter() - start < 1.0
    assert second.cache_hit and second.cache_dir == first.cache_dir and second.meta == first.meta
    assert "cache hit" in second.summary()


def test_changes_invalidate(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    base = _prepare(corpus, cache).cache_dir
    assert _prepare(corpus, cache, val_fraction=0.5).cache_dir != base  # split fraction
    assert _prepare(corpus, cache, split_seed=7).cache_dir != base  # split seed
    assert _prepare(corpus, cache, tokenizer="bytes").cache_dir != base  # tokenizer
    with monkeypatch.context() as m:  # the same tokenizer name built from other inputs
        m.setattr(token_cache, "tokenizer_hash", lambda name: "0" * 64)
        assert _prepare(corpus, cache).cache_dir != base
    (corpus / "b.txt").write_text(DOCS["b.txt"] + "one more line\n", encoding="utf-8")  # content
    changed = _prepare(corpus, cache)
    assert changed.cache_dir != base and not changed.cache_hit
    assert changed.meta["text_bytes"] == sum(len(t.encode()) for t in DOCS.values()) + len("one more line\n")
    (corpus / "b.txt").write_text(DOCS["b.txt"], encoding="utf-8")  # restored content: the old cache again
    again = _prepare(corpus, cache)
    assert again.cache_hit and again.cache_dir == base
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 6


def test_corrupt_cache_and_stale_temp_dir_are_rebuilt(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    info = _prepare(corpus, cache)
    good = _tokens(info.cache_dir / "train.bin")
    with open(info.cache_dir / "train.bin", "r+b") as f:
        f.truncate(100)  # e.g. a full disk
    (cache / f".tmp-{info.cache_dir.name}-999999").mkdir()  # left by a killed build
    capsys.readouterr()
    rebuilt = _prepare(corpus, cache)
    assert not rebuilt.cache_hit and rebuilt.cache_dir == info.cache_dir
    assert np.array_equal(_tokens(rebuilt.cache_dir / "train.bin"), good)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"token cache {info.cache_dir} is invalid (train.bin holds 100 bytes, meta.json says "
        f"{info.train_tokens} tokens): rebuilding"
    )


def _set(meta, dotted, value):
    *path, last = dotted.split(".")
    for key in path:
        meta = meta[key]
    meta[last] = value


def _drop(meta, dotted):
    *path, last = dotted.split(".")
    for key in path:
        meta = meta[key]
    del meta[last]


# Each damage: (id, function of (meta dict, meta.json text) -> bytes written, the reason in the notice).
DAMAGES = [
    ("null", lambda m, t: b"null", "meta.json is null, not an object"),
    ("list", lambda m, t: b"[]", "meta.json is list, not an object"),
    ("empty object", lambda m, t: b"{}", "meta.json.fingerprint is missing"),
    (
        "missing key",
        lambda m, t: (_drop(m, "tokens.val"), json.dumps(m).encode())[1],
        "meta.json.tokens.val is missing",
    ),
    (
        "string count",
        lambda m, t: (_set(m, "tokens.train", "12"), json.dumps(m).encode())[1],
        "meta.json.tokens.train is '12', not an integer >= 0",
    ),
    (
        "bool count",
        lambda m, t: (_set(m, "bytes.val", True), json.dumps(m).encode())[1],
        "meta.json.bytes.val is True, not an integer >= 0",
    ),
    (
        "null section",
        lambda m, t: (_set(m, "split", None), json.dumps(m).encode())[1],
        "meta.json.split is null, not an object",
    ),
    (
        "list of names is a string",
        lambda m, t: (_set(m, "split.val_names", "a.txt"), json.dumps(m).encode())[1],
        "meta.json.split.val_names is str, not a list",
    ),
    ("random bytes", lambda m, t: os.urandom(64) + b"\xff", "meta.json is not JSON"),
    ("truncated", lambda m, t: t[: len(t) // 2], "meta.json is not JSON"),
    (
        "size mismatch",
        lambda m, t: (_set(m, "tokens.val", m["tokens"]["val"] + 1), json.dumps(m).encode())[1],
        "val.bin holds",
    ),
    ("old version", lambda m, t: (_set(m, "version", 1), json.dumps(m).encode())[1], "meta.json has version 1"),
]


@pytest.mark.parametrize("damage", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_damaged_meta_is_rebuilt_with_a_notice(corpus, tmp_path, capsys, damage):
    write, reason = damage
    cache = tmp_path / "cache"
    info = _prepare(corpus, cache)
    meta_path = info.cache_dir / "meta.json"
    meta_path.write_bytes(write(json.loads(meta_path.read_text()), meta_path.read_bytes()))
    with pytest.raises(token_cache.InvalidCache, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        token_cache.PreparedData.read(info.cache_dir, info.meta["fingerprint"])
    capsys.readouterr()
    rebuilt = _prepare(corpus, cache)
    notice = capsys.readouterr().out.splitlines()[0]
    assert notice.startswith(f"token cache {info.cache_dir} is invalid ({reason}") and notice.endswith("): rebuilding")
    assert not rebuilt.cache_hit and rebuilt.cache_dir == info.cache_dir
    assert (rebuilt.train_tokens, rebuilt.val_tokens) == (info.train_tokens, info.val_tokens)
    assert rebuilt.meta["tokens"] == info.meta["tokens"] and rebuilt.meta["bytes"] == info.meta["bytes"]
    assert _tokens(rebuilt.cache_dir / "val.bin").size == info.val_tokens
    again = _prepare(corpus, cache)  # and the repaired cache is used from then on
    assert again.cache_hit and capsys.readouterr().out == ""


def test_single_file_uses_token_tail_split(tmp_path):
    text = "".join(f"Line {i}: a single long document without siblings.\n" for i in range(300))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    source = TextFiles(str(tmp_path / "one.txt"))
    info = token_cache.prepare(source, tmp_path / "cache", "gpt2", val_fraction=0.1)
    all_ids = gpt2_encoding().encode_ordinary(text) + [EOT_TOKEN]
    n_val = math.ceil(0.1 * len(all_ids))
    assert info.meta["split"]["rule"] == "token_tail"
    assert (info.train_tokens, info.val_tokens) == (len(all_ids) - n_val, n_val)
    assert _tokens(info.cache_dir / "train.bin").tolist() + _tokens(info.cache_dir / "val.bin").tolist() == all_ids
    val_text = gpt2_encoding().decode(all_ids[-n_val:-1])
    assert text.endswith(val_text) and info.val_bytes == len(val_text.encode())
    assert info.train_bytes + info.val_bytes == len(text.encode())
    assert info.meta["split"]["val_names"] == ["one.txt"] and info.meta["split"]["order_tokens"] == [len(all_ids)]
    assert "1 document (its last" in info.summary()


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
    dirs, hits, created, train = zip(*out, strict=True)
    assert len(set(dirs)) == 1 and len(set(created)) == 1 and len(set(train)) == 1
    assert sorted(hits) == [False, True]  # one built, the other waited on the lock and reused it
    name = Path(dirs[0]).name
    assert sorted(p.name for p in cache.iterdir()) == [name, f"{name}.lock"]  # no temp dir left
    single = _prepare(root, cache)
    assert single.cache_hit and single.train_tokens == train[0]
    assert _tokens(single.cache_dir / "train.bin").size == train[0]


# ---------------------------------------------------------------- empty documents, split by tokens


def _story(i, n_lines):
    return "".join(f"Story {i}, line {j}: the robot walked on through the quiet town.\n" for j in range(n_lines))


@pytest.fixture
def three_and_empty(tmp_path):
    """The reported corpus: three ~3k-token files and one empty .txt."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"story{i}.txt").write_text(_story(i, 190), encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return root


def test_empty_document_is_never_the_validation_split(three_and_empty, tmp_path):
    enc = gpt2_encoding()
    sizes = {f"story{i}.txt": len(enc.encode_ordinary(_story(i, 190))) + 1 for i in range(3)}
    assert all(3000 < n < 3100 for n in sizes.values())
    for seed in range(8):
        info = _prepare(three_and_empty, tmp_path / "cache", split_seed=seed)
        split = info.meta["split"]
        assert (split["documents_found"], split["skipped_empty"]) == (4, 1)
        assert (split["train_documents"], split["val_documents"]) == (2, 1)
        (name,) = split["val_names"]
        assert info.val_tokens == sizes[name] == split["val_document_tokens"][0]
        assert info.train_tokens == sum(sizes.values()) - sizes[name]
        assert "3 documents (2 train / 1 val), 1 empty skipped" in info.summary()
        assert int((_tokens(info.cache_dir / "train.bin") == EOT_TOKEN).sum()) == 2  # no EOS for the empty file


def test_whitespace_only_documents_are_skipped_and_counted(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    texts = {"a.txt": "Alpha text.\n" * 30, "b.txt": "Beta text here.\n" * 30, "c.txt": "Gamma.\n" * 30}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    for name, blank in {"blank1.txt": "   \n\n\t ", "blank2.txt": "\u3000\u2003\n", "blank3.txt": ""}.items():
        (root / name).write_text(blank, encoding="utf-8")
    info = _prepare(root, tmp_path / "cache", split_seed=1)
    enc = gpt2_encoding()
    split = info.meta["split"]
    assert (split["documents_found"], split["skipped_empty"], split["train_documents"] + split["val_documents"]) == (
        6,
        3,
        3,
    )
    assert info.train_tokens + info.val_tokens == sum(len(enc.encode_ordinary(t)) + 1 for t in texts.values())
    assert info.meta["text_bytes"] == sum(len(t.encode()) for t in texts.values())  # blank bytes are not counted
    assert set(split["val_names"]) <= set(texts)
    assert ", 3 empty skipped" in info.summary()


def test_only_empty_documents_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(token_cache.NCNConfigError, match=r"has no text: its 2 documents are empty or whitespace-only"):
        _prepare(tmp_path, tmp_path / "cache")


@pytest.mark.parametrize(
    "order,fraction,expected",
    [
        ([100, 100, 100, 100], 0.25, 1),
        ([100, 100, 100, 100], 0.5, 2),
        ([10, 1000, 10], 0.05, 1),  # 10 is closer to 50.5 than 1010
        ([10, 1000, 10], 0.5, 1),  # never all documents
        ([1000, 10, 10], 0.05, 1),  # at least one document
        ([100, 100], 0.5, 1),
        ([50, 50, 100], 0.25, 1),  # a tie (50 or 100 from 50): the shorter prefix
    ],
)
def test_val_prefix_is_the_closest_prefix(order, fraction, expected):
    assert token_cache.val_prefix(np.array(order), fraction) == expected


def test_shakespeare_like_rule_keeps_two_plays():
    # The embedded corpus's seeded play order starts with 36,492 and 39,162 tokens of 1,531,559: 2 plays.
    head = [36492, 39162, 49000, 41605] + [40000] * 33
    order = np.array([*head, 1_531_559 - sum(head)])
    assert token_cache.val_prefix(order, 0.05) == 2


def _prepared(order, rule="documents", val_tokens=0, train_tokens=0):
    meta = {"split": {"rule": rule, "order_tokens": order}}
    return token_cache.PreparedData(Path("x"), train_tokens, val_tokens, 0, 0, meta)


def test_val_fraction_for_finds_the_smallest_fraction_that_fits_both_splits():
    info = _prepared([8, 22, 3000, 3000])
    # need 65: [8] and [8, 22] are too short, [8, 22, 3000] first fits: 3030 of 6030 is reached from 0.26
    # (0.26 * 6030 = 1567.8 is closer to 3030 than to 30).
    assert info.val_fraction_for(65) == 0.26
    assert token_cache.val_prefix(np.array([8, 22, 3000, 3000]), 0.26) == 3
    assert token_cache.val_prefix(np.array([8, 22, 3000, 3000]), 0.25) == 2
    assert info.val_fraction_for(3001) is None  # train would be too short
    assert _prepared([1000], rule="token_tail").val_fraction_for(65) == 0.07  # ceil(0.07 * 1000) = 70 >= 65
    assert _prepared([10, 10], rule="source").val_fraction_for(5) is None
    assert _prepared([]).val_fraction_for(5) is None  # a large corpus: no per-document counts in meta.json


# ---------------------------------------------------------------- bytes, tokenizers, bits per byte


def test_byte_tokenizer_cache_counts_bytes_and_tokens(corpus, tmp_path):
    gpt2 = _prepare(corpus, tmp_path / "cache", val_fraction=0.25, split_seed=3)
    info = _prepare(corpus, tmp_path / "cache", tokenizer="bytes", val_fraction=0.25, split_seed=3)
    assert info.cache_dir.name.startswith("text_files-bytes-") and info.cache_dir != gpt2.cache_dir
    assert info.meta["tokenizer"]["name"] == "bytes" and info.meta["tokenizer"]["eot"] == 256
    val_names = info.meta["split"]["val_names"]
    expected_val = list(DOCS[val_names[0]].encode()) + [256]
    assert _tokens(info.cache_dir / "val.bin").tolist() == expected_val
    split = info.meta["split"]
    assert info.val_tokens == info.val_bytes + split["val_documents"]  # one id per byte, plus EOS per document
    assert info.train_tokens == info.train_bytes + split["train_documents"]
    assert info.val_bytes == len(DOCS[val_names[0]].encode())
    assert info.meta["text_bytes"] == gpt2.meta["text_bytes"] == sum(len(t.encode()) for t in DOCS.values())
    ce = 0.9
    assert info.bits_per_byte(ce) == pytest.approx(ce / math.log(2) * (info.val_bytes + 1) / info.val_bytes)
    assert "bytes tokens train" in info.summary()


def test_bits_per_byte_of_gpt2_cache(corpus, tmp_path):
    info = _prepare(corpus, tmp_path / "cache", val_fraction=0.25, split_seed=3)
    val_text = DOCS[info.meta["split"]["val_names"][0]]
    assert info.val_bytes == len(val_text.encode())
    expected = 2.0 * (len(gpt2_encoding().encode_ordinary(val_text)) + 1) / (math.log(2) * len(val_text.encode()))
    assert info.bits_per_byte(2.0) == pytest.approx(expected, rel=1e-12)
    assert info.bits_per_byte(0.0) == 0.0


def test_unknown_tokenizer_is_refused(corpus, tmp_path):
    with pytest.raises(token_cache.NCNConfigError, match="data.tokenizer=latin1 is unknown"):
        _prepare(corpus, tmp_path / "cache", tokenizer="latin1")


def test_cache_hit_builds_no_tokenizer_and_imports_no_datasets(corpus, tmp_path):
    cache = tmp_path / "cache"
    _prepare(corpus, cache)
    get_encoding.cache_clear()
    assert _prepare(corpus, cache).cache_hit
    assert get_encoding.cache_info().currsize == 0
    code = (
        "import sys; from ncn.data import token_cache; from ncn.data.sources import TextFiles\n"
        f"info = token_cache.prepare(TextFiles({str(corpus)!r}), {str(cache)!r}, 'gpt2')\n"
        "print(info.cache_hit, sorted(m for m in ('datasets', 'pyarrow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.split("\n")[-2] == "True []"
