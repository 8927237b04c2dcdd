"""Tests of ncn.tokenizer: the offline GPT-2 encoding (NCN paper §6) and vocab padding.

Run: pytest tests/test_tokenizer.py  (offline, about 1 s)
"""

import hashlib
import os
import shutil
import socket

import pytest
import tiktoken

from ncn.errors import NCNConfigError
from ncn.tokenizer import (
    EOT_TOKEN,
    GPT2_N_VOCAB,
    encoding_hash,
    expected_gpt2_hashes,
    gpt2_encoding,
    gpt2_files,
    padded_vocab_size,
)


def test_hello_world_and_known_ids():
    enc = gpt2_encoding()
    assert enc.encode("Hello world<|endoftext|>", allowed_special={"<|endoftext|>"}) == [15496, 995, 50256]
    assert enc.encode_ordinary(" the") == [262]
    assert (enc.name, enc.n_vocab, enc.eot_token, EOT_TOKEN, GPT2_N_VOCAB) == ("gpt2", 50257, 50256, 50256, 50257)


@pytest.mark.parametrize(
    "text",
    [
        "Ünïcödé — naïve café, 日本語のテキスト, 한국어, العربية, emoji 🧠🔬👩🏽‍🔬",
        "e\u0301 combining, zero\u200bwidth, NUL\x00byte, tabs\t\tand   spaces\n\n\r\n",
        "To be, or not to be: that is the question.",
        "",
    ],
)
def test_round_trip_unicode(text):
    enc = gpt2_encoding()
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < EOT_TOKEN for i in ids)
    assert enc.decode(ids) == text
    assert enc.decode_bytes(ids) == text.encode("utf-8")


def test_hashes_come_from_tiktoken_and_match_the_packaged_files():
    hashes = expected_gpt2_hashes()
    assert hashes["vocab.bpe"].startswith("1ce16647") and hashes["vocab.bpe"].endswith("adc5")
    assert hashes["encoder.json"].startswith("19613966") and hashes["encoder.json"].endswith("6783")
    for name, path in gpt2_files().items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashes[name]


def test_builds_with_network_disabled_and_writes_no_cache(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tiktoken's default cache is $TMPDIR/data-gym-cache
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    gpt2_encoding.cache_clear()
    enc = gpt2_encoding()
    assert enc.encode_ordinary("offline") == gpt2_encoding().encode_ordinary("offline") == [2364, 1370]
    assert list(tmp_path.iterdir()) == []
    assert "TIKTOKEN_CACHE_DIR" not in os.environ  # restored after the build


def test_wrong_file_hash_is_refused(monkeypatch, tmp_path):
    files = {name: tmp_path / name for name in ("vocab.bpe", "encoder.json")}
    for name, path in gpt2_files().items():
        shutil.copy(path, files[name])
    files["vocab.bpe"].write_bytes(files["vocab.bpe"].read_bytes() + b"\n")
    monkeypatch.setattr("ncn.tokenizer.gpt2_files", lambda: files)
    gpt2_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="vocab.bpe has sha256 .* tiktoken expects 1ce16647"):
            gpt2_encoding()
    finally:
        gpt2_encoding.cache_clear()


def test_encoding_hash_is_stable_and_sensitive():
    enc = gpt2_encoding()
    assert encoding_hash(enc) == encoding_hash(gpt2_encoding()) and len(encoding_hash(enc)) == 64
    other = tiktoken.Encoding(
        name="gpt2",
        pat_str=enc._pat_str,
        mergeable_ranks=enc._mergeable_ranks,
        special_tokens={"<|endoftext|>": 50256, "<|x|>": 50257},
    )
    assert encoding_hash(other) != encoding_hash(enc)


@pytest.mark.parametrize("multiple,expected", [(1, 50257), (8, 50264), (64, 50304), (128, 50304), (50257, 50257)])
def test_padded_vocab_size(multiple, expected):
    assert padded_vocab_size(multiple) == expected
    assert expected % multiple == 0 and 0 <= expected - GPT2_N_VOCAB < multiple


@pytest.mark.parametrize("bad", [0, -64, 1.5])
def test_padded_vocab_size_rejects(bad):
    with pytest.raises(NCNConfigError, match=f"data.pad_vocab_to={bad}"):
        padded_vocab_size(bad)
