"""The layer library stays light: models, losses and metrics import without TF or the trainer."""

import subprocess
import sys


def test_layer_library_imports_without_tensorflow_or_trainer():
    code = (
        "import sys; import medjax.models, medjax.losses, medjax.metrics, medjax.visualize; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'orbax', 'ml_collections', 'tensorflow_datasets', 'medjax')"
        " and not m.startswith(('medjax.models', 'medjax.losses', 'medjax.metrics', 'medjax.ffi',"
        " 'medjax.visualize')) and m != 'medjax']; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _imports(path):
    """Every module a Python file imports (absolute names, `from x import y` as `x.y` too)."""
    import ast

    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_dependencies_point_one_way():
    """models, losses, metrics and data never import the trainer; tasks never import the loop,
    the evaluator, the command line or each other (they get a runner as an argument)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "medjax"
    lower = [*sorted((root / "data").rglob("*.py")), *sorted((root / "models").glob("*.py"))]
    lower += sorted(root.glob("*.py"))
    for path in lower:
        bad = sorted(m for m in _imports(path) if m.startswith("medjax.train"))
        assert not bad, f"{path} imports {bad}"
    tasks = sorted((root / "train" / "tasks").glob("*.py"))
    names = {p.stem for p in tasks}
    assert {"segmentation", "dcgan", "conditional_gan"} <= names
    for path in tasks:
        bad = sorted(
            m
            for m in _imports(path)
            if m.startswith(("medjax.train.loop", "medjax.train.evaluate", "medjax.train.cli"))
            or m.startswith("medjax.train.tasks")
            or m in {f"medjax.train.{n}" for n in ("loop", "evaluate", "cli", "tasks")}
        )
        assert not bad, f"{path} imports {bad}"
