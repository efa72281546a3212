"""The paper's tables and figures as experiments: each a title and its settings (rows).

`EXPERIMENTS` is what `cas-jax-experiments NAME` runs (cas_jax/experiments/driver.py): a
Setting is the base config plus the few fields it changes; a CAS row names its twin without
CAS, and the paper's figures ride along where its text gives them.
"""
import dataclasses
from typing import Any, Dict, Optional, Tuple

DEFAULT_CONFIG = "cifar10_at_cas"  # a packaged config's name (cas_jax/configs/) or a file
# What every setting of an experiment is evaluated with, unless given on the command line.
EVAL_DEFAULTS = {"eval.attacks": "default,fgsm", "eval.checkpoints": "last"}
# The fields a setting takes from default.setting(...) when it names an objective / a model.
OBJECTIVE_FIELDS = ("loss.objective", "loss.lam", "attack.start", "attack.eps", "attack.step_size")
MODEL_FIELDS = ("model.name", "loss.beta", "optim.weight_decay")
# What --config.attack.norm=l2 sets in every setting (configs.default.under_l2), unless the
# command line sets it too: every objective's adversary and the reports move to L2 eps 0.5.
L2_FIELDS = ("attack.eps", "attack.step_size", "eval.norm", "eval.eps")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of a table: its workdir name, its label and what it changes in the base config."""
  name: str
  label: str
  objective: Optional[str] = None  # take OBJECTIVE_FIELDS from default.setting(objective, ...)
  cas: Optional[bool] = None  # model.cas_stages "default" (True) or "none" (False)
  overrides: Tuple[Tuple[str, Any], ...] = ()  # (dotted config path, value), applied last
  twin: str = ""  # the setting this one is compared with (a CAS row's: the row without CAS)
  extra_attacks: str = ""  # appended to the experiment's attack list (e.g. EOT for SAP)
  paper: Tuple[Tuple[str, float], ...] = ()  # the paper's figures (last checkpoint, %)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A paper table or figure: a title and its settings (model: every row's architecture)."""
  title: str
  settings: Tuple[Setting, ...]
  model: Optional[str] = None  # take MODEL_FIELDS from default.setting(..., model)
  plot_beta: bool = False  # draw accuracy against the CAS loss weight beta (fig8)
  attacks: str = EVAL_DEFAULTS["eval.attacks"]  # every setting's attack list, unless overridden
  reuses: str = ""  # evaluation only: these settings, trained by that experiment in --workdir
  source: Optional[Setting] = None  # trained once (base seed) in W/<name>/: transfer source
  exact: bool = False  # every attack on every clean-correct image (eval.exact_per_attack)


def _paper(natural, fgsm, pgd20, cw):
  return (("natural", natural), ("fgsm", fgsm), ("pgd20", pgd20), ("cw", cw))


def _methods_table(paper: Dict[str, tuple]) -> Tuple[Setting, ...]:
  """AT, TRADES and MART, each without and with CAS (the CAS row compared with its twin)."""
  rows = []
  for objective, label in (("at", "AT"), ("trades", "TRADES"), ("mart", "MART")):
    rows.append(Setting(objective, label, objective, cas=False, paper=paper.get(label, ())))
    rows.append(Setting(f"{objective}_cas", f"{label}+CAS", objective, cas=True, twin=objective,
                        paper=paper.get(f"{label}+CAS", ())))
  return tuple(rows)


def _beta(beta: float) -> Setting:
  # beta 0 is plain AT, as in the paper's Figure 8: no CAS module at all.
  if beta == 0:
    return Setting("beta0", "beta 0 (AT, no CAS)", cas=False)
  return Setting(f"beta{beta:g}", f"beta {beta:g}", cas=True, twin="beta0",
                 overrides=(("loss.beta", float(beta)),))


def _baseline(name: str, label: str, extra_attacks: str = "") -> Setting:
  """A Table 1 row: PGD-AT with the baseline `name` instead of CAS, compared with plain AT."""
  return Setting(name, label, "at", cas=False, twin="at", extra_attacks=extra_attacks,
                 overrides=(("baseline", name),))


_TABLE3 = _methods_table({})
# Table 6's transfer source: a naturally trained ResNet-50 (bottleneck blocks), no CAS.
_RESNET50_SOURCE = Setting("source_resnet50", "ResNet-50, natural training (transfer source)",
                           "natural", cas=False,
                           overrides=(("model.name", "resnet50"), ("baseline", "none")))

EXPERIMENTS = {
    # Paper Table 1: CAS beside the activation-side defenses kWTA, SAP and PCL, all with PGD-AT.
    # Avg-PGD-100 is a Table 1 column; SAP, randomized, is also attacked with EOT and AutoAttack's
    # rand version (gradients averaged over draws) and judged over fresh draws.
    "table1": Experiment("CAS beside kWTA, SAP and PCL (paper Table 1, ResNet-18)", (
        Setting("at", "AT", "at", cas=False),
        _baseline("kwta", "AT+kWTA"),
        _baseline("sap", "AT+SAP", extra_attacks="eot20,aa-rand"),
        _baseline("pcl", "AT+PCL"),
        Setting("at_cas", "AT+CAS", "at", cas=True, twin="at"),
    ), attacks="default,fgsm,avg-pgd100"),
    # "table3" is the paper's Table 5 (white-box robustness, ResNet-18, CIFAR-10);
    # the paper's ResNet-18 figures did not survive in its text, so none are shown.
    "table3": Experiment("AT, TRADES and MART with and without CAS (paper Table 5, ResNet-18)",
                         _TABLE3),
    # The next four evaluate table3's settings (the same --workdir and flags): Tables 4, 12 and
    # 13 train nothing; Table 6 trains its source (and any table3 setting not trained yet).
    "table4": Experiment("The CAS heads attacked alone, main-head accuracy (paper Table 4)",
                         tuple(dataclasses.replace(s, twin="") for s in _TABLE3 if s.cas),
                         attacks="pgd20-main,cas-head20,pgd20", reuses="table3", exact=True),
    "table6": Experiment("Black-box: transfer from a naturally trained ResNet-50, and N-Attack "
                         "(paper Table 6)", _TABLE3, source=_RESNET50_SOURCE, exact=True,
                         attacks="transfer-pgd20,transfer-cw20,n-attack"),
    "table12": Experiment("The Margin Decomposition attack (paper Table 12)", _TABLE3,
                          attacks="pgd20,cw,md", reuses="table3", exact=True),
    "table13": Experiment("PGD-20 at eps 2, 4, 8, 16, 32/255 (paper Table 13; no gradient "
                          "masking: accuracy falls to 0)", _TABLE3, attacks="sweep",
                          reuses="table3"),
    "table2": Experiment("CAS ablation: channel suppressing is what helps (paper Table 2)", (
        Setting("no_cas", "no CAS", cas=False),
        Setting("cas_no_suppress", "CAS loss without suppressing", cas=True, twin="no_cas",
                overrides=(("model.cas_suppress", False),)),
        Setting("cas", "CAS", cas=True, twin="no_cas", overrides=(("model.cas_suppress", True),)),
    )),
    "fig8": Experiment("Robustness against the CAS loss weight beta (paper Figure 8)",
                       tuple(_beta(b) for b in (0, 0.5, 1, 2, 5, 10, 20)), plot_beta=True),
    # Not in the paper: does the fast bfloat16 mode train as well as float32 (same seed)?
    # Both are attacked and judged in config.eval.dtype (float32 by default): the training
    # dtype is the only difference.
    "dtype": Experiment("bfloat16 against float32 training, same seed and schedule, both "
                        "evaluated in eval.dtype", (
        Setting("float32", "float32", overrides=(("model.dtype", "float32"),)),
        Setting("bfloat16", "bfloat16", twin="float32",
                overrides=(("model.dtype", "bfloat16"),)),
    )),
    # Appendix F (paper Tables 8 and 9): rows whose numbers the paper text lost have none.
    "wrn34_10": Experiment("WideResNet-34-10 with and without CAS (paper appendix F.1)",
                           _methods_table({"TRADES+CAS": _paper(87.15, 66.15, 53.15, 57.07),
                                           "MART": _paper(85.69, 66.41, 54.49, 52.55),
                                           "MART+CAS": _paper(89.20, 67.96, 54.95, 57.11)}),
                           model="wrn34_10"),
    "vgg16": Experiment("VGG16 with and without CAS (paper appendix F.2)",
                        _methods_table({"AT+CAS": _paper(82.61, 57.56, 42.73, 49.68),
                                        "TRADES": _paper(76.67, 52.99, 41.13, 45.25),
                                        "TRADES+CAS": _paper(83.25, 61.51, 49.56, 52.47),
                                        "MART": _paper(72.20, 54.90, 46.53, 44.72),
                                        "MART+CAS": _paper(83.28, 61.70, 49.13, 49.10)}),
                        model="vgg16"),
}
