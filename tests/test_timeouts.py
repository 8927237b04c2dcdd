"""The suite's time budgets agree: no test allows a child process more time than pytest-timeout allows it.

Reads every test file's syntax tree (nothing runs): a test's budget is its `@pytest.mark.timeout(N)`,
else conftest.SLOW_TIMEOUT_S when it (or its module) is marked `slow`, else pyproject's `timeout`.
Every literal `timeout=` a test passes (subprocess.run, communicate, wait, join, ...) must fit in
that budget, one by one and all together; a helper outside a test may only wait briefly
(HELPER_WAIT_S) for a process it already stopped, and otherwise takes the test's `time_left()`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO, SLOW_TIMEOUT_S

HELPER_WAIT_S = 60


def _mark(node: ast.expr) -> tuple[str, list[ast.expr]] | None:
    """`pytest.mark.NAME` or `pytest.mark.NAME(args)` -> (NAME, args)."""
    call = node if isinstance(node, ast.Call) else None
    target = call.func if call else node
    if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "pytest.mark":
        return target.attr, list(call.args) if call else []
    return None


def _literal_timeouts(node: ast.AST) -> list[tuple[int, float]]:
    """(line, seconds) of every `timeout=<number>` keyword in calls under `node`."""
    return [
        (call.lineno, float(kw.value.value))
        for call in ast.walk(node)
        if isinstance(call, ast.Call)
        for kw in call.keywords
        if kw.arg == "timeout" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, int | float)
    ]


def budgets_and_timeouts(source: str, suite_timeout: float) -> tuple[dict[str, float], dict[str, list], list]:
    """-> (test name -> budget s, test name -> its literal timeouts, literal timeouts outside tests)."""
    tree = ast.parse(source)
    module_marks = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in stmt.targets):
            values = stmt.value.elts if isinstance(stmt.value, ast.List | ast.Tuple) else [stmt.value]
            module_marks |= {m[0] for m in map(_mark, values) if m}
    budgets, inside, seen = {}, {}, set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or not fn.name.startswith("test_"):
            continue
        marks = dict(m for m in map(_mark, fn.decorator_list) if m)
        if "timeout" in marks:
            budgets[fn.name] = float(ast.literal_eval(marks["timeout"][0]))
        elif "slow" in marks or "slow" in module_marks:
            budgets[fn.name] = float(SLOW_TIMEOUT_S)
        else:
            budgets[fn.name] = suite_timeout
        inside[fn.name] = _literal_timeouts(fn)
        seen |= {line for line, _ in inside[fn.name]}
    outside = [(line, s) for line, s in _literal_timeouts(tree) if line not in seen]
    return budgets, inside, outside


@pytest.mark.parametrize("path", sorted((REPO / "tests").glob("test_*.py")), ids=lambda p: p.name)
def test_no_test_allows_a_child_more_time_than_it_has(path: Path, pytestconfig: pytest.Config) -> None:
    suite_timeout = float(pytestconfig.getini("timeout"))
    budgets, inside, outside = budgets_and_timeouts(path.read_text(), suite_timeout)
    for name, waits in inside.items():
        assert all(s <= budgets[name] for _, s in waits), f"{path.name}::{name} budget {budgets[name]}: {waits}"
        assert sum(s for _, s in waits) <= budgets[name], f"{path.name}::{name} budget {budgets[name]}: {waits}"
    assert all(s <= HELPER_WAIT_S for _, s in outside), f"{path.name}: helpers wait {outside}"


def test_the_budget_check_catches_a_child_that_outlives_its_test() -> None:
    """The check itself: the shapes that were wrong (a 400 s child under the 300 s suite timeout, two
    200 s children in one test, a 300 s helper default) are caught; a marked budget is honoured."""
    source = """
import pytest
pytestmark = [pytest.mark.slow]

def test_a():
    subprocess.run(cmd, timeout=400)

@pytest.mark.timeout(120)
def test_b():
    run(x, timeout=100); run(y, timeout=100)

def _helper(cmd, limit=3):
    return subprocess.run(cmd, timeout=300)
"""
    budgets, inside, outside = budgets_and_timeouts(source, 300.0)
    assert budgets == {"test_a": SLOW_TIMEOUT_S, "test_b": 120.0}
    assert inside == {"test_a": [(6, 400.0)], "test_b": [(10, 100.0), (10, 100.0)]}
    assert outside == [(13, 300.0)]
    plain = budgets_and_timeouts("def test_c():\n    p.wait(timeout=400)\n", 300.0)
    assert plain == ({"test_c": 300.0}, {"test_c": [(2, 400.0)]}, [])
