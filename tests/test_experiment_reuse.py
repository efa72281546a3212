"""Tables 4, 6, 12, 13: evaluation-only drivers on table3's trained settings; Table 6's source;
the evaluation cache, reused only for the same config, code and checkpoint files."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from cas_jax import checkpointing
from cas_jax import compilation
from cas_jax import errors
from cas_jax import integrity
from cas_jax.evaluation import evaluate
from cas_jax.evaluation import report as report_lib
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


def _without(data, key):
  """JSON data without `key` at any depth."""
  if isinstance(data, dict):
    return {k: _without(v, key) for k, v in data.items() if k != key}
  return data


def _reproducible(report):
  """A report's JSON less what differs between two runs of one evaluation: the timings and
  the process's provenance (its time and command line; the config and training runs stay)."""
  data = _without(json.loads(report.to_json()), "seconds")
  data.pop("provenance_line")
  data["provenance"] = {k: data["provenance"][k] for k in ("config", "training_runs")}
  return data


def _counted_evaluations(monkeypatch):
  """evaluate.evaluate_workdir replaced by a stand-in recording each call: the k-th call's
  report breaks the first k of 16 images, so a report tells which evaluation it came from."""
  calls = []

  def evaluate_workdir(config, workdir, out_dir=None):
    calls.append(workdir)
    os.makedirs(out_dir, exist_ok=True)  # as the real one does
    robust = np.arange(16) >= len(calls)
    return {"last": report_lib.Report(
        eps=config.eval.eps, indices=np.arange(16), ran_on={"pgd2": np.ones(16, bool)},
        verdicts={"natural": np.ones(16, bool), "pgd2": robust, "worst_case": robust},
        attacks={"pgd2": {"description": "PGD-2"}})}
  monkeypatch.setattr(evaluate, "evaluate_workdir", evaluate_workdir)
  return calls


def _largest(step_dir):
  sizes = integrity.file_sizes(step_dir)
  return os.path.join(step_dir, max(sorted(sizes), key=sizes.get))


def _rewritten(step_dir):
  """A data file changed in place at its size, then recorded in a new manifest (a re-save)."""
  path = _largest(os.path.join(step_dir, "default"))
  with open(path, "r+b") as f:
    first = f.read(1)
    f.seek(0)
    f.write(bytes([first[0] ^ 0xFF]))
  integrity.write_manifest(step_dir)


def test_the_evaluation_cache_follows_the_config_and_every_checkpoint_file(tmp_path, monkeypatch):
  config = test_experiments.smoke_base(**test_experiments.TINY)
  for step in (3, 4):
    test_experiments.fake_trained(tmp_path, config, step)
  steps = tmp_path / "checkpoints"
  calls = _counted_evaluations(monkeypatch)

  def evaluation(config=config):
    """Which evaluation (k-th call) the reports of evaluate_setting come from."""
    report = experiment_runs.evaluate_setting(config, str(tmp_path), "t")["last"]
    return int(np.sum(~report.verdicts["worst_case"]))

  assert evaluation() == 1 and evaluation() == 1  # an unchanged tree: the cache is reused
  assert evaluation(test_experiments.smoke_base(**{**test_experiments.TINY,
                                                   "eval.attacks": "pgd2"})) == 2
  assert evaluation() == 3  # the cache holds the last request
  extra = steps / "4" / "default" / "stray.bin"
  changes = [
      ("a file deleted", lambda: os.remove(_largest(steps / "4"))),
      ("a file cut short", lambda: os.truncate(_largest(steps / "3"), 10)),
      ("a file added", lambda: extra.write_bytes(b"not saved with the checkpoint")),
      ("a file replaced", lambda: extra.write_bytes(b"another")),
      ("a step deleted", lambda: shutil.rmtree(steps / "3")),
      ("a file rewritten at its size", lambda: _rewritten(steps / "4")),
      ("the manifest deleted", lambda: os.remove(steps / "4" / integrity.MANIFEST)),
      ("a file deleted, no manifest", lambda: os.remove(_largest(steps / "4")))]
  for k, (what, change) in enumerate(changes, start=4):
    change()
    assert (evaluation(), evaluation()) == (k, k), what  # evaluated once, then reused
  assert len(calls) == 3 + len(changes)
  (step,) = experiment_runs.checkpoint_identity(str(tmp_path))["steps"].values()
  assert step["record"] == "_CHECKPOINT_METADATA" and "default/stray.bin" in step["files"]


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
  monkeypatch.setattr(compilation, "free_compiled_programs_if_crowded",
                      lambda: cleared.append(1))
  evaluated, original_evaluate = [], evaluate.evaluate_workdir
  monkeypatch.setattr(evaluate, "evaluate_workdir", lambda config, workdir, **kwargs: (
      evaluated.append(os.path.basename(workdir)) or original_evaluate(config, workdir, **kwargs)))
  sweep = _run("table13", tmp_path)
  assert len(cleared) == len(ONLY)  # compiled programs freed (if crowded) after every model
  assert evaluated == ONLY
  names = ["natural", *(f"pgd20@{e}" for e in (2, 4, 8, 16, 32)), "worst_case"]
  for row in sweep["rows"]:
    assert list(row["verdicts"]) == names
    with open(tmp_path / row["setting"] / "eval" / "table13" / "last_report.json") as f:
      written = json.load(f)
    assert {n: [list(map(int, v))] for n, v in written["verdicts"].items()} == row["verdicts"]
  # Nothing changed: the cache serves every setting, nothing is evaluated again.
  again = _run("table13", tmp_path)
  assert evaluated == ONLY and again["rows"] == sweep["rows"]
  # What the cache serves is what a fresh evaluation of the same model finds.
  for setting in experiments.select_settings("table13", ONLY):
    config = experiments.setting_config("table13", setting, test_experiments.smoke_base(**TINY),
                                        TINY)
    folder = str(tmp_path / setting.name)
    cached = experiment_runs.evaluate_setting(config, folder, "table13")["last"]
    fresh = original_evaluate(config, folder, out_dir=str(tmp_path / "fresh" / setting.name))
    assert _reproducible(cached) == _reproducible(fresh["last"]), setting.name
  assert evaluated == ONLY
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
  # A checkpoint file gone: the cache is not used, and the evaluation stops in one line.
  done = evaluated[:]  # table4 evaluated at_cas too
  (step,) = os.listdir(tmp_path / "at" / "checkpoints")  # the last epoch's
  step_dir = str(tmp_path / "at" / "checkpoints" / step)
  victim = _largest(step_dir)
  os.rename(victim, tmp_path / "aside")
  with pytest.raises(checkpointing.RestoreError, match=rf"step {step} .* is damaged \("
                     rf"{os.path.relpath(victim, step_dir)} is missing\)"):
    _run("table13", tmp_path, only=["at"])
  assert evaluated == [*done, "at"]
  os.rename(tmp_path / "aside", victim)  # back: the cached evaluation serves again
  assert _run("table13", tmp_path, only=["at"])["rows"][0]["verdicts"] == sweep["rows"][0][
      "verdicts"] and evaluated == [*done, "at"]
  os.rename(step_dir, tmp_path / "aside")  # the whole step gone: stopped before any evaluation
  with pytest.raises(errors.UserError, match="holds no finished training of this setting"):
    _run("table13", tmp_path, only=["at"])
  assert evaluated == [*done, "at"]
