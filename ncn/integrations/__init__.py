"""Adapters between `ncn` and other tools: weights and checkpoints in, benchmark harnesses out.

The home of every bridge to a format or tool that `ncn` does not own: loading HF-format
pretrained weights into the model, converting the reference implementation's checkpoints, and
exposing checkpoints to lm-evaluation-harness. An integration may import the model, the data
path and training, never a task; the tool it adapts is imported only when the integration is used.
"""
