"""The Colab TPU notebook runs top to bottom, headless, on a CPU with the smoke config."""
import json
import os

import nbformat
from nbclient import NotebookClient
import pytest

from test_experiments import TINY

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "colab_tpu.ipynb")


@pytest.mark.slow
def test_colab_notebook_trains_evaluates_and_draws(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setenv("CAS_JAX_CONFIG", "configs/smoke.py")
  monkeypatch.setenv("CAS_JAX_WORKDIR", str(workdir))
  monkeypatch.setenv("CAS_JAX_OVERRIDES", json.dumps(TINY))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO_ROOT, "notebooks")}}).execute()

  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # curves, report
  for name in ("training_curves.png", "report.png"):
    assert (workdir / name).stat().st_size > 0
  with open(workdir / "metrics.jsonl") as f:
    epochs = [json.loads(line) for line in f if '"epoch"' in line]
  assert [r["epoch"] for r in epochs] == [1]
  # The report the notebook shows is the one evaluate_workdir saved for the last checkpoint.
  with open(workdir / "eval" / "last_report.json") as f:
    saved = json.load(f)
  assert set(saved["accuracy"]) == {"natural", "fgsm", "pgd2", "worst_case"}
  shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
  worst = 100 * saved["accuracy"]["worst_case"]
  assert f"**worst case** (every attack at eps 8/255) | 8/255 | **{worst:.1f}**" in shown
