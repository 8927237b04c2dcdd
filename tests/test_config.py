"""Config tests: every option of every group in conf/ composes and converts to its typed
object, schemas reject typos at compose time, run names, and the reference-flag mapping.

Run: python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.config import ControlConfig, DataConfig, OptimConfig, TrackingConfig, TrainerConfig
from ncn.errors import NCNConfigError
from ncn.tracking import MLflowTracker, NullTracker, default_run_name, name_overrides, open_tracker

from conftest import REPO, run_cli

GROUPS = ("model", "ncn", "control", "data", "optim", "trainer", "tracking")
TYPES = {
    "model": ModelConfig,
    "ncn": ModulationConfig,
    "control": ControlConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "tracking": TrackingConfig,
}
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((REPO / "conf" / g).glob("*.yaml"))]
TARGETS = {
    "none": [],
    "none_iso": [],
    "full": ["temperature", "gain", "activation"],
    "temperature_only": ["temperature"],
    "gain_only": ["gain"],
    "activation_only": ["activation"],
    "no_temperature": ["gain", "activation"],
    "no_gain": ["temperature", "activation"],
    "no_activation": ["temperature", "gain"],
    "per_head_temperature": ["temperature", "gain", "activation"],
    "swish_beta": ["temperature", "gain", "activation"],
    "paper_global": ["temperature", "gain", "activation"],
    "reference": ["temperature", "gain", "activation"],
    "head_gate": ["temperature", "gain", "activation", "head_gate"],
    "layer_gate": ["temperature", "gain", "activation", "layer_gate"],
    "sparse": ["temperature", "gain", "activation", "head_gate", "layer_gate"],
}
# Every flag of the reference train.py (NCN paper §6) -> the config key that replaces it.
REFERENCE_FLAGS = {
    "--d_model": "model.d_model",
    "--n_layer": "model.n_layer",
    "--n_head": "model.n_head",
    "--ncn_heads": "ncn.heads",
    "--ncn_hidden_dim": "ncn.hidden_dim",
    "--num_epochs": "trainer.epochs",
    "--batch_size": "trainer.batch_size",
    "--block_size": "model.block_size",
    "--lr": "optim.lr",
    "--total_tokens": "data.total_tokens",
    "--use_amp": "trainer.precision",
    "--checkpoint_frequency": "trainer.checkpoint_every",
    "--log_frequency": "trainer.log_every",
    "--num_workers": "data.num_workers",
    "--resume_checkpoint": "trainer.resume",
    "--gradient_accumulation_steps": "trainer.grad_accum",
    "--gradient_checkpointing": "trainer.activation_checkpointing",
    "--seed": "seed",
}


def test_expected_options_exist() -> None:
    found = {(g, o) for g, o in OPTIONS}
    assert {("model", m) for m in ("tiny", "small", "medium", "paper_18m", "gpt2_124m", "gpt2", "gpt2_medium")} <= found
    assert {("ncn", n) for n in TARGETS} == {(g, o) for g, o in found if g == "ncn"}, "add new ncn options to TARGETS"
    assert {("trainer", t) for t in ("default", "smoke", "gpu")} <= found
    # YAML reads on/off/yes/no as booleans: option names must be words
    assert not {o for _, o in OPTIONS} & {"on", "off", "yes", "no", "true", "false", "y", "n"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_converts(typed_config, tmp_path: Path, group: str, option: str) -> None:
    extra = {
        "ncn": ["model=tiny"],
        "data": ["data.path=/texts"] if option in ("text_files", "hf") else [],
        "control": ["data=text_files", "data.path=/texts"] if option == "labels" else [],
    }
    cfg = typed_config([f"{group}={option}", *extra.get(group, [])])
    obj = getattr(cfg, group)
    assert type(obj) is TYPES[group]
    if group == "tracking":
        tracker = open_tracker(obj, tmp_path, tmp_path)
        assert isinstance(tracker, {"mlflow": MLflowTracker, "none": NullTracker}[option])
        if option == "mlflow":
            assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and tracker.uri.startswith("sqlite:////")
    if group == "model":
        # GPT-2's 50257 padded to a multiple of data.pad_vocab_to=64; the GPT-2 options keep it unpadded
        assert obj.vocab_size == (50257 if option in ("gpt2", "gpt2_medium") else 50304)
    if group == "ncn":
        assert obj.targets == TARGETS[option]
        model = ModulatedGPT(cfg.model, obj)
        assert (model.num_parameters().controller > 0) == bool(TARGETS[option])


def test_option_files_set_only_what_differs_from_the_schema() -> None:
    """Each default lives in one place: an option that repeated a schema default would hide the schema's value.
    Model presets are exempt: each spells out a whole shape (paper_18m's equals the schema's defaults)."""
    for group, option in OPTIONS:
        if group == "model":
            continue
        values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / group / f"{option}.yaml"))
        defaults = TYPES[group]() if group != "data" else DataConfig()
        for key, value in values.items():
            if key in ("defaults", "source", "backend", "kind"):  # an option's defaults list; the discriminators
                continue
            assert value != getattr(defaults, key, object()), (
                f"conf/{group}/{option}.yaml repeats the schema default {key}={value}"
            )


def test_option_specifics(typed_config) -> None:
    paper = typed_config(["model=paper_18m"]).model
    assert (paper.d_model, paper.n_layer, paper.n_head, paper.d_ff, paper.dropout, paper.block_size) == (
        256,
        6,
        8,
        1024,
        0.1,
        512,
    )
    assert typed_config(["ncn=paper_global"]).ncn.pooling == "global"
    assert typed_config(["ncn=swish_beta"]).ncn.activation == "swish_beta"
    assert typed_config(["ncn=per_head_temperature"]).ncn.per_head_precision is True
    gpu = typed_config(["trainer=gpu"]).trainer
    assert (gpu.precision, gpu.compile, gpu.device) == ("bf16", True, "cuda")
    smoke = typed_config(["trainer=smoke"]).trainer
    assert (smoke.max_steps, smoke.checkpoint_every, smoke.eval_every) == (6, 3, 3)
    data = typed_config(["data=tinystories"]).data
    assert (data.source, data.path, data.val_split, data.tokenizer) == (
        "hf",
        "roneneldan/TinyStories",
        "validation",
        "gpt2",
    )
    assert typed_config(["data.tokenizer=bytes"]).model.vocab_size == 320  # 257 byte ids padded to 64
    assert typed_config(["tracking=none"]).tracking.backend == "none"


def test_schemas_reject_typos_and_wrong_types(compose_config) -> None:
    with pytest.raises(ConfigCompositionException, match="d_modle"):
        compose_config(["model.d_modle=64"])
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps=abc"):
        compose_config(["trainer.max_steps=abc"])


def test_run_names(compose_config) -> None:
    assert default_run_name(
        {"model": "small", "ncn": "temperature_only", "data": "shakespeare", "optim": "adamw"}, 0
    ) == ("small-temperature_only-s0")
    assert (
        default_run_name({"model": "tiny", "ncn": "none", "data": "tinystories", "optim": "adamw"}, 3)
        == "tiny-none-tinystories-s3"
    )
    cfg = compose_config(["ncn=gain_only", "seed=7"], hydra=True)
    assert default_run_name(OmegaConf.to_container(cfg.hydra.runtime.choices), cfg.seed) == "small-gain_only-s7"


def _name(compose_config, overrides: list[str], swept: tuple[str, ...] = ()) -> str:
    """The default run name of a command line, as the train task builds it."""
    choices = OmegaConf.to_container(compose_config(overrides, hydra=True).hydra.runtime.choices)
    cfg = compose_config(overrides)
    typed = [o.split("=", 1)[0] for o in overrides]
    return default_run_name(choices, cfg.seed, name_overrides(OmegaConf.to_container(cfg, resolve=True), typed, swept))


def test_run_names_tell_runs_apart(compose_config) -> None:
    """Architecture overrides and a sweep's varied keys are in the name; what does not change the model
    (the budget, the seed, paths) is not; more than three named overrides become a short hash of them."""
    assert _name(compose_config, []) == "small-full-s0"  # the default run keeps its name
    assert _name(compose_config, ["model.d_model=96", "model.n_layer=2"]) == "small-full-d_model_96-n_layer_2-s0"
    assert _name(compose_config, ["model=tiny", "trainer.max_steps=50", "seed=1"]) == "tiny-full-s1"
    assert _name(compose_config, ["data.tokenizer=bytes"]) == "small-full-tokenizer_bytes-s0"
    assert _name(compose_config, ["ncn.targets=[temperature,gain]"]) == "small-full-targets_temperature+gain-s0"
    # the pooling sweep: its jobs differ in ncn.pooling only; an ad-hoc trainer grid is shown as swept
    pooling = ["model=tiny", "ncn.pooling=global", "seed=2"]
    assert _name(compose_config, pooling, swept=("ncn.pooling", "seed")) == "tiny-full-pooling_global-s2"
    assert _name(compose_config, ["trainer.skip_nonfinite=5"], swept=("trainer.skip_nonfinite",)) == (
        "small-full-skip_nonfinite_5-s0"
    )
    many = ["model.d_model=96", "model.n_layer=2", "model.n_head=2", "ncn.heads=1"]
    hashed = _name(compose_config, many)
    assert re.fullmatch(r"small-full-c[0-9a-f]{6}-s0", hashed)
    assert hashed == _name(compose_config, list(reversed(many)))  # the same overrides in another order
    assert hashed != _name(compose_config, [*many[:3], "ncn.heads=2"])  # one value differs


def test_every_reference_flag_has_an_override(compose_config) -> None:
    cfg = compose_config()
    for flag, key in REFERENCE_FLAGS.items():
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", f"{flag} -> {key} is not a config key"
    readme = (REPO / "README.md").read_text()
    for flag, key in REFERENCE_FLAGS.items():
        assert f"`{flag}" in readme and key in readme, f"README's flag table lacks {flag} -> {key}"


def test_cli_config_errors_are_one_line(tmp_path: Path) -> None:
    unknown = run_cli(["ncn=bogus"], cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: ncn=bogus is not an option of ncn: check the spelling, valid options are "
        + ", ".join(sorted(p.stem for p in (REPO / "conf" / "ncn").glob("*.yaml")))
    ]
    shape = run_cli(["model.d_model=100", "model.n_head=3", "tracking=none"], cwd=tmp_path)
    assert shape.returncode == 2
    assert shape.stderr.strip().splitlines()[-1] == (
        "error: model.d_model=100 is not divisible by model.n_head=3: choose d_model as a multiple of n_head "
        "(e.g. model.d_model=99)"
    )
    assert not (tmp_path / "mlflow.db").exists()  # nothing created for a config error


@pytest.mark.parametrize(
    ("override", "key", "choices"),
    [
        ("+trainer.max_step=10", "trainer.max_step", "max_steps, epochs, max_tokens, batch_size,"),
        ("++foo=1", "foo", "model, ncn, control, data, optim, trainer, tracking,"),
        ("+model.d_modle=64", "model.d_modle", "vocab_size, block_size, d_model,"),
        ("++optim.lr_min=0.1", "optim.lr_min", "lr, min_lr,"),
    ],
)
def test_a_key_added_with_plus_that_the_schema_lacks_is_refused(typed_config, override, key, choices) -> None:
    """The same wording as a misspelt key without `+` (tests/test_cli_errors.py): one way to say it."""
    with pytest.raises(NCNConfigError) as err:
        typed_config(["model=tiny", override])
    assert str(err.value).startswith(f"{key} is not a setting: check the spelling, valid keys here are {choices}")


def test_plus_on_a_known_key_and_dict_fields_still_work(typed_config) -> None:
    assert typed_config(["model=tiny", "++trainer.max_steps=7"]).trainer.max_steps == 7
