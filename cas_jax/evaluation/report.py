"""The robustness report: per-image verdicts, the worst case over attacks, table, JSON, sanity.

    report = evaluate.robustness_report(apply_fn, x, y, eps=8/255, key=key)
    print(report.markdown())              # the table, then the sanity report under it
    report.verdicts["worst_case"]         # (N,) bool: correct on x and under every attack
    text = report.to_json(); Report.from_json(text).verdicts   # every verdict survives

A verdict is True where the image is still classified correctly. An attack that ran on only
some of the clean-correct images (the expensive ones run on the images every earlier attack
left standing) keeps True elsewhere: its own figure is then an upper bound, written "<= 41.2",
while the worst case stays exact. `ran_on[name]` records the images each attack attacked.
"""
import dataclasses
import json
from typing import Dict, List, Optional

import numpy as np

from cas_jax.attacks.cascade import COST_FIELDS
from cas_jax.evaluation.attack_registry import eps_text, same_eps

NATURAL, WORST_CASE = "natural", "worst_case"
# Points by which the worst case may undercut the best single attack (and AutoAttack's joint
# and main variants may disagree) before the sanity report says so.
TOLERANCE_POINTS = 2.0
# PGD at eps 32/255 must leave at most this much accuracy (paper Table 13: ~0).
# The sanity check's eps, per norm: L-inf 32/255 (paper Table 13); L2 7 and L1 386, radii of
# balls that contain that L-inf ball on a 32x32x3 image (32/255 sqrt(3072) = 6.95, 32/255 x
# 3072 = 385.5): a model robust in them would be robust at L-inf 32/255.
LARGE_EPS = {"linf": 32 / 255, "l2": 7.0, "l1": 386.0}
LARGE_EPS_MAX_POINTS = 5.0


def format_eps(eps: float, norm: str = "linf") -> str:
  """8/255 -> '8/255' under L-inf; 'L2 0.5' under L2 (attack_registry.eps_text)."""
  return eps_text(eps, norm)


@dataclasses.dataclass
class Report:
  """Per-image verdicts of natural, each attack (in the order they ran) and the worst case."""
  eps: float
  indices: np.ndarray  # (N,) the images' global indices (their keys are folded from them)
  verdicts: Dict[str, np.ndarray]  # name -> (N,) bool; NATURAL, attacks..., WORST_CASE
  # attack -> (N,) bool: the images it was started on (clean-correct; for an attack on the
  # survivors of others, those left standing by them)
  ran_on: Dict[str, np.ndarray]
  # attack -> {"description", "method", "steps", "joint", "eps", "black_box", "in_worst_case",
  #            "family"}: what sanity_checks and the table read.
  attacks: Dict[str, dict]
  sanity: List[str] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)
  seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
  title: str = "Robustness report"
  # A randomized model (e.g. SAP): each verdict is the majority over `draws` fresh draws, and
  # natural_mean the natural accuracy averaged over them. 0 / None: a deterministic model.
  draws: int = 0
  natural_mean: Optional[float] = None
  # {"stages": {unit: {images, fooled, forward_rows, gradient_rows, padding_rows, seconds,
  #  attacks}}, "attacks": {attack: the sums over its stages}, "total": {...}} (assemble_costs)
  costs: Dict[str, dict] = dataclasses.field(default_factory=dict)
  # attack -> (N,) bool: attacked, but left standing by a stage it shares with another attack
  # that had broken the image first (FAB-T and Square of aa and aa-joint): an upper bound there.
  cut_short: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # What produced the report: versions, commit, devices, the config and the training runs
  # (cas_jax/provenance.py: for_report); summary_line(...) is printed under the title.
  provenance: Dict[str, object] = dataclasses.field(default_factory=dict)
  provenance_line: str = ""
  norm: str = "linf"  # the threat model of eps and of the worst case

  @property
  def num_images(self) -> int:
    return int(self.verdicts[NATURAL].size)

  @property
  def accuracies(self) -> Dict[str, float]:
    """Accuracy (a fraction) of every verdict array."""
    return {name: self.accuracy(name) for name in self.verdicts}

  def accuracy(self, name: str) -> float:
    """The fraction of images still correct under `name` (an upper bound if not is_exact)."""
    return float(np.mean(self.verdicts[name]))

  def is_exact(self, name: str) -> bool:
    """Whether `name`'s own figure is exact: it attacked every clean-correct image."""
    if name not in self.ran_on:
      return True
    cut = self.cut_short.get(name)
    return not np.any(self.verdicts[NATURAL] & (~self.ran_on[name]
                                                | (False if cut is None else cut)))

  def figure(self, name: str) -> str:
    """Accuracy in percent, '<= x' where it is only an upper bound (natural: mean over draws)."""
    if name == NATURAL and self.natural_mean is not None:
      return f"{100 * self.natural_mean:.1f}"
    text = f"{100 * self.accuracy(name):.1f}"
    return text if self.is_exact(name) else f"<= {text}"

  def table(self) -> str:
    """Markdown: one row per attack with its accuracy and the worst case over it and those above."""
    rows = ["| attack | eps | accuracy (%) | worst case so far (%) | images | attacked |",
            "|---|---|---|---|---|---|"]
    natural = self.verdicts[NATURAL]
    natural_name = "natural" if not self.draws else f"natural (mean over {self.draws} draws)"
    rows.append(f"| {natural_name} | - | {self.figure(NATURAL)} | "
                f"{100 * self.accuracy(NATURAL):.1f} | {self.num_images} | - |")
    so_far = natural.copy()
    for name, info in self.attacks.items():
      cumulative = "-"  # other eps: shown, but not part of the worst case
      if info["in_worst_case"]:
        so_far &= self.verdicts[name]
        cumulative = f"{100 * np.mean(so_far):.1f}"
      description = info["description"]
      if self.draws:
        description += (f" [EOT: {info['gradient_draws']} draws per step]"
                        if info.get("gradient_draws") else " [on the expectation (no noise)]")
      eps = format_eps(info["eps"], info.get("norm", "linf"))
      rows.append(f"| {name}: {description} | {eps} | "
                  f"{self.figure(name)} | {cumulative} | {self.num_images} | "
                  f"{int(np.sum(self.ran_on[name]))} |")
    worst = f"{100 * self.accuracy(WORST_CASE):.1f}"
    eps = format_eps(self.eps, self.norm)
    rows.append(f"| **worst case** (every attack at eps {eps}) | "
                f"{eps} | **{worst}** | {worst} | {self.num_images} | - |")
    return "\n".join(rows)

  def markdown(self) -> str:
    """The title, the table, the sanity report under it, then notes and timings."""
    lines = [f"# {self.title}", ""]
    if self.provenance_line:
      lines += [self.provenance_line, ""]
    if self.draws:
      lines += [f"Randomized model: every verdict is the majority over {self.draws} fresh draws "
                "(an image counts as correct when more than half of them classify it "
                "correctly); the natural accuracy is the mean over those draws, and the worst "
                "case starts from the images correct in most draws.", ""]
    lines += [self.table(), "", "## Sanity report", ""]
    lines += [f"- WARNING: {w}" for w in self.sanity] or ["- No warnings."]
    if self.notes:
      lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
    if self.costs:
      lines += ["", "## Cost", ""] + cost_table(self.costs)
    return "\n".join(lines) + "\n"

  def to_json(self) -> str:
    """Every figure and every per-image verdict (and where each attack ran) as JSON."""
    as_list = lambda a: [bool(v) for v in a]
    data = {
        "title": self.title, "eps": self.eps, "num_images": self.num_images,
        "indices": [int(i) for i in self.indices],
        "accuracy": {name: self.accuracy(name) for name in self.verdicts},
        "exact": {name: self.is_exact(name) for name in self.verdicts},
        "verdicts": {name: as_list(v) for name, v in self.verdicts.items()},
        "ran_on": {name: as_list(v) for name, v in self.ran_on.items()},
        "attacks": self.attacks, "sanity": self.sanity, "notes": self.notes,
        "seconds": self.seconds, "draws": self.draws, "natural_mean": self.natural_mean,
        "costs": self.costs,
        "cut_short": {name: as_list(v) for name, v in self.cut_short.items()},
        "provenance": self.provenance, "provenance_line": self.provenance_line,
        "norm": self.norm,
    }
    return json.dumps(data, indent=1, default=str)

  def write(self, stem: str) -> List[str]:
    """Write stem.md (markdown()) and stem.json (to_json()); their paths."""
    paths = [f"{stem}.md", f"{stem}.json"]
    for path, text in zip(paths, (self.markdown(), self.to_json())):
      with open(path, "w") as f:
        f.write(text)
    return paths

  @classmethod
  def from_json(cls, text: str) -> "Report":
    """The Report that to_json wrote."""
    data = json.loads(text)
    as_array = lambda v: np.asarray(v, dtype=bool)
    return cls(eps=data["eps"], indices=np.asarray(data["indices"], np.int64),
               verdicts={k: as_array(v) for k, v in data["verdicts"].items()},
               ran_on={k: as_array(v) for k, v in data["ran_on"].items()},
               attacks=data["attacks"], sanity=data["sanity"], notes=data["notes"],
               seconds=data["seconds"], title=data["title"], draws=data.get("draws", 0),
               natural_mean=data.get("natural_mean"), costs=data.get("costs", {}),
               cut_short={k: as_array(v) for k, v in data.get("cut_short", {}).items()},
               provenance=data.get("provenance", {}),
               provenance_line=data.get("provenance_line", ""),
               norm=data.get("norm", "linf"))


def assemble_costs(unit_costs: Dict[str, dict], steps, natural_rows: int,
                   natural_padding: int = 0) -> Dict[str, dict]:
  """Per stage (unit) and per attack (the sum over its stages, shared ones in full), and the
  total (every stage once, the natural pass's rows and padding included): images, fooled,
  model rows, seconds."""
  fields = COST_FIELDS  # the cascade's: one list of cost fields
  stages, attacks = {}, {}
  for step in steps:
    cost = {f: unit_costs.get(step.unit.name, {}).get(f, 0.0) for f in fields}
    stages[step.unit.name] = {**cost, "attacks": list(step.members)}
    for member in step.members:
      total = attacks.setdefault(member, dict.fromkeys(fields, 0.0))
      for f in fields:
        total[f] += cost[f]
  total = {f: sum(c[f] for c in stages.values()) for f in fields}
  total["forward_rows"] += natural_rows
  total["padding_rows"] += natural_padding
  total["natural_rows"] = natural_rows
  total["rows"] = total["forward_rows"] + total["gradient_rows"]
  return {"stages": stages, "attacks": attacks, "total": total}


def cost_table(costs: Dict[str, dict]) -> List[str]:
  """Markdown rows: each stage's images attacked, model rows and seconds, then the total."""
  rows = ["Model rows: one image through one forward pass; gradient rows also took a backward "
          "pass. Source rows: gradient rows through a transfer attack's source model, apart "
          "from the evaluated model's. Padding rows (copies filling a stage's last batch) are "
          "included and counted apart.", "",
          "| stage | attacks | images attacked | fooled | forward rows | gradient rows | "
          "source rows | padding rows | s | images/s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  counts = lambda c: " | ".join(str(int(c.get(f, 0))) for f in (
      "fooled", "forward_rows", "gradient_rows", "source_rows", "padding_rows"))
  for name, c in costs["stages"].items():
    rate = c["images"] / c["seconds"] if c["seconds"] else 0.0
    rows.append(f"| {name} | {', '.join(c['attacks'])} | {int(c['images'])} | {counts(c)} | "
                f"{c['seconds']:.1f} | {rate:.1f} |")
  t = costs["total"]
  rows.append(f"| **total** (natural: {int(t['natural_rows'])} rows) | - | {int(t['images'])} | "
              f"{counts(t)} | {t['seconds']:.1f} | - |")
  return rows


def worst_case(verdicts: Dict[str, np.ndarray], attacks: Dict[str, dict]) -> np.ndarray:
  """Correct on clean input and under every attack run at the report's eps."""
  robust = verdicts[NATURAL].copy()
  for name, info in attacks.items():
    if info["in_worst_case"]:
      robust &= verdicts[name]
  return robust


# ----------------------------------------------------------------------------- sanity report


def _points(report: Report, name: str) -> float:
  return 100 * report.accuracy(name)


def _lowest(report: Report, names) -> str:
  return min(names, key=lambda n: report.accuracy(n))


def _worst_case_gap(report: Report) -> List[str]:
  """Worst case well below every single attack: name the attacks that found the extra images."""
  counted = [n for n, info in report.attacks.items() if info["in_worst_case"]]
  exact = [n for n in counted if report.is_exact(n)]
  if not exact:
    return []
  best = _lowest(report, exact)
  gap = _points(report, best) - _points(report, WORST_CASE)
  if gap <= TOLERANCE_POINTS:
    return []
  extra = report.verdicts[best] & ~report.verdicts[WORST_CASE]
  finders = sorted(((int(np.sum(extra & ~report.verdicts[n])), n) for n in counted if n != best),
                   reverse=True)
  found = ", ".join(f"{n} ({c})" for c, n in finders if c)
  message = (f"the worst case ({_points(report, WORST_CASE):.1f}%) is {gap:.1f} points below the "
             f"strongest single attack, {best} ({_points(report, best):.1f}%): no single attack "
             f"is enough on this model. The {int(extra.sum())} images {best} left standing fell "
             f"to {found}.")
  partial = [n for n in counted if not report.is_exact(n)]
  if partial:
    message += (f" {', '.join(partial)} ran only on images that earlier attacks left standing, "
                "so their own figures are upper bounds; rerun with exact_per_attack=True to "
                "see whether one of them alone reaches the worst case.")
  return [message]


def _large_eps_not_broken(report: Report) -> List[str]:
  warnings = []
  for name, info in report.attacks.items():
    norm = info.get("norm", "linf")
    if (info["method"] == "pgd" and same_eps(info["eps"], LARGE_EPS[norm])
        and _points(report, name) > LARGE_EPS_MAX_POINTS):
      warnings.append(
          f"{name} leaves {_points(report, name):.1f}% accuracy at eps "
          f"{format_eps(LARGE_EPS[norm], norm)} (more than "
          f"{LARGE_EPS_MAX_POINTS:.0f}%): a large enough perturbation should break every image; "
          "suspect gradient masking (paper Table 13).")
  return warnings


def _same_threat(a: dict, b: dict) -> bool:
  """Whether two attacks' infos run in the same threat model (norm and eps)."""
  return a.get("norm", "linf") == b.get("norm", "linf") and same_eps(a["eps"], b["eps"])


def _fgsm_beats_pgd(report: Report) -> List[str]:
  warnings = []
  for fgsm, f_info in report.attacks.items():
    if f_info["method"] != "fgsm":
      continue
    for pgd, p_info in report.attacks.items():
      if (p_info["method"] == "pgd" and _same_threat(p_info, f_info)
          and p_info["joint"] == f_info["joint"] and report.is_exact(pgd)
          and report.accuracy(fgsm) < report.accuracy(pgd)):
        warnings.append(
            f"FGSM is stronger than PGD: {fgsm} leaves {_points(report, fgsm):.1f}%, {pgd} "
            f"{_points(report, pgd):.1f}%. One step beating many means the iterations get lost "
            "(gradient masking or a bad step size).")
  return warnings


def _black_box_beats_white_box(report: Report) -> List[str]:
  counted = {n: i for n, i in report.attacks.items() if i["in_worst_case"]}
  white = [n for n, i in counted.items() if not i["black_box"] and report.is_exact(n)]
  if not white:
    return []
  best_white = _lowest(report, white)
  return [f"the black-box attack {name} ({_points(report, name):.1f}%) is stronger than every "
          f"white-box attack (best: {best_white}, {_points(report, best_white):.1f}%): "
          "gradients mislead the white-box attacks (gradient masking)."
          for name, info in counted.items()
          if info["black_box"] and report.accuracy(name) < report.accuracy(best_white)]


def _joint_main_disagree(report: Report) -> List[str]:
  warnings = []
  for joint, j_info in report.attacks.items():
    if j_info["family"] != "autoattack" or not j_info["joint"]:
      continue
    for main, m_info in report.attacks.items():
      same = (all(m_info[k] == j_info[k] for k in ("family", "method"))
              and _same_threat(m_info, j_info))
      if not same or m_info["joint"]:
        continue
      # Compared on the images both attacked, so that the gap is exact either way.
      both = report.ran_on[joint] & report.ran_on[main]
      broken = lambda n: int(np.sum(both & ~report.verdicts[n]))
      gap = 100 * abs(broken(joint) - broken(main)) / report.num_images
      if gap > TOLERANCE_POINTS:
        warnings.append(
            f"AutoAttack on the joint losses ({joint}) and on the main logits ({main}) disagree "
            f"by {gap:.1f} points: of the {int(both.sum())} images both attacked, {joint} broke "
            f"{broken(joint)} and {main} {broken(main)}. The CAS heads change what the attack "
            "finds; trust the worst case, not either one.")
  return warnings


def _randomized_without_eot(report: Report) -> List[str]:
  if not report.draws or any(i.get("averages_draws") for i in report.attacks.values()):
    return []
  return [f"this model is randomized (verdicts over {report.draws} draws) but no attack "
          "averaged its gradients over draws: PGD on one draw or on the expectation overstates "
          "the robustness of randomized defenses. Add eot20, avg-pgd100 or aa-rand (paper "
          "Table 1; Athalye et al. 2018, Tramer et al. 2020)."]


def sanity_checks(report: Report) -> List[str]:
  """Plain-English warnings about figures that a sound evaluation should not produce."""
  return (_randomized_without_eot(report) + _worst_case_gap(report)
          + _large_eps_not_broken(report) + _fgsm_beats_pgd(report)
          + _black_box_beats_white_box(report) + _joint_main_disagree(report))
