"""End to end through `train_and_evaluate`: outputs, exact resume after SIGKILL, loud failures."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO, TWO_BUCKETS, tiny_config

from configs import glue as glue_cfg
from research import checkpoint, run_checks, train
from research.data import tasks
from research.models.convert import WeightsError


def _final_params(workdir, step=None):
  step, state, _ = checkpoint.restore_on_host(workdir / "checkpoints", step)
  return step, jax.tree.map(np.asarray, state["params"])


def test_tiny_end_to_end(small_glue, tmp_path):
  wd = tmp_path / "run"
  result = train.train_and_evaluate(tiny_config(small_glue, log_every_steps=3, **TWO_BUCKETS), wd)
  assert result["step"] == 8 and result["final"]["examples"] == 41.0
  assert 0.0 <= result["final"]["accuracy"] <= 1.0
  records = [json.loads(r) for r in (wd / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [3, 4, 6, 8]  # every 3 steps, and at each eval
  assert [r["step"] for r in records if r["split"] == "dev"] == [4, 8]
  assert {"loss", "accuracy", "grad_norm", "param_norm", "update_norm", "lr", "examples_per_sec"} <= set(records[-2])
  # Every logged step measured the parameter and update norms (the others leave them out), the
  # eval and last steps included, and the rate is timed from the end of the first step (compile excluded).
  assert all(np.isfinite(r["param_norm"]) and r["update_norm"] > 0 for r in train_records)
  assert all(r["examples_per_sec"] > 0 for r in train_records)
  assert json.loads((wd / "config.json").read_text())["task"] == "sst2"
  assert not list(wd.glob(".*.tmp"))  # config.json, model_config.json, summary.json: written by rename
  assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
  # The latest step and the best-by-accuracy step are both kept, nothing else.
  kept = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  dev = {r["step"]: r["accuracy"] for r in records if r["split"] == "dev"}
  best = max(dev, key=lambda s: (dev[s], s))  # ties go to the later step, as in orbax
  assert kept == sorted({8, best}) and result["best_step"] == best


def test_tfds_source_trains_and_evaluates(small_glue, tmp_path):
  """config.data.source=tfds reads a prepared glue/sst2 (array_record) and runs end to end."""
  from fake_tfds import prepare_sst2_like

  prepare_sst2_like(str(tmp_path / "tfds"), str(small_glue))
  cfg = tiny_config(small_glue, **{"data.source": "tfds", "data.tfds_data_dir": str(tmp_path / "tfds")})
  result = train.train_and_evaluate(cfg, tmp_path / "run")
  assert result["step"] == 8 and result["final"]["examples"] == 41.0


def test_rerun_of_a_finished_run_is_a_no_op(small_glue, tmp_path):
  c = tiny_config(small_glue, num_train_steps=4)
  train.train_and_evaluate(c, tmp_path)
  _, before = _final_params(tmp_path)
  result = train.train_and_evaluate(c, tmp_path)
  assert result["step"] == 4
  _, after = _final_params(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_config_resume_starts_from_another_runs_checkpoint(small_glue, tmp_path, caplog):
  """`config.resume` continues another run's latest checkpoint in a new workdir (state, data
  position, dropout rng: the same parameters as one uninterrupted run, with a schedule that does
  not depend on the run's length), without its early-stopping count or training time; the new
  workdir's own checkpoint then comes first."""
  flat = {"optimizer.schedule": "constant", "optimizer.warmup_ratio": 0.0}
  train.train_and_evaluate(tiny_config(small_glue, num_train_steps=8, **flat), tmp_path / "straight")
  train.train_and_evaluate(tiny_config(small_glue, num_train_steps=4, **flat), tmp_path / "first")
  second = tiny_config(small_glue, num_train_steps=8, resume=str(tmp_path / "first" / "checkpoints"), **flat)
  with caplog.at_level(logging.INFO, logger="research.train"):
    result = train.train_and_evaluate(second, tmp_path / "second")
  assert any("started from" in r.getMessage() and "step 4" in r.getMessage() for r in caplog.records)
  assert result["step"] == 8 and result["train_seconds"] < 60
  jax.tree.map(
    np.testing.assert_array_equal, _final_params(tmp_path / "straight")[1], _final_params(tmp_path / "second")[1]
  )
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="research.train"):
    assert train.train_and_evaluate(second, tmp_path / "second")["step"] == 8  # its own checkpoint, not first's
  assert any("resumed from" in r.getMessage() and "second" in r.getMessage() for r in caplog.records)
  with pytest.raises(FileNotFoundError, match=r"config.resume=.*empty.* holds no checkpoint"):
    (tmp_path / "empty").mkdir()
    train.train_and_evaluate(tiny_config(small_glue, resume=str(tmp_path / "empty"), **flat), tmp_path / "third")


def test_a_different_model_or_optimizer_in_a_used_workdir_fails_and_changes_nothing(small_glue, tmp_path):
  """Rerunning a workdir with another architecture names the changed fields before anything
  is written; another optimizer (a differently shaped state) gets a clear checkpoint error."""
  c = tiny_config(small_glue, num_train_steps=4)
  train.train_and_evaluate(c, tmp_path)
  files = {f: (tmp_path / f).read_bytes() for f in ("config.json", "model_config.json", "summary.json")}
  ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(ValueError, match=r"holds checkpoints of a different model \(num_hidden_layers: 2 -> 3\)"):
    train.train_and_evaluate(tiny_config(small_glue, num_train_steps=8, **{"model.num_hidden_layers": 3}), tmp_path)
  with pytest.raises(checkpoint.MismatchError, match=r"does not fit this run's train state \(this run has opt_state/"):
    train.train_and_evaluate(tiny_config(small_glue, num_train_steps=8, **{"optimizer.name": "sgd"}), tmp_path)
  assert {f: (tmp_path / f).read_bytes() for f in files} == files
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ckpts
  # remat changes no parameter: the same workdir resumes with it on
  assert (
    train.train_and_evaluate(tiny_config(small_glue, num_train_steps=6, **{"model.remat": True}), tmp_path)["step"] == 6
  )


_DAMAGED_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
    from pathlib import Path
    from conftest import tiny_config
    from research import checkpoint, run_checks, train
    workdir, glue = Path(sys.argv[1]), Path(sys.argv[2])
    errors = []
    for attempt in (
      lambda: train.train_and_evaluate(tiny_config(glue, num_train_steps=12, keep_every_steps=4), workdir),
      lambda: checkpoint.restore_on_host(workdir / "checkpoints", 8),
    ):
      try:
        attempt()
        errors.append(None)
      except Exception as e:
        errors.append([type(e).__name__, str(e)])
    print(json.dumps(errors))
""")


def test_a_damaged_checkpoint_is_named_as_damaged_and_nothing_changes(small_glue, tmp_path):
  """A checkpoint file cut short (a full disk, a copy interrupted) is reported as unreadable,
  with tensorstore's reason and the other saved steps, not as a different model; the workdir
  is left as it was, for training and for prediction. (The failing restores run in a child:
  Orbax abandons its other concurrent reads when one fails, and Python reports those as
  unraisable exceptions in whatever test runs next.)"""
  train.train_and_evaluate(tiny_config(small_glue, num_train_steps=8, keep_every_steps=4), tmp_path)
  ckpts = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8]
  biggest = max((ckpts / "8" / "state").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  files = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
  script = _DAMAGED_CHILD.format(tests=str(REPO / "tests"), repo=str(REPO))
  out = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path), str(small_glue)], capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  (train_kind, train_msg), (host_kind, host_msg) = json.loads(out.stdout.strip().splitlines()[-1])
  damaged = rf"^{ckpts / '8'}: the checkpoint cannot be read \(ValueError: OUT_OF_RANGE: Error reading .* in OCDBT"
  assert train_kind == host_kind == "UnreadableCheckpointError"
  assert re.match(damaged + r".*Other saved steps: \[4\]; to use the latest of them, move", train_msg), train_msg
  assert re.match(damaged, host_msg), host_msg
  assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == files


def test_a_save_cut_short_is_ignored_on_resume(small_glue, tmp_path, caplog):
  """A process killed while Orbax was writing leaves `N.orbax-checkpoint-tmp` behind; the rerun
  resumes from the last complete step, and the leftover goes when step N is saved again."""
  train.train_and_evaluate(tiny_config(small_glue, num_train_steps=8), tmp_path)
  ckpts = tmp_path / "checkpoints"
  shutil.copytree(ckpts / "8", ckpts / "10.orbax-checkpoint-tmp")
  shutil.rmtree(ckpts / "10.orbax-checkpoint-tmp" / "data")  # cut short
  with caplog.at_level(logging.INFO, logger="research.train"):
    assert train.train_and_evaluate(tiny_config(small_glue, num_train_steps=12), tmp_path)["step"] == 12
  assert "at step 8" in next(r.getMessage() for r in caplog.records if "resumed from" in r.getMessage())
  assert sorted(p.name for p in ckpts.iterdir()) == ["12"]


_CHILD = textwrap.dedent("""
    import logging, os, signal, sys
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from pathlib import Path
    from conftest import TWO_BUCKETS, tiny_config
    from research import train, writers

    kill_at, sig = int(sys.argv[2]), getattr(signal, sys.argv[4])
    original = writers.MetricWriter.write
    def write(self, step, split, metrics):
      original(self, step, split, metrics)
      if split == "train" and step == kill_at:
        os.kill(os.getpid(), sig)  # SIGKILL: a crash; SIGTERM: a preemption notice; SIGINT: Ctrl-C
    writers.MetricWriter.write = write
    config = tiny_config(Path(sys.argv[3]), num_train_steps=12, eval_every_steps=6, checkpoint_every_steps=3,
                         log_every_steps=1, **TWO_BUCKETS)
    train.train_and_evaluate(config, sys.argv[1])
""")


def _child(workdir, glue, kill_at=0, sig="SIGKILL"):
  script = _CHILD.format(tests=str(REPO / "tests"), repo=str(REPO))
  env = os.environ | {"HF_HUB_OFFLINE": "1"}
  return subprocess.run(
    [sys.executable, "-c", script, str(workdir), str(kill_at), str(glue), sig],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.fixture(scope="module")
def straight_run(module_glue, tmp_path_factory):
  """The uninterrupted 12-step run that killed and preempted runs must reproduce."""
  wd = tmp_path_factory.mktemp("straight")
  out = _child(wd, module_glue)
  assert out.returncode == 0, out.stderr[-3000:]
  return _final_params(wd)


def test_sigkill_then_rerun_gives_identical_parameters(module_glue, straight_run, tmp_path):
  small_glue = module_glue
  killed = _child(tmp_path / "killed", small_glue, kill_at=8)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert _final_params(tmp_path / "killed")[0] < 12  # it really died mid-run
  resumed = _child(tmp_path / "killed", small_glue)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  s1, p1 = straight_run
  s2, p2 = _final_params(tmp_path / "killed")
  assert s1 == s2 == 12
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  # metrics.jsonl holds each step once, as if the run had never died.
  steps = [
    json.loads(r)["step"]
    for r in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    if json.loads(r)["split"] == "train"
  ]
  assert steps == list(range(1, 13))


@pytest.mark.parametrize("sig, said", [("SIGTERM", "preempted"), ("SIGINT", "interrupted")])
def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(module_glue, straight_run, tmp_path, sig, said):
  """A preemption notice, or a first Ctrl-C, saves the step it arrived in and exits cleanly."""
  small_glue = module_glue
  stopped = _child(tmp_path / "pre", small_glue, kill_at=7, sig=sig)
  assert stopped.returncode == 0, stopped.stderr[-3000:]  # a clean exit, not a crash
  assert f"{said}: saved step 7" in stopped.stderr
  assert _final_params(tmp_path / "pre")[0] == 7
  saved = json.loads((tmp_path / "pre" / "checkpoints" / "7" / "data" / "metadata").read_text())
  resumed = _child(tmp_path / "pre", small_glue)
  assert resumed.returncode == 0 and "resumed from" in resumed.stderr
  # The run's train time counts the stopped process's too (results tables read it).
  summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
  assert 0 < saved["train_seconds"] < summary["train_seconds"]
  s1, p1 = straight_run
  s2, p2 = _final_params(tmp_path / "pre")
  assert s1 == s2 == 12
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_nan_stops_loudly_and_keeps_the_last_good_checkpoint(small_glue, tmp_path):
  # lr=1e30 overflows the parameters within a few steps.
  c = tiny_config(
    small_glue,
    **{
      "optimizer.lr": 1e30,
      "optimizer.warmup_ratio": 0.0,
      "optimizer.clip_norm": 0.0,
      "checkpoint_every_steps": 1,
      "num_train_steps": 50,
      "eval_every_steps": 0,
    },
  )
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step (\d+)") as e:
    train.train_and_evaluate(c, tmp_path)
  bad_step = int(e.value.args[0].split("at step ")[1].split()[0])
  step, params = _final_params(tmp_path)
  assert step < bad_step
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_config_typo_names_the_nearest_key():
  c = glue_cfg.get_config("task=sst2")
  with pytest.raises(AttributeError, match=r'Did you mean "lr" instead of "lrr"'):
    c.optimizer.lrr = 1e-3
  with pytest.raises(ValueError, match=r"unknown config argument 'taks'.*did you mean 'task'"):
    glue_cfg.get_config("taks=sst2")
  with pytest.raises(ValueError, match=r"config.task='sst3': unknown task \(GLUE tasks: cola, .*did you mean 'sst2'"):
    glue_cfg.get_config("task=sst3")  # at flag parsing, not when the run starts
  with pytest.raises(ValueError, match=r"config.task='qnlii': unknown task .*did you mean 'qnli'"):
    tasks.get_task("qnlii")  # what train_and_evaluate meets for --config.task=qnlii
  with pytest.raises(ValueError, match=r"config argument 'smoke=maybe': smoke is a switch"):
    glue_cfg.get_config("task=sst2,smoke=maybe")  # was read as smoke=False
  assert (
    glue_cfg.get_config("task=sst2,smoke=false").num_train_steps == glue_cfg.get_config("task=sst2").num_train_steps
  )


def test_command_line_override_and_typo(tmp_path):
  """The real entry point: a typo'd --config field fails before any work, in one line naming the
  flag and the nearest key."""
  cmd = [
    sys.executable,
    "-m",
    "research.main",
    "--config",
    "configs/glue.py:task=sst2,model=tiny",
    "--config.optimizer.lrr=3e-5",
    f"--workdir={tmp_path}",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert (
    "FATAL Flags parsing error: --config.optimizer.lrr: the config has no key 'lrr'. "
    'Did you mean "lr" instead of "lrr"?' in out.stderr
  )
  assert "Traceback" not in out.stderr


def test_wrong_architecture_weights_folder(small_glue, tmp_path, minilm_dir):
  folder = tmp_path / "gpt"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  c = tiny_config(small_glue, **{"model.init_from": str(folder), "model.tokenizer": str(minilm_dir)})
  with pytest.raises(WeightsError, match=r"gpt/config.json: model_type is 'gpt2'"):
    train.train_and_evaluate(c, tmp_path / "run")


def test_batch_size_must_split_over_devices(small_glue, tmp_path):
  with pytest.raises(ValueError, match=r"batch_size=12 must be divisible by devices \(8\)"):
    train.train_and_evaluate(tiny_config(small_glue, batch_size=12), tmp_path)
  with pytest.raises(ValueError, match=r"config.keep_every_steps=-5: must be >= 0"):
    train.train_and_evaluate(tiny_config(small_glue, keep_every_steps=-5), tmp_path)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"batch_size": 0}, r"config.batch_size=0: must be > 0"),
    ({"log_every_steps": 0}, r"config.log_every_steps=0: must be > 0"),
    ({"num_train_steps": -5}, r"config.num_train_steps=-5: must be >= 0"),
    ({"num_train_steps": 0, "num_epochs": 0.0}, r"config.num_train_steps=0 and config.num_epochs=0.0"),
    ({"optimizer.lr": -1.0}, r"config.optimizer.lr=-1.0: must be >= 0"),
    ({"optimizer.warmup_ratio": 1.5}, r"warmup_ratio=1.5: expected warmup_steps >= 0 and 0 <= warmup_ratio < 1"),
    ({"optimizer.end_lr_ratio": -0.1}, r"config.optimizer.end_lr_ratio=-0.1"),
    ({"optimizer.clip_norm": -1.0}, r"config.optimizer.clip_norm=-1.0: must be >= 0"),
    ({"optimizer.grad_accum": 0}, r"config.optimizer.grad_accum=0: must be >= 1"),
    ({"finetune.strategy": "lora", "finetune.lora_rank": -2}, r"config.finetune.lora_rank=-2: must be > 0"),
    ({"data.max_length": 4096}, r"config.data.max_length=4096 is longer than the model's max_position_embeddings"),
    (
      {"best_metric": "f1"},
      r"config.best_metric='f1': the eval reports accuracy, loss",
    ),  # was a KeyError at the first eval
    ({"loss": "mse"}, r"config.loss='mse' is a regression loss; sst2 is a classification task"),
    ({"data.max_length": 0}, r"config.data.max_length=0, .*expected max_length >= 3"),  # was an IndexError
    ({"data.pack_rows": -1}, r"pack_rows=-1: expected"),
  ],
)
def test_bad_run_fields_are_refused_by_name(small_glue, tmp_path, overrides, message):
  """Each of these used to run, or fail deep inside: a zero batch or grad_accum in the data or
  step code, a negative lr, step count or clip norm trained backwards or not at all and reported
  success, a negative LoRA rank failed in Flax's init, a max_length past the position table at
  the first batch that long."""
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(small_glue, **overrides), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_bad_weights_and_tokenizer_paths_are_named(small_glue, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(WeightsError, match=r"config.model.init_from: no folder at '/no/such/model'"):
    train.train_and_evaluate(tiny_config(small_glue, **{"model.init_from": "/no/such/model"}), tmp_path / "a")
  with pytest.raises(
    ValueError, match=r"config.model.tokenizer=.*empty': no tokenizer in .*tokenizer.json or vocab.txt"
  ):
    train.train_and_evaluate(tiny_config(small_glue, **{"model.tokenizer": str(empty)}), tmp_path / "b")


def test_a_warmup_longer_than_the_run_is_warned_about(caplog):
  import logging

  from research import optim

  c = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=50, warmup_ratio=0.0, end_lr_ratio=0.0, schedule="linear"))
  with caplog.at_level(logging.WARNING):
    schedule = optim.make_schedule(c, total_steps=20)
  assert "warmup_steps=50 is not shorter than the run's 20 steps" in caplog.text
  assert float(schedule(19)) < 1e-3


def test_pmap_run_matches_jit_run_and_checkpoints_interchange(small_glue, tmp_path):
  """The same config under jit and pmap: same losses, same dev metrics, same parameters."""
  no_dropout = {"model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0}
  r_jit = train.train_and_evaluate(tiny_config(small_glue, **no_dropout), tmp_path / "jit")
  r_pmap = train.train_and_evaluate(tiny_config(small_glue, parallel="pmap", **no_dropout), tmp_path / "pmap")
  assert r_jit["final"]["accuracy"] == r_pmap["final"]["accuracy"]
  np.testing.assert_allclose(r_jit["final"]["loss"], r_pmap["final"]["loss"], rtol=1e-5)
  _, p_jit = _final_params(tmp_path / "jit")
  _, p_pmap = _final_params(tmp_path / "pmap")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_jit, p_pmap)
  # A pmap checkpoint resumes under jit (checkpoints hold one layout).
  more = tiny_config(small_glue, parallel="jit", num_train_steps=10, **no_dropout)
  assert train.train_and_evaluate(more, tmp_path / "pmap")["step"] == 10


def test_fsdp_run_matches_jit_run_and_checkpoints_interchange(small_glue, tmp_path, monkeypatch):
  """fsdp=4 on 8 devices (2 x 4 mesh) against plain data parallel on 8: same metrics and
  parameters; its sharded checkpoint resumes under plain jit, and a jit one under fsdp."""
  from research import parallel

  monkeypatch.setattr(parallel, "FSDP_MIN_SIZE", 256)
  r_jit = train.train_and_evaluate(tiny_config(small_glue), tmp_path / "jit")
  r_fsdp = train.train_and_evaluate(tiny_config(small_glue, fsdp=4), tmp_path / "fsdp")
  assert r_jit["final"]["accuracy"] == r_fsdp["final"]["accuracy"]
  np.testing.assert_allclose(r_jit["final"]["loss"], r_fsdp["final"]["loss"], rtol=1e-5)
  _, p_jit = _final_params(tmp_path / "jit")
  _, p_fsdp = _final_params(tmp_path / "fsdp")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_jit, p_fsdp)
  assert train.train_and_evaluate(tiny_config(small_glue, num_train_steps=10), tmp_path / "fsdp")["step"] == 10
  assert train.train_and_evaluate(tiny_config(small_glue, num_train_steps=10, fsdp=8), tmp_path / "jit")["step"] == 10


def test_predict_split_text_and_export(small_glue, tmp_path):
  from research import predict
  from research.models import convert

  wd = tmp_path / "run"
  result = train.train_and_evaluate(tiny_config(small_glue), wd)
  p = predict.Predictor(wd, step="latest")
  out = predict.predict_split(p, "dev", tmp_path / "pred")
  assert out["examples"] == 41 and out["accuracy"] == result["final"]["accuracy"]
  rows = (tmp_path / "pred" / "sst2_dev_predictions.tsv").read_text().splitlines()
  assert rows[0] == "index\tprediction\tlabel" and len(rows) == 42
  side = json.loads((tmp_path / "pred" / "sst2_dev_predictions.json").read_text())
  assert side["runs"] == [{"workdir": str(wd), "step": 8}] and side["accuracy"] == out["accuracy"]
  got = predict.predict_texts(p, ["a gorgeous , witty film", "dull and lifeless"])
  assert [r["prediction"] in ("0", "1") for r in got] == [True, True]
  assert abs(sum(got[0]["probabilities"].values()) - 1) < 1e-3
  with pytest.raises(ValueError, match="input line 1: task sst2 needs 1 non-empty"):
    predict.predict_texts(p, ["a\tb"])
  # Export, then load the folder back through the strict converter: same logits.
  folder = convert.save_hf_folder(tmp_path / "hf", p.params, p.bert_cfg, num_labels=2, tokenizer=p.tokenizer)
  cfg, enc, heads, _ = convert.load_hf_folder(str(folder))
  params = convert.merge_pretrained(p.params, enc, heads, 2)
  jax.tree.map(np.testing.assert_array_equal, params, p.params)
  assert (folder / "tokenizer.json").exists() and json.loads((folder / "config.json").read_text())["num_labels"] == 2


def test_ema_weights_are_what_is_evaluated_kept_and_predicted(small_glue, tmp_path):
  """optimizer.ema > 0: dev metrics, the best checkpoint and Predictor all use the average.
  keep_every_steps > 0 also saves and keeps every multiple of it, whatever the save interval."""
  from research import optim, predict

  wd = tmp_path / "run"
  c = tiny_config(small_glue, **{"optimizer.ema": 0.9, "optimizer.lr": 1e-2, "keep_every_steps": 3})
  result = train.train_and_evaluate(c, wd)
  kept = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({3, 6, 8, result["best_step"]})  # saved every 2 steps; 3 is saved for keeping
  # Those checkpoints average into one model (a soup along the run); the .json names them.
  soup = predict.predict_split(predict.load_runs(f"{wd}@3,{wd}@6"), "dev", tmp_path / "soup", "soup")
  side = json.loads((tmp_path / "soup" / "sst2_dev_predictions.json").read_text())
  assert [r["step"] for r in side["runs"]] == [3, 6] and side["combine"] == "soup"
  assert side["accuracy"] == soup["accuracy"]
  # By default each combination gets its own folder (named by its runs and steps).
  runs36, runs38 = predict.load_runs(f"{wd}@3,{wd}@6"), predict.load_runs(f"{wd}@3,{wd}@8")
  assert predict.combined_out_dir(runs36, "soup") == predict.combined_out_dir(
    predict.load_runs(f"{wd}@3,{wd}@6"), "soup"
  )
  assert (
    len(
      {
        predict.combined_out_dir(runs36, "soup"),
        predict.combined_out_dir(runs38, "soup"),
        predict.combined_out_dir(runs36, "ensemble"),
      }
    )
    == 3
  )
  assert predict.combined_out_dir(runs36, "soup").parent == wd
  _, state, _ = checkpoint.restore_on_host(wd / "checkpoints", 8)
  p = predict.Predictor(wd, step="latest")
  assert p.step == 8
  avg = optim.ema_params(state["params"], state["opt_state"])
  jax.tree.map(np.testing.assert_array_equal, p.params, avg)
  assert not np.allclose(
    p.params["classifier"]["kernel"], state["params"]["classifier"]["kernel"]
  )  # it is not the raw weights
  out = predict.predict_split(p, "dev", tmp_path / "pred")
  assert out["accuracy"] == result["final"]["accuracy"]


def test_bag_of_embeddings_baseline_trains_and_predicts(small_glue, tmp_path):
  from research import predict

  c = tiny_config(small_glue)
  c.unlock()
  c.model = glue_cfg.get_config("model=bow").model
  c.optimizer.lr = 1e-2
  c.lock()
  result = train.train_and_evaluate(c, tmp_path)
  assert result["step"] == 8 and 0 <= result["final"]["accuracy"] <= 1
  assert json.loads((tmp_path / "model_config.json").read_text())["arch"] == "bow"
  p = predict.Predictor(tmp_path, step="latest")
  assert predict.predict_split(p, "dev", tmp_path / "pred")["accuracy"] == result["final"]["accuracy"]


def test_early_stopping_on_the_main_metric(small_glue, tmp_path):
  # lr = 0: the dev metric never improves after the first eval.
  c = tiny_config(
    small_glue, **{"optimizer.lr": 0.0, "num_train_steps": 20, "eval_every_steps": 2, "early_stopping_patience": 2}
  )
  result = train.train_and_evaluate(c, tmp_path)
  assert result["stopped_early"] and result["step"] == 6
  assert result["best_step"] == 6  # all evals tie; Orbax ranks the later of equal checkpoints higher
  again = train.train_and_evaluate(c, tmp_path)  # rerunning a stopped run does not train on
  assert again["stopped_early"] and again["step"] == 6


def test_rbg_dropout_bits_train_deterministically(small_glue, tmp_path):
  c = tiny_config(small_glue, rng_impl="rbg", num_train_steps=4)
  a = train.train_and_evaluate(c, tmp_path / "a")
  b = train.train_and_evaluate(c, tmp_path / "b")
  assert a["final"] == b["final"]
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "a")[1], _final_params(tmp_path / "b")[1])
  with pytest.raises(ValueError, match="parallel='jit' only"):
    train.train_and_evaluate(tiny_config(small_glue, rng_impl="rbg", parallel="pmap"), tmp_path / "c")


def test_a_log_between_logging_steps_leaves_unmeasured_norms_out():
  """A preemption logs the steps since the last record; their program measured no param/update
  norm, so the record leaves those out instead of writing NaN into metrics.jsonl."""
  sums = {}
  nan = float("nan")
  train._accumulate(
    sums,
    {
      "loss_sum": 2.0,
      "count": 4.0,
      "correct": 3.0,
      "grad_norm": 1.5,
      "param_norm": nan,
      "update_norm": nan,
      "lr": 1e-4,
    },
  )
  record = train._summarize(sums)
  assert record == {"loss": 0.5, "accuracy": 0.75, "grad_norm": 1.5, "lr": 1e-4}
  assert json.loads(json.dumps(record)) == record  # strict JSON: no NaN


def test_saving_replicated_arrays_on_cpu_compiles_nothing_and_restores_exactly(tmp_path):
  """Orbax's replica-parallel saving slices each replicated array once per device, an eager op
  XLA compiles per shape; on CPU devices the trainer saves each array whole from one replica."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  host = {"w": rng.normal(size=(24, 40)).astype(np.float32), "b": rng.normal(size=(13,)).astype(np.float32)}
  state = jax.device_put(host, NamedSharding(mesh, P()))  # replicated over the 8 devices
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", best_metric="accuracy")
  compiles = []
  listener = lambda event, duration, **_: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ckpt.save(1, state, {"position": 3}, {"task": "x"}, metrics={"accuracy": 0.5})
    ckpt.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  ckpt.close()
  assert compiles == []
  step, restored, metrics = checkpoint.restore_on_host(tmp_path / "ckpt")
  assert step == 1 and metrics["accuracy"] == 0.5
  jax.tree.map(np.testing.assert_array_equal, restored, host)


def test_a_save_between_evals_keeps_latest_and_best_and_logs_no_orbax_warning(tmp_path, caplog):
  """Saves without metrics (checkpoint_every_steps, preemption) are kept as the latest and never
  ranked; Orbax's warning about them is filtered out."""
  import logging

  state = {"w": np.arange(3, dtype=np.float32)}
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", best_metric="accuracy")
  with caplog.at_level(logging.WARNING):
    ckpt.save(1, state, {"position": 1}, {}, metrics={"accuracy": 0.9})
    ckpt.save(2, state, {"position": 2}, {}, metrics={"accuracy": 0.5})
    ckpt.save(3, state, {"position": 3}, {})  # between evals
    ckpt.wait()
  assert ckpt.latest_step() == 3 and ckpt.best_step() == 1
  assert sorted(ckpt.manager.all_steps()) == [1, 3]
  ckpt.close()
  assert not [r for r in caplog.records if "metrics" in r.getMessage()]
  # --step arguments (predict, generate, export): best, latest, a saved step, else a clear error
  d = tmp_path / "ckpt"
  assert [checkpoint.choose_step(d, s, "accuracy") for s in ("best", "latest", "3")] == [1, None, 3]
  with pytest.raises(ValueError, match=r"step 'abc': expected best, latest or a step number"):
    checkpoint.choose_step(d, "abc", "accuracy")
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 2; saved steps: \[1, 3\]"):
    checkpoint.restore_on_host(d, 2)


def test_a_resume_with_a_changed_config_lists_the_changes(tmp_path):
  saved = tmp_path / "config.json"
  saved.write_text(json.dumps({"batch_size": 32, "progress": True, "optimizer": {"lr": 1e-3, "b1": 0.9}}))
  now = {"batch_size": 16, "progress": False, "optimizer": {"lr": 1e-3, "b1": 0.95}, "new": 1}
  assert run_checks.config_changes(saved, now) == [
    "batch_size: 32 -> 16",
    "new: None -> 1",
    "optimizer.b1: 0.9 -> 0.95",
  ]
  assert run_checks.config_changes(tmp_path / "none.json", now) == []


def test_a_second_ctrl_c_stops_without_waiting_for_the_save():
  import signal

  before = signal.getsignal(signal.SIGINT)
  p = train._Preemption()
  try:
    p._handle(signal.SIGINT, None)
    assert p.requested and p.reason == "interrupted"
    with pytest.raises(KeyboardInterrupt):
      p._handle(signal.SIGINT, None)
  finally:
    p.restore()
  assert signal.getsignal(signal.SIGINT) is before
