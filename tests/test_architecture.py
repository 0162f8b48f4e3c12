"""The layout as a rule: imports point down the floors, functions stay short, imports hidden
inside functions are only the heavy optional ones."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional, Tuple

from grafccsr.paths import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "grafccsr"
FLOORS = {
    # what everything stands on
    "paths": 0, "config": 0, "camera": 0, "imaging": 0,
    # data and models; the leaves for tracking and measuring
    "data": 1, "models": 1, "tracking": 1, "measure": 1,
    "metrics": 2,
    "training": 3,
    # built on training
    "evaluation": 4, "sizing": 4, "bench": 4,
    "sweeping": 5, "services": 5,
    # the command lines, and the ``python -m grafccsr.<name>`` shims
    "cli": 6, "train": 6, "eval": 6, "sweep": 6, "memory": 6,
}
"""Floors, bottom to top: a module may import its own floor and the ones below."""
HEAVY = {"mlflow", "optuna", "torch_fidelity", "torchmetrics", "matplotlib", "submitit", "psycopg2", "imageio",
         "imageio_ffmpeg", "tqdm", "hydra", "scipy", "sqlalchemy", "torch", "pandas", "plotly", "optuna_dashboard"}
"""What a function may import inside itself: modules that cost seconds or are optional (the
CLIs answer --help at once; a metric does not load torch-fidelity until it is computed). A
grafccsr module may be imported inside a function when it imports one of these at its top, or
from a command line (every grafccsr module imports torch)."""
LONG_FUNCTION_LINES = 80


def modules() -> Iterator[Tuple[Path, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts[0]


def imports(tree: ast.AST) -> Iterator[Tuple[ast.stmt, str, bool]]:
    """(node, imported module, inside a function?) of every import."""
    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child, alias.name, in_function
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                yield child, child.module, in_function
            yield from walk(child, inner)

    yield from walk(tree, False)


def floor_of(module: str) -> Optional[int]:
    parts = module.split(".")
    if parts[0] != "grafccsr" or len(parts) < 2:
        return None
    return FLOORS[parts[1]]


def test_every_module_has_a_floor():
    assert {top for _, top in modules() if top != "__init__"} <= set(FLOORS)


def test_imports_point_down():
    wrong = []
    for path, top in modules():
        if top == "__init__" or path.name == "__main__.py":  # `python -m` shims call their CLI
            continue
        for node, module, _ in imports(ast.parse(path.read_text())):
            target = floor_of(module)
            if target is not None and target > FLOORS[top]:
                wrong.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} ({top}, floor {FLOORS[top]}) "
                             f"imports {module} (floor {target})")
    assert not wrong, "\n".join(wrong)


def test_analysis_is_above_the_package():
    for path in sorted((PROJECT_ROOT / "analysis").rglob("*.py")):
        for _, module, _ in imports(ast.parse(path.read_text())):
            assert not module.startswith("grafccsr.cli"), f"{path}: analysis uses the library, not the CLIs"


def _module_file(module: str) -> Optional[Path]:
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _heavy_at_top(module: str) -> bool:
    path = _module_file(module)
    if path is None:
        return False
    return any(not inside and name.split(".")[0] in HEAVY for _, name, inside in imports(ast.parse(path.read_text())))


def test_imports_inside_functions_are_heavy_or_optional():
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((PROJECT_ROOT / "analysis").rglob("*.py")):
        command_line = "cli" in path.parts or "analysis" in path.parts
        for node, module, in_function in imports(ast.parse(path.read_text())):
            root = module.split(".")[0]
            ours = root in ("grafccsr", "analysis")
            if in_function and root not in HEAVY and not (ours and (command_line or _heavy_at_top(module))):
                hidden.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} imports {module} inside a function")
    assert not hidden, "\n".join(hidden)


def test_functions_are_short_or_say_why():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((PROJECT_ROOT / "analysis").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                head = "\n".join(lines[node.lineno - 1:node.lineno + 3])
                if length > LONG_FUNCTION_LINES and "# long:" not in head:
                    long.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "\n".join(long)


def test_every_package_ships_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PROJECT_ROOT).parts) for root in ("grafccsr", "analysis")
             for p in (PROJECT_ROOT / root).rglob("__init__.py")}
    # analysis/ installs as grafccsr_analysis: no top-level package of a common name
    found = {f"grafccsr_{name}" if name.split(".")[0] == "analysis" else name for name in found}
    groups = {"grafccsr.conf"} | {f"grafccsr.conf.{d.name}" for d in (PROJECT_ROOT / "conf").iterdir() if d.is_dir()}
    groups.add("grafccsr.studies")  # sweeps/, the study files
    assert found | groups == listed


def test_the_gpu_check_needs_only_torch_hydra_numpy_yaml():
    """.ci/gpu-check runs on a bare GPU machine: the modules it uses (and tests/test_gpu.py's)
    import none of MLflow, Optuna, torch-fidelity, Pillow, psutil, submitit or psycopg2."""
    import subprocess
    import sys

    blocked = ["mlflow", "optuna", "torch_fidelity", "PIL", "psutil", "submitit", "psycopg2", "pandas", "matplotlib"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import grafccsr.cli.bench, grafccsr.cli.memory, grafccsr.sizing.calibrate, grafccsr.sizing.batch_finder\n"
            "import grafccsr.sizing.synthetic, grafccsr.measure, grafccsr.models\n"
            "from grafccsr.cli.memory import main\n"
            "assert main(['estimate', '+exp=smoke', '--train-only']) == 0\n"
            "try:\n"  # the error path too: a bad value is one line, exit 2
            "    code = main(['estimate', '+exp=smoke', 'train.batch_size=eight'])\n"
            "except SystemExit as stop:\n"
            "    code = stop.code\n"
            "assert code == 2, code\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
