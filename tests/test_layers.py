"""Architecture checks read from the import graph: two floors, a typed boundary, light imports.

Library modules (`ncn/*.py`) never import a task; task modules (`ncn/tasks/*.py`) import only the
library, never each other; only the entry side (`ncn/cli.py`, `ncn/schema.py`, the Hydra sweep
callback) sees Hydra's `DictConfig`. Composing a config imports no heavy dependency and
`import ncn` (the model API) imports neither Hydra nor MLflow.
Run: python -m pytest -q tests/test_layers.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "ncn"
ENTRY = {"ncn.cli", "ncn.schema"}  # the entry point's side of Hydra
LIBRARY = {f"ncn.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"} - ENTRY
TASKS = {f"ncn.tasks.{p.stem}" for p in (PACKAGE / "tasks").glob("*.py") if p.stem != "__init__"}
HEAVY = ("torch", "mlflow", "datasets", "matplotlib", "pandas", "scipy", "pyarrow", "tiktoken")


def _file(module: str) -> Path:
    return REPO / (module.replace(".", "/") + ".py")


def imports(module: str) -> set[str]:
    """Every ncn module `module` imports, at any depth of its code (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ncn"):
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in LIBRARY | TASKS | ENTRY else node.module
                for a in node.names
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ncn")}
    return found - {module}


def test_the_floors_are_what_the_layout_says() -> None:
    assert {
        "ncn.config",
        "ncn.gpt",
        "ncn.data",
        "ncn.checkpoint",
        "ncn.tracking",
        "ncn.runtime",
        "ncn.plots",
        "ncn.trainer",
        "ncn.evaluation",
        "ncn.tokenizer",
        "ncn.optim",
    } <= LIBRARY
    assert {
        f"ncn.tasks.{t}" for t in ("train", "prepare", "generate", "analyze", "evaluate", "report", "sweep")
    } == TASKS


@pytest.mark.parametrize("module", sorted(LIBRARY | ENTRY))
def test_the_library_never_imports_a_task(module: str) -> None:
    assert not {m for m in imports(module) if m.startswith("ncn.tasks")}, f"{module} imports a task"
    if module in LIBRARY:
        assert not imports(module) & ENTRY, f"{module} imports the entry point's Hydra side"


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
        timeout=120,
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
