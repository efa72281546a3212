"""Experiment drivers: the settings tables, the table text, and a tiny fig8 run that resumes."""
import glob
import importlib
import json
import os

import pytest

import numpy as np

from cas_jax import checkpointing
from cas_jax import errors
from cas_jax.evaluation import evaluate
from cas_jax.evaluation import report as report_lib
from cas_jax.experiments import runs as experiment_runs
from cas_jax.experiments import tables as experiment_tables
from cas_jax.experiments import driver as experiments
from cas_jax import provenance
from cas_jax.training import train
from tests import test_checkpointing

# Tiny sizes on top of configs/smoke.py, given as if on the command line.
TINY = {"data.image_size": 8, "data.synthetic_num_train": 32, "data.synthetic_num_test": 16,
        "model.width": 4, "batch_size": 16, "eval_batch_size": 16, "attack.steps": 1,
        "eval.steps": 1, "eval.num_images": 16, "eval.report_images": 8,
        "eval.attacks": "fgsm,pgd2", "schedule.num_epochs": 1, "schedule.milestones": (2,),
        "ckpt.async_save": False, "log_every_steps": 1}


def smoke_base(**overrides):
  config = importlib.import_module("configs.smoke").get_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize("name", sorted(experiments.EXPERIMENTS))
def test_every_setting_builds_a_valid_config(name):
  base = smoke_base()
  settings = experiments.select_settings(name)
  configs = {s.name: experiments.setting_config(name, s, base) for s in settings}
  for setting in settings:
    config = configs[setting.name]
    if setting.cas is not None:
      assert (config.model.cas_stages != "none") == setting.cas
    if setting.twin and setting.cas:  # a CAS row is compared with a row without CAS
      assert configs[setting.twin].model.cas_stages == "none" != config.model.cas_stages
    attacks = ",".join(filter(None, (experiments.EXPERIMENTS[name].attacks, setting.extra_attacks)))
    assert config.eval.attacks == attacks and config.eval.checkpoints == "last"
    assert config.data.source == "synthetic"  # the base's fields the setting does not set
  assert len({json.dumps(c.to_dict(), sort_keys=True) for c in configs.values()}) == len(configs)


def test_settings_follow_the_paper():
  base = smoke_base()
  trades = experiments.setting_config("table3", experiments.select_settings(
      "table3", ["trades_cas"])[0], base)
  assert (trades.loss.objective, trades.attack.start, trades.attack.eps,
          trades.attack.step_size) == ("trades", "normal", 0.031, 0.007)
  assert tuple(trades.schedule.milestones) == tuple(base.schedule.milestones)  # one schedule
  fig8 = experiments.select_settings("fig8")
  betas = [experiments.setting_config("fig8", s, base) for s in fig8]
  assert [c.loss.beta if c.model.cas_stages != "none" else 0 for c in betas] == [
      0, 0.5, 1, 2, 5, 10, 20]
  ablation = experiments.select_settings("table2", ["cas_no_suppress"])[0]
  assert not experiments.setting_config("table2", ablation, base).model.cas_suppress
  vgg = experiments.setting_config("vgg16", experiments.EXPERIMENTS["vgg16"].settings[1], base)
  assert (vgg.model.name, vgg.loss.beta) == ("vgg16", 3.0)
  f32, bf16 = (experiments.setting_config("dtype", s, base).to_dict()
               for s in experiments.select_settings("dtype"))
  assert bf16["model"].pop("dtype") == "bfloat16" and f32["model"].pop("dtype") == "float32"
  assert f32 == bf16  # the same setting and seed otherwise
  wrn = experiments.setting_config("wrn34_10", experiments.EXPERIMENTS["wrn34_10"].settings[1],
                                   base)
  assert (wrn.model.name, wrn.optim.weight_decay) == ("wrn34_10", 5e-4)


def test_table1_rows_differ_from_plain_at_only_in_their_defense():
  base = smoke_base()
  settings = experiments.select_settings("table1")
  configs = {s.name: experiments.setting_config("table1", s, base).to_dict() for s in settings}
  assert list(configs) == ["at", "kwta", "sap", "pcl", "at_cas"]
  plain = configs["at"]
  assert plain["loss"]["objective"] == "at" and plain["baseline"] == "none"
  for name in ("kwta", "sap", "pcl"):
    eval_attacks = configs[name]["eval"]["attacks"]
    assert configs[name]["baseline"] == name
    assert {**configs[name], "baseline": "none",
            "eval": {**configs[name]["eval"], "attacks": plain["eval"]["attacks"]}} == plain
    # Only the randomized defense needs gradients averaged over draws (paper Table 1).
    assert ("eot20" in eval_attacks and "aa-rand" in eval_attacks) == (name == "sap")
    assert "avg-pgd100" in eval_attacks
  assert configs["at_cas"]["model"]["cas_stages"] == "default" != plain["model"]["cas_stages"]
  assert {s.twin for s in settings if s.name != "at"} == {"at"}


def test_command_line_overrides_win_or_are_refused():
  base = smoke_base(**{"eval.attacks": "pgd2"})
  setting = experiments.select_settings("fig8", ["beta5"])[0]
  config = experiments.setting_config("fig8", setting, base, command_line={"eval.attacks"})
  assert config.eval.attacks == "pgd2" and config.loss.beta == 5.0
  with pytest.raises(ValueError, match="--config.loss.beta is what fig8 sets"):
    experiments.setting_config("fig8", setting, base, command_line={"loss.beta"})
  with pytest.raises(ValueError, match="no setting beta3; valid: beta0, beta0.5"):
    experiments.select_settings("fig8", ["beta3"])
  with pytest.raises(ValueError, match="unknown experiment 'table9'"):
    experiments.select_settings("table9")


def _row(setting, label, twin, accuracy):
  return {"setting": setting, "label": label, "checkpoint": "last", "twin": twin,
          "accuracy": accuracy, "figure": {n: f"{100 * a:.1f}" for n, a in accuracy.items()},
          "descriptions": {}, "paper": {}, "sanity": [], "epochs": 1, "train_seconds": 0,
          "eval_seconds": 0, "num_images": 10, "eps": 8 / 255, "beta": 0}


def test_cas_rows_are_compared_with_their_twins_in_points():
  plain = _row("at", "AT", "", {"natural": 0.5, "pgd20": 0.2, "fgsm": 0.3, "worst_case": 0.2})
  cas = _row("at_cas", "AT+CAS", "at",
             {"natural": 0.6, "pgd20": 0.3, "fgsm": 0.25, "aa": 0.1, "worst_case": 0.1})
  assert experiment_tables.attack_columns([plain, cas]) == [
      "natural", "fgsm", "pgd20", "aa", "worst_case"]
  (line,) = experiment_tables.twin_comparisons([plain, cas])
  assert "natural +10.0, fgsm -5.0, pgd20 +10.0, worst case -10.0 points" in line
  assert "(fgsm, pgd20): pgd20 only; under the worst case: no." in line
  sweep = [_row(r["setting"], r["label"], r["twin"], {"natural": 0.5, "pgd20@2": a,
                                                      "worst_case": a})
           for r, a in ((plain, 0.2), (cas, 0.3))]
  (line,) = experiment_tables.twin_comparisons(sweep)  # none of the paper's attacks ran
  assert line.endswith("worst case +10.0 points. Better under the worst case: yes.")
  cas["paper"] = {"natural": 82.61, "pgd20": 42.73}
  markdown = experiment_tables.markdown({"experiment": "t", "title": "T", "rows": [plain, cas]})
  assert "| AT+CAS | last | 60.0 | 25.0 | 30.0 | 10.0 | **10.0** | 1 | 0 | 0 |" in markdown
  assert "| AT | last | 50.0 | 30.0 | 20.0 | - | **20.0** |" in markdown
  assert "| setting | natural | pgd20 |\n|---|---|---|\n| AT+CAS | 82.61 | 42.73 |" in markdown


def _mtimes(folder):
  return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(folder, "**"), recursive=True)}


@pytest.mark.slow
def test_fig8_trains_evaluates_and_writes_then_resumes_without_work(tmp_path, monkeypatch):
  base, workdir, only = smoke_base(**TINY), str(tmp_path), ["beta0", "beta2"]
  result = experiments.run_experiment("fig8", base, workdir, command_line=TINY, only=only)
  for ext in ("md", "json", "png"):
    assert os.path.getsize(os.path.join(workdir, f"fig8.{ext}")) > 0
  with open(os.path.join(workdir, "fig8.json")) as f:
    written = json.load(f)
  assert [(r["setting"], r["beta"]) for r in written["rows"]] == [("beta0", 0.0), ("beta2", 2.0)]
  markdown = open(os.path.join(workdir, "fig8.md")).read()
  for row in written["rows"]:  # the table holds what each setting's own eval report says
    with open(os.path.join(workdir, row["setting"], "eval", "fig8", "last_report.json")) as f:
      report = json.load(f)
    assert row["accuracy"] == report["accuracy"] and row["num_images"] == 8
    assert set(report["accuracy"]) == {"natural", "fgsm", "pgd2", "worst_case"}
    assert f"| {row['label']} | last | " + " | ".join(
        row["figure"][n] for n in ("natural", "fgsm", "pgd2")) in markdown
    assert row["epochs"] == 1
  # A second run trains and evaluates nothing: it reads the checkpoints and the cached reports.
  before = {s: _mtimes(os.path.join(workdir, s)) for s in only}
  monkeypatch.setattr(train, "train_and_evaluate", pytest.fail)
  monkeypatch.setattr(evaluate, "evaluate_workdir", pytest.fail)
  again = experiments.run_experiment("fig8", base, workdir, command_line=TINY, only=only)
  assert again["rows"] == result["rows"]
  assert {s: _mtimes(os.path.join(workdir, s)) for s in only} == before
  # Another optimiser in the same workdir: refused before anything is trained or evaluated.
  other = smoke_base(**{**TINY, "optim.lr": 0.05})
  with pytest.raises(errors.UserError, match=r"beta0 was trained with another config \(optim"):
    experiments.run_experiment("fig8", other, workdir, command_line={*TINY, "optim.lr"},
                               only=only)


@pytest.mark.slow
def test_seeds_train_every_setting_k_times_and_the_table_shows_mean_and_std(tmp_path):
  base, workdir = smoke_base(**TINY), str(tmp_path)
  result = experiments.run_experiment("fig8", base, workdir, command_line=TINY,
                                      only=["beta0", "beta2"], seeds=2)
  for row in result["rows"]:
    assert row["seeds"] == [0, 1] and [s["seed"] for s in row["per_seed"]] == [0, 1]
    for seed in row["per_seed"]:  # each seed's own report, in its own folder
      with open(os.path.join(seed["workdir"], "eval", "fig8", "last_report.json")) as f:
        assert json.load(f)["accuracy"] == seed["accuracy"]
      assert json.load(open(os.path.join(seed["workdir"], "config.json")))["seed"] == seed["seed"]
    values = [100 * s["accuracy"]["pgd2"] for s in row["per_seed"]]
    assert row["figure"]["pgd2"] == f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"
    assert np.asarray(row["verdicts"]["worst_case"]).shape == (2, 8)
  assert sorted(os.listdir(tmp_path / "beta2")) == ["seed0", "seed1"]
  (worst,) = [s for s in result["statistics"] if s["name"] == "worst_case"]
  assert (worst["setting"], worst["twin"], worst["seeds"], worst["images"]) == (
      "beta2", "beta0", 2, 8)
  assert len(worst["mcnemar_p"]) == 2
  assert "mean ± standard deviation over 2 seeds" in open(tmp_path / "fig8.md").read()


def fake_trained(folder, config, step=4):
  """A folder as training leaves it: config.json and a (tiny) checkpoint at `step`."""
  manager = checkpointing.create_manager(str(folder), async_save=False)
  checkpointing.save(manager, test_checkpointing.state_at(step))
  manager.close()
  provenance.record_run(str(folder), config, 0)


def test_a_setting_is_reused_only_for_the_config_that_trained_it(tmp_path):
  config, folder = smoke_base(**TINY), tmp_path / "at"
  experiment_runs.check_reusable(config, str(folder))  # nothing there yet
  fake_trained(folder, config)
  experiment_runs.check_reusable(config, str(folder))
  experiment_runs.check_reusable(smoke_base(**{**TINY, "schedule.num_epochs": 3,
                                               "eval.attacks": "pgd2"}), str(folder))
  with pytest.raises(errors.UserError, match=r"another config \(schedule.num_epochs 1 -> 0\)"):
    experiment_runs.check_reusable(smoke_base(**{**TINY, "schedule.num_epochs": 0}), str(folder))
  other = smoke_base(**{**TINY, "optim.lr": 0.05})
  with pytest.raises(errors.UserError, match=r"was trained with another config \(optim\.lr "
                     r"0\.1 -> 0\.05\); rerun with --retrain .* or use a new --workdir"):
    experiment_runs.check_reusable(other, str(folder))
  experiment_runs.check_reusable(other, str(folder), retrain=True)
  assert not folder.exists() and (tmp_path / "at.replaced" / "config.json").is_file()
  fake_trained(folder, config)
  os.remove(folder / "config.json")  # trained before configs were recorded
  with pytest.raises(errors.UserError, match="no config.json"):
    experiment_runs.check_reusable(config, str(folder))


def test_the_evaluation_cache_keys_on_the_config_budgets_and_checkpoint(tmp_path):
  config = smoke_base(**TINY)
  fake_trained(tmp_path, config)
  request = experiment_runs.eval_request(config, str(tmp_path))
  assert request == experiment_runs.eval_request(config, str(tmp_path))
  for key, value in [("optim.lr", 0.05), ("loss.objective", "trades"), ("eval.attacks", "pgd2"),
                     ("eval.apgd_steps", 3), ("attack.steps", 4)]:
    assert experiment_runs.eval_request(smoke_base(**{**TINY, key: value}),
                                        str(tmp_path)) != request, key
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  manager.delete(4)
  manager.close()
  fake_trained(tmp_path, config)  # the same step, trained again
  assert experiment_runs.eval_request(config, str(tmp_path)) != request


def test_the_evaluation_cache_keys_on_the_code(tmp_path, monkeypatch):
  config = smoke_base(**TINY)
  fake_trained(tmp_path, config)
  request = experiment_runs.eval_request(config, str(tmp_path))
  assert request["code"] == provenance.code_digest()
  # Another source of the package (a fixed attack bug): another request, the cache is not used.
  monkeypatch.setattr(provenance, "code_digest", lambda: "0.1.0+000000000000")
  assert experiment_runs.eval_request(config, str(tmp_path)) != request


def _with_verdicts(row, verdicts):
  row["verdicts"] = {n: [list(map(int, v))] for n, v in verdicts.items()}
  row["accuracy"] = {n: float(np.mean(v)) for n, v in verdicts.items()}
  return row


def test_each_cas_row_gets_paired_statistics_in_words_and_in_the_json(tmp_path):
  rng = np.random.default_rng(0)
  plain = rng.random(200) < 0.5
  cas = plain & (rng.random(200) < 0.6)  # CAS loses 40% of the plain model's robust images
  at = _with_verdicts(_row("at", "AT", "", {}), {"natural": plain | True, "pgd20": plain,
                                                "worst_case": plain})
  at_cas = _with_verdicts(_row("at_cas", "AT+CAS", "at", {}), {
      "natural": plain | True, "pgd20": cas, "worst_case": cas})
  result = {"experiment": "t", "title": "T", "rows": [at, at_cas]}
  experiment_tables.write_outputs(result, str(tmp_path))
  written = json.load(open(tmp_path / "t.json"))["statistics"]
  assert [(s["setting"], s["twin"], s["name"]) for s in written] == [
      ("at_cas", "at", "natural"), ("at_cas", "at", "pgd20"), ("at_cas", "at", "worst_case")]
  worst = written[-1]
  assert worst["difference"] == pytest.approx(np.mean(cas) - np.mean(plain))
  assert worst["ci_high"] < 0 and worst["significant"] and worst["mcnemar_p"][0] < 0.05
  assert worst["holm_tests"] == 3 and worst["t_p"] is None  # one seed: no seed-level test
  assert written[0]["difference"] == 0 and not written[0]["significant"]
  markdown = open(tmp_path / "t.md").read()
  assert "(last checkpoint) AT+CAS vs AT, worst case: " in markdown
  assert "**significant at 5% after Holm over 3 tests** (adjusted p " in markdown
  assert "this one trained pair only): AT+CAS is lower than AT" in markdown
  assert "AT+CAS vs AT, natural: +0.0 points" in markdown and "**not significant" in markdown
  assert "Scope: conditional on these 200 evaluation images and the 1 seed trained" in markdown


def test_a_table_names_each_reports_provenance_where_they_differ():
  plain = _row("at", "AT", "", {"natural": 0.5, "worst_case": 0.2})
  cas = _row("at_cas", "AT+CAS", "at", {"natural": 0.6, "worst_case": 0.1})
  old, new = "Provenance: cas_jax commit 1111111111; jax 0.4", "Provenance: cas_jax commit 2222"
  plain["per_seed"] = [{"seed": 0, "evaluated_by": old}, {"seed": 1, "evaluated_by": old}]
  cas["per_seed"] = [{"seed": 0, "evaluated_by": old}, {"seed": 1, "evaluated_by": new}]
  markdown = experiment_tables.markdown({"experiment": "t", "title": "T", "rows": [plain, cas]})
  assert "The reports were not all made by the same code" in markdown
  assert (f"- {old} AT (last, seed 0), AT (last, seed 1), AT+CAS (last, seed 0)." in markdown)
  assert f"- {new} AT+CAS (last, seed 1)." in markdown
  cas["per_seed"][1]["evaluated_by"] = old
  markdown = experiment_tables.markdown({"experiment": "t", "title": "T", "rows": [plain, cas]})
  assert f"Every report: {old}" in markdown and "not all made" not in markdown


def test_a_rows_eval_seconds_count_a_shared_stage_once():
  report = report_lib.Report(eps=8 / 255, indices=np.arange(2), ran_on={},
                             verdicts={"natural": np.ones(2, bool), "aa": np.ones(2, bool),
                                       "aa-joint": np.ones(2, bool),
                                       "worst_case": np.ones(2, bool)},
                             attacks={"aa": {"description": "a"}, "aa-joint": {"description": "b"}},
                             seconds={"aa": 5.0, "aa-joint": 5.0},  # square (4 s) in both
                             costs={"total": {"seconds": 6.0}})
  row = experiment_runs.setting_row({"setting": "s", "label": "S"}, "last", [report], [0],
                                    ["/nonexistent"])
  assert row["eval_seconds"] == 6.0 and row["per_seed"][0]["eval_seconds"] == 6.0


def test_rewrite_recomputes_old_statistics_and_keeps_every_other_field(tmp_path, capsys):
  rng = np.random.default_rng(1)
  plain = rng.random((3, 100)) < 0.5
  at = _row("at", "AT", "", {})
  at_cas = _row("at_cas", "AT+CAS", "at", {})
  for row, verdicts in ((at, plain), (at_cas, plain & (rng.random((3, 100)) < 0.8))):
    row["verdicts"] = {"pgd20": verdicts.astype(int).tolist()}
    row["accuracy"] = {"natural": 1.0, "pgd20": float(verdicts.mean()), "worst_case": 0.1}
    row["figure"] = {"pgd20": "<= 50.0" if row is at else "40.0"}
  old = [{"setting": "at_cas", "name": "pgd20", "difference": -0.1, "ci_low": -0.2,
          "ci_high": -0.05, "significant": True}]  # the previous format: no Holm, no t-test
  result = {"experiment": "t", "title": "T", "rows": [at, at_cas], "statistics": old,
            "extra": {"kept": [1, 2]}}
  assert "upper bounds, no verdict" in experiment_tables.markdown(result)  # not the old ones
  path = tmp_path / "t_3seeds.json"
  path.write_text(json.dumps(result))
  experiment_tables.main(["--rewrite", str(path)])
  written = json.loads(path.read_text())
  assert list(written) == list(result) and written["extra"] == result["extra"]
  assert written["rows"] == json.loads(json.dumps(result["rows"]))
  (pgd,) = written["statistics"]
  assert pgd["upper_bound"] and pgd["significant"] is None and len(pgd["seed_differences"]) == 3
  assert "upper bounds, no verdict" in (tmp_path / "t_3seeds.md").read_text()
  assert f"Wrote {tmp_path / 't_3seeds.md'}" in capsys.readouterr().out
  (tmp_path / "bad.json").write_text("{")
  (tmp_path / "list.json").write_text("[]")
  for name, message in (("bad.json", "is not JSON"), ("list.json", "holds no experiment result"),
                        ("t_3seeds.md", "takes a result's .json")):
    with pytest.raises(SystemExit, match=message):
      experiment_tables.main(["--rewrite", str(tmp_path / name)])
