"""The commands of `run.py` (`task=...`) and the sweep callback: siblings over the `ncn` library.

Each task module has `main(cfg: RunConfig, ctx: RunContext)`; it imports only library modules
(never another task), and only when run.py chose it (tests/test_layers.py checks the import graph).
"""
