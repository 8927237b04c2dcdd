"""Tests of ncn.data.tokenizer: the offline GPT-2 and byte encodings (NCN paper §6), their hashes, vocab padding.

Run: pytest tests/test_tokenizer.py  (offline, about 1 s)
"""

import hashlib
import os
import shutil
import socket

import pytest
import tiktoken_ext.openai_public

import ncn.data.tokenizer
from ncn.config import vocab_size
from ncn.data.tokenizer import (
    EOT_TOKEN,
    GPT2_FILE_SHA256,
    GPT2_N_VOCAB,
    get_encoding,
    gpt2_encoding,
    gpt2_files,
    tokenizer_hash,
)
from ncn.errors import NCNConfigError


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


def test_hashes_come_from_tiktoken_and_match_the_packaged_files(monkeypatch):
    passed = {}

    def capture(**kwargs):  # what tiktoken's own "gpt2" constructor would download and check
        passed.update(kwargs)
        return {}

    monkeypatch.setattr(tiktoken_ext.openai_public, "data_gym_to_mergeable_bpe_ranks", capture)
    tiktoken_ext.openai_public.gpt2()
    hashes = GPT2_FILE_SHA256
    assert hashes == {"vocab.bpe": passed["vocab_bpe_hash"], "encoder.json": passed["encoder_json_hash"]}
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
    get_encoding.cache_clear()
    enc = gpt2_encoding()
    assert enc.encode_ordinary("offline") == gpt2_encoding().encode_ordinary("offline") == [2364, 1370]
    assert list(tmp_path.iterdir()) == []
    assert "TIKTOKEN_CACHE_DIR" not in os.environ  # restored after the build


def test_wrong_file_hash_is_refused(monkeypatch, tmp_path):
    files = {name: tmp_path / name for name in ("vocab.bpe", "encoder.json")}
    for name, path in gpt2_files().items():
        shutil.copy(path, files[name])
    files["vocab.bpe"].write_bytes(files["vocab.bpe"].read_bytes() + b"\n")
    monkeypatch.setattr("ncn.data.tokenizer.gpt2_files", lambda: files)
    get_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="vocab.bpe has sha256 .* GPT-2's published file has 1ce16647"):
            gpt2_encoding()
    finally:
        get_encoding.cache_clear()


def test_tokenizer_hash_is_stable_and_sensitive(monkeypatch):
    gpt2, byte_level = tokenizer_hash("gpt2"), tokenizer_hash("bytes")
    assert gpt2 == tokenizer_hash("gpt2") and len(gpt2) == 64 and int(gpt2, 16) >= 0
    assert byte_level != gpt2
    tokenizer_hash.cache_clear()
    try:  # a change of any input the encoding is built from changes the hash
        monkeypatch.setattr(ncn.data.tokenizer, "GPT2_FILE_SHA256", {**GPT2_FILE_SHA256, "vocab.bpe": "0" * 64})
        assert tokenizer_hash("gpt2") != gpt2
        monkeypatch.setattr(ncn.data.tokenizer, "BYTES_PAT_STR", r"\S+|\s+")
        assert tokenizer_hash("bytes") != byte_level
    finally:
        tokenizer_hash.cache_clear()
    with pytest.raises(NCNConfigError, match="data.tokenizer=latin1 is unknown: choose one of gpt2, bytes"):
        tokenizer_hash("latin1")


def test_hash_does_not_build_the_encoding():
    get_encoding.cache_clear()
    tokenizer_hash.cache_clear()
    tokenizer_hash("gpt2")
    assert get_encoding.cache_info().currsize == 0


@pytest.mark.parametrize("text", ["", "plain ASCII", "Ünïcödé — 日本語 🧠", "<|endoftext|> is text here\n"])
def test_byte_encoding_is_one_id_per_byte(text):
    enc = get_encoding("bytes")
    assert (enc.name, enc.n_vocab, enc.eot_token) == ("bytes", 257, 256)
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))
    assert enc.decode(ids) == text
    assert enc.encode("a<|endoftext|>", allowed_special={"<|endoftext|>"}) == [97, 256]


@pytest.mark.parametrize("multiple,expected", [(1, 50257), (8, 50264), (64, 50304), (128, 50304), (50257, 50257)])
def test_padded_vocab_size(multiple, expected):
    assert vocab_size("gpt2", multiple) == expected
    assert expected % multiple == 0 and 0 <= expected - GPT2_N_VOCAB < multiple


@pytest.mark.parametrize("multiple,expected", [(1, 257), (64, 320), (256, 512)])
def test_padded_vocab_size_bytes(multiple, expected):
    assert vocab_size("bytes", multiple) == expected


@pytest.mark.parametrize("bad", [0, -64, 1.5])
def test_padded_vocab_size_rejects(bad):
    with pytest.raises(NCNConfigError, match=f"data.pad_vocab_to={bad}"):
        vocab_size("gpt2", bad)
