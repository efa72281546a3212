"""Build cas_jax from a copy of its sources, and make virtual environments to install it into."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# All that the build reads: a wheel built from these alone cannot lean on the checkout.
SOURCES = ("pyproject.toml", "README.md", "cas_jax")


def copy_sources(dest) -> str:
  """Copy the package's sources (no caches, no build outputs) to `dest`; its path."""
  os.makedirs(dest)
  for name in SOURCES:
    source, target = os.path.join(ROOT, name), os.path.join(dest, name)
    if os.path.isdir(source):
      shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(source, target)
  return str(dest)


def clean_env() -> dict:
  """os.environ without PYTHONPATH, so that a checkout on it cannot shadow the installed copy."""
  return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(command, cwd, timeout=300) -> subprocess.CompletedProcess:
  """Run `command` with clean_env() and assert that it succeeded."""
  result = subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
  return result


def build_wheel(sources: str, out: str) -> str:
  """The wheel of `sources` (pip wheel, no dependencies, no download of a build backend)."""
  run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
       "-w", out, sources], cwd=sources)
  wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
  assert len(wheels) == 1, wheels
  return os.path.join(out, wheels[0])


def parent_site_dirs() -> list:
  """The site-packages folders of the running interpreter: a base install's, a venv's, conda's."""
  return [p for p in sys.path
          if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def make_venv(path: str) -> str:
  """A fresh venv that sees the running interpreter's packages (none re-downloaded); its python.

  `venv --system-site-packages` would show the *base* interpreter's packages, which are not the
  ones the tests run with when they run inside a venv (or conda). Instead, a .pth file in the
  new venv adds the running interpreter's site folders after its own: what pip installs into
  the venv comes first, everything else is found where the tests found it.
  """
  run([sys.executable, "-m", "venv", "--without-pip", path], cwd=os.path.dirname(path))
  python = os.path.join(path, "bin", "python")
  purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=path).stdout.strip()
  with open(os.path.join(purelib, "_running_interpreter_site.pth"), "w") as f:
    # addsitedir, not bare paths: those folders' own .pth files (editable installs) apply too.
    f.write("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parent_site_dirs())
            + "\n")
  return python
