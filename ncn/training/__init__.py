"""The training machinery: the loop, the optimizer, checkpoints, evaluation, the process runtime, job resume.

Owns how a model is trained and measured: `loop` (the training loop of fixed sections and one
optimizer step), `optim` (AdamW groups and the schedule), `checkpoint` (self-describing atomic
checkpoints, resolving and restoring them), `evaluation` (val loss, bits per byte, the leak
audit, signal probes), `runtime` (device, DDP process group, threads, autocast, signals) and
`job_resume` (a sweep job continuing its earlier attempt). May import the model, the data path,
the tracker interface (`ncn.tracking`) and analysis (the probe's heatmaps), never a task.
"""
