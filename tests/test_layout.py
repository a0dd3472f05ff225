"""The package's architecture, checked: imports flow one way between wings and no module imports
itself back in a circle. Imports inside functions count too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "looper"

# Each wing may import only wings of a lower rank (and itself). Top-level modules are named alone.
RANKS = {
    "errors": 0,
    "hashing": 0,
    "answers": 0,
    "stats": 0,
    "config": 1,
    "store": 2,
    "data": 3,
    "regime_w": 3,
    "generation": 4,
    "policy": 5,
    "rewards": 5,
    "train": 6,
    "eval": 6,
    "plan": 6,
    "stages": 7,
    "loop": 8,
    "cli": 9,
    "__main__": 10,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> set[str]:
    """The looper modules `path` imports (`from looper.x import y` names module looper.x.y when it is one)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("looper")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "looper":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found - {name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path, name) for name, path in MODULES.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "looper"


def test_every_wing_has_a_rank():
    assert {wing(m) for m in MODULES} - {"looper"} <= set(RANKS)


def test_no_import_circles():
    """Depth-first search for a back edge; the message names the circle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if dep not in GRAPH or dep == "looper":
                continue
            if state.get(dep) == 1:
                circle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_imports_flow_down():
    upward = [
        f"{module} imports {dep}"
        for module, deps in GRAPH.items()
        for dep in deps
        if wing(module) != wing(dep)
        and wing(dep) != "looper"
        and wing(module) != "looper"
        and RANKS[wing(dep)] >= RANKS[wing(module)]
    ]
    assert not upward, "imports that go up or sideways between wings:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The checks above cannot pass vacuously: the graph holds edges, and a known edge is found."""
    assert "looper.store.artifacts" in GRAPH["looper.stages.prepare"]
    assert "looper.store.integrity" in GRAPH["looper.store.artifacts"]


def test_stages_meet_only_through_artifacts():
    """A stage never imports another stage; a stage's mode module (`ppo_online` for `ppo --online`,
    `sft_rollouts` for `sft --rollouts`) is part of its stage."""
    crossing = [
        f"{module} imports {dep}"
        for module, deps in GRAPH.items()
        for dep in deps
        if wing(module) == wing(dep) == "stages"
        and dep != "looper.stages"
        and not dep.rsplit(".", 1)[1].startswith(module.rsplit(".", 1)[1] + "_")
    ]
    assert not crossing, "\n".join(sorted(crossing))


PRIVATE_TRL = (
    "_compute_loss",
    "_calculate_rewards",
    "_generate_and_score_completions",
    "_get_per_token_logps_and_entropies",
    "_metrics",
    "_total_train_tokens",
    "_save_checkpoint",
    "_save_optimizer_and_scheduler",
    "_tr_loss",
    "_total_loss_scalar",
    "trl.trainer.utils",
)


def test_trl_internals_stay_behind_one_door():
    """Outside looper/train/trl_internals.py no module names a private TRL/transformers member."""
    door = PACKAGE / "train" / "trl_internals.py"
    found = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in MODULES.values()
        if path != door
        for name in PRIVATE_TRL
        if name in path.read_text()
    ]
    assert not found, "\n".join(found)
    assert all(name in door.read_text() for name in PRIVATE_TRL[:4])  # the door really holds them


def test_an_unsupported_trl_is_one_line():
    import pytest

    from looper.errors import LooperError
    from looper.train.trl_internals import SUPPORTED_TRL, check_trl_version

    check_trl_version(SUPPORTED_TRL[0] + ".0")
    with pytest.raises(LooperError, match=r"trl>=1\.16,<1\.17"):
        check_trl_version("1.18.0")
