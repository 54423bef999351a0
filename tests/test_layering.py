"""Imports run one way (DESIGN.md): `ir` imports nothing of einfuse; the kernel kinds import `ir`; `frontend`
imports `ir`; `passes` import `ir` and the kinds; `codegen` imports `ir` and the kinds; `runtime` imports
`codegen` and `ir`; only the api, the CLI, `serve` (api-level) and the package's top-level modules import
`api`/`frontend`; no compiler package imports `serve`. The drivers above the compiler (`serve`, `quant`,
`compress`, `dist`: they compile, calibrate and run models) may import the api. Numeric libraries (GPTQ, the
quantized formats, the ternary dictionary codec: LIBRARIES) import only `ir`, the kinds and each other, and any
layer may use them. No module imports a private (`_name`) name from another module. Read from the source with
`ast`, so an import inside a function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "einfuse"

ALLOWED = {
    "ir": {"ir"},
    "kinds": {"ir", "kinds"},
    "frontend": {"ir", "frontend"},
    "passes": {"ir", "kinds", "passes"},
    "codegen": {"ir", "kinds", "codegen"},
    "runtime": {"runtime", "codegen", "ir"},
}
DRIVERS = {"api", "cli", "__init__", "frontend", "serve", "quant", "compress", "dist"}  # may import api/frontend
LIBRARIES = {"einfuse.quant.gptq", "einfuse.quant.formats", "einfuse.compress.codec", "einfuse.compress.format",
             "einfuse.compress.ternary", "einfuse.compress.experts", "einfuse.compress.ir"}
ALLOWED["library"] = {"ir", "kinds"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if ".".join(("einfuse",) + rel.with_suffix("").parts) in LIBRARIES:
        return "library"
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem  # a top-level module is its own layer


def imports(path: Path, source: str | None = None):
    """(imported einfuse module path, names, line) for every import in the file."""
    tree = ast.parse(path.read_text() if source is None else source)
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "einfuse":
                target = node.module.split(".")
            else:
                continue
            yield ".".join(target), [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "einfuse":
                    yield a.name, [], node.lineno


FILES = sorted(p for p in PACKAGE.rglob("*.py"))


def violations(path: Path, source: str | None = None) -> list[str]:
    out = []
    layer = layer_of(path)
    allowed = ALLOWED.get(layer)
    for target, names, line in imports(path, source):
        parts = target.split(".")
        if parts[0] != "einfuse":
            continue
        if len(parts) == 1:  # `from einfuse import x` / `from .. import __version__`
            to = names[0] if names and names[0] in {"api", "frontend", "ir", "passes", "kinds", "codegen",
                                                    "runtime"} else "einfuse"
        else:
            to = parts[1]
        where = f"{path.relative_to(PACKAGE)}:{line}"
        if target in LIBRARIES:
            to = "library"
        if to in {"api", "frontend"} and layer not in DRIVERS:
            out.append(f"{where} imports einfuse.{to}: only the api, the CLI and the package root may")
        if allowed is not None and to not in allowed and to not in {"einfuse", "library"}:
            out.append(f"{where} ({layer}) imports einfuse.{to}; {layer} may import {sorted(allowed)}")
        if allowed is not None and to == "einfuse" and names != ["__version__"]:
            out.append(f"{where} imports the package root")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private:
            out.append(f"{where} imports private {private} from {target}")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way_and_no_private_names(path):
    assert not violations(path), violations(path)


def test_the_checker_finds_violations():
    """The checker itself: an upward import, a frontend import and a private name are each reported."""
    assert violations(PACKAGE / "passes" / "x.py", "from ..codegen import generate")
    assert violations(PACKAGE / "ir" / "x.py", "from ..kinds import KINDS")
    assert violations(PACKAGE / "runtime" / "x.py", "from ..frontend.lower import lower_graph")
    assert violations(PACKAGE / "kinds" / "x.py", "from ..ir.index import _simplify_node")
    assert violations(PACKAGE / "runtime" / "x.py", "from ..serve import LLM")
    assert not violations(PACKAGE / "serve" / "x.py", "from ..api import compile")
    assert not violations(PACKAGE / "kinds" / "x.py", "from ..ir.index import simplify")
    assert not violations(PACKAGE / "kinds" / "x.py", "from ..compress.codec import Dictionary")  # a library
    assert violations(PACKAGE / "compress" / "codec.py", "from ..passes.base import Pass")  # libraries stay low
    assert violations(PACKAGE / "quant" / "gptq.py", "from ..api import compile")
    assert not violations(PACKAGE / "quant" / "calibrate.py", "from ..api import compile")  # a driver
