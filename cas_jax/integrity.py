"""Evidence that saved files are the ones written: SHA-256 manifests and self-checking files.

    integrity.write_manifest(step_dir)            # after a checkpoint has committed
    verdict = integrity.check_manifest(step_dir)  # before restoring it
    verdict.status in ("verified", "unverified", "damaged"), verdict.problem

    arrays = integrity.seal_arrays({"a": ...})    # an .npz that carries its own checksum
    integrity.open_arrays(arrays)                 # raises Damaged if it does not match

SHA-256 (hashlib, in the standard library) rather than CRC32: no new dependency, a digest no
accidental change (a flipped bit, a cut file, a file from another run) can match, and it reads
at about the disk's speed (benchmarks/checkpoint_integrity.py measures it). A damaged file is
never guessed from an error text: it is damaged when its bytes differ from the record.
"""
import hashlib
import json
import os
import time
from typing import Any, Dict, NamedTuple, Optional

from absl import logging
import numpy as np

ALGORITHM = "sha256"
MANIFEST = "cas_jax_manifest.json"  # in the checkpoint's step folder, beside Orbax's files
_CHUNK = 1 << 22


class Damaged(Exception):
  """A file or folder does not match its integrity record (cut short, changed, missing)."""


class Verdict(NamedTuple):
  """What check_manifest found: status 'verified', 'unverified' (no manifest) or 'damaged'."""
  status: str
  problem: Optional[str] = None


def file_digest(path: str) -> str:
  """The SHA-256 of a file's bytes, hex."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(folder: str) -> Dict[str, str]:
  """{path relative to folder: absolute path} of every file under folder but the manifest."""
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, folder)
      if relative != MANIFEST:
        found[relative] = path
  return found


def file_sizes(folder: str) -> Dict[str, int]:
  """{path relative to folder: size in bytes} of every file under folder but the manifest."""
  return {rel: os.path.getsize(path) for rel, path in sorted(_files(folder).items())}


def write_manifest(folder: str) -> None:
  """Record every file under `folder` (size and SHA-256) in folder/MANIFEST, atomically."""
  files = {rel: {"size": os.path.getsize(path), ALGORITHM: file_digest(path)}
           for rel, path in sorted(_files(folder).items())}
  # The temporary file sits beside the folder, not in it: a crash mid-write leaves no stray
  # file inside the checkpoint (Orbax ignores names that are not step numbers).
  parent, name = os.path.split(os.path.normpath(folder))
  temporary = os.path.join(parent, f".{name}.{MANIFEST}.tmp")
  with open(temporary, "w") as f:
    json.dump({"algorithm": ALGORITHM, "files": files}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, os.path.join(folder, MANIFEST))


def check_manifest(folder: str) -> Verdict:
  """Compare every file under `folder` with its manifest: sizes first, then SHA-256."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    return Verdict("unverified")
  try:
    with open(path) as f:
      recorded = json.load(f)["files"]
  except (ValueError, KeyError, TypeError) as error:
    return Verdict("damaged", f"its manifest {MANIFEST} is unreadable ({error})")
  present = _files(folder)
  for rel in sorted(recorded):
    if rel not in present:
      return Verdict("damaged", f"{rel} is missing")
    size = os.path.getsize(present[rel])
    if size != recorded[rel]["size"]:
      return Verdict("damaged", f"{rel} has {size} bytes, {recorded[rel]['size']} were saved")
  extra = sorted(set(present) - set(recorded))
  if extra:
    return Verdict("damaged", f"{extra[0]} was not saved with it")
  for rel in sorted(recorded):
    if file_digest(present[rel]) != recorded[rel][ALGORITHM]:
      return Verdict("damaged", f"{rel} has changed since it was saved (SHA-256 differs)")
  return Verdict("verified")


def _arrays_digest(arrays: Dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for key in sorted(arrays):
    value = np.ascontiguousarray(arrays[key])
    digest.update(json.dumps([key, value.dtype.str, list(value.shape)]).encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def seal_arrays(arrays: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """`arrays` plus a 'sha256' entry over all of them, to save with np.savez."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  return {**arrays, ALGORITHM: np.asarray(_arrays_digest(arrays))}


def load_sealed_arrays(path: str) -> Dict[str, np.ndarray]:
  """The arrays of an .npz written from seal_arrays; Damaged if unreadable or changed."""
  try:
    with np.load(path, allow_pickle=False) as saved:
      arrays = {key: saved[key] for key in saved.files}
  except Exception as error:  # pylint: disable=broad-except  (zip, CRC, EOF, format errors)
    raise Damaged(f"unreadable ({type(error).__name__}: {str(error)[:120]})") from error
  recorded = arrays.pop(ALGORITHM, None)
  if recorded is None:
    raise Damaged("it carries no checksum")
  if str(recorded) != _arrays_digest(arrays):
    raise Damaged("its contents have changed since it was saved (SHA-256 differs)")
  return arrays


def seal_json(data: Any) -> Dict[str, Any]:
  """{'data': data, 'sha256': digest of its canonical JSON}, to save with json.dump."""
  canonical = json.dumps(data, sort_keys=True)
  return {"data": data, ALGORITHM: hashlib.sha256(canonical.encode()).hexdigest()}


def load_sealed_json(path: str) -> Any:
  """The data of a JSON file written from seal_json; Damaged if unreadable or changed."""
  try:
    with open(path) as f:
      sealed = json.load(f)
    data, recorded = sealed["data"], sealed[ALGORITHM]
  except (ValueError, KeyError, TypeError) as error:
    raise Damaged(f"unreadable ({type(error).__name__}: {str(error)[:120]})") from error
  if hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest() != recorded:
    raise Damaged("its contents have changed since it was saved (SHA-256 differs)")
  return data


def keep_aside(path: str, tag: str) -> str:
  """Rename a file to <path>.<tag>-<time> (kept, never deleted); the new path."""
  target = f"{path}.{tag}-{int(time.time())}"
  os.replace(path, target)
  return target


def set_aside(path: str, problem: str, what: str) -> str:
  """Keep a damaged file aside as <path>.damaged-<time> and say so in one line."""
  target = keep_aside(path, "damaged")
  logging.warning("%s %s is damaged (%s); kept as %s, starting afresh.", what, path, problem,
                  target)
  return target
