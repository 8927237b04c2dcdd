"""Token cache: a source tokenized once into `train.bin`/`val.bin` (uint16) + `meta.json`.

The directory `<cache_root>/<source>-<fingerprint[:16]>/` is keyed on the source
content, the split rule, the tokenizer and `CACHE_VERSION`; it is built in a temporary
directory under a file lock and renamed into place, so parallel jobs build it once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import filelock
import numpy as np
import pyarrow.compute as pc
import tiktoken

from ncn.errors import NCNConfigError
from ncn.sources import Corpus, Source
from ncn.tokenizer import tokenizer_hash

# Bump when the bytes a cache holds change for the same inputs (cleaning, EOS rule, layout).
CACHE_VERSION = 1
TOKEN_DTYPE = np.uint16  # GPT-2 ids < 65536: half the disk and page cache of int32
_NAMES_IN_META = 1000  # list document names in meta.json only for small corpora
_DOCS_PER_PROCESS = 10_000  # "auto" num_proc: at least this many documents per process


@dataclass(frozen=True)
class PreparedData:
    """A ready token cache.

    Attributes:
        cache_dir: the directory holding train.bin, val.bin, meta.json.
        train_tokens, val_tokens: token counts of the two files (EOS included).
        meta: the parsed meta.json.
        cache_hit: True when an existing cache was verified instead of built.
    """

    cache_dir: Path
    train_tokens: int
    val_tokens: int
    meta: dict = field(repr=False)
    cache_hit: bool = False

    def summary(self) -> str:
        """One line for the user: documents, tokens, MB, seconds, cache path."""
        m = self.meta
        docs = m["split"]
        took = f"{m['seconds']:.1f} s"
        action = f"cache hit (built in {took})" if self.cache_hit else f"tokenized in {took}"
        return (
            f"data {m['source']['name']}: {docs['train_documents'] + docs['val_documents']:,} documents "
            f"({docs['train_documents']:,} train / {docs['val_documents']:,} val), "
            f"tokens train {self.train_tokens:,} / val {self.val_tokens:,}, "
            f"{m['text_bytes'] / 1e6:.1f} MB text, {action} -> {self.cache_dir}"
        )


def cache_key(source_fingerprint: str, split_rule: dict, encoding: tiktoken.Encoding) -> str:
    """sha256 (hex) of everything that decides the cache's bytes."""
    key = {
        "source": source_fingerprint,
        "split": split_rule,
        "tokenizer": [encoding.name, tokenizer_hash(encoding.name)],
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _verified(cache_dir: Path, key: str) -> PreparedData | None:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        counts = meta["tokens"]
        itemsize = np.dtype(TOKEN_DTYPE).itemsize
        sizes_ok = all((cache_dir / f"{s}.bin").stat().st_size == counts[s] * itemsize for s in ("train", "val"))
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("fingerprint") != key or not sizes_ok:
        return None
    return PreparedData(cache_dir, counts["train"], counts["val"], meta, cache_hit=True)


def _encode_batch(batch: dict[str, list], encoding: tiktoken.Encoding, text_column: str, eot: int) -> dict[str, list]:
    ids = encoding.encode_ordinary_batch(batch[text_column])
    for doc in ids:
        doc.append(eot)  # EOS after every document, as GPT-2 was trained
    return {"ids": ids}


def _tokenize(
    ds: datasets.Dataset, text_column: str, encoding: tiktoken.Encoding, num_proc: int | None, out: Path, key: str
) -> datasets.Dataset:
    if num_proc is None:
        # tiktoken's batch encoder already runs on threads; extra processes pay off only
        # when converting many documents to Arrow (measured: 38 plays 0.7 s with 1, 1.3 s with 2).
        num_proc = max(1, min(os.cpu_count() or 1, 8, len(ds) // _DOCS_PER_PROCESS))
    return ds.map(
        _encode_batch,
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        fn_kwargs={"encoding": encoding, "text_column": text_column, "eot": encoding.eot_token},
        features=datasets.Features({"ids": datasets.Sequence(datasets.Value("uint16"))}),
        cache_file_name=str(out),
        new_fingerprint=f"{key[:32]}-{out.stem}",  # our key, not a hash of the function
        desc=f"tokenizing {out.stem}",
    )


def _count_tokens(tokens: datasets.Dataset) -> int:
    return int(pc.sum(pc.list_value_length(tokens.data.column("ids"))).as_py() or 0)


def _write_tokens(tokens: datasets.Dataset, path: Path, start: int, stop: int) -> int:
    """Write tokens[start:stop] of the concatenated "ids" lists to `path`; return the count."""
    if stop <= start:
        path.touch()
        return 0
    out = np.memmap(path, dtype=TOKEN_DTYPE, mode="w+", shape=(stop - start,))
    offset = 0
    for chunk in tokens.data.column("ids").chunks:  # chunk by chunk: the corpus may not fit in memory
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        lo, hi = max(start, offset), min(stop, offset + len(flat))
        if hi > lo:
            out[lo - start : hi - start] = flat[lo - offset : hi - offset]
        offset += len(flat)
    out.flush()
    return stop - start


def _text_bytes(ds: datasets.Dataset | None, column: str) -> int:
    return 0 if ds is None else int(pc.sum(pc.binary_length(ds.data.column(column))).as_py() or 0)


def _split_documents(
    corpus: Corpus, val_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict]:
    """Train/val documents: the source's own split, else whole documents chosen with `seed`."""
    n = len(corpus.documents)
    if corpus.validation is not None:
        return corpus.documents, corpus.validation, {"train_documents": n, "val_documents": len(corpus.validation)}
    if n == 1:
        return corpus.documents, None, {"train_documents": 1, "val_documents": 0}
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val_idx = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    info = {"train_documents": n - n_val, "val_documents": n_val}
    if corpus.names is not None and n <= _NAMES_IN_META:
        info["val_names"] = [corpus.names[i] for i in val_idx]
    return corpus.documents.select(train_idx), corpus.documents.select(val_idx), info


def _build(
    source: Source,
    source_fp: str,
    tmp: Path,
    key: str,
    split_rule: dict,
    encoding: tiktoken.Encoding,
    num_proc: int | None,
) -> dict:
    start = time.perf_counter()
    scratch = tmp / "scratch"
    scratch.mkdir()
    corpus = source.load(scratch)
    if len(corpus.documents) == 0:
        raise NCNConfigError(f"data source {source.describe()} has 0 documents: point data.path at some text")
    col = corpus.text_column
    text_bytes = _text_bytes(corpus.documents, col) + _text_bytes(corpus.validation, col)
    train_docs, val_docs, split_info = _split_documents(corpus, split_rule["val_fraction"], split_rule["seed"])
    train_tok = _tokenize(train_docs, col, encoding, num_proc, scratch / "train.arrow", key)
    if val_docs is None:
        # One document: the last val_fraction of its tokens (at least 1) become validation.
        total = _count_tokens(train_tok)
        n_val = max(1, math.ceil(split_rule["val_fraction"] * total))
        n_train = _write_tokens(train_tok, tmp / "train.bin", 0, total - n_val)
        n_val = _write_tokens(train_tok, tmp / "val.bin", total - n_val, total)
        split_info["rule"] = "token_tail"
    else:
        val_tok = _tokenize(val_docs, col, encoding, num_proc, scratch / "val.arrow", key)
        n_train = _write_tokens(train_tok, tmp / "train.bin", 0, _count_tokens(train_tok))
        n_val = _write_tokens(val_tok, tmp / "val.bin", 0, _count_tokens(val_tok))
        split_info["rule"] = "source" if corpus.validation is not None else "documents"
    seconds = time.perf_counter() - start
    return {
        "fingerprint": key,
        "version": CACHE_VERSION,
        "source": {"name": source.name, "location": source.describe(), "fingerprint": source_fp},
        "split": {**split_rule, **split_info},
        "tokenizer": {
            "name": encoding.name,
            "hash": tokenizer_hash(encoding.name),
            "n_vocab": encoding.n_vocab,
            "eot": encoding.eot_token,
        },
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "tokens": {"train": n_train, "val": n_val},
        "text_bytes": text_bytes,
        "seconds": round(seconds, 3),
        "mb_per_s": round(text_bytes / 1e6 / max(seconds, 1e-9), 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare(
    source: Source,
    cache_root: str | os.PathLike,
    encoding: tiktoken.Encoding,
    val_fraction: float = 0.05,
    split_seed: int = 42,
    num_proc: int | None = None,
) -> PreparedData:
    """Return the token cache of `source`, building it if absent or stale.

    Args:
        source: a `ncn.sources` source.
        cache_root: parent directory of all caches (`data.cache_dir`).
        encoding: tokenizer; its hash is part of the key.
        val_fraction: share of documents (or of the tokens of a single document) for
            validation, in (0, 1); ignored when the source has its own validation split.
        split_seed: seed of the document permutation.
        num_proc: processes for `datasets.map`; None picks one per 10,000 documents (1..8).
    Returns:
        PreparedData; `cache_hit` tells whether it was built now.
    Raises:
        NCNConfigError: the source cannot be loaded or is empty; the tokenizer has > 65536 ids.
    """
    if encoding.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise NCNConfigError(f"tokenizer {encoding.name} has {encoding.n_vocab} tokens: the cache stores uint16 ids (<= 65536)")
    split_rule = {"val_fraction": val_fraction, "seed": split_seed}
    source_fp = source.fingerprint()
    key = cache_key(source_fp, split_rule, encoding)
    root = Path(cache_root).expanduser()
    final = root / f"{source.name}-{key[:16]}"
    if (hit := _verified(final, key)) is not None:
        return hit
    root.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(root / f"{final.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for another process that is building {final} ...", flush=True)
        lock.acquire()
    try:
        if (hit := _verified(final, key)) is not None:  # built by the process we waited for
            return hit
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = _build(source, source_fp, tmp, key, split_rule, encoding, num_proc)
            shutil.rmtree(tmp / "scratch")  # Arrow copies made on the way; keep only the cache files
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)  # an invalid leftover (we hold the lock)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return PreparedData(final, meta["tokens"]["train"], meta["tokens"]["val"], meta)
