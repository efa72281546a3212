"""The survivor cascade: every attack stage on the images still standing, in full sharded batches.

    steps = [Step(unit_a, ("aa",)), Step(unit_b, ("aa", "aa-joint"))]
    result = cascade.run(steps, x, y, key_data, eligible={"aa": natural, "aa-joint": natural})
    result.broken["aa"], result.cut["aa"], result.costs["unit_b"]

A `Unit` is one compiled piece of an attack (a PGD, one APGD-T target, one FAB-T target, a chunk
of Square queries). A `Step` runs a unit for the attacks in `members` on the images every one of
them still has standing: a step shared by several attacks (FAB-T and Square of `aa` and
`aa-joint`) runs once. Its images are gathered from the whole set into batches of `batch_size`
rows, sharded over every local device; the rest of a step runs as one batch of its own size,
or padded (copies of a real row, whose results are dropped and whose rows are counted apart)
into a size its program made before when that wastes at most 1/16 of it (`BatchShapes`, one
per compiled program: the units of one `program(unit)`): a stage makes at most 3 batch sizes,
so its program compiles for at most 3 shapes whatever the number of images (stages sharing a
program, APGD's, share their sizes and add at most 2 each).

Costs are counted in model rows (one image through one forward pass): every unit reports how
many batch passes it made, with and without a gradient, and the cascade multiplies by the rows
of the batch (padding included, reported apart). With `state_path` every finished batch is
recorded (at most every `save_every` seconds, and at once on SIGTERM / Ctrl-C): a run started
again with the same fingerprint skips every image already attacked.
"""
import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import tqdm

from cas_jax import errors
from cas_jax import integrity
from cas_jax import preemption

Array = jax.Array
# A unit's output on one batch: (fooled (B,), x_adv (B, ...), carry out (pytree or None),
# forward passes, gradient passes[, padding rows beyond the batch's own, e.g. its judge's]) --
# passes over the whole batch, Python or JAX scalars.
UnitOutput = Tuple[Any, ...]
COST_FIELDS = ("images", "fooled", "forward_rows", "gradient_rows", "source_rows", "padding_rows",
               "seconds")


@dataclasses.dataclass(frozen=True)
class Unit:
  """One compiled piece of an attack: run(x, y, key_data, carry) -> UnitOutput on one batch.

  carry names a per-image state that units of one group hand on (Square's chunks of queries),
  a tuple of arrays with a leading batch axis; reads_carry: this unit continues from it (else
  it starts afresh and may write one). source_gradient: its gradient passes are through a
  transfer attack's source model, counted as source_rows, apart from the attacked model's.
  program: the compiled program it runs, whose units share one BatchShapes (`program`).
  """
  name: str
  run: Callable[..., UnitOutput]
  carry: Optional[str] = None
  reads_carry: bool = False
  source_gradient: bool = False
  program: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Step:
  """Run `unit` for the attacks `members` on the images standing for all of them."""
  unit: Unit
  members: Tuple[str, ...]


@dataclasses.dataclass
class Result:
  """Per attack: broken (N,) (fooled by one of its steps) and cut (N,) (left standing for it
  by a shared step that did not attack them: its verdict there is an upper bound); per unit:
  its costs (COST_FIELDS) and fooled (N,); x_adv (the first adversarial per image) if kept."""
  broken: Dict[str, np.ndarray]
  cut: Dict[str, np.ndarray]
  fooled: Dict[str, np.ndarray]
  costs: Dict[str, Dict[str, float]]
  x_adv: Optional[np.ndarray] = None


def stage(unit: Unit) -> str:
  """The stage a unit belongs to, which owns the batch sizes its units make: its name up to
  the first "/" (fab-t/2 and fab-t/3 -> fab-t; square/q0 -> square)."""
  return unit.name.split("/")[0]


def program(unit: Unit) -> str:
  """The program a unit runs, whose units share one BatchShapes: its own `program` if set
  (every APGD stage: "apgd"), else its stage's."""
  return unit.program or stage(unit)


class BatchShapes:
  """The batch sizes of one compiled program in a report (it compiles for these shapes only):
  full batches of batch_size, and for a rest smaller than that the smallest size already made
  that holds it with padding of at most `waste` of it, or two batches of one made size; else,
  while its `owner` (an attack stage running the program) has made fewer than `limit` - 1
  sizes, a new size that fits it exactly (rounded up to a multiple of `devices`); else the
  largest size it fills, the last piece padded to the smallest that holds it. A program of
  one stage so makes at most `limit` sizes; stages sharing a program (APGD's, every loss)
  use each other's sizes and make at most `limit` - 1 each. The reports of one evaluation (a
  workdir's checkpoints) share their BatchShapes, so that the second compiles nothing new.

  A rest runs as one batch of its own size where a fixed ladder of sizes split it into small
  batches (batch 1 costs twice a row of batch 5 on a CPU) or padded it; the sizes follow the
  attack's own rests, which shrink slowly from unit to unit (APGD-T's targets, Square's chunks).
  """

  def __init__(self, batch_size: int, devices: int, limit: int = 3, waste: float = 0.0625):
    self.devices, self.limit, self.waste = devices, limit, waste
    self.sizes = [self.round_up(batch_size)]
    self.made: Dict[Optional[str], int] = {}  # rest sizes made, per owner

  def round_up(self, rows: int) -> int:
    """rows rounded up to a multiple of the device count (at least one row per device)."""
    return max(self.devices, -(-rows // self.devices) * self.devices)

  def size_for(self, left: int, owner: Optional[str] = None) -> int:
    """The size of the next batch of `owner`'s step with `left` rows still to attack."""
    if left >= self.sizes[0]:
      return self.sizes[0]
    fits = min(s for s in self.sizes if s >= left)
    if fits - left <= self.waste * left or fits == self.round_up(left):
      return fits
    # Two batches of a size made before cover it (6 as 3 + 3): no new size to compile.
    pairs = [s for s in self.sizes if s <= left and 2 * s - left <= self.waste * left]
    if pairs and 2 * max(pairs) >= left:
      return max(pairs)
    if self.made.get(owner, 0) < self.limit - 1:
      self.made[owner] = self.made.get(owner, 0) + 1
      self.sizes.append(self.round_up(left))
      return self.sizes[-1]
    return max((s for s in self.sizes if s <= left), default=fits)

  def batches(self, rows: np.ndarray, owner: Optional[str] = None):
    """(real rows, padded rows) batches covering `rows` (padding: copies of a batch's first)."""
    start = 0
    while start < rows.size:
      size = self.size_for(rows.size - start, owner)
      take = rows[start:start + size]
      yield take, np.concatenate([take, np.full(size - take.size, take[0])])
      start += take.size


def shapes_of(shapes: Dict[Tuple[str, int], BatchShapes], name: str, batch_size: int,
              n: int) -> BatchShapes:
  """The BatchShapes of program `name` in batches of up to `batch_size` of `n` images, from
  `shapes` (made there on first use: the reports that share the dict share their sizes)."""
  full = min(batch_size, max(n, 1))
  if (name, full) not in shapes:
    shapes[name, full] = BatchShapes(full, jax.local_device_count())
  return shapes[name, full]


class _State:
  """Per-unit attacked / fooled masks, costs and carries, saved to state_path as one .npz."""

  def __init__(self, n: int, path: Optional[str], fingerprint: Optional[dict], save_every: float):
    self.n, self.path, self.save_every = n, path, save_every
    self.fingerprint = json.dumps(fingerprint or {}, sort_keys=True)
    self.attacked: Dict[str, np.ndarray] = {}
    self.fooled: Dict[str, np.ndarray] = {}
    self.costs: Dict[str, Dict[str, float]] = {}
    self.carries: Dict[str, List[np.ndarray]] = {}
    self.last_save = time.monotonic()
    if path and os.path.exists(path):
      self._load()

  def _load(self):
    try:
      saved = integrity.load_sealed_arrays(self.path)
    except integrity.Damaged as damage:
      integrity.set_aside(self.path, str(damage), "The evaluation state")
      return
    previous = json.loads(str(saved["fingerprint"]))
    if previous != json.loads(self.fingerprint):
      differ = sorted(k for k in set(previous) | set(json.loads(self.fingerprint))
                      if previous.get(k) != json.loads(self.fingerprint).get(k))
      stale = integrity.keep_aside(self.path, "stale")
      logging.warning("Not resuming the evaluation in %s: its %s differ; starting afresh "
                      "(the old state is kept as %s).", self.path, ", ".join(differ), stale)
      return
    for key in saved:
      kind, _, name = key.partition(":")
      if kind == "attacked":
        self.attacked[name] = saved[key]
      elif kind == "fooled":
        self.fooled[name] = saved[key]
      elif kind == "cost":
        self.costs[name] = dict(zip(COST_FIELDS, saved[key].tolist()))
      elif kind == "carry":
        group, _, leaf = name.rpartition("/")
        self.carries.setdefault(group, []).append((int(leaf), saved[key]))
    self.carries = {g: [a for _, a in sorted(leaves, key=lambda p: p[0])]
                    for g, leaves in self.carries.items()}
    done = sum(int(a.sum()) for a in self.attacked.values())
    logging.info("Resuming the evaluation in %s: %d image-stages already attacked.", self.path,
                 done)

  def unit(self, name: str):
    """(attacked, fooled, costs) of unit `name`, created empty the first time."""
    if name not in self.attacked:
      self.attacked[name] = np.zeros(self.n, bool)
      self.fooled[name] = np.zeros(self.n, bool)
    cost = self.costs.setdefault(name, dict.fromkeys(COST_FIELDS, 0.0))
    return self.attacked[name], self.fooled[name], cost

  def save(self, force: bool = False):
    """Write the state atomically (when due, or now with force)."""
    if not self.path or (not force and time.monotonic() - self.last_save < self.save_every):
      return
    arrays = {"fingerprint": np.asarray(self.fingerprint)}
    for name in self.attacked:
      arrays[f"attacked:{name}"] = self.attacked[name]
      arrays[f"fooled:{name}"] = self.fooled[name]
      arrays[f"cost:{name}"] = np.asarray([self.costs[name][f] for f in COST_FIELDS])
    for group, leaves in self.carries.items():
      arrays.update({f"carry:{group}/{i}": leaf for i, leaf in enumerate(leaves)})
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    temporary = self.path + ".tmp.npz"
    np.savez(temporary, **integrity.seal_arrays(arrays))
    os.replace(temporary, self.path)
    self.last_save = time.monotonic()


def local_mesh():
  """A 1-D mesh ('data') over this process's devices, or None for one device."""
  devices = jax.local_devices()
  return jax.sharding.Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


def to_device(mesh, tree):
  """Host arrays as device arrays, their leading axis sharded over the mesh's devices."""
  if mesh is None:  # device_put, not jnp.asarray, which compiles a staging program per shape
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, P("data")))


def run(steps: Sequence[Step], x: np.ndarray, y: np.ndarray, key_data: np.ndarray, *,
        eligible: Dict[str, np.ndarray], after: Optional[Dict[str, Sequence[str]]] = None,
        batch_size: int = 256, keep_adversarial: bool = False,
        state_path: Optional[str] = None, fingerprint: Optional[dict] = None,
        save_every: float = 10.0, progress: bool = False,
        shapes: Optional[Dict[Tuple[str, int], BatchShapes]] = None) -> Result:
  """Run `steps` in order, each on the images still standing for all of its members.

  key_data: (N, ...) per-image key data (jax.random.key_data), gathered with the images' rows.
  eligible[m]: the images attack m may attack (e.g. the clean-correct ones); after[m]: attacks
  whose survivors (by then final) m attacks only, applied at m's first step. shapes: the
  BatchShapes per attack (`program`) of earlier runs to reuse (updated in place), if any.
  """
  n, after = y.shape[0], dict(after or {})
  mesh = local_mesh()
  shapes = {} if shapes is None else shapes
  state = _State(n, state_path, fingerprint, save_every)
  if keep_adversarial and any(a.any() for a in state.attacked.values()):
    raise errors.UserError(
        f"keep_adversarial=True cannot resume from {state_path}: the state keeps verdicts, not "
        "the adversarial images of the first run; pass another state_path to attack afresh")
  members = {m for s in steps for m in s.members}
  broken = {m: np.zeros(n, bool) for m in members}
  cut = {m: np.zeros(n, bool) for m in members}
  alive: Dict[str, np.ndarray] = {}
  x_adv = x.copy() if keep_adversarial else None
  # A carry (Square's best points and margins, a float per pixel) is kept in the state only
  # while a unit of its group is still to run.
  last_of_group = {s.unit.carry: i for i, s in enumerate(steps) if s.unit.carry}
  signals = preemption.StopSignals().install()
  try:
    for i, step in enumerate(steps):
      for m in step.members:
        if m not in alive:  # its first step: what the attacks before it left standing
          alive[m] = eligible[m].copy()
          for name in after.get(m, ()):
            alive[m] &= ~broken[name]
      active = np.logical_and.reduce([alive[m] for m in step.members])
      fooled = _run_unit(step.unit, active, x, y, key_data,
                         shapes_of(shapes, program(step.unit), batch_size, n), mesh, state,
                         x_adv, signals, progress)
      for m in step.members:
        broken[m] |= fooled
        cut[m] |= alive[m] & ~active
        alive[m] &= active & ~fooled
      if step.unit.carry and last_of_group[step.unit.carry] == i:
        state.carries.pop(step.unit.carry, None)
  finally:  # every finished batch is kept, also when a unit fails (an out-of-memory, a bug)
    state.save(force=True)
    signals.restore()
  return Result(broken=broken, cut=cut, fooled=dict(state.fooled),
                costs={k: dict(v) for k, v in state.costs.items()}, x_adv=x_adv)


def _run_unit(unit: Unit, active: np.ndarray, x, y, key_data, shapes: BatchShapes, mesh,
              state: _State, x_adv, signals, progress: bool) -> np.ndarray:
  """Attack the active images not yet attacked by `unit`; its fooled mask over all images."""
  attacked, fooled, cost = state.unit(unit.name)
  todo = np.flatnonzero(active & ~attacked)
  standing = int(active.sum())
  bar = tqdm.tqdm(total=standing, initial=standing - todo.size, desc=unit.name, unit="img",
                  leave=False, dynamic_ncols=True,
                  disable=None if progress else True)  # None: quiet when not a terminal
  start = time.perf_counter()
  for take, rows in shapes.batches(todo, owner=stage(unit)):
    carry = None
    if unit.reads_carry:
      carry = tuple(leaf[rows] for leaf in state.carries[unit.carry])
    out_fooled, out_x, out_carry, forward, gradient, *padding = unit.run(
        *to_device(mesh, (x[rows], y[rows], key_data[rows])),
        None if carry is None else to_device(mesh, carry))
    real = take.size
    fooled[take] = np.asarray(out_fooled)[:real]
    if x_adv is not None:
      broke = fooled[take]
      x_adv[take[broke]] = np.asarray(out_x)[:real][broke]
    if unit.carry is not None and out_carry is not None:
      leaves = [np.asarray(leaf) for leaf in jax.device_get(tuple(out_carry))]
      if unit.carry not in state.carries:
        state.carries[unit.carry] = [np.zeros((state.n,) + l.shape[1:], l.dtype) for l in leaves]
      for store, leaf in zip(state.carries[unit.carry], leaves):
        store[take] = np.asarray(leaf)[:real]
    attacked[take] = True
    forward, gradient = int(forward), int(gradient)
    cost["images"] += real
    cost["fooled"] += int(fooled[take].sum())
    beyond = int(padding[0]) if padding else 0  # rows the unit padded past the batch (its judge)
    cost["forward_rows"] += forward * rows.size + beyond
    cost["source_rows" if unit.source_gradient else "gradient_rows"] += gradient * rows.size
    cost["padding_rows"] += (forward + gradient) * (rows.size - real) + beyond
    cost["seconds"] += time.perf_counter() - start
    start = time.perf_counter()
    bar.update(real)
    bar.set_postfix(standing=standing - int(fooled[active].sum()), refresh=False)
    if signals.signum is not None:
      state.save(force=True)
      bar.close()
      raise preemption.Stopped(int(attacked.sum()), signals.signum, (
          f"evaluation stopped by {signal.Signals(signals.signum).name} during {unit.name} with "
          "every finished batch saved"))
    state.save()
  bar.close()
  if todo.size:
    seconds = max(cost["seconds"], 1e-9)
    logging.info("%s: %d images attacked, %d still standing, %d forward + %d gradient rows, "
                 "%.1f s (%.1f images/s)", unit.name, int(cost["images"]),
                 standing - int(fooled[active].sum()), cost["forward_rows"],
                 cost["gradient_rows"], seconds, cost["images"] / seconds)
  return fooled & active


def attack_unit(name: str, attack: Callable, eps, key_kind: Array, forward: int,
                gradient: int) -> Unit:
  """A Unit of attack(x, y, keys, eps) -> (x_adv, fooled), `forward` / `gradient` passes a batch.

  key_kind: any key array of the kind the cascade's key data holds (its PRNG implementation).
  """
  impl = jax.random.key_impl(key_kind)

  def run_batch(x, y, key_data, carry):
    del carry
    x_adv, fooled = attack(x, y, jax.random.wrap_key_data(key_data, impl=impl), eps)
    return fooled, x_adv, None, forward, gradient
  return Unit(name, run_batch)


def attack_in_rounds(units: Sequence[Unit], x: Array, y: Array, keys: Array,
                     active: np.ndarray) -> Array:
  """Each unit in turn on the `active` images still standing; the first adversarial per image."""
  result = run([Step(u, ("rounds",)) for u in units], np.asarray(x), np.asarray(y),
               np.asarray(jax.random.key_data(keys)), eligible={"rounds": active},
               batch_size=x.shape[0], keep_adversarial=True)
  return jnp.asarray(result.x_adv)
