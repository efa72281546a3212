"""Compilations: counted per program, and kept across processes in JAX's persistent cache.

    with compilation.counted() as stats:       # JAX's monitoring events, not wall time
      evaluate.robustness_report(...)
    stats.counts   # {"apgd_round": 2, ...}: XLA compilations (persistent-cache hits apart)
    stats.seconds  # seconds spent compiling (or fetching from the cache)

    compilation.use_persistent_cache(config.compilation_cache)   # the CLI commands do this

The persistent cache (jax's `jax_compilation_cache_dir`) keeps compiled programs on disk, keyed
on the program, the jax version and the backend: a second evaluation of the same architecture,
a resumed report, the next seed of a table or a rerun of the tests fetch them instead of
compiling again. Its folder is `config.compilation_cache` (default ~/.cache/cas_jax/jax), or
the environment variable CAS_JAX_COMPILATION_CACHE; "off" (either) switches it off.
"""
import collections
import contextlib
import dataclasses
import os
from typing import Dict, Optional, Tuple

from absl import logging
import jax

ENV = "CAS_JAX_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "cas_jax", "jax")
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@dataclasses.dataclass
class Stats:
  """What counted() saw: per program, backend compilations and their seconds; cache hits."""
  counts: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  seconds: Dict[str, float] = dataclasses.field(default_factory=collections.Counter)
  cache_hits: int = 0
  trace_seconds: float = 0.0
  lower_seconds: float = 0.0

  @property
  def total(self) -> int:
    """Compilations of every program, persistent-cache hits included."""
    return sum(self.counts.values())

  @property
  def total_seconds(self) -> float:
    return float(sum(self.seconds.values()))

  def as_dict(self) -> dict:
    """JSON-ready: totals and the per-program counts and seconds, most compiled first."""
    order = sorted(self.counts, key=lambda n: (-self.counts[n], n))
    return {"compilations": self.total, "compile_seconds": round(self.total_seconds, 3),
            "persistent_cache_hits": self.cache_hits,
            "trace_seconds": round(self.trace_seconds, 3),
            "lower_seconds": round(self.lower_seconds, 3),
            "programs": {n: {"compilations": self.counts[n],
                             "seconds": round(self.seconds[n], 3)} for n in order}}


@contextlib.contextmanager
def counted():
  """Count the XLA compilations (and persistent-cache fetches) made inside the block."""
  stats = Stats()

  def on_duration(event: str, duration: float, **kwargs):
    if event == _BACKEND_COMPILE:
      name = str(kwargs.get("fun_name", "?"))
      stats.counts[name] += 1
      stats.seconds[name] += duration
    elif event == _TRACE:
      stats.trace_seconds += duration
    elif event == _LOWER:
      stats.lower_seconds += duration

  def on_event(event: str, **kwargs):
    del kwargs
    if event == _CACHE_HIT:
      stats.cache_hits += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield stats
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)


def cache_dir(configured: Optional[str] = None) -> Optional[str]:
  """The persistent cache folder: the environment variable, else `configured`, else the
  default; None when either says "off" (or is empty)."""
  configured = DEFAULT_DIR if configured is None else configured
  chosen = os.environ.get(ENV, configured)
  if any(value.strip().lower() in ("off", "") for value in (configured, chosen)):
    return None
  return os.path.abspath(os.path.expanduser(chosen))


def use_persistent_cache(configured: Optional[str] = None) -> Optional[str]:
  """Turn JAX's persistent compilation cache on in cache_dir(configured); the folder or None.

  Every program is cached, however quickly it compiled (an attack's many small programs add
  up). A folder that cannot be created leaves the cache off with one warning line.
  """
  folder = cache_dir(configured)
  if folder is None:
    return None
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as error:
    logging.warning("Compilation cache off: cannot create %s (%s); set %s or "
                    "--config.compilation_cache to another folder, or to off.", folder, error, ENV)
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return folder


def use_unrolled_threefry_on_cpu() -> bool:
  """Have XLA:CPU compile JAX's threefry hash as straight-line code; True if this jax allows it.

  On the CPU jax lowers each threefry call (every fold_in, split and random draw) as a loop of
  5 rounds, which XLA:CPU compiles into a while loop of small kernels: an attack's random start
  took 0.35-0.54 s to compile, against 0.14 s for jax's unrolled lowering (the one it uses on
  the other platforms: the same rounds, so the same bits), and a full-width APGD program 2.2 s
  against 1.9 s (docs/evaluation.md). The switch is jax-private, so where this jax lacks it
  nothing changes. Call it before the programs are traced; the CLI commands do.
  """
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32 as threefry  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  unrolled = getattr(threefry, "_threefry2x32_lowering_rule", None)
  primitive = getattr(threefry, "threefry2x32_p", None)
  if unrolled is None or primitive is None:
    return False
  mlir.register_lowering(primitive, unrolled, platform="cpu")
  return True


def memory_mappings() -> Tuple[Optional[int], Optional[int]]:
  """(this process's memory mappings, the kernel's vm.max_map_count); None where unknown."""
  def read(path: str, count_lines: bool) -> Optional[int]:
    try:
      with open(path, "rb") as f:
        return sum(1 for _ in f) if count_lines else int(f.read())
    except (OSError, ValueError):
      return None
  return read("/proc/self/maps", True), read("/proc/sys/vm/max_map_count", False)


def free_compiled_programs_if_crowded(fraction: float = 0.5) -> bool:
  """jax.clear_caches() once this process holds over `fraction` of vm.max_map_count memory
  mappings, or whenever it cannot tell; True if it cleared.

  Each XLA:CPU executable keeps mappings of its own and a process that passes the limit
  crashes in its next compilation (docs/implementation.md); below it, the programs stay
  compiled for the next model of the same architecture.
  """
  held, limit = memory_mappings()
  if held is not None and limit is not None and held <= fraction * limit:
    return False
  jax.clear_caches()
  return True
