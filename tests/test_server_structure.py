"""server/ is a tree: the route modules import downward only (never each other, never the app), and only the
runner touches the engine (so a change of the engine's API is a change of one server module)."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import qwen_awq.server

SERVER = Path(qwen_awq.server.__file__).parent
ROUTES = {"openai_api", "tgi_api", "vllm_api"}
ENGINE = ("qwen_awq.engine", "qwen_awq.generation")


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_server_modules_form_a_tree_with_one_engine_bridge():
    graph = {}
    for f in SERVER.glob("*.py"):
        deps = imports(f)
        graph[f.stem] = {d.rsplit(".", 1)[-1] for d in deps
                         if d.startswith("qwen_awq.server.") and (SERVER / f"{d.rsplit('.', 1)[-1]}.py").is_file()}
        if f.stem not in ("runner", "serve"):  # serve builds the engine for the CLI; no request touches it
            assert not [d for d in deps if d.startswith(ENGINE)], f"{f.name} uses the engine outside runner.py"
    assert list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    for route in ROUTES:
        assert not graph[route] & (ROUTES | {"app"}), f"{route} imports {graph[route] & (ROUTES | {'app'})}"
    assert "scheduler" not in "".join((SERVER / f"{r}.py").read_text() for r in ROUTES)
