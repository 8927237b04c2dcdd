"""The entry point's side of Hydra: typed config and run context in, one-line errors and exit codes out.

`typed(cfg)` turns the composed `DictConfig` into a `RunConfig` (`OmegaConf.to_object`, which
runs every dataclass's validation) and a `RunContext` read from `HydraConfig`; tasks never see
Hydra. `one_line(exc)` words any error that ends a run as one line for `error: <message>`,
`report_error(exc)` prints that line and gives the exit status (run.py, and `ErrorLine`, the
callback that reports a failed single run before Hydra adds its own "Error executing job" line),
`shell_quote_override` suggests a quoting of an override that bash and Hydra both accept,
`app_help` prints Hydra's `--help` text without Hydra's slow listing of every config group.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import string
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, StringNode, open_dict
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

import ncn.schema  # noqa: F401  (registers the resolvers and the schema before composition)
from ncn.config import SWEPT_ENV, RunConfig, RunContext
from ncn.errors import NO_SPACE, USAGE_EXIT, NCNConfigError, RunFailedError, exit_code, mb
from ncn.schema import conf_dir

_SHELL_SPECIAL = set("$`\\!")  # special to bash inside double quotes (besides the quote itself)
HELP_FLAGS = ("--help", "-h")
# errors that end a run with one `error:` line (docs/errors.md); an OSError only when it names a path
REPORTED = (NCNConfigError, RunFailedError, HydraException, OmegaConfBaseException, KeyboardInterrupt, OSError)


def typed(cfg: DictConfig) -> tuple[RunConfig, RunContext]:
    """(RunConfig, RunContext) of the composed config `cfg` of a running Hydra app (or of a test's compose).

    Raises:
        MissingMandatoryValue: a `???` left unset (named by `one_line`); NCNConfigError: an invalid value.
    """
    for key in sorted(OmegaConf.missing_keys(cfg)):
        OmegaConf.select(cfg, key, throw_on_missing=True)  # raises MissingMandatoryValue naming the key
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    overrides = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)) if hydra_cfg else []
    keep_typed_text(cfg, overrides)
    run_cfg = OmegaConf.to_object(cfg)
    assert isinstance(run_cfg, RunConfig), f"conf/config.yaml must extend the RunConfig schema, got {type(run_cfg)}"
    _refuse_unknown_keys(cfg, OmegaConf.structured(run_cfg))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if hydra_cfg is None:
        return run_cfg, RunContext.here(resolved)
    job_num = None
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a sweep job's number is its folder's (the same when a sweep grows)
        folder = Path(hydra_cfg.runtime.output_dir).name
        job_num = int(folder) if folder.isdigit() else int(hydra_cfg.job.num)
    return run_cfg, RunContext(
        run_dir=Path(hydra_cfg.runtime.output_dir),
        launch_dir=Path(hydra_cfg.runtime.cwd),
        choices={k: str(v) for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")},
        overridden=frozenset(o.key_or_group.lstrip("+~") for o in overrides),
        config=resolved,
        command=" ".join(shlex.quote(a) for a in sys.argv),
        job=job_num,
        swept=frozenset(k for k in os.environ.get(SWEPT_ENV, "").split(",") if k and job_num is not None),
    )


def keep_typed_text(cfg: DictConfig, overrides: list[Override]) -> None:
    """Give each text setting of `cfg` (a `str` key: prompt, run_name, tracking.experiment, paths) set by
    one of `overrides` the value as typed on the command line: Hydra's grammar reads `prompt=1.10` as the
    float 1.1, `prompt=true` as True and `prompt=1e3` as 1000.0 before the schema turns them back into
    text ("1.1", "True", "1000.0"). `null` keeps its meaning (the default)."""
    for override in overrides:
        value = override.value() if not override.is_sweep_override() else None
        if value is None or isinstance(value, (str, list, dict)):
            continue
        parent_key, _, leaf = override.key_or_group.lstrip("+~").rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if isinstance(parent, DictConfig) and isinstance(parent._get_node(leaf), StringNode):
            parent[leaf] = override.input_line.split("=", 1)[1].strip()


def _refuse_unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Raise NCNConfigError for a key of `cfg` the typed `schema` lacks: one added with `+`/`++`
    (Hydra lets it past the schema, the dataclass would drop it silently)."""
    for key in cfg:
        if prefix == "" and key == "hydra":
            continue
        path = f"{prefix}{key}"
        if key not in schema:  # the same line as a misspelt key without `+` (`one_line`)
            known = ", ".join(str(k) for k in schema if str(k) != "hydra" and not str(k).startswith("_"))
            raise NCNConfigError(f"{path} is not a setting: check the spelling, valid keys here are {known}")
        if dataclasses.is_dataclass(OmegaConf.get_type(schema, key)):  # a typed group: its keys are fixed
            _refuse_unknown_keys(cfg[key], schema[key], f"{path}.")


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


def grid_without_multirun(override: str) -> str:
    """The message for a grid (`model=tiny,small`, `seed=range(3)`) given to a single run: a grid needs
    `-m` or a sweep config. A value with a comma for a key that is not a config group may also have
    been meant as one text: its quoting is suggested too."""
    key = override.split("=", 1)[0].lstrip("+~")
    message = (
        f"{override} is a grid of values, and a grid needs -m or a sweep config: add -m (python run.py -m ... "
        f"{override}) or launch a sweep (python run.py -cd sweeps -cn <sweep> {override})"
    )
    if (Path(conf_dir()) / key).is_dir() or "," not in override.split("=", 1)[-1]:  # no text with a comma meant
        return message
    return f"{message}; for one value that holds a comma, quote it, e.g. {shell_quote_override(override)}"


def _config_dir_not_found(folder: str) -> str:
    """The message for `-cd <folder>` that does not exist: a relative -cd is read from the folder
    `run.py` was started in, so from outside the clone `-cd sweeps` misses the repository's sweeps/."""
    sweeps = Path(conf_dir()).parent / "sweeps"
    names = ", ".join(sorted(p.stem for p in sweeps.glob("*.yaml")))
    script = shlex.quote(str(Path(sys.argv[0]).resolve()))
    return (
        f"config folder {folder} (-cd) not found: a relative -cd is read from the folder you run in "
        f"({Path.cwd()}); give the sweeps' folder by its path, e.g. python {script} -cd {shlex.quote(str(sweeps))} "
        f"-cn <sweep> (sweeps: {names})"
    )


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


def os_error_line(exc: OSError) -> str:
    """The error line for an OSError on a path a run writes (`exc.filename`): a full disk (ENOSPC,
    EDQUOT) names the file, the free space of its folder and where to write instead; any other
    error names the file, the system's reason and the permissions to check."""
    if exc.errno in NO_SPACE:
        folder = Path(exc.filename).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return (
            f"no space left to write {exc.filename} ({mb(shutil.disk_usage(folder).free)} free in {folder}): "
            "free some space or set hydra.run.dir=<folder on a disk with space>"
        )
    return (
        f"cannot write {exc.filename} ({exc.strerror}): check the path and its permissions "
        "(e.g. hydra.run.dir=<writable folder>)"
    )


def unknown_option(missing: str, options: list[str], message: str) -> str:
    """The line for an option a config group lacks (Hydra's MissingConfigException): `missing` is the
    config path Hydra looked for (`ncn/bogus`), `options` the group's options, `message` the first line
    of Hydra's message (`In '<file>': Could not find ...`), whose file is named when it is not the
    primary config: there the option was written in a config file, not typed."""
    group, _, option = missing.rpartition("/")
    where = re.match(r"In '([^']+)'", message)
    named_in = f" (named in {where.group(1)})" if where and not where.group(1).endswith("config") else ""
    return (
        f"{group}={option} is not an option of {group}{named_in}: check the spelling, "
        f"valid options are {', '.join(options)}"
    )


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
        if line.startswith("Additional config directory") and line.endswith("not found"):  # -cd <relative dir>
            return _config_dir_not_found(line.split("'")[1])
        if line.startswith(("Ambiguous value for argument", "Sweep parameters")):  # a,b / range(3) without -m
            return grid_without_multirun(line.split("'", 1)[1].rsplit("'", 1)[0] if "'" in line else line)
        if isinstance(e, MissingMandatoryValue) and e.full_key:  # a `???` left in the config
            return f"{e.full_key} is required here: set {e.full_key}=<value>"
        if getattr(e, "options", None) and getattr(e, "missing_cfg_file", None):  # an unknown group option
            return unknown_option(e.missing_cfg_file, e.options, line)
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and e.parent_node is not None:  # a typo'd key
            keys = [str(k) for k in e.parent_node if str(k) != "hydra" and not str(k).startswith("_")]
            return f"{e.full_key} is not a setting: check the spelling, valid keys here are {', '.join(keys)}"
        if isinstance(e, ValidationError) and isinstance(e.child_node, StringNode) and not isinstance(e.value, str):
            typed = next((a for a in sys.argv[1:] if a.lstrip("+~").startswith(f"{e.full_key}=")), None)
            typed = typed or f"{e.full_key}={e.value}"  # a list or a mapping in Hydra's grammar, for a text key
            return (
                f"{typed} is not text ({line}): {e.full_key} takes text; to pass it as typed, quote it, "
                f"e.g. {shell_quote_override(typed)}"
            )
        if isinstance(e, ValidationError) and e.child_node is not None:  # a value of the wrong type
            return f"{e.full_key}={e.value} is invalid ({line}): use a value like {e.full_key}={e.child_node}"
    return ": ".join(dict.fromkeys(line for line in first[:2] if "$VALUE" not in line))


def report_error(exc: BaseException) -> int | None:
    """Print the one `error: <message>` line for `exc` to stderr and return run.py's exit status: 2 for a
    user mistake (Hydra's and OmegaConf's errors, a path that cannot be written), 3 for a failed run,
    130 for an interrupt. None, printing nothing, for anything else (a bug: its traceback stays)."""
    if isinstance(exc, OSError) and not isinstance(exc, HydraException):  # MissingConfigException is both
        if exc.filename is None:  # not a bad path: a real failure
            return None
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return USAGE_EXIT
    if not isinstance(exc, REPORTED):
        return None
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return USAGE_EXIT if isinstance(exc, (HydraException, OmegaConfBaseException)) else exit_code(exc)


def failed_job_error(job_return: JobReturn) -> BaseException | None:
    """The exception a failed Hydra job raised, or None. Read from the job's result directly, as Hydra's
    own LogJobReturnCallback does: the `return_value` property writes "Error executing job with overrides:
    [...]" to stderr on every access before re-raising, which printed that line once per reader."""
    if job_return.status != JobStatus.FAILED:
        return None
    error = job_return._return_value
    return error if isinstance(error, BaseException) else None


class ErrorLine(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks.errors`): a single run (not a sweep job) that
    failed with a reported error ends here with its one `error:` line and exit status, before Hydra
    reads the job's result and adds "Error executing job with overrides: [...]" above it. A
    SystemExit passes Hydra's callback wrapper, which catches only Exception. A bug is left to Hydra."""

    def on_run_end(self, config: DictConfig, job_return: JobReturn, **kwargs: object) -> None:
        error = failed_job_error(job_return)
        if error is not None and (status := report_error(error)) is not None:
            raise SystemExit(status)


def _app_groups(parent: str = "") -> dict[str, list[str]]:
    """{group: its options} of the app's config groups under `parent` (nested ones as `a/b`),
    without Hydra's own `hydra/...`; groups without options of their own are left out, as Hydra does."""
    loader = GlobalHydra.instance().config_loader()
    groups: dict[str, list[str]] = {}
    for child in loader.list_groups(parent):
        name = f"{parent}/{child}" if parent else child
        if name == "hydra":
            continue
        if options := loader.get_group_options(name, ObjectType.CONFIG):
            groups[name] = options
        if loader.get_group_options(name, ObjectType.GROUP):
            groups.update(_app_groups(name))
    return groups


def app_help(argv: list[str], config_dir: Path, config_name: str) -> str | None:
    """The text `python run.py --help [overrides]` prints, or None when Hydra has to make it itself.

    Hydra's own `--help` answers every group and option query with a fresh deep copy of its
    config repository (the ConfigStore with the schema and every plugin's configs): about 90
    copies for the groups of Hydra and of this app, 0.5 s of a 1 s `--help`. This composes the
    config once with Hydra's compose API and lists only the app's groups, which the help template
    shows (`$APP_CONFIG_GROUPS`, `$CONFIG`): the same text (tests/test_startup.py compares both).
    None for arguments other than the help flag and overrides (`-cd`, `--resolve`, ...), or for a
    help template that uses `$FLAGS_HELP` or `$HYDRA_CONFIG_GROUPS`.

    Raises:
        the errors of composing the config with the overrides, as Hydra's `--help` would.
    """
    if not any(a in HELP_FLAGS for a in argv) or any(a.startswith("-") and a not in HELP_FLAGS for a in argv):
        return None
    overrides = [a for a in argv if a not in HELP_FLAGS]
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # as Hydra's help does: `${hydra:...}` resolves in the template
        template = str(cfg.hydra.help.template)
        used = {m.group(1) or m.group(2) for m in re.finditer(r"\$(?:(\w+)|\{(\w+)\})", template)}
        if used - {"APP_CONFIG_GROUPS", "CONFIG"}:
            return None
        groups = "".join(f"{g}: {', '.join(sorted(options))}\n" for g, options in sorted(_app_groups().items()))
    with open_dict(cfg):
        del cfg["hydra"]
    return string.Template(template).substitute(APP_CONFIG_GROUPS=groups, CONFIG=OmegaConf.to_yaml(cfg))
