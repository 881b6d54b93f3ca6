"""The rooms' import rules of the README's "Map of the folders" that say "never": every import
of each file, the function-level ones too, read from its source (nothing is imported here)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
def files_in(folder: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob("*.py"))


INFERENCE = ["trainer/bundle.py", "trainer/sampling.py", "trainer/cascade.py", "trainer/evaluate.py",
             "trainer/heldout.py", "trainer/judge.py", "trainer/export.py"]
STAGES = ["trainer/stage_config.py", *files_in("trainer/stages")]
DATA = files_in("data_pipeline")
MODELS = files_in("trainer/models")

# (files, module prefixes they never import)
RULES = {
    "inference never stages": (INFERENCE, ("trainer.stages",)),
    "stages never cascade, evaluate or sampling": (STAGES, ("trainer.cascade", "trainer.evaluate", "trainer.sampling")),
    "data_pipeline never trainer or deepspeed": (DATA, ("trainer", "deepspeed")),
    "models no DeepSpeed": (MODELS, ("deepspeed",)),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of this file names (`from a import b` also as a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def breaks(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("rule", list(RULES))
def test_room_never_imports(rule):
    files, prefixes = RULES[rule]
    assert files
    broken = {f: sorted(m for m in imported_modules(ROOT / f) if breaks(m, prefixes)) for f in files}
    assert not {f: m for f, m in broken.items() if m}, rule
