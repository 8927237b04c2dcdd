"""Token cache: a source tokenized once into `train.bin`/`val.bin` (uint16) + `meta.json`.

The directory `<cache_root>/<source>-<tokenizer>-<key[:16]>/` is keyed on the source content,
the split rule, the tokenizer (`tokenizer_hash`) and `CACHE_VERSION`; it is built in a
temporary directory under a file lock and renamed into place, so parallel jobs build it once.
A cache hit reads meta.json (checked by `PreparedData.read`, the one reader of its shape) and
two file sizes: it builds no tokenizer and imports neither `datasets` nor `pyarrow`. A cache
whose meta.json or files are damaged in any way is rebuilt, with a one-line notice.

Each document is its tokens plus one end-of-text token; empty and whitespace-only documents
are skipped and counted. Validation (`split_rule`): the source's own split ("source"); else
whole documents ("documents"), taken in an order seeded by `split_seed`, the prefix whose token
count is closest to val_fraction × all tokens (at least 1 document, at most all but one); a
single document gives its last val_fraction of tokens ("token_tail").

Labelled caches (control=genre / control=labels, NCN paper §3.2) also hold `train_labels.bin` /
`val_labels.bin`: the label id (uint16) of every token, its document's label, beside the ids; the
label vocabulary (sorted names, id = position) is in meta.json["labels"], the labelling is part
of the key, and the "documents" rule is stratified: it picks the seeded val prefix within each
label, so every label has validation tokens. Unlabelled caches are unchanged (same key, same files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ncn.config import TOKENIZERS
from ncn.data.sources import Source, label_documents
from ncn.data.tokenizer import get_encoding, tokenizer_hash
from ncn.errors import NCNConfigError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    import tiktoken

# Bump when the bytes a cache holds change for the same inputs (cleaning, EOS rule, split rule, layout).
# 2: empty documents skipped, validation chosen by tokens, per-split byte counts in meta.json.
CACHE_VERSION = 2
TOKEN_DTYPE = np.uint16  # GPT-2 ids < 65536: half the disk and page cache of int32
RULES = ("documents", "token_tail", "source")
_NAMES_IN_META = 1000  # list per-document names and token counts in meta.json only for small corpora
_DOCS_PER_PROCESS = 10_000  # "auto" num_proc: at least this many documents per process

# The shape of meta.json: nested objects of typed fields (int: an integer >= 0; float: any number).
# split may also hold the lists val_names (str), val_document_tokens and order_tokens (int).
META_SHAPE: dict[str, Any] = {
    "fingerprint": str,
    "version": int,
    "source": {"name": str, "location": str, "fingerprint": str},
    "split": {
        "rule": str,
        "val_fraction": float,
        "seed": int,
        "documents_found": int,
        "skipped_empty": int,
        "train_documents": int,
        "val_documents": int,
    },
    "tokenizer": {"name": str, "hash": str, "n_vocab": int, "eot": int},
    "dtype": str,
    "tokens": {"train": int, "val": int},
    "bytes": {"train": int, "val": int},
    "text_bytes": int,
    "seconds": float,
}
_SPLIT_LISTS = {"val_names": str, "val_document_tokens": int, "order_tokens": int}
# meta.json["labels"] of a labelled cache: the labelling rule, the names (id = index), tokens per label.
LABELS_SHAPE: dict[str, Any] = {"rule": dict, "names": list, "train_tokens": list, "val_tokens": list}
LABEL_FILES = {"train": "train_labels.bin", "val": "val_labels.bin"}


class InvalidCache(Exception):
    """A token cache folder that cannot be used as it is; the message says why in a few words."""


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_field(value: object, kind: Any, where: str) -> None:
    """Raise InvalidCache unless `value` has `kind` (a META_SHAPE entry); `where` names it."""
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise InvalidCache(f"{where} is {_kind(value)}, not an object")
        for key, sub in kind.items():
            if key not in value:
                raise InvalidCache(f"{where}.{key} is missing")
            _check_field(value[key], sub, f"{where}.{key}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidCache(f"{where} is {value!r}, not an integer >= 0")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidCache(f"{where} is {value!r}, not a number")
    elif not isinstance(value, kind):
        raise InvalidCache(f"{where} is {_kind(value)}, not {kind.__name__}")


def _read_meta(cache_dir: Path, key: str) -> dict:
    """meta.json of `cache_dir`, checked against META_SHAPE, `key`, CACHE_VERSION and the .bin sizes.

    Raises:
        InvalidCache: anything else (missing, not JSON, another shape, other inputs, file sizes).
    """
    path = cache_dir / "meta.json"
    try:
        meta = json.loads(path.read_bytes())
    except OSError as e:
        raise InvalidCache(f"meta.json cannot be read: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidCache(f"meta.json is not JSON: {str(e).splitlines()[0]}") from None
    _check_field(meta, META_SHAPE, "meta.json")
    split = meta["split"]
    for name, kind in _SPLIT_LISTS.items():
        value = split.get(name, [])
        if not isinstance(value, list):
            raise InvalidCache(f"meta.json.split.{name} is {_kind(value)}, not a list")
        for i, item in enumerate(value):
            _check_field(item, kind, f"meta.json.split.{name}[{i}]")
    if meta["fingerprint"] != key:
        raise InvalidCache("meta.json was written for other inputs")
    if meta["version"] != CACHE_VERSION or meta["dtype"] != np.dtype(TOKEN_DTYPE).name:
        raise InvalidCache(
            f"meta.json has version {meta['version']} of {meta['dtype']} tokens, "
            f"this ncn writes version {CACHE_VERSION} of uint16"
        )
    if split["rule"] not in RULES:
        raise InvalidCache(f"meta.json.split.rule is {split['rule']!r}, not one of {', '.join(RULES)}")
    if meta["text_bytes"] != meta["bytes"]["train"] + meta["bytes"]["val"]:
        raise InvalidCache("meta.json.text_bytes is not bytes.train + bytes.val")
    for name in ("val_names", "val_document_tokens"):
        if name in split and len(split[name]) != split["val_documents"]:
            raise InvalidCache(f"meta.json.split.{name} has {len(split[name])} entries, not val_documents")
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    files = {s: f"{s}.bin" for s in ("train", "val")}
    if "labels" in meta:
        _check_field(meta["labels"], LABELS_SHAPE, "meta.json.labels")
        if not meta["labels"]["names"] or not all(isinstance(n, str) for n in meta["labels"]["names"]):
            raise InvalidCache("meta.json.labels.names is not a non-empty list of names")
        files |= {f"{s} labels": name for s, name in LABEL_FILES.items()}
    for what, name in files.items():
        split = what.split()[0]
        try:
            size = (cache_dir / name).stat().st_size
        except OSError:
            raise InvalidCache(f"{name} is missing") from None
        if size != meta["tokens"][split] * itemsize:
            raise InvalidCache(f"{name} holds {size} bytes, meta.json says {meta['tokens'][split]} tokens")
    return meta


def val_prefix(order_tokens: np.ndarray, val_fraction: float) -> int:
    """How many documents the "documents" rule holds out, taken in `order_tokens`' order.

    Args:
        order_tokens: tokens of each (non-empty) document in the seeded order, shape (n,), n >= 2.
        val_fraction: the share of all tokens wanted for validation, in (0, 1).
    Returns:
        k in [1, n - 1]: the prefix whose token count is closest to val_fraction × the total
        (ties: the shorter prefix).
    """
    cum = np.cumsum(order_tokens)
    return 1 + int(np.argmin(np.abs(cum[:-1] - val_fraction * cum[-1])))


def _tail_tokens(total: int, val_fraction: float) -> int:
    """Tokens the "token_tail" rule holds out of a single document of `total` tokens (at least 1)."""
    return max(1, math.ceil(val_fraction * total))


@dataclass(frozen=True)
class PreparedData:
    """A ready token cache.

    Attributes:
        cache_dir: the directory holding train.bin, val.bin, meta.json.
        train_tokens, val_tokens: token counts of the two files (one end-of-text token per document included).
        train_bytes, val_bytes: UTF-8 bytes of the text those tokens encode (end-of-text tokens: 0 bytes).
        meta: the parsed meta.json (shape: `META_SHAPE`); `meta["split"]` also names the split
            rule, documents found / skipped empty / per split and, for up to 1,000 documents,
            val_names, val_document_tokens and order_tokens (document tokens in the seeded order).
        cache_hit: True when an existing cache was verified instead of built.
    """

    cache_dir: Path
    train_tokens: int
    val_tokens: int
    train_bytes: int
    val_bytes: int
    meta: dict = field(repr=False)
    cache_hit: bool = False

    @classmethod
    def read(cls, cache_dir: Path, key: str, cache_hit: bool = True) -> PreparedData:
        """The cache in `cache_dir` if it is complete and was built for `key`.

        Raises:
            InvalidCache: a missing or damaged meta.json (any shape but the one written), files
                whose sizes disagree with it, or a cache of other inputs.
        """
        meta = _read_meta(cache_dir, key)
        tokens, n_bytes = meta["tokens"], meta["bytes"]
        return cls(cache_dir, tokens["train"], tokens["val"], n_bytes["train"], n_bytes["val"], meta, cache_hit)

    @property
    def label_names(self) -> list[str]:
        """The label vocabulary of a labelled cache (id = index), [] for an unlabelled one."""
        return list(self.meta.get("labels", {}).get("names", []))

    def bits_per_byte(self, ce: float) -> float:
        """Bits per UTF-8 byte of validation text, for a cross-entropy `ce` in nats per val token.

        bpb = ce × val_tokens / (ln 2 × val_bytes): the information of the whole val split in
        bits over the bytes of its text. val_tokens includes the end-of-text token after each
        document (the model predicts it, so `ce` averages over it too); val_bytes counts text
        only (end-of-text has no bytes). Exact when `ce` is the mean over the whole val split;
        the mean over its first blocks estimates it. For the byte tokenizer val_tokens =
        val_bytes + val documents, so bpb = ce / ln 2 × val_tokens / val_bytes there too.

        Raises:
            ValueError: the val split holds no text bytes.
        """
        if self.val_bytes <= 0:
            raise ValueError(f"the val split of {self.cache_dir} holds no text bytes: bits per byte is undefined")
        return ce * self.val_tokens / (math.log(2) * self.val_bytes)

    def val_fraction_for(self, min_tokens: int) -> float | None:
        """The smallest data.val_fraction (two decimals) whose split gives both splits >= `min_tokens` tokens.

        None when no value does, when the split is the source's own, or when the corpus is too
        large for meta.json to list its documents' token counts.
        """
        split = self.meta["split"]
        order = np.asarray(split.get("order_tokens", []), dtype=np.int64)
        if split["rule"] == "source" or len(order) == 0:
            return None
        total = int(order.sum())
        for percent in range(1, 100):
            f = percent / 100
            val = _tail_tokens(total, f) if len(order) == 1 else int(order[: val_prefix(order, f)].sum())
            if val >= min_tokens and total - val >= min_tokens:
                return f
        return None

    def summary(self) -> str:
        """One line for the user: documents (found, skipped, per split), tokens, MB, seconds, cache path."""
        m, s = self.meta, self.meta["split"]
        took = f"{m['seconds']:.1f} s"
        action = f"cache hit (built in {took})" if self.cache_hit else f"tokenized in {took}"
        if s["rule"] == "token_tail":
            docs = f"1 document (its last {self.val_tokens:,} tokens are val)"
        else:
            docs = (
                f"{s['train_documents'] + s['val_documents']:,} documents "
                f"({s['train_documents']:,} train / {s['val_documents']:,} val)"
            )
        if s["skipped_empty"]:
            docs += f", {s['skipped_empty']:,} empty skipped"
        return (
            f"data {m['source']['name']}: {docs}, {m['tokenizer']['name']} tokens train {self.train_tokens:,} / "
            f"val {self.val_tokens:,}, {_size(m['text_bytes'])} text, {action} -> {self.cache_dir}"
        )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{n_bytes / 1e3:.1f} kB"


def cache_key(source_fingerprint: str, split_rule: dict, tokenizer: str) -> str:
    """sha256 (hex) of everything that decides the cache's bytes (the tokenizer by `tokenizer_hash`)."""
    key = {
        "source": source_fingerprint,
        "split": split_rule,
        "tokenizer": [tokenizer, tokenizer_hash(tokenizer)],
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _encode_batch(batch: dict[str, list], encoding: tiktoken.Encoding, text_column: str) -> dict[str, list]:
    # Empty, whitespace-only and null documents become no tokens at all (not even end-of-text).
    texts = [t if t and not t.isspace() else "" for t in batch[text_column]]
    ids = encoding.encode_ordinary_batch(texts)
    return {
        "ids": [
            doc + [encoding.eot_token] if text else [] for doc, text in zip(ids, texts, strict=True)
        ],  # EOS as GPT-2
        "n_bytes": [len(text.encode()) for text in texts],
    }


def _tokenize(
    ds: datasets.Dataset, text_column: str, encoding: tiktoken.Encoding, num_proc: int | None, out: Path, key: str
) -> datasets.Dataset:
    """Columns "ids" (list of uint16, [] for a skipped document) and "n_bytes" (int64), one row per document."""
    import datasets

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
        fn_kwargs={"encoding": encoding, "text_column": text_column},
        features=datasets.Features(
            {"ids": datasets.Sequence(datasets.Value("uint16")), "n_bytes": datasets.Value("int64")}
        ),
        cache_file_name=str(out),
        new_fingerprint=f"{key[:32]}-{out.stem}",  # our key, not a hash of the function
        desc=f"tokenizing {out.stem}",
    )


@dataclass(frozen=True)
class _Tokenized:
    """One tokenized split of a source: the "ids" column and, per document, tokens (0 = skipped) and bytes."""

    ids: pa.ChunkedArray
    tokens: np.ndarray  # (documents,) int64, end-of-text included
    n_bytes: np.ndarray  # (documents,) int64
    labels: np.ndarray | None = None  # (documents,) label ids of a labelled cache

    @classmethod
    def of(cls, dataset: datasets.Dataset, labels: np.ndarray | None = None) -> _Tokenized:
        import pyarrow.compute as pc

        ids = dataset.data.column("ids")
        tokens = pc.list_value_length(ids).to_numpy().astype(np.int64)
        return cls(ids, tokens, dataset.data.column("n_bytes").to_numpy(), labels)

    def label_tokens(self, keep: np.ndarray, n_labels: int) -> list[int]:
        """Tokens per label id of the documents where `keep` is True ([] when unlabelled)."""
        if self.labels is None:
            return []
        return np.bincount(self.labels[keep], weights=self.tokens[keep], minlength=n_labels).astype(int).tolist()

    @property
    def kept(self) -> np.ndarray:
        """Indices of the documents that hold text."""
        return np.flatnonzero(self.tokens > 0)

    def append(self, keep: np.ndarray, out: Outputs) -> None:
        """Append the tokens of the documents where `keep` (bool, one per document) is True to `out.ids`, in
        order, and, when labelled, each token's document label id to `out.labels`."""
        import pyarrow.compute as pc

        doc = 0
        for chunk in self.ids.chunks:  # chunk by chunk: the corpus may not fit in memory
            lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
            flat = chunk.flatten().to_numpy(zero_copy_only=False)
            chosen = keep[doc : doc + len(chunk)]
            flat[np.repeat(chosen, lengths)].astype(TOKEN_DTYPE, copy=False).tofile(out.ids)
            if self.labels is not None and out.labels is not None:
                labels = self.labels[doc : doc + len(chunk)][chosen]
                np.repeat(labels, lengths[chosen]).astype(TOKEN_DTYPE).tofile(out.labels)
            doc += len(chunk)


@dataclass(frozen=True)
class Outputs:
    """The open files of one split: token ids and, for a labelled cache, label ids."""

    ids: BinaryIO
    labels: BinaryIO | None = None


def _split_source(train: _Tokenized, val: _Tokenized, out: tuple[Outputs, Outputs]) -> dict:
    """The "source" rule: the source's own splits as they are."""
    train.append(train.tokens > 0, out[0])
    val.append(val.tokens > 0, out[1])
    split = {"rule": "source", "train_documents": len(train.kept), "val_documents": len(val.kept)}
    if len(val.kept) <= _NAMES_IN_META:
        split["val_document_tokens"] = val.tokens[val.kept].tolist()
    return {
        "split": split,
        "tokens": {"train": int(train.tokens.sum()), "val": int(val.tokens.sum())},
        "bytes": {"train": int(train.n_bytes.sum()), "val": int(val.n_bytes.sum())},
    }


def _split_token_tail(
    docs: _Tokenized, name: str | None, val_fraction: float, encoding: tiktoken.Encoding, out: tuple[Outputs, Outputs]
) -> dict:
    """The "token_tail" rule: the last val_fraction of the tokens of the only document with text."""
    (index,) = docs.kept
    ids = docs.ids[int(index)].values.to_numpy(zero_copy_only=False).astype(TOKEN_DTYPE)
    n_val = _tail_tokens(len(ids), val_fraction)
    cut = len(ids) - n_val
    ids[:cut].tofile(out[0].ids)
    ids[cut:].tofile(out[1].ids)
    if docs.labels is not None and out[0].labels is not None and out[1].labels is not None:
        label = docs.labels[int(index)]
        np.full(cut, label, dtype=TOKEN_DTYPE).tofile(out[0].labels)
        np.full(n_val, label, dtype=TOKEN_DTYPE).tofile(out[1].labels)
    val_bytes = len(encoding.decode_bytes(ids[cut:-1].tolist()))  # the last token is end-of-text: no bytes
    split = {
        "rule": "token_tail",
        "train_documents": 1,
        "val_documents": 1,
        "order_tokens": [len(ids)],
        "val_document_tokens": [n_val],
        **({"val_names": [name]} if name is not None else {}),
    }
    return {
        "split": split,
        "tokens": {"train": cut, "val": n_val},
        "bytes": {"train": int(docs.n_bytes.sum()) - val_bytes, "val": val_bytes},
    }


def _stratified_val(docs: _Tokenized, order: np.ndarray, val_fraction: float, names: list[str]) -> np.ndarray:
    """The val documents of a labelled "documents" split: within each label, the prefix of that label's
    documents (in the seeded `order`) whose tokens are closest to val_fraction of the label's tokens.

    Raises:
        NCNConfigError: a label with fewer than 2 non-empty documents (it cannot give both splits text).
    """
    assert docs.labels is not None
    chosen = []
    for label in range(len(names)):
        mine = order[docs.labels[order] == label]
        if len(mine) < 2:
            raise NCNConfigError(
                f"label {names[label]!r} has {len(mine)} non-empty document(s): a stratified split needs at least 2 "
                "per label (one for validation): add documents with this label or relabel them"
            )
        chosen.append(mine[: val_prefix(docs.tokens[mine], val_fraction)])
    return np.concatenate(chosen)


def _split_documents(
    docs: _Tokenized,
    names: list[str] | None,
    val_fraction: float,
    seed: int,
    out: tuple[Outputs, Outputs],
    label_names: list[str] | None = None,
) -> dict:
    """The "documents" rule: the seeded prefix of documents whose tokens are closest to val_fraction of all
    (stratified by label when `label_names` is given: `_stratified_val`)."""
    kept = docs.kept
    order = kept[np.random.default_rng(seed).permutation(len(kept))]
    val_docs = _stratified_val(docs, order, val_fraction, label_names) if label_names else None
    k = len(val_docs) if val_docs is not None else val_prefix(docs.tokens[order], val_fraction)
    is_val = np.zeros(len(docs.tokens), dtype=bool)
    is_val[val_docs if val_docs is not None else order[:k]] = True
    docs.append(~is_val, out[0])
    docs.append(is_val, out[1])
    split: dict[str, Any] = {"rule": "documents", "train_documents": len(kept) - k, "val_documents": k}
    if len(kept) <= _NAMES_IN_META:
        val = np.flatnonzero(is_val)  # in document order, as in val.bin
        split |= {"val_document_tokens": docs.tokens[val].tolist(), "order_tokens": docs.tokens[order].tolist()}
        if names is not None:
            split["val_names"] = [names[i] for i in val]
    return {
        "split": split,
        "tokens": {"train": int(docs.tokens[~is_val].sum()), "val": int(docs.tokens[is_val].sum())},
        "bytes": {"train": int(docs.n_bytes[~is_val].sum()), "val": int(docs.n_bytes[is_val].sum())},
    }


def _build(source: Source, tmp: Path, key: str, split_rule: dict, tokenizer: str, num_proc: int | None) -> dict:
    """Tokenize `source` into tmp/train.bin and tmp/val.bin (and the label files when `split_rule` has
    "labels"); returns meta.json's split, tokens, bytes, tokenizer (and labels)."""
    encoding = get_encoding(tokenizer)
    scratch = tmp / "scratch"
    scratch.mkdir()
    corpus = source.load(scratch)
    if len(corpus.documents) == 0:
        raise NCNConfigError(f"data source {source.describe()} has 0 documents: point data.path at some text")
    labelling = split_rule.get("labels")
    names: list[str] | None = None
    doc_labels = val_labels = None
    if labelling is not None:
        corpus = label_documents(source, corpus, labelling.get("column"))
        assert corpus.labels is not None
        names = sorted(set(corpus.labels) | set(corpus.validation_labels or []))
        index = {name: i for i, name in enumerate(names)}
        doc_labels = np.array([index[v] for v in corpus.labels], dtype=np.int64)
        if corpus.validation_labels is not None:
            val_labels = np.array([index[v] for v in corpus.validation_labels], dtype=np.int64)
    col = corpus.text_column
    docs = _Tokenized.of(_tokenize(corpus.documents, col, encoding, num_proc, scratch / "docs.arrow", key), doc_labels)
    val = None
    if corpus.validation is not None:
        tokenized = _tokenize(corpus.validation, col, encoding, num_proc, scratch / "val.arrow", key)
        val = _Tokenized.of(tokenized, val_labels)
    elif len(docs.kept) == 0:
        raise NCNConfigError(
            f"data source {source.describe()} has no text: its {len(docs.tokens)} documents are "
            "empty or whitespace-only: point data.path at some text"
        )
    found = [len(d.tokens) for d in (docs, val) if d is not None]
    kept = [len(d.kept) for d in (docs, val) if d is not None]
    with contextlib.ExitStack() as files:

        def _open(name: str) -> BinaryIO:
            return files.enter_context(open(tmp / name, "wb"))

        out = tuple(
            Outputs(_open(f"{split}.bin"), _open(LABEL_FILES[split]) if names is not None else None)
            for split in ("train", "val")
        )
        if val is not None:
            built = _split_source(docs, val, out)
        elif len(docs.kept) == 1:
            name = None if corpus.names is None else corpus.names[int(docs.kept[0])]
            built = _split_token_tail(docs, name, split_rule["val_fraction"], encoding, out)
        else:
            built = _split_documents(
                docs, corpus.names, split_rule["val_fraction"], split_rule["seed"], out, label_names=names
            )
    if names is not None:
        built["labels"] = _label_meta(labelling, names, tmp, source)
    built["split"] = {
        **split_rule,
        "documents_found": sum(found),
        "skipped_empty": sum(found) - sum(kept),
        **built["split"],
    }
    built["tokenizer"] = {
        "name": tokenizer,
        "hash": tokenizer_hash(tokenizer),
        "n_vocab": encoding.n_vocab,
        "eot": encoding.eot_token,
    }
    return built


def _label_meta(labelling: dict, names: list[str], tmp: Path, source: Source) -> dict:
    """meta.json["labels"]: the rule, the names and the tokens per label of each split (counted from the files).

    Raises:
        NCNConfigError: a label without validation tokens (a source's own split that lacks it).
    """
    counts = {
        split: np.bincount(np.fromfile(tmp / LABEL_FILES[split], dtype=TOKEN_DTYPE), minlength=len(names)).tolist()
        for split in ("train", "val")
    }
    missing = [name for name, n in zip(names, counts["val"], strict=True) if n == 0]
    if missing:
        raise NCNConfigError(
            f"labels {', '.join(missing)} of {source.describe()} have no validation tokens: every label needs "
            "validation text (give the validation split documents of every label, or set data.val_split=null)"
        )
    return {"rule": labelling, "names": names, "train_tokens": counts["train"], "val_tokens": counts["val"]}


def _existing(cache_dir: Path, key: str, notify: bool) -> PreparedData | None:
    """The valid cache in `cache_dir`, or None; with `notify`, one line says why an existing one is rebuilt."""
    if not cache_dir.exists():
        return None
    try:
        return PreparedData.read(cache_dir, key)
    except InvalidCache as exc:
        if notify:
            print(f"token cache {cache_dir} is invalid ({exc}): rebuilding", flush=True)
        return None


def prepare(
    source: Source,
    cache_root: str | os.PathLike,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.05,
    split_seed: int = 42,
    num_proc: int | None = None,
    labels: dict | None = None,
) -> PreparedData:
    """Return the token cache of `source`, building it if absent, stale or damaged.

    Args:
        source: a `ncn.data.sources` source.
        cache_root: parent directory of all caches (`data.cache_dir`).
        tokenizer: "gpt2" or "bytes" (`ncn.config.TOKENIZERS`); built only when the cache is.
        val_fraction: share of tokens held out for validation, in (0, 1) (see the module
            docstring); ignored when the source has its own validation split.
        split_seed: seed of the document order.
        num_proc: processes for `datasets.map`; None picks one per 10,000 documents (1..8).
        labels: None (unlabelled), or the labelling rule {"kind": "genre" | "labels", "column":
            <hf column> | None}: per-token label files, a stratified split, a different key.
    Returns:
        PreparedData; `cache_hit` tells whether it was built now.
    Raises:
        NCNConfigError: an unknown tokenizer; the source cannot be loaded, is empty or holds
            only empty documents.
    """
    import filelock

    split_rule: dict[str, Any] = {"val_fraction": val_fraction, "seed": split_seed}
    if labels is not None:
        split_rule["labels"] = labels
    source_fp = source.fingerprint()
    key = cache_key(source_fp, split_rule, tokenizer)  # checks the tokenizer's name
    assert TOKENIZERS[tokenizer] <= np.iinfo(TOKEN_DTYPE).max + 1, f"{tokenizer} ids do not fit {TOKEN_DTYPE}"
    root = Path(cache_root).expanduser()
    final = root / f"{source.name}-{tokenizer}-{key[:16]}"
    if (hit := _existing(final, key, notify=True)) is not None:
        return hit
    root.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(root / f"{final.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for another process that is building {final} ...", flush=True)
        lock.acquire()
    try:
        if (hit := _existing(final, key, notify=False)) is not None:  # built by the process we waited for
            return hit
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            start = time.perf_counter()
            built = _build(source, tmp, key, split_rule, tokenizer, num_proc)
            seconds = time.perf_counter() - start
            text_bytes = built["bytes"]["train"] + built["bytes"]["val"]
            meta = {
                "fingerprint": key,
                "version": CACHE_VERSION,
                "source": {"name": source.name, "location": source.describe(), "fingerprint": source_fp},
                **built,
                "dtype": np.dtype(TOKEN_DTYPE).name,
                "text_bytes": text_bytes,
                "seconds": round(seconds, 3),
                "mb_per_s": round(text_bytes / 1e6 / max(seconds, 1e-9), 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            shutil.rmtree(tmp / "scratch")  # Arrow copies made on the way; keep only the cache files
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)  # an invalid leftover (we hold the lock)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return PreparedData.read(final, key, cache_hit=False)
