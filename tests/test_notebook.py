"""The Colab TPU notebook installs cas_jax, then runs top to bottom, headless, on a CPU."""
import json
import os

import nbformat
from nbclient import NotebookClient
import pytest

from test_experiments import TINY
import venv_install

NOTEBOOK = os.path.join(venv_install.ROOT, "notebooks", "colab_tpu.ipynb")


def _venv_kernel(tmp_path, monkeypatch) -> str:
  """A Jupyter kernel in a fresh venv (sees this Python's packages, not the checkout)."""
  python = venv_install.make_venv(str(tmp_path / "venv"))
  spec_dir = tmp_path / "jupyter" / "kernels" / "cas_jax_venv"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "cas_jax venv", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.delenv("PYTHONPATH", raising=False)
  return "cas_jax_venv"


@pytest.mark.slow
def test_colab_notebook_installs_trains_evaluates_and_draws(tmp_path, monkeypatch):
  kernel = _venv_kernel(tmp_path, monkeypatch)
  # The notebook's pip install, from a copy of the checkout; "0" turns build isolation off
  # (pip's spelling), so that no build backend is downloaded.
  monkeypatch.setenv("CAS_JAX_REPO_URL", venv_install.copy_sources(tmp_path / "src"))
  monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
  workdir = tmp_path / "run"
  monkeypatch.setenv("CAS_JAX_CONFIG", "smoke")
  monkeypatch.setenv("CAS_JAX_WORKDIR", str(workdir))
  monkeypatch.setenv("CAS_JAX_OVERRIDES", json.dumps(TINY))
  elsewhere = tmp_path / "elsewhere"  # the kernel's folder: no checkout to import from
  elsewhere.mkdir()
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name=kernel,
                 resources={"metadata": {"path": str(elsewhere)}}).execute()

  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  printed = "".join(o.get("text", "") for o in outputs)
  assert f"from {tmp_path / 'venv'}" in printed  # the copy pip installed, not the checkout
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
