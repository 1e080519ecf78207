"""Stage packages never import each other (DESIGN.md): what two stages share lives on the floor below them
(common/, model/, tokenizer/, and data/ for the data stages). Every import in every module is checked,
top-level and function-local alike, by parsing the source (so a lazy import cannot hide a crossing)."""

import ast
from pathlib import Path

import ember

SRC = Path(ember.__file__).parent
STAGES = ("pretrain", "sft", "align", "eval", "serve", "compress", "safety", "rag", "scaling", "vision")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]  # from ember import sft
    return out


def crossings(src: Path = SRC) -> list[str]:
    bad = []
    for stage in STAGES:
        for path in sorted((src / stage).rglob("*.py")) if (src / stage).is_dir() else []:
            for line, mod in imported_modules(path):
                parts = mod.split(".")
                if parts[0] == "ember" and len(parts) > 1 and parts[1] in STAGES and parts[1] != stage:
                    bad.append(f"{path.relative_to(src.parent)}:{line} imports {mod}")
    return bad


def test_no_stage_imports_another_stage():
    assert crossings() == [], "move the shared piece down to common/, model/ or tokenizer/"


def test_the_floor_imports_no_stage():
    floor = [p for d in ("common", "model", "tokenizer") for p in (SRC / d).rglob("*.py")]
    bad = [f"{p.relative_to(SRC.parent)}:{line} imports {mod}" for p in floor for line, mod in imported_modules(p)
           if mod.split(".")[:1] == ["ember"] and len(mod.split(".")) > 1 and mod.split(".")[1] in STAGES]
    assert bad == []


def test_the_check_sees_a_crossing(tmp_path):
    """The checker itself finds a function-local cross-stage import (it would pass vacuously otherwise)."""
    fake = tmp_path / "ember"
    (fake / "sft").mkdir(parents=True)
    (fake / "sft" / "x.py").write_text("def f():\n    from ember.pretrain.sample import generate\n")
    assert crossings(fake) == ["ember/sft/x.py:2 imports ember.pretrain.sample",
                               "ember/sft/x.py:2 imports ember.pretrain.sample.generate"]
