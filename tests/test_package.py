"""The wheel installs into a fresh venv and, outside the checkout, runs the smoke config."""
import json
import os
import subprocess

import pytest

import cas_jax
from cas_jax import configs
from test_experiments import TINY
import venv_install

PROBE = """import json, cas_jax
from cas_jax import attacks, configs, models
from cas_jax.evaluation import evaluate
print(json.dumps({"version": cas_jax.__version__, "file": cas_jax.__file__,
                  "configs": configs.names(), "api": [attacks.pgd.__name__,
                  evaluate.robustness_report.__name__, models.create.__name__]}))"""


@pytest.mark.slow
def test_the_wheel_trains_the_smoke_config_outside_the_checkout(tmp_path):
  sources = venv_install.copy_sources(tmp_path / "src")
  wheel = venv_install.build_wheel(sources, str(tmp_path / "dist"))
  python = venv_install.make_venv(str(tmp_path / "venv"))
  venv_install.run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                    wheel], cwd=tmp_path)
  elsewhere = tmp_path / "elsewhere"  # no cas_jax/, configs/ or main.py to fall back on
  elsewhere.mkdir()

  installed = json.loads(venv_install.run([python, "-c", PROBE], cwd=elsewhere).stdout)
  assert installed["version"] == cas_jax.__version__
  assert installed["file"].startswith(str(tmp_path / "venv"))
  assert installed["configs"] == configs.names()  # every config ships with the package

  bin_dir = os.path.dirname(python)
  flags = [f"--config.{path}={value}" for path, value in TINY.items()]
  venv_install.run([os.path.join(bin_dir, "cas-jax"), "--config=smoke",
                    f"--workdir={elsewhere / 'run'}", *flags], cwd=elsewhere)
  with open(elsewhere / "run" / "metrics.jsonl") as f:
    epochs = [json.loads(line) for line in f if '"epoch"' in line]
  assert [r["epoch"] for r in epochs] == [1] and 0 <= epochs[0]["pgd_acc"] <= 1
  assert os.listdir(elsewhere / "run" / "checkpoints")

  dry_run = venv_install.run([os.path.join(bin_dir, "cas-jax-experiments"), "table2",
                              f"--workdir={elsewhere / 'table2'}", "--config=smoke", "--dry_run"],
                             cwd=elsewhere)
  assert [line.split()[0] for line in dry_run.stdout.splitlines()] == [
      "no_cas", "cas_no_suppress", "cas"]

  # The benchmark command is installed and lists its flags (absl's --helpshort exits with 1).
  helped = subprocess.run([os.path.join(bin_dir, "cas-jax-benchmark"), "--helpshort"],
                          cwd=elsewhere, env=venv_install.clean_env(), capture_output=True,
                          text=True, timeout=300, check=False)
  assert "--torch-checkpoint" in helped.stdout and "--threat-model" in helped.stdout, helped
