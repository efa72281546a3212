"""Attacks by name, for evaluation reports and configs (config.eval.attacks="pgd20,cw,aa,aa-joint").

    specs, notes = parse_attacks("default,fgsm,sweep", eps=8/255, has_cas=True)

Names (case-insensitive; a number after the name sets the step count):
  default               pgd20, cw, aa, aa-joint: the default set (docs/evaluation.md)
  fgsm, pgd<k>, cw<k>   white-box, adaptive on CAS models (joint CE / joint margin of the main and
                        CAS heads, step eps/10); "-main" attacks the main head alone
  cas-head<k>           PGD-k on the CAS heads' CE alone, main-head accuracy (paper Table 4)
  eot<k>, avg-pgd<k>    PGD with the gradient averaged over random draws (Table 1; joint CE /
                        joint margin); on a deterministic model the draws coincide
  md<k>                 Margin Decomposition (Table 12), adaptive unless "-main"
  aa (= autoattack)     AutoAttack standard on the main logits; "aa-joint": APGD on the joint losses
  aa-plus               AutoAttack's "plus" version (APGD-CE, APGD-DLR and FAB with 5 restarts,
                        Square, APGD-T, FAB-T); "aa-plus-joint": APGD on the joint losses
  aa-rand               AutoAttack's "rand" version (APGD-CE, APGD-DLR with EOT) for randomized
                        models such as SAP; "aa-rand-joint" on the joint losses
  apgd-ce, apgd-t, apgd-dlr, fab-t, square, fab   one AutoAttack part ("-joint" for APGD's
                        joint losses; fab: untargeted FAB, 5 restarts, as in plus)
  n-attack              query-based black-box N-Attack (Table 6)
  transfer-pgd<k>, transfer-cw<k>   black-box transfer from a source model (Table 6)
  sweep                 pgd20@2, pgd20@4, pgd20@8, pgd20@16, pgd20@32 (Table 13)
  <name>@<e>            the attack at eps e/255 (only the report's eps enters the worst case)
  <name>-l2, -l1, -linf the attack under another norm than the report's (its eps in that norm's
                        units: pgd20-l2@0.5; without @, 0.5 for L2 and 12 for L1); only attacks
                        at the report's norm and eps enter the worst case
On a model without CAS heads the adaptive, "-joint" and "-main" variants coincide and run once.
"""
import dataclasses
import re
from typing import List, Optional, Sequence, Tuple, Union

from cas_jax import errors
from cas_jax.attacks.norms import NORMS, check_eps, check_norm  # pylint: disable=unused-import

DEFAULT_ATTACKS = ("pgd20", "cw", "aa", "aa-joint")
SWEEP_EPS_255 = (2, 4, 8, 16, 32)
ALIASES = {"autoattack": "aa"}
EOT_METHODS = ("eot", "avg-pgd", "aa-rand")  # gradients averaged over random draws
_NAME = re.compile(r"(?P<base>[a-z][a-z-]*?)(?P<steps>\d+)?(?P<mode>-main|-joint)?"
                   r"(?P<norm>-linf|-l2|-l1)?(?:@(?P<eps>\d+(?:\.\d+)?))?")
# Each norm's default eps (an attack named with another norm than the report's, and no @):
# RobustBench's boards (L-inf 8/255, L2 0.5) and AutoAttack's L1 eps (12).
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
# Methods with an L2 and an L1 variant; the query-based N-Attack is L-inf only.
ANY_NORM = ("fgsm", "pgd", "cw", "cas-head", "eot", "avg-pgd", "md", "aa", "aa-plus", "aa-rand",
            "apgd-ce", "apgd-t", "apgd-dlr", "fab-t", "fab", "square", "transfer-pgd",
            "transfer-cw")


def same_eps(a: float, b: float) -> bool:
  """The one rule for "the same eps": equal in units of 1/255 to 4 decimals (8/255 == 8/255)."""
  return round(a * 255, 4) == round(b * 255, 4)


def eps_text(eps: float, norm: str = "linf") -> str:
  """The eps in its norm's units: 8/255 for L-inf, 0.5 for L2 and L1 ('L2 0.5')."""
  if norm != "linf":
    return f"{norm.upper()} {eps:g}"
  in_255ths = eps * 255
  if abs(in_255ths - round(in_255ths)) < 1e-4:
    return f"{round(in_255ths)}/255"
  return f"{eps:.4g}"


@dataclasses.dataclass(frozen=True)
class Method:
  """How an attack method is named, run and counted."""
  steps: Optional[int]  # default step count; None: no count in the name (the budget sets it)
  joint: Optional[bool]  # ascends the joint loss by default; None: one fixed loss
  expensive: bool  # runs only on images every earlier attack left standing
  black_box: bool
  family: str  # expensive attacks of one family run on the same images


METHODS = {
    "fgsm": Method(None, True, False, False, "fgsm"),
    "pgd": Method(20, True, False, False, "pgd"),
    "cw": Method(20, True, False, False, "cw"),
    "cas-head": Method(20, None, False, False, "cas-head"),
    "eot": Method(20, True, False, False, "eot"),
    "avg-pgd": Method(100, True, True, False, "avg-pgd"),
    "md": Method(40, True, True, False, "md"),
    "aa": Method(None, False, True, False, "autoattack"),
    "aa-plus": Method(None, False, True, False, "autoattack"),
    "aa-rand": Method(None, False, True, False, "autoattack"),
    "apgd-ce": Method(None, False, True, False, "autoattack"),
    "apgd-t": Method(None, False, True, False, "autoattack"),
    "apgd-dlr": Method(None, False, True, False, "autoattack"),
    "fab-t": Method(None, None, True, False, "autoattack"),
    "fab": Method(None, None, True, False, "autoattack"),
    "square": Method(None, None, True, True, "autoattack"),
    "n-attack": Method(None, None, True, True, "n-attack"),
    "transfer-pgd": Method(20, None, False, True, "transfer"),
    "transfer-cw": Method(20, None, False, True, "transfer"),
}


@dataclasses.dataclass(frozen=True)
class AttackBudget:
  """Step, query and draw counts the attack names do not carry (defaults: their papers')."""
  apgd_steps: int = 100
  fab_steps: int = 100
  square_queries: int = 5000
  target_classes: int = 9
  n_attack_population: int = 300
  n_attack_iters: int = 500
  md_restarts: int = 1
  eot_draws: int = 10  # per step of eot and avg-pgd
  aa_rand_draws: int = 20  # per step of aa-rand's APGD (AutoAttack's rand version)
  verdict_draws: int = 10  # fresh draws whose majority judges a randomized model

  def __post_init__(self):
    for name, value in vars(self).items():
      if int(value) != value or value < 1:
        raise errors.UserError(f"attack budget {name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One named attack: what it runs (method, steps, loss mode) and at which eps."""
  name: str
  method: str
  steps: int
  joint: bool
  eps: float
  norm: str = "linf"

  @property
  def expensive(self) -> bool:
    return METHODS[self.method].expensive

  @property
  def black_box(self) -> bool:
    return METHODS[self.method].black_box

  @property
  def family(self) -> str:
    return METHODS[self.method].family

  @property
  def averages_draws(self) -> bool:
    """Whether its gradients average over random draws (EOT): the attack for randomized models."""
    return self.method in EOT_METHODS

  def in_threat(self, norm: str, eps: float) -> bool:
    """Whether it runs in the threat model (norm, eps): the one rule of the worst case."""
    return self.norm == norm and same_eps(self.eps, eps)

  @property
  def canonical(self) -> str:
    """The attack's name whatever the spelling (its random stream): method, steps, loss, eps."""
    loss = "-joint" if self.joint else "-main"
    norm = "" if self.norm == "linf" else f"-{self.norm}"  # L-inf streams as before
    return f"{self.method}{self.steps or ''}{loss}{norm}@{round(self.eps * 255, 4):g}"

  @property
  def description(self) -> str:
    loss = {True: "joint loss (adaptive)", False: "main head"}[self.joint]
    if self.norm != "linf":
      loss += f", {self.norm.upper()}"
    method, steps = self.method, self.steps
    return {
        "fgsm": f"FGSM, {loss}",
        "pgd": f"PGD-{steps} CE, {loss}",
        "cw": f"CW-inf-{steps} margin, {loss}",
        "cas-head": f"PGD-{steps} on the CAS heads' CE",
        "eot": f"EOT-PGD-{steps} CE, {loss}",
        "avg-pgd": f"Avg-PGD-{steps} margin, {loss}",
        "md": f"MD-{steps}, {loss}",
        "aa": "AutoAttack standard, " + ("joint losses" if self.joint else "main logits"),
        "aa-plus": "AutoAttack plus, " + ("joint losses" if self.joint else "main logits"),
        "fab": "AutoAttack part fab (untargeted FAB, 5 restarts)",
        "aa-rand": "AutoAttack rand (APGD-CE, APGD-DLR with EOT), " + (
            "joint losses" if self.joint else "main logits"),
        "n-attack": "N-Attack (black-box)",
        "transfer-pgd": f"transfer PGD-{steps} from the source model",
        "transfer-cw": f"transfer CW-inf-{steps} from the source model",
    }.get(method, f"AutoAttack part {method}" + (", joint loss" if self.joint else ""))

  def info(self, in_worst_case: bool) -> dict:
    """The JSON-ready description the report and its sanity checks read."""
    return {"description": self.description, "method": self.method, "steps": self.steps,
            "averages_draws": self.averages_draws,
            "joint": self.joint, "eps": self.eps, "norm": self.norm, "black_box": self.black_box,
            "expensive": self.expensive, "family": self.family, "in_worst_case": in_worst_case}


def _bad_name(name: str, why: str) -> errors.UserError:
  return errors.UserError(f"attack {name!r}: {why}. Valid names: default, fgsm, pgd<k>, cw<k>, "
                    "cas-head<k>, eot<k>, avg-pgd<k>, md<k>, aa, aa-joint, aa-plus, aa-rand, "
                    "apgd-ce, apgd-t, apgd-dlr, fab-t, fab, square, n-attack, transfer-pgd<k>, "
                    "transfer-cw<k>, "
                    "sweep; "
                    "add -main / -joint for the loss, -linf / -l2 / -l1 for another norm than the "
                    "report's and @<e> for eps (e/255 under L-inf, e under L2 and L1), e.g. "
                    "pgd100-main@16, pgd20-l2@0.5")


def parse_attack(name: str, *, eps: float, has_cas: bool, norm: str = "linf") -> AttackSpec:
  """The AttackSpec of one name such as 'pgd100', 'cw-main', 'aa-joint', 'pgd20@32' or
  'aa-l2@0.5' (norm, eps: the report's, which a name without its own takes)."""
  text = name.strip().lower()
  match = _NAME.fullmatch(text)
  base = ALIASES.get(match["base"], match["base"]) if match else None
  if base not in METHODS:
    raise _bad_name(name, "unknown attack")
  method = METHODS[base]
  if match["steps"] is not None and method.steps is None:
    raise _bad_name(name, f"{base} takes no step count (its budget sets it)")
  steps = method.steps if match["steps"] is None else int(match["steps"])
  if steps is not None and steps < 1:
    raise _bad_name(name, "the step count must be >= 1")
  if match["mode"] and method.joint is None:
    raise _bad_name(name, f"{base} has one fixed loss; drop {match['mode']}")
  joint = method.joint if not match["mode"] else match["mode"] == "-joint"
  if base == "cas-head" and not has_cas:
    raise _bad_name(name, "this model has no CAS heads to attack")
  norm = check_norm(norm)
  attack_norm = match["norm"][1:] if match["norm"] else norm
  if attack_norm != "linf" and base not in ANY_NORM:
    raise _bad_name(name, f"{base} has no {attack_norm.upper()} variant (L-inf only)")
  if match["eps"] is not None:
    attack_eps = float(match["eps"]) / (255 if attack_norm == "linf" else 1)
  else:
    attack_eps = eps if attack_norm == norm else DEFAULT_EPS[attack_norm]
  check_eps(attack_eps, attack_norm)
  # Without CAS heads the joint losses are the main-head losses: one variant.
  return AttackSpec(name=text, method=base, steps=steps or 0, joint=bool(joint) and has_cas,
                    eps=attack_eps, norm=attack_norm)


def attack_names(attacks: Union[None, str, Sequence[str]], norm: str = "linf") -> List[str]:
  """The names in a comma-separated string or a sequence, 'default' and 'sweep' expanded (the
  sweep is L-inf's, named as such in a report of another norm)."""
  if attacks is None:
    attacks = "default"
  if isinstance(attacks, str):
    attacks = attacks.split(",")
  names = []
  for name in (a.strip().lower() for a in attacks):
    if name == "default":
      names += DEFAULT_ATTACKS
    elif name == "sweep":
      names += [f"pgd20{'' if norm == 'linf' else '-linf'}@{e}" for e in SWEEP_EPS_255]
    elif name:
      names.append(name)
  if not names:
    raise errors.UserError(f"no attacks in {attacks!r}; e.g. 'default' or 'pgd20,cw,aa'")
  return names


def parse_attacks(attacks, *, eps: float, has_cas: bool,
                  norm: str = "linf") -> Tuple[List[AttackSpec], List[str]]:
  """The attacks to run, each once, and notes on the names that coincide with an earlier one."""
  specs, notes, seen = [], [], {}
  for name in attack_names(attacks, check_norm(norm)):
    spec = parse_attack(name, eps=eps, has_cas=has_cas, norm=norm)
    same = spec.canonical
    if same in seen:
      why = " on a model without CAS heads" if not has_cas and name != seen[same] else ""
      notes.append(f"{name} coincides with {seen[same]}{why}: run once.")
      continue
    seen[same] = spec.name
    specs.append(spec)
  return specs, notes
