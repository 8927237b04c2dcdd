"""The model: the base GPT, its blocks, the NCN controller, the modulation signals, the decoding state.

Owns everything that computes logits and signals from token ids (NCN paper §2–§5, §7): `gpt`
(`ModulatedGPT`, cached generation), `blocks` (attention, FFN, the pre-norm block, the KV
cache), `controller` (salience pooling and the controller MLP) and `signals` (transforms,
neutral values, the homeostatic penalty). May import `ncn.config` and `ncn.errors` only: never
the data path, training, tracking or a task, so a notebook can build a model from its config
alone.
"""
