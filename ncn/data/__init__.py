"""The data path: text sources, tokenizers, the token cache and the block loaders (NCN paper §6).

Owns everything between a corpus and batches of token ids: `sources` (the embedded plays, text
folders, HF datasets), `tokenizer` (GPT-2 BPE and bytes, built offline), `token_cache` (a source
tokenized once, keyed by its content and settings) and `loader` (`DataModule`: resumable,
seeded, DDP-sharded blocks). May import `ncn.config` and `ncn.errors` only, never the model,
training or tracking; torch and `datasets` are imported where batches or documents are made.
"""
