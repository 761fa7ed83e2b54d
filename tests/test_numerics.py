"""The shared numeric rules are defined once (beyond_cls.numerics, ops._dispatch) and mean what they say."""

from __future__ import annotations

import ast
import math

import pytest
import torch

from beyond_cls import numerics
from tests.test_layering import package_modules

# name -> the one module allowed to define it
HOMES = {
    "entropy": "beyond_cls.numerics",
    "max_entropy": "beyond_cls.numerics",
    "accumulation_dtype": "beyond_cls.numerics",
    "MAX_KEPT_ROWS": "beyond_cls.numerics",
    "MAX_BRANCHES": "beyond_cls.numerics",
    "interpreting": "beyond_cls.triton_mode",
}


def _definitions() -> dict[str, list[str]]:
    """Every module that defines one of HOMES' names at module level (def or assignment)."""
    found: dict[str, list[str]] = {name: [] for name in HOMES}
    for module, path in package_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = []
            if isinstance(node, ast.FunctionDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for name in names:
                if name in found:
                    found[name].append(module)
    return found


def test_each_rule_has_one_definition():
    assert _definitions() == {name: [home] for name, home in HOMES.items()}


def test_only_numerics_takes_the_log_of_a_patch_count():
    calls = [
        module for module, path in package_modules().items() if module != "beyond_cls.numerics"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "math.log"
    ]
    assert calls == []


@pytest.mark.parametrize("dtypes, expected", [
    ((torch.float64,), torch.float64),
    ((torch.bfloat16, torch.float64), torch.float64),
    ((torch.float16,), torch.float32),
    ((torch.bfloat16, torch.float32), torch.float32),
])
def test_accumulation_dtype(dtypes, expected):
    assert numerics.accumulation_dtype(*dtypes) == expected


def test_entropy_is_exact_with_zero_weights():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4], dtype=torch.float64)
    assert numerics.entropy(p).tolist() == [math.log(2), 0.0, math.log(4)]
    assert numerics.max_entropy(196) == pytest.approx(5.278, abs=1e-3)
