"""The package's layering: no import cycles at module level, and the CLI imported by nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import sbm_transformer

ROOT = Path(sbm_transformer.__file__).parent


def module_graph() -> dict[str, set[str]]:
    """Module-level imports between the package's modules (``from pkg import submodule``
    counts as importing the submodule, not the package's ``__init__``)."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.parse(path.read_text()).body:  # module level only
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "sbm_transformer"
            ):
                subs = [f"{node.module}.{a.name}" for a in node.names]
                found = [s for s in subs if s in mods]
                targets += found if len(found) == len(subs) else [node.module or "", *found]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("sbm_transformer")]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def test_no_import_cycles() -> None:
    graph = module_graph()

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()] - seen:
                seen.add(nxt)
                stack.append(nxt)
        return seen

    def nested(a: str, b: str) -> bool:  # a package and its own submodule
        return a.startswith(b + ".") or b.startswith(a + ".")

    cycles = [(a, b) for a in graph for b in graph[a] if a in reachable(b) and not nested(a, b)]
    assert not cycles


def test_the_cli_is_the_top() -> None:
    assert not [m for m, deps in module_graph().items() if "sbm_transformer.cli" in deps]
