"""Architecture checks read from the import graph: two floors, subpackages by concern, a typed boundary, light imports.

The library (`ncn/`) is the shared floor (`config`, `errors`, and the entry side `cli`,
`schema`) plus one subpackage per concern, each importing only what its `__init__` docstring
allows: the model imports nothing from data, training or tracking; the data path nothing from
the model; training may use the model, the data path and the tracker interface; tracking
neither the model nor the data. Task modules (`ncn/tasks/*.py`) import only the library, never
each other; only the entry side sees Hydra's `DictConfig`. Composing a config imports no heavy
dependency and `import ncn` (the model API) imports neither Hydra nor MLflow.
Run: python -m pytest -q tests/test_layers.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, time_left

PACKAGE = REPO / "ncn"
ENTRY = {"ncn.cli", "ncn.schema"}  # the entry point's side of Hydra
SHARED = {"ncn.config", "ncn.errors"}  # every layer may import these
SUBPACKAGES = ("model", "data", "training", "tracking", "analysis", "integrations")
# What each subpackage may import besides itself and the shared floor (its __init__ docstring says so).
MAY_IMPORT = {
    "model": set(),
    "data": set(),
    "training": {"model", "data", "tracking", "analysis"},
    "tracking": set(),
    "analysis": {"model"},
    "integrations": {"model", "data", "training"},
}
HEAVY = ("torch", "mlflow", "datasets", "matplotlib", "pandas", "scipy", "pyarrow", "tiktoken")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p) for p in PACKAGE.rglob("*.py")}
TASKS = {m for m in MODULES if m.startswith("ncn.tasks.")}
LIBRARY = MODULES - TASKS - ENTRY - {"ncn", "ncn.tasks"}


def _file(module: str) -> Path:
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> set[str]:
    """Every ncn module `module` imports, at any depth of its code (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ncn"):
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ncn")}
    return found - {module}


def concern(module: str) -> str | None:
    """The subpackage `module` belongs to (`ncn.model.gpt` -> "model"), None for the shared floor."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else None


def test_the_tree_shows_the_architecture() -> None:
    assert {
        "ncn.model.gpt",
        "ncn.model.blocks",
        "ncn.model.controller",
        "ncn.model.signals",
        "ncn.data.loader",
        "ncn.data.sources",
        "ncn.data.token_cache",
        "ncn.data.tokenizer",
        "ncn.training.loop",
        "ncn.training.checkpoint",
        "ncn.training.evaluation",
        "ncn.training.optim",
        "ncn.training.runtime",
        "ncn.training.job_resume",
        "ncn.tracking.base",
        "ncn.tracking.mlflow_tracker",
        "ncn.tracking.store",
        "ncn.analysis.plots",
        "ncn.analysis.statistics",
    } <= LIBRARY
    assert {f"ncn.{p}" for p in SUBPACKAGES} <= LIBRARY
    assert {m for m in LIBRARY if concern(m) is None} == SHARED, "a module outside the subpackages and the shared floor"
    assert {
        f"ncn.tasks.{t}" for t in ("train", "prepare", "generate", "analyze", "evaluate", "report", "sweep")
    } <= TASKS


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_subpackage_says_what_it_owns_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    assert len(doc.split()) >= 40, f"ncn/{package}/__init__.py needs a paragraph: what it owns, what it may import"
    assert "import" in doc


@pytest.mark.parametrize("module", sorted(LIBRARY | ENTRY))
def test_the_library_never_imports_a_task(module: str) -> None:
    assert not {m for m in imports(module) if m.startswith("ncn.tasks")}, f"{module} imports a task"
    if module in LIBRARY:
        assert not imports(module) & ENTRY, f"{module} imports the entry point's Hydra side"


@pytest.mark.parametrize("module", sorted(m for m in LIBRARY if concern(m) is not None))
def test_a_subpackage_imports_only_what_its_concern_allows(module: str) -> None:
    own = concern(module)
    allowed = {own, *MAY_IMPORT[own]}
    bad = {m for m in imports(module) if m not in SHARED and concern(m) not in allowed}
    assert not bad, f"{module} ({own}) imports {sorted(bad)}; {own} may import {sorted(allowed)} and {sorted(SHARED)}"


def test_the_shared_floor_imports_no_subpackage_and_the_rules_hold_as_stated() -> None:
    assert imports("ncn.config") <= {"ncn.errors"}
    assert imports("ncn.errors") == set()
    # the rules of the layout, as the __init__ docstrings state them
    assert "model" not in MAY_IMPORT["data"] and not {"data", "training", "tracking"} & MAY_IMPORT["model"]
    assert not {"model", "data"} & MAY_IMPORT["tracking"]


@pytest.mark.parametrize("module", sorted(TASKS))
def test_a_task_imports_only_the_library(module: str) -> None:
    assert imports(module) <= LIBRARY | {"ncn"}, f"{module} imports {sorted(imports(module) - LIBRARY)}"


@pytest.mark.parametrize("module", sorted(LIBRARY | TASKS - {"ncn.tasks.sweep"}))
def test_no_library_or_task_function_takes_a_dict_config(module: str) -> None:
    tree = ast.parse(_file(module).read_text())
    hydra = [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        and any((getattr(n, "module", None) or a.name).startswith("hydra") for a in n.names)
    ]
    assert hydra == [], f"{module} imports Hydra"
    signatures = [
        ast.unparse(a.annotation)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef,))
        for a in f.args.args + f.args.kwonlyargs
        if a.annotation is not None
    ]
    assert not [s for s in signatures if "DictConfig" in s], f"{module} has a function taking a DictConfig"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=time_left(),
    )
    return {m.split(".")[0] for m in out.stdout.split()}


def test_composing_and_validating_a_config_imports_nothing_heavy() -> None:
    loaded = _modules_after("from ncn import cli, errors, schema, config, tracking\nimport ncn.tasks.sweep")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    errors = _modules_after("import ncn.errors")
    assert not errors & {"hydra", "omegaconf"}


def test_the_model_api_imports_neither_hydra_nor_mlflow() -> None:
    loaded = _modules_after("from ncn import ModulatedGPT, ModelConfig, ModulationConfig")
    assert "torch" in loaded and not loaded & {"hydra", "mlflow", "omegaconf"}
