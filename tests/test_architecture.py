"""The folder tree is the architecture: the shared model, one room per job, and dependencies that point
one way (model <- eval <- train / embed / serve <- the CLI), with modules that read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "rayembed"

# A room may import rooms of lower layers only; rooms of one layer never import each other.
# eval sits below the jobs: the train job's run report and merge measure with it.
LAYERS = {
    "settings": 0, "io": 0,  # what job configs share; filesystems and Ray start-up
    "tracking": 1,  # experiment tracking and the model registry (a module per backend)
    "model": 2,  # the shared model (a models:/ source is fetched through tracking's registry)
    "data": 3,  # public data sets, training formats, prepare (which may build a random model)
    "eval": 4,
    "train": 5, "embed": 5, "serve": 5,  # the jobs
    "config": 6, "__init__": 6,  # the registry of job configs; the package's face
    "spec": 7,  # YAML specs + key=value overrides
    "cli": 8,
}  # fmt: skip
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Functions allowed past MAX_FUNCTION_LINES, each with the reason it stands (none today).
LONG_FUNCTIONS: dict[str, str] = {}


def room(path: Path, root: Path) -> str:
    """platform/rayembed/<room>/... or platform/rayembed/<room>.py -> <room>."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_rooms(tree: ast.AST, package: str) -> set[str]:
    """Rooms of `package` named by every import in the module, lazy ones inside functions included:
    `rayembed.<room>...`; `from rayembed import <room>`; anything else from `rayembed` is its __init__."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == package and node.level == 0:
            names |= {f"{package}.{a.name}" if a.name in LAYERS else package for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    parts = [n.split(".") for n in names if n == package or n.startswith(f"{package}.")]
    return {p[1] if len(p) > 1 else "__init__" for p in parts}


def violations(root: Path, layers: dict[str, int]) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        own = room(path, root)
        if own not in layers:
            out.append(f"{path.relative_to(root)}: room {own!r} has no layer")
            continue
        for target in sorted(imported_rooms(ast.parse(path.read_text()), root.name) - {own}):
            if target in layers and layers[target] >= layers[own]:
                kind = (
                    "same layer (jobs never import each other)" if layers[target] == layers[own] else "upward"
                )
                out.append(f"{path.relative_to(root)} ({own}) imports {target}: {kind}")
    return out


def too_long(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(root)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{path.relative_to(root)}::{node.name}"
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    out.append(f"{name}: {length} lines")
    return out


def test_dependencies_point_one_way() -> None:
    assert violations(PACKAGE, LAYERS) == []


def test_every_job_has_its_room_with_its_config() -> None:
    from rayembed.config import CONFIGS

    rooms = {"prepare": "data", "train": "train", "merge": "train", "mine": "embed", "eval": "eval",
             "embed": "embed", "serve": "serve"}  # fmt: skip
    assert set(rooms) == set(CONFIGS)
    for job, cls in CONFIGS.items():
        assert cls.__module__ == f"rayembed.{rooms[job]}.config", (job, cls.__module__)


def test_the_checker_catches_upward_and_sideways_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "rayembed"
    (pkg / "model").mkdir(parents=True)
    (pkg / "embed").mkdir()
    (pkg / "model" / "embedder.py").write_text("def f():\n    from rayembed.train.loop import x\n")
    (pkg / "embed" / "job.py").write_text("import rayembed.serve.api\nfrom rayembed.model import Embedder\n")
    (pkg / "io.py").write_text("from rayembed import model\n")
    found = violations(pkg, LAYERS)
    assert found == [
        "embed/job.py (embed) imports serve: same layer (jobs never import each other)",
        "io.py (io) imports model: upward",
        "model/embedder.py (model) imports train: upward",
    ]


def test_modules_and_functions_read_in_one_sitting(tmp_path: Path) -> None:
    assert too_long(PACKAGE) == []
    (tmp_path / "big.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert too_long(tmp_path) == [f"big.py::f: {MAX_FUNCTION_LINES + 1} lines"]


def test_public_names_still_import() -> None:
    """What users import keeps working after the move into rooms (the RayService import path too)."""
    import rayembed
    from rayembed.embed import embed
    from rayembed.eval import evaluate
    from rayembed.model import Embedder, postprocess
    from rayembed.serve import app_builder
    from rayembed.train import train

    assert rayembed.Embedder is Embedder and rayembed.postprocess is postprocess
    for fn, module in ((embed, "embed.job"), (evaluate, "eval.job"),
                       (app_builder, "serve.deployment"), (train, "train.job")):  # fmt: skip
        assert fn.__module__ == f"rayembed.{module}"


def test_configs_the_cli_and_read_tasks_import_no_torch() -> None:
    """Processes that only parse specs or run Ray Data read tasks on rayembed code (a FlagEmbedding
    file's `normalize`, the train job's ingest) stay free of torch and transformers: each import costs a
    Ray worker process ~3 s of CPU and ~180 MB (docs/benchmarks.md "What a Ray worker process imports")."""
    import subprocess
    import sys

    light = ["rayembed", "rayembed.cli", "rayembed.config", "rayembed.spec", "rayembed.io",
             "rayembed.data.flagembedding", "rayembed.train.order", "rayembed.model.layout"]  # fmt: skip
    code = f"import sys\nfor m in {light!r}: __import__(m)\nprint(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    heavy = "import sys, rayembed\nrayembed.Embedder\nprint('torch' in sys.modules)"  # first use imports it
    assert (
        subprocess.run([sys.executable, "-c", heavy], capture_output=True, text=True).stdout.strip() == "True"
    )


def test_import_rayembed_raises_the_young_generation_unless_the_process_set_its_own() -> None:
    """The model stack's import ran 3-6 full collections with CPython's default thresholds (700, 10, 10);
    `import rayembed` raises the young generation before it, and keeps a threshold set before it."""
    import subprocess
    import sys

    def thresholds(before: str) -> str:
        code = f"import gc\n{before}\nimport rayembed\nprint(gc.get_threshold())"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert thresholds("").strip() == "(20000, 10, 10)"
    assert thresholds("gc.set_threshold(5000, 5, 5)").strip() == "(5000, 5, 5)"
    model = "import gc, rayembed, rayembed.model.embedder\nprint(gc.get_stats()[2]['collections'])"
    done = subprocess.run([sys.executable, "-c", model], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0"  # no full collection while torch and transformers import
