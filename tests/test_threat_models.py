"""Reports under L2 and L1: attack names with a norm, eps in the norm's units, the worst case
keyed by (norm, eps), the sanity check per norm, one line of error for bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import errors
from cas_jax.evaluation import attack_registry
from cas_jax.evaluation import evaluate
from cas_jax.evaluation import report as report_lib
from cas_jax.evaluation.attack_registry import AttackBudget, parse_attack, parse_attacks


def test_names_carry_a_norm_and_eps_in_its_units():
  spec = parse_attack("pgd20-l2@0.5", eps=8 / 255, has_cas=False)
  assert (spec.method, spec.steps, spec.norm, spec.eps) == ("pgd", 20, "l2", 0.5)
  spec = parse_attack("aa-l1", eps=8 / 255, has_cas=False)  # the norm's default eps
  assert (spec.method, spec.norm, spec.eps) == ("aa", "l1", 12.0)
  spec = parse_attack("pgd20@32", eps=0.5, has_cas=False, norm="L2")  # the report's norm
  assert (spec.norm, spec.eps) == ("l2", 32.0)
  spec = parse_attack("apgd-ce-joint-linf@8", eps=0.5, has_cas=True, norm="l2")
  assert (spec.method, spec.joint, spec.norm, spec.eps) == ("apgd-ce", True, "linf", 8 / 255)
  # One attack whatever the spelling; another norm is another attack.
  specs, notes = parse_attacks("pgd20,pgd20-l2,pgd20-l2@0.5", eps=0.5, has_cas=False,
                               norm="l2")
  assert [s.name for s in specs] == ["pgd20"] and len(notes) == 2
  specs, _ = parse_attacks("pgd20,pgd20-l2", eps=8 / 255, has_cas=False)
  assert [(s.norm, s.eps) for s in specs] == [("linf", 8 / 255), ("l2", 0.5)]
  assert specs[0].canonical != specs[1].canonical
  assert parse_attack("pgd20", eps=8 / 255, has_cas=False).canonical == "pgd20-main@8"
  # The sweep is L-inf's whatever the report's norm.
  assert attack_registry.attack_names("sweep", "l2")[0] == "pgd20-linf@2"


@pytest.mark.parametrize("call,message", [
    (lambda: attack_registry.check_norm("l3"), "unknown norm 'l3'; valid: linf, l2, l1"),
    (lambda: parse_attack("pgd20", eps=-1.0, has_cas=False, norm="l2"), "outside the l2 range"),
    (lambda: parse_attack("pgd20@300", eps=8 / 255, has_cas=False), "eps"),
    (lambda: parse_attack("n-attack-l2", eps=8 / 255, has_cas=False), "no L2 variant"),
])
def test_bad_norms_and_eps_give_one_line(call, message):
  with pytest.raises(errors.UserError, match=message) as raised:
    call()
  assert "\n" not in str(raised.value)


def test_eps_is_written_in_its_norms_units():
  assert report_lib.format_eps(8 / 255) == "8/255"
  assert report_lib.format_eps(0.5, "l2") == "L2 0.5"
  assert report_lib.format_eps(12.0, "l1") == "L1 12"


W = jax.random.normal(jax.random.key(0), (48, 10)) / 7
KEY = jax.random.key(0)
BUDGET = AttackBudget(apgd_steps=5, fab_steps=5, square_queries=20, target_classes=2)


def linear(x):
  return x.reshape(x.shape[0], -1) @ W


def _data(n=16):
  x = np.random.default_rng(0).uniform(0.3, 0.7, (n, 4, 4, 3)).astype(np.float32)
  return x, np.asarray(jnp.argmax(linear(jnp.asarray(x)), -1), np.int32)


def test_an_l2_report_keys_its_worst_case_on_norm_and_eps():
  x, y = _data()
  report = evaluate.robustness_report(linear, x, y, key=KEY, norm="L2", eps=0.2,
                                      attacks="pgd10,aa,pgd10-linf@51", budget=BUDGET,  # 51/255 = 0.2
                                      batch_size=8)
  assert report.norm == "l2" and report.attacks["aa"]["norm"] == "l2"
  assert report.attacks["pgd10-linf@51"]["norm"] == "linf"
  assert not report.attacks["pgd10-linf@51"]["in_worst_case"]
  v = report.verdicts
  np.testing.assert_array_equal(v["worst_case"], v["natural"] & v["pgd10"] & v["aa"])
  assert 0 < v["worst_case"].sum() < v["natural"].sum()  # eps 0.2 breaks some, not all
  assert "(every attack at eps L2 0.2)" in report.markdown()
  again = report_lib.Report.from_json(report.to_json())
  assert again.norm == "l2" and again.markdown() == report.markdown()


def test_the_sanity_check_at_a_large_eps_has_a_counterpart_per_norm():
  x, y = _data()
  masked = lambda z: jax.lax.stop_gradient(linear(z))  # no gradient: PGD cannot move
  for norm, name in (("l2", "pgd5@7"), ("l1", "pgd5@386")):
    report = evaluate.robustness_report(masked, x, y, key=KEY, norm=norm, attacks=name,
                                        budget=BUDGET, batch_size=16)
    (warning,) = [w for w in report.sanity if "a large enough perturbation" in w]
    assert f"at eps {norm.upper()} " in warning


@pytest.mark.parametrize("norm,eps", [("l2", 0.2), ("l1", 1.5)])
def test_public_autoattack_under_a_norm_gives_the_reports_verdicts(norm, eps):
  """One assembler under L2 and L1 too (L1: APGD with large eps, 5 restarts, 5 targets)."""
  from cas_jax.attacks.autoattack import autoattack  # pylint: disable=g-import-not-at-top
  x, y = _data()
  budget = AttackBudget(apgd_steps=10, fab_steps=5, square_queries=20, target_classes=2)
  _, robust = autoattack(linear, x, y, eps=eps, key=KEY, norm=norm.upper(),
                         return_per_attack=True, apgd_steps=10, fab_steps=5, square_queries=20,
                         target_classes=2)
  seen = []
  def counted(z):  # the rows the model evaluates, each call's
    jax.debug.callback(lambda rows: seen.append(int(rows)), z.shape[0])
    return linear(z)
  report = evaluate.robustness_report(counted, x, y, key=KEY, eps=eps, norm=norm, attacks="aa",
                                      budget=budget, batch_size=8)
  jax.effects_barrier()
  np.testing.assert_array_equal(robust["square"], report.verdicts["aa"])
  assert report.costs["total"]["rows"] == sum(seen)  # the cost accounting holds per norm
  stages = report.costs["stages"]
  if norm == "l1":
    assert [n for n in stages if n.startswith("apgd-ce")] == [f"apgd-ce/r{i}" for i in range(5)]
  else:
    assert "apgd-ce" in stages


def test_training_under_l2_crafts_adversaries_in_the_l2_ball():
  from cas_jax.configs import default  # pylint: disable=g-import-not-at-top
  from cas_jax.training import train  # pylint: disable=g-import-not-at-top
  from test_train import init_state, random_batch, tiny_config  # pylint: disable=g-import-not-at-top
  config = default.under_l2(tiny_config("at"), eps=0.5)
  state = init_state(config)
  batch = random_batch(config)
  x_adv = train.craft_training_adversaries(state, batch["image"], batch["label"],
                                           jax.random.key(3), config)
  size = jnp.sqrt(jnp.sum((x_adv - batch["image"]) ** 2, axis=(1, 2, 3)))
  assert float(jnp.max(size)) <= 0.5 * (1 + 1e-5) and float(jnp.min(size)) > 0.25
  assert float(jnp.max(jnp.abs(x_adv - batch["image"]))) > 8 / 255  # not an L-inf ball
  assert 0.0 <= float(jnp.min(x_adv)) and float(jnp.max(x_adv)) <= 1.0


def test_table3_under_l2_moves_every_setting_to_the_l2_recipe():
  from cas_jax.experiments import driver  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  base = importlib.import_module("configs.smoke").get_config()
  base.attack.norm = "l2"
  for setting in driver.select_settings("table3"):
    config = driver.setting_config("table3", setting, base, command_line={"attack.norm"})
    assert (config.attack.norm, config.attack.eps, config.attack.step_size) == ("l2", 0.5, 0.125)
    assert (config.eval.norm, config.eval.eps) == ("l2", 0.5)
  base.eval.eps = 0.25
  config = driver.setting_config("table3", driver.select_settings("table3")[0], base,
                                 command_line={"attack.norm", "eval.eps"})
  assert config.eval.eps == 0.25  # what the command line sets, it keeps


def test_the_rand_version_runs_under_l2_with_eot_in_the_l2_ball():
  """aa-rand under L2 on a randomized model: APGD-CE / APGD-DLR averaged over draws."""
  x, y = _data(8)
  noisy = lambda z, keys: linear(z) + 0.05 * jax.vmap(lambda k: jax.random.normal(k, (10,)))(keys)
  budget = AttackBudget(apgd_steps=5, aa_rand_draws=3, verdict_draws=5, target_classes=2)
  report = evaluate.robustness_report(linear, x, y, key=KEY, eps=0.2, norm="l2",
                                      attacks="aa-rand", budget=budget, batch_size=8,
                                      random_apply_fn=noisy)
  info = report.attacks["aa-rand"]
  assert info["norm"] == "l2" and info["gradient_draws"] == 3
  assert set(report.costs["stages"]) == {"rand:apgd-ce", "rand:apgd-dlr"}


def test_the_rand_version_under_l2_stays_in_the_l2_ball():
  """Public autoattack(version="rand", norm="l2"): points within L2 0.2 (an L-inf ball of 0.2
  reaches L2 1.4 on these 48 values) that do move."""
  from cas_jax.attacks.autoattack import autoattack  # pylint: disable=g-import-not-at-top
  x, y = _data(8)
  noisy = lambda z, keys: linear(z) + 0.05 * jax.vmap(lambda k: jax.random.normal(k, (10,)))(keys)
  x_adv = autoattack(noisy, x, y, eps=0.2, key=KEY, version="rand", norm="l2", apgd_steps=5,
                     eot_draws=3, verdict_draws=5)
  size = np.sqrt(np.sum((np.asarray(x_adv) - x) ** 2, axis=(1, 2, 3)))
  assert size.max() <= 0.2 * (1 + 1e-5) and size.max() > 0.1
