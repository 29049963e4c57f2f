"""The TPU VM kit against a fake `gcloud` on PATH: exact commands in dry-run, and a babysit cycle."""

import os
import shutil
import subprocess

import pytest
from conftest import REPO

FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_LOG"
case "$*" in
  "config get-value project") echo fake-project ;;
  *"queued-resources describe"*)
    if grep -q "queued-resources create" "$GCLOUD_LOG"; then echo ACTIVE; else echo "${FAKE_STATE:-ACTIVE}"; fi ;;
esac
"""


@pytest.fixture
def env(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.log"
  log.write_text("")
  e = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "TPU_NAME", "ZONE", "DRY_RUN")}
  return e | {"PATH": f"{bin_dir}:{e['PATH']}", "GCLOUD_LOG": str(log), "TMPDIR": str(tmp_path), "WAIT_SECONDS": "0"}


def _sh(script, *args, env):
  out = subprocess.run(["bash", str(REPO / "tpu" / script), *args], env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_create_dry_run_prints_queued_resource_commands(env):
  out = _sh("create.sh", "--dry-run", "--name", "t1", "--zone", "us-east5-a", "--accelerator", "v5litepod-8", env=env)
  assert out.splitlines()[0] == (
    "gcloud compute tpus queued-resources create t1 --node-id=t1 --zone=us-east5-a --project=fake-project "
    "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite --spot"
  )
  assert "queued-resources describe t1" in out
  out = _sh("create.sh", "--dry-run", "--no-spot", "--project", "p", env=env)
  assert "--runtime-version=tpu-ubuntu2204-base" in out and "--spot" not in out


def test_setup_dry_run_installs_pinned_jax_tpu_on_all_workers(env):
  out = _sh("setup.sh", "--dry-run", "--project", "p", env=env)
  assert "gcloud compute tpus tpu-vm scp" in out and "--worker=all" in out
  assert "jax\\[tpu\\]==0.12.0.1" in out or "jax[tpu]==0.12.0.1" in out
  assert "pip install -q -r requirements.lock" in out.replace("\\ ", " ")


def test_run_dry_run_launches_on_every_worker(env):
  out = _sh(
    "run.sh",
    "--dry-run",
    "--project",
    "p",
    "--tfds-data-dir",
    "gs://b/tfds",
    "--",
    "--config",
    "configs/glue.py:task=sst2",
    "--workdir",
    "gs://b/runs/sst2",
    env=env,
  )
  cmd = out.replace("\\ ", " ")
  assert cmd.startswith("gcloud compute tpus tpu-vm ssh research-tpu --zone=us-central2-b --project=p --worker=all")
  assert "TFDS_DATA_DIR=gs://b/tfds" in cmd
  assert (
    "python -m research.main --config configs/glue.py:task=sst2 --workdir gs://b/runs/sst2 --config.distributed=True"
    in cmd
  )


def test_babysit_recreates_a_preempted_tpu_and_relaunches(env, tmp_path):
  env = env | {"FAKE_STATE": "SUSPENDED"}
  _sh("babysit.sh", "--once", "--name", "t2", "--", "--config", "configs/glue.py", "--workdir", "gs://b/r", env=env)
  calls = (tmp_path / "gcloud.log").read_text().splitlines()
  kinds = [next((k for k in ("delete", "create", "scp", "ssh") if f" {k} " in f" {c} "), None) for c in calls]
  kinds = [k for k in kinds if k]
  assert kinds == ["delete", "create", "scp", "ssh", "ssh"], calls
  assert "research.main --config configs/glue.py --workdir gs://b/r" in calls[-1]


def test_babysit_leaves_a_healthy_tpu_alone(env, tmp_path):
  _sh("babysit.sh", "--once", "--name", "t3", "--", "--workdir", "x", env=env | {"FAKE_STATE": "ACTIVE"})
  calls = (tmp_path / "gcloud.log").read_text()
  assert "create" not in calls and "ssh" not in calls


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck") or str(REPO / ".venv" / "bin" / "shellcheck")
  scripts = sorted(str(p) for p in (REPO / "tpu").glob("*.sh")) + [
    str(REPO / ".ci" / "run"),
    str(REPO / ".ci" / "setup"),
  ]
  out = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout
