"""What the integrity manifest adds to a checkpoint's save and restore; prints and writes JSON.

  python -m benchmarks.checkpoint_integrity --configs=cifar10_at_cas,wrn34_10_at_cas \
      --out=benchmarks/results/cpu_checkpoint_integrity.json

For each config's full train state (parameters, batch statistics, optimizer state): the seconds
of a synchronous Orbax save and of a restore, and of writing and of verifying the manifest
(SHA-256 of every file), best of --repeats, on a fresh folder under --dir.
"""
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import orbax.checkpoint as ocp

from benchmarks import common
from cas_jax import checkpointing
from cas_jax import configs
from cas_jax import integrity
from cas_jax.training import train

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["cifar10_at_cas", "wrn34_10_at_cas"], "Packaged config names.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")
flags.DEFINE_string("dir", "", "Folder for the checkpoints (default: a temporary one).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def measure(name: str, root: str, repeats: int) -> dict:
  """Seconds of save, manifest, verification and restore of one config's train state."""
  config = configs.get_config(name)
  model = train.create_model(config, config.data.num_classes)
  size = config.data.image_size
  state = train.create_train_state(0, model, config, 100, (size, size, 3))
  workdir = os.path.join(root, name)
  step_dir = os.path.join(workdir, "checkpoints", "1")

  def save():
    shutil.rmtree(workdir, ignore_errors=True)
    manager = checkpointing.create_manager(workdir, async_save=False)
    manager.save(1, args=ocp.args.StandardSave(state))  # Orbax alone
    manager.wait_until_finished()

  save_s = _best(save, repeats)
  manifest_s = _best(lambda: integrity.write_manifest(step_dir), repeats)
  verify_s = _best(lambda: integrity.check_manifest(step_dir), repeats)
  restore_s = _best(lambda: checkpointing.restore(
      checkpointing.create_manager(workdir, async_save=False), state, 1), repeats)
  assert integrity.check_manifest(step_dir).status == "verified"
  files = [os.path.join(r, f) for r, _, names in os.walk(step_dir) for f in names]
  return {"config": name, "model": config.model.name,
          "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
          "checkpoint_bytes": sum(os.path.getsize(f) for f in files), "files": len(files),
          "save_s": save_s, "manifest_s": manifest_s, "restore_s": restore_s,
          "verify_s": verify_s, "save_overhead": manifest_s / save_s,
          "restore_overhead": verify_s / restore_s}


def main(_):
  """Measure every config of --configs and report them."""
  root = FLAGS.dir or tempfile.mkdtemp(prefix="ckpt_integrity_")
  rows = [measure(name, root, FLAGS.repeats) for name in FLAGS.configs]
  for row in rows:
    print(f"{row['config']}: {row['checkpoint_bytes'] / 2**20:.0f} MiB in {row['files']} files; "
          f"save {row['save_s']:.2f} s + manifest {row['manifest_s']:.2f} s "
          f"({100 * row['save_overhead']:.0f}%); restore {row['restore_s']:.2f} s + verify "
          f"{row['verify_s']:.2f} s ({100 * row['restore_overhead']:.0f}%)")
  common.report({"devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                 "jax": jax.__version__, "rows": rows}, FLAGS.out)
  if not FLAGS.dir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
