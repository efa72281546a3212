"""A training workdir records what produced it; a resume that would train another model stops."""
import json
import os
import re
import shutil
import subprocess

import pytest

from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax import provenance
from cas_jax.training import train
from tests.test_fault_tolerance import small_config


def trained_workdir(tmp_path, config):
  """A workdir whose config.json is `config` and which holds a (fake) checkpoint."""
  os.makedirs(tmp_path / "checkpoints" / "4")
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  return str(tmp_path)


def test_flatten_and_differences_name_the_fields():
  old, new = small_config(), small_config(**{"optim.lr": 0.05, "eval.num_images": 8})
  flat = provenance.flatten(old)
  assert flat["optim.lr"] == old.optim.lr and flat["schedule.milestones"] == [2]
  assert provenance.differences(old.to_dict(), new) == {"optim.lr": (old.optim.lr, 0.05)}
  everything = provenance.differences(old.to_dict(), new, training_only=False)
  assert set(everything) == {"optim.lr", "eval.num_images"}
  assert provenance.describe({"a": (1, 2), "b.c": ("x", None)}) == 'a 1 -> 2, b.c "x" -> null'


def test_a_resume_with_another_model_config_stops_in_one_line_before_loading_data(
    tmp_path, monkeypatch):
  workdir = trained_workdir(tmp_path, small_config())
  monkeypatch.setattr(input_pipeline, "create_dataset", lambda config: pytest.fail("loaded"))
  changed = small_config(**{"optim.lr": 0.05, "model.width": 8})
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(changed, workdir)
  message = str(raised.value)
  assert "\n" not in message
  assert re.search(r"model\.width 4 -> 8, optim\.lr [0-9.e-]+ -> 0\.05\)", message), message
  assert "new --workdir" in message and "--config.allow_config_change=True" in message
  assert not os.path.exists(tmp_path / "provenance.json")  # nothing recorded, nothing trained


def test_changes_that_do_not_change_the_model_or_are_allowed_pass(tmp_path):
  workdir = trained_workdir(tmp_path, small_config())
  assert provenance.check_resume(workdir, small_config(**{
      "eval.num_images": 8, "ckpt.every_steps": 3, "data.cifar_dir": "/elsewhere"})) == {}
  longer = provenance.check_resume(workdir, small_config(**{"schedule.num_epochs": 6}))
  assert longer == {"schedule.num_epochs": (3, 6)}
  allowed = small_config(**{"optim.lr": 0.05, "allow_config_change": True})
  assert set(provenance.check_resume(workdir, allowed)) == {"optim.lr"}
  assert provenance.check_resume(str(tmp_path / "new"), allowed) == {}  # nothing trained there


def test_training_records_config_versions_commit_devices_and_each_resume(tmp_path):
  config = small_config(**{"loss.objective": "natural", "schedule.num_epochs": 1})
  train.train_and_evaluate(config, str(tmp_path))
  assert provenance.differences(provenance.read_config(str(tmp_path)), config,
                                training_only=False) == {}
  (first,) = json.load(open(tmp_path / "provenance.json"))["runs"]
  for name in ("jax", "flax", "optax", "orbax-checkpoint"):
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", first["versions"][name]), name
  # This checkout's commit and dirty flag (test_the_commit_and_dirty_flag_follow_the_checkout
  # checks what project() finds in a repository made for the purpose).
  assert first["project"] == provenance.project()
  assert re.fullmatch(r"[0-9a-f]{40}", first["project"]["commit"])
  assert first["devices"]["count"] >= 1 and first["devices"]["platform"] == "cpu"
  assert first["dtype"] == "float32" and first["start_step"] == 0
  assert "config_changes" not in first
  config.schedule.num_epochs = 2  # continue the finished run: allowed and recorded
  train.train_and_evaluate(config, str(tmp_path))
  runs = json.load(open(tmp_path / "provenance.json"))["runs"]
  assert len(runs) == 2 and runs[1]["start_step"] == 4
  assert runs[1]["config_changes"] == {"schedule.num_epochs": {"recorded": 1, "now": 2}}
  assert provenance.read_config(str(tmp_path))["schedule"]["num_epochs"] == 2
  config.optim.lr, config.schedule.num_epochs = 0.05, 3
  with pytest.raises(errors.UserError, match="optim.lr"):
    train.train_and_evaluate(config, str(tmp_path))
  config.allow_config_change = True
  train.train_and_evaluate(config, str(tmp_path))
  runs = json.load(open(tmp_path / "provenance.json"))["runs"]
  assert runs[2]["allowed_by"] == "allow_config_change"
  assert set(runs[2]["config_changes"]) == {"optim.lr", "schedule.num_epochs"}


def test_report_provenance_carries_the_training_runs(tmp_path):
  config = small_config()
  provenance.record_run(str(tmp_path), config, 0)
  record = provenance.for_report(config, str(tmp_path))
  assert record["config"]["optim"]["lr"] == config.optim.lr
  assert len(record["training_runs"]) == 1 and record["trained_config"]["seed"] == config.seed
  assert "versions" in record and "training_runs" not in provenance.for_report(config)
  line = provenance.summary_line(record)
  assert re.fullmatch(r"Provenance: cas_jax commit [0-9a-f]{10}( \(dirty\))?; jax [^;]+, flax "
                      r"[^;]+, optax [^;]+, orbax-checkpoint [^;]+; \d+ x [^;]+; dtype float32\.",
                      line), line


def _git(repo, *args):
  """The output of git in `repo` (the test's own repository)."""
  return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                        check=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
  """A throwaway repository (one commit: tracked.py, .gitignore ignoring *.log), git isolated
  from the user's and the system's git config and from any GIT_DIR of the caller."""
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
    monkeypatch.delenv(name, raising=False)
  (tmp_path / "gitconfig").write_text("")
  monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
  monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
  for role in ("AUTHOR", "COMMITTER"):
    monkeypatch.setenv(f"GIT_{role}_NAME", "test")
    monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.com")
  repo = tmp_path / "repo"
  repo.mkdir()
  (repo / "tracked.py").write_text("x = 1\n")
  (repo / ".gitignore").write_text("*.log\n")
  _git(repo, "init", "-q")
  _git(repo, "add", "tracked.py", ".gitignore")
  _git(repo, "commit", "-q", "-m", "first")
  return repo


def test_the_commit_and_dirty_flag_follow_the_checkout(git_repo, tmp_path):
  def found():
    info = provenance.project(str(git_repo))
    assert info["path"] == str(git_repo) and info["commit"] == _git(git_repo, "rev-parse", "HEAD")
    return info["dirty"]

  assert found() is False  # clean
  (git_repo / "run.log").write_text("ignored\n")
  assert found() is False  # a new file .gitignore ignores
  (git_repo / "tracked.py").write_text("x = 2\n")
  assert found() is True  # a tracked file changed
  _git(git_repo, "checkout", "--", "tracked.py")
  assert found() is False
  (git_repo / "new.py").write_text("y = 1\n")
  assert found() is True  # a new file, not ignored
  _git(git_repo, "add", "new.py")
  _git(git_repo, "commit", "-q", "-m", "second")
  assert found() is False  # committed: a new commit, clean again
  plain = tmp_path / "plain"
  plain.mkdir()
  assert provenance.project(str(plain)) == {"name": "cas_jax", "path": str(plain),
                                            "version": provenance.project()["version"]}


def test_the_code_digest_changes_with_any_source_file(tmp_path):
  package = os.path.dirname(os.path.abspath(provenance.__file__))
  copy = tmp_path / "cas_jax"
  shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
  assert provenance.code_digest(str(copy)) == provenance.code_digest()
  # (__wrapped__: past the per-process cache, which holds the code this process has loaded)
  digest = provenance.code_digest.__wrapped__
  (copy / "notes.txt").write_text("not Python")  # only the Python sources count
  assert digest(str(copy)) == provenance.code_digest()
  with open(copy / "attacks" / "apgd.py", "a") as f:
    f.write("\n# a fix\n")
  changed = digest(str(copy))
  assert changed != provenance.code_digest()
  os.rename(copy / "attacks" / "apgd.py", copy / "attacks" / "apgd2.py")  # same bytes, moved
  assert digest(str(copy)) not in (changed, provenance.code_digest())
