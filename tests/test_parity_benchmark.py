"""benchmarks/autoattack_parity.py end to end: export to torch, forward check, both AutoAttacks."""
import json
import subprocess
import sys

import numpy as np
import torch

from tests.fake_devices import ROOT, environment
from tests.test_input_pipeline import write_fake_cifar10
from tests.test_interop import _randomised, build_torch_network


def test_parity_script_attacks_the_same_network_on_both_sides(tmp_path):
  write_fake_cifar10(tmp_path / "cifar", test_size=6)
  torch.manual_seed(0)
  torch.save(_randomised(build_torch_network("resnet18", {"width": 4})).state_dict(),
             tmp_path / "net.pth")
  out = tmp_path / "parity.json"
  command = [sys.executable, "-m", "benchmarks.autoattack_parity",
             "--config=configs/smoke.py", "--config.model.width=4",
             f"--config.data.cifar_dir={tmp_path / 'cifar'}", f"--checkpoint={tmp_path / 'net.pth'}",
             "--images=6", "--seeds=2", "--apgd_steps=2", "--square_queries=4",
             "--torch_device=cpu", f"--out={out}"]
  result = subprocess.run(command, cwd=ROOT, env=environment(1), capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["max_logit_gap"] < 1e-4
  assert report["seeds"] == {"ours": 2, "reference": 2}
  ours, theirs = report["verdicts"]["ours"], report["verdicts"]["reference"]
  # Same weights: both sides find the same images misclassified before any attack.
  for seed in range(2):
    assert [v == "clean" for v in ours[seed]] == [v == "clean" for v in theirs[seed]]
  for side in ("ours", "reference"):
    timing = report["speed"][side]
    np.testing.assert_allclose(timing["images_per_s"], 6 / timing["later_seeds_mean_s"])
  assert report["environment"]["torch_device"] == "cpu"
  assert "images/s" in report["markdown"]
