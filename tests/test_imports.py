"""The layer library stays light: models, losses and metrics import without TF or the trainer."""

import subprocess
import sys


def test_layer_library_imports_without_tensorflow_or_trainer():
    code = (
        "import sys; import medjax.models, medjax.losses, medjax.metrics, medjax.visualize; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'orbax', 'ml_collections', 'tensorflow_datasets', 'medjax')"
        " and not m.startswith(('medjax.models', 'medjax.losses', 'medjax.metrics',"
        " 'medjax.visualize')) and m != 'medjax']; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
