"""A report's sanity flags (each on a report built by hand to show its case) and the parsing of
attack names. The models and budget are tests/test_evaluate.py's."""
import numpy as np
import pytest

from cas_jax.evaluation import report as report_lib
from cas_jax.evaluation.attack_registry import attack_names, parse_attack, parse_attacks
from test_evaluate import EPS, linear, report_of


def _info(method, eps=8 / 255, joint=True, black_box=False, family=None, steps=20):
  return {"description": method, "method": method, "steps": steps, "joint": joint, "eps": eps,
          "black_box": black_box, "expensive": False, "family": family or method,
          "in_worst_case": abs(eps - 8 / 255) < 1e-9}


def constructed_report(attacks, natural=None):
  """A Report from {name: (info, verdicts)}: every attack ran on every clean-correct image."""
  natural = np.ones(10, bool) if natural is None else np.asarray(natural)
  verdicts = {"natural": natural}
  verdicts.update({n: np.asarray(v, bool) & natural for n, (_, v) in attacks.items()})
  infos = {n: info for n, (info, _) in attacks.items()}
  verdicts["worst_case"] = report_lib.worst_case(verdicts, infos)
  report = report_lib.Report(eps=8 / 255, indices=np.arange(natural.size), verdicts=verdicts,
                             ran_on={n: natural.copy() for n in infos}, attacks=infos)
  report.sanity = report_lib.sanity_checks(report)
  return report


FIVE = [1] * 5 + [0] * 5  # 50% robust


def test_benign_report_has_no_warnings():
  report = constructed_report({
      "fgsm": (_info("fgsm"), [1] * 7 + [0] * 3),
      "pgd20": (_info("pgd"), FIVE),
      "cw": (_info("cw"), [1] * 6 + [0] * 4),
      "aa": (_info("aa", joint=False, family="autoattack"), [1] * 4 + [0] * 6),
      "aa-joint": (_info("aa", family="autoattack"), [1] * 4 + [0] * 6),
      "n-attack": (_info("n-attack", black_box=True), [1] * 8 + [0] * 2),
      "pgd20@32": (_info("pgd", eps=32 / 255), [0] * 10),
  })
  assert report.sanity == []
  assert "- No warnings." in report.markdown()


def test_each_sanity_flag_fires_on_its_case():
  gap = constructed_report({"pgd20": (_info("pgd"), FIVE),
                            "cw": (_info("cw"), [0] * 5 + [1] * 5)})
  assert len(gap.sanity) == 1 and "fell to cw (5)" in gap.sanity[0]
  large_eps = constructed_report({"pgd20@32": (_info("pgd", eps=32 / 255), [1] + [0] * 9)})
  assert len(large_eps.sanity) == 1 and "eps 32/255" in large_eps.sanity[0]
  fgsm = constructed_report({"fgsm": (_info("fgsm"), [1] * 4 + [0] * 6),
                             "pgd20": (_info("pgd"), FIVE)})
  assert any(w.startswith("FGSM is stronger than PGD") for w in fgsm.sanity)
  black = constructed_report({"pgd20": (_info("pgd"), FIVE),
                              "n-attack": (_info("n-attack", black_box=True), [1] * 4 + [0] * 6)})
  assert any(w.startswith("the black-box attack n-attack") for w in black.sanity)
  aa = constructed_report({"aa": (_info("aa", joint=False, family="autoattack"), FIVE),
                           "aa-joint": (_info("aa", family="autoattack"), [1] * 4 + [0] * 6)})
  assert len(aa.sanity) == 1 and "disagree by 10.0 points" in aa.sanity[0]


def test_attack_names_parse_and_bad_names_fail_clearly():
  assert attack_names("default, sweep") == ["pgd20", "cw", "aa", "aa-joint", "pgd20@2",
                                            "pgd20@4", "pgd20@8", "pgd20@16", "pgd20@32"]
  spec = parse_attack("PGD100-main@16", eps=EPS, has_cas=True)
  assert (spec.method, spec.steps, spec.joint, spec.eps) == ("pgd", 100, False, 16 / 255)
  assert parse_attack("autoattack-joint", eps=EPS, has_cas=True).joint
  assert not parse_attack("cw", eps=EPS, has_cas=False).joint
  specs, _ = parse_attacks("pgd20,pgd20@8", eps=8 / 255, has_cas=True)
  assert len(specs) == 1  # the same attack at the same eps runs once
  for bad in ("pgd0", "fgsm10", "square-joint", "bim", "pgd20@300"):
    with pytest.raises(ValueError, match="Valid names|outside"):
      parse_attack(bad, eps=EPS, has_cas=True)
  with pytest.raises(ValueError, match="no CAS heads"):
    parse_attack("cas-head", eps=EPS, has_cas=False)
  with pytest.raises(ValueError, match="source_fn"):
    report_of(linear, "transfer-pgd")
