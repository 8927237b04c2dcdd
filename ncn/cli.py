"""The entry point's side of Hydra: typed config and run context in, one-line errors and exit codes out.

`typed(cfg)` turns the composed `DictConfig` into a `RunConfig` (`OmegaConf.to_object`, which
runs every dataclass's validation) and a `RunContext` read from `HydraConfig`; tasks never see
Hydra. `one_line(exc)` words any error that ends a run as one line for `error: <message>`,
`shell_quote_override` suggests a quoting of an override that bash and Hydra both accept.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

import ncn.schema  # noqa: F401  (registers the resolvers and the schema before composition)
from ncn.config import RunConfig, RunContext
from ncn.errors import NCNConfigError, RunFailedError

AMBIGUOUS_HINT = (
    "quote a value with spaces or commas, e.g. \"prompt='To be, or not'\" "
    "(the double quotes are for the shell, the single quotes for Hydra)"
)
_SHELL_SPECIAL = set("$`\\!")  # special to bash inside double quotes (besides the quote itself)


def typed(cfg: DictConfig) -> tuple[RunConfig, RunContext]:
    """(RunConfig, RunContext) of the composed config `cfg` of a running Hydra app (or of a test's compose).

    Raises:
        MissingMandatoryValue: a `???` left unset (named by `one_line`); NCNConfigError: an invalid value.
    """
    for key in sorted(OmegaConf.missing_keys(cfg)):
        OmegaConf.select(cfg, key, throw_on_missing=True)  # raises MissingMandatoryValue naming the key
    run_cfg = OmegaConf.to_object(cfg)
    assert isinstance(run_cfg, RunConfig), f"conf/config.yaml must extend the RunConfig schema, got {type(run_cfg)}"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if not HydraConfig.initialized():
        return run_cfg, RunContext.here(resolved)
    hydra_cfg = HydraConfig.get()
    overrides = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    job_num = int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return run_cfg, RunContext(
        run_dir=Path(hydra_cfg.runtime.output_dir),
        launch_dir=Path(hydra_cfg.runtime.cwd),
        choices={k: str(v) for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")},
        overridden=frozenset(o.key_or_group.lstrip("+~") for o in overrides),
        config=resolved,
        command=" ".join(shlex.quote(a) for a in sys.argv),
        job=job_num,
    )


def shell_quote_override(override: str) -> str:
    """`key=value` quoted so that bash passes it unchanged and Hydra reads `value` as one string.

    The value is quoted for Hydra with single quotes (double quotes when it holds a single
    quote), then the whole override for the shell: in double quotes (inner ones escaped) when
    nothing else in it is special to bash inside double quotes, else with `shlex.quote`.
    """
    key, _, value = override.partition("=")
    if "'" not in value:
        hydra_value = f"'{value}'"
    elif '"' not in value:
        hydra_value = f'"{value}"'
    else:
        hydra_value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    text = f"{key}={hydra_value}"
    if _SHELL_SPECIAL & set(text):
        return shlex.quote(text)
    return '"' + text.replace('"', '\\"') + '"'


def typed_override(fragment: str, argv: list[str]) -> str:
    """The override as the user meant it: `fragment` (what Hydra could not parse) joined with the
    shell words around it that belong to the same `key=value`, e.g. "prompt=To be, or not" for
    `prompt=To be, or not` typed without quotes (the shell split it into four words)."""
    if fragment not in argv:
        return fragment
    start = argv.index(fragment)
    while start > 0 and "=" not in argv[start]:
        start -= 1
    end = argv.index(fragment) + 1
    while end < len(argv) and "=" not in argv[end]:
        end += 1
    return " ".join(argv[start:end]) if "=" in argv[start] else fragment


def one_line(exc: BaseException) -> str:
    """Our own message if the cause chain holds an ncn error, else Hydra's/OmegaConf's, on one line."""
    if isinstance(exc, KeyboardInterrupt):  # the train task says where it stopped and how to go on
        return str(exc) if str(exc).startswith("interrupted") else "interrupted"
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    first = [str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__ for e in chain]
    for e, line in zip(chain, first, strict=True):
        if isinstance(e, (NCNConfigError, RunFailedError)):
            return line
        if isinstance(e, OverrideParseException):
            meant = typed_override(e.override, sys.argv[1:])
            reason = line.removeprefix("LexerNoViableAltException: ")
            if meant != e.override:
                reason = "unquoted, the shell split it into words at its spaces"
            elif reason in meant:
                reason = "a character in it is reserved by Hydra's override grammar"
            return f"cannot parse the override {meant} ({reason}): quote its value, e.g. {shell_quote_override(meant)}"
        if line.startswith("Ambiguous value for argument"):
            return f"{line}: {AMBIGUOUS_HINT}"
        if isinstance(e, MissingMandatoryValue) and e.full_key:  # a `???` left in the config
            return f"{e.full_key} is required here: set {e.full_key}=<value>"
        if getattr(e, "options", None):  # Hydra's MissingConfigException: an unknown group option
            return f"{line}: choose one of {', '.join(e.options)}"
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and e.parent_node is not None:  # a typo'd key
            keys = [str(k) for k in e.parent_node if str(k) != "hydra" and not str(k).startswith("_")]
            return f"{e.full_key} is not a setting: check the spelling, valid keys here are {', '.join(keys)}"
        if isinstance(e, ValidationError) and e.child_node is not None:  # a value of the wrong type
            return f"{e.full_key}={e.value} is invalid ({line}): use a value like {e.full_key}={e.child_node}"
    return ": ".join(dict.fromkeys(line for line in first[:2] if "$VALUE" not in line))
