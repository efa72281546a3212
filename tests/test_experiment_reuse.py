"""Tables 4, 6, 12, 13: evaluation-only drivers on table3's trained settings; Table 6's source."""
import glob
import json
import os

import jax
import pytest

from cas_jax import errors
from cas_jax.experiments import runs as experiment_runs
from cas_jax.experiments import driver as experiments
from cas_jax.models import loading
from cas_jax.training import train
from cas_jax.models import resnet
from tests import test_experiments

# TINY without its attack list: every experiment evaluates with its own.
TINY = {k: v for k, v in test_experiments.TINY.items() if k != "eval.attacks"}
TINY.update({"eval.n_attack_population": 4, "eval.n_attack_iters": 3})
ONLY = ["at", "at_cas"]


def _run(name, workdir, only=ONLY, **kwargs):
  base = test_experiments.smoke_base(**TINY)
  return experiments.run_experiment(name, base, str(workdir), command_line=TINY, only=only,
                                    **kwargs)


def _mtimes(folder):
  return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(folder, "**"), recursive=True)
          if os.path.isfile(p)}


def test_the_evaluation_only_tables_are_table3_settings_with_their_own_attacks():
  base = test_experiments.smoke_base()
  table3 = {s.name: experiments.setting_config("table3", s, base)
            for s in experiments.select_settings("table3")}
  for name, attacks in [("table4", "pgd20-main,cas-head20,pgd20"), ("table12", "pgd20,cw,md"),
                        ("table13", "sweep"),
                        ("table6", "transfer-pgd20,transfer-cw20,n-attack")]:
    for setting in experiments.select_settings(name):
      config = experiments.setting_config(name, setting, base)
      assert config.eval.attacks == attacks
      # The same trained model as table3's setting: only evaluation fields differ.
      trained = table3[setting.name].to_dict()
      assert {k: v for k, v in config.to_dict().items() if k != "eval"} == {
          k: v for k, v in trained.items() if k != "eval"}, (name, setting.name)
  # Table 4 attacks the CAS heads: only the CAS rows, with no twin to compare.
  assert [s.name for s in experiments.select_settings("table4")] == [
      "at_cas", "trades_cas", "mart_cas"]
  with pytest.raises(errors.UserError, match="table4 has no setting at;"):
    experiments.select_settings("table4", ["at"])
  source = experiments.EXPERIMENTS["table6"].source
  config = experiments.setting_config("table6", source, base)
  assert (config.model.name, config.model.cas_stages, config.loss.objective) == (
      "resnet50", "none", "natural")


@pytest.mark.slow
def test_evaluation_only_tables_reuse_table3_and_table6_trains_its_source(tmp_path, monkeypatch):
  with pytest.raises(errors.UserError, match=r"holds no finished training of this setting; this "
                     r"experiment trains nothing: first run cas-jax-experiments table3"):
    _run("table13", tmp_path)
  _run("table3", tmp_path)
  trained = {s: _mtimes(tmp_path / s) for s in ONLY}
  # Table 6: the source is trained (a ResNet-50), the table3 settings are reused.
  calls = []
  original = train.train_and_evaluate
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda config, folder: calls.append(folder) or original(config, folder))
  result = _run("table6", tmp_path)
  assert calls == [str(tmp_path / "source_resnet50")]
  assert result["source"]["model"] == "resnet50" and result["source"]["epochs"] == 1
  config = experiments.setting_config("table6", experiments.select_settings("table6", ["at"])[0],
                                      test_experiments.smoke_base(**TINY), TINY)
  config.eval.transfer_checkpoint = str(tmp_path / "source_resnet50")
  source = loading.load_transfer_source(config, 10, (8, 8, 3))
  assert source.model.block is resnet.Bottleneck  # its own config.json, not the target's network
  assert "transfer_source" in experiment_runs.eval_request(config, str(tmp_path / "at"))
  for row in result["rows"]:
    assert set(row["accuracy"]) == {"natural", "transfer-pgd20", "transfer-cw20", "n-attack",
                                    "worst_case"}
    assert not row["figure"]["n-attack"].startswith("<=")  # exact: on every correct image
  assert "Transfer source: ResNet-50, natural training" in open(tmp_path / "table6.md").read()
  # Tables 13 and 4 train nothing and leave table3's and table6's evaluations as they were.
  monkeypatch.setattr(train, "train_and_evaluate", pytest.fail)
  before = {s: _mtimes(tmp_path / s / "eval") for s in ONLY}
  cleared = []
  monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(1))
  sweep = _run("table13", tmp_path)
  assert len(cleared) == len(ONLY)  # compiled programs freed after every model
  for row in sweep["rows"]:
    names = [f"pgd20@{e}" for e in (2, 4, 8, 16, 32)]
    assert set(names) <= set(row["accuracy"])
    assert row["accuracy"]["pgd20@32"] <= row["accuracy"]["pgd20@2"]
    with open(tmp_path / row["setting"] / "eval" / "table13" / "last_report.json") as f:
      assert json.load(f)["accuracy"] == row["accuracy"]
  heads = _run("table4", tmp_path, only=["at_cas"])
  assert set(heads["rows"][0]["accuracy"]) == {"natural", "pgd20-main", "cas-head20", "pgd20",
                                               "worst_case"}
  for setting in ONLY:
    after = _mtimes(tmp_path / setting / "eval")
    assert {p: t for p, t in after.items() if p in before[setting]} == before[setting]
    assert {p: t for p, t in _mtimes(tmp_path / setting).items()
            if "/eval" not in p and p in trained[setting]} == {
                p: t for p, t in trained[setting].items() if "/eval" not in p}
  for name in ("table3", "table6", "table13", "table4"):
    assert os.path.isfile(tmp_path / f"{name}.md")
  with pytest.raises(errors.UserError, match="table6 trains its own transfer source; drop "):
    experiments.run_experiment("table6", test_experiments.smoke_base(**TINY), str(tmp_path),
                               command_line={*TINY, "eval.transfer_checkpoint"}, only=ONLY)
  with pytest.raises(errors.UserError, match="table13 trains nothing; drop --retrain"):
    _run("table13", tmp_path, retrain=True)
