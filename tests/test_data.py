"""GLUE readers (errors name file and line), bucketing, seeded plans, exact eval coverage."""

import numpy as np
import pytest

from research.data import pipeline, sources, tasks

SST2 = tasks.get_task("sst2")


def _write(tmp_path, text, name="train.tsv"):
  p = tmp_path / name
  p.write_text(text)
  return p


def test_reads_every_offline_glue_split(glue_dir):
  expected = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3668, 408), "rte": (2490, 277), "stsb": (5749, 1500)}
  for name, (n_train, n_dev) in expected.items():
    t = tasks.get_task(name)
    train = sources.load_split(t, "train", source="tsv", glue_dir=str(glue_dir), tfds_data_dir=None)
    dev = sources.load_split(t, "dev", source="tsv", glue_dir=str(glue_dir), tfds_data_dir=None)
    assert (len(train), len(dev)) == (n_train, n_dev), name
    assert len(train.texts[0]) == len(t.text_columns)
  sst = sources.load_split(SST2, "dev", source="tsv", glue_dir=str(glue_dir), tfds_data_dir=None)
  assert np.bincount(sst.labels).tolist() == [428, 444]  # from ../shared/data/README.md


def test_missing_data_dir():
  with pytest.raises(sources.DataError, match="/no/such/glue.*does not exist"):
    sources.load_split(SST2, "train", source="tsv", glue_dir="/no/such/glue", tfds_data_dir=None)


def test_missing_task_folder(tmp_path):
  with pytest.raises(sources.DataError, match="no folder for task 'sst2'"):
    sources.load_split(SST2, "train", source="tsv", glue_dir=str(tmp_path), tfds_data_dir=None)


def test_byte_order_mark_and_crlf_line_ends_read_as_plain_utf8(tmp_path):
  """Files saved by Excel or Notepad: a leading BOM would stick to the first column's name."""
  plain = sources.read_glue_tsv(_write(tmp_path, "sentence\tlabel\ngood film\t1\nbad film\t0\n"), SST2)
  (tmp_path / "b").mkdir()
  p = tmp_path / "b" / "train.tsv"
  p.write_bytes(b"\xef\xbb\xbf" + b"sentence\tlabel\r\ngood film\t1\r\nbad film\t0\r\n")
  windows = sources.read_glue_tsv(p, SST2)
  assert windows.texts == plain.texts == [("good film",), ("bad film",)]
  np.testing.assert_array_equal(windows.labels, plain.labels)


def test_malformed_row_names_file_and_line(tmp_path):
  p = _write(tmp_path, "sentence\tlabel\ngood film\t1\nbad film\t0\textra\n")
  with pytest.raises(sources.DataError, match=rf"{p}:3: expected 2 tab-separated columns"):
    sources.read_glue_tsv(p, SST2)


def test_unknown_label_names_file_and_line(tmp_path):
  p = _write(tmp_path, "sentence\tlabel\ngood film\t1\nbad film\t2\n")
  with pytest.raises(sources.DataError, match=rf"{p}:3: unknown label '2'; expected one of \['0', '1'\]"):
    sources.read_glue_tsv(p, SST2)


def test_empty_text_names_file_and_line(tmp_path):
  p = _write(tmp_path, "sentence\tlabel\ngood film\t1\n  \t0\n")
  with pytest.raises(sources.DataError, match=rf"{p}:3: empty text in column 'sentence'"):
    sources.read_glue_tsv(p, SST2)


def test_missing_column_and_bad_regression_label(tmp_path):
  p = _write(tmp_path, "text\tlabel\nx\t1\n")
  with pytest.raises(sources.DataError, match=r":1: header .* lacks column\(s\) \['sentence'\]"):
    sources.read_glue_tsv(p, SST2)
  stsb = tasks.get_task("stsb")
  header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
  p = _write(tmp_path, header + "0\tg\tf\ty\to\ts\ts\ta b\tc d\tfive\n", "stsb.tsv")
  with pytest.raises(sources.DataError, match=r"stsb.tsv:2: label 'five' is not a number"):
    sources.read_glue_tsv(p, stsb)


def test_unknown_source():
  with pytest.raises(sources.DataError, match="config.data.source='hub'"):
    sources.load_split(SST2, "train", source="hub", glue_dir="", tfds_data_dir=None)


def test_tfds_source_reads_prepared_glue(tmp_path, small_glue):
  """A prepared TFDS GLUE (array_record, read without TensorFlow): the same examples as the TSVs,
  labels mapped by name (TFDS says negative/positive for SST-2's 0/1 and orders MNLI's labels
  differently), dev -> validation[_matched], and a clear error when nothing is prepared."""
  from fake_tfds import prepare_glue, prepare_sst2_like

  data_dir = str(tmp_path / "tfds")
  prepare_sst2_like(data_dir, str(small_glue))
  tsv = {
    s: sources.load_split(SST2, s, source="tsv", glue_dir=str(small_glue), tfds_data_dir=None) for s in ("train", "dev")
  }
  for split, ex in tsv.items():
    got = sources.load_split(SST2, split, source="tfds", glue_dir="", tfds_data_dir=data_dir)
    assert sorted(zip(got.texts, got.labels.tolist())) == sorted(zip(ex.texts, ex.labels.tolist()))

  mnli = tasks.get_task("mnli")  # TFDS: entailment, neutral, contradiction; ours: contradiction, entailment, neutral
  pairs = [("A man eats.", "Someone eats.", 0), ("A dog runs.", "A cat sleeps.", 2), ("It rains.", "It is wet.", 1)]
  recs = [{"premise": p, "hypothesis": h, "label": y} for p, h, y in pairs]
  prepare_glue(data_dir, "mnli", {"train": recs, "validation_matched": recs})
  got = sources.load_split(mnli, "dev_matched", source="tfds", glue_dir="", tfds_data_dir=data_dir)
  by_text = dict(zip(got.texts, got.labels.tolist()))
  assert by_text == {
    ("A man eats.", "Someone eats."): 1,
    ("A dog runs.", "A cat sleeps."): 0,
    ("It rains.", "It is wet."): 2,
  }
  # auto falls back to TFDS when the GLUE folder is missing
  auto = sources.load_split(mnli, "train", source="auto", glue_dir=str(tmp_path / "none"), tfds_data_dir=data_dir)
  assert len(auto.texts) == 3
  with pytest.raises(sources.DataError, match=r"TFDS glue/rte:train is not available in data_dir="):
    sources.load_split(tasks.get_task("rte"), "train", source="tfds", glue_dir="", tfds_data_dir=data_dir)


def test_pairs_get_token_types(glue_dir, tokenizer):
  rte = tasks.get_task("rte")
  dev = sources.load_split(rte, "dev", source="tsv", glue_dir=str(glue_dir), tfds_data_dir=None).take(4)
  enc = pipeline.encode(dev, tokenizer, 128)
  types = enc.token_type_ids[0]
  assert types[0] == 0 and types[-1] == 1 and set(types.tolist()) == {0, 1}


def _fake_encoded(n=203, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 60, size=n).astype(np.int32)
  ids = [np.arange(1, k + 1, dtype=np.int32) for k in lengths]
  return pipeline.Encoded(ids, [np.zeros(k, np.int32) for k in lengths], lengths, (np.arange(n) % 2).astype(np.int32))


def test_epoch_plan_is_a_seeded_permutation():
  enc = _fake_encoded()
  a = pipeline.epoch_plan(enc.lengths, 16, seed=3, epoch=0, sort_window=4)
  assert sorted(np.concatenate(a).tolist()) == list(range(len(enc)))
  b = pipeline.epoch_plan(enc.lengths, 16, seed=3, epoch=0, sort_window=4)
  assert all((x == y).all() for x, y in zip(a, b))
  c = pipeline.epoch_plan(enc.lengths, 16, seed=3, epoch=1, sort_window=4)
  assert not all(len(x) == len(y) and (x == y).all() for x, y in zip(a, c))


def test_batches_use_bucket_shapes_and_weights():
  enc = _fake_encoded()
  buckets = pipeline.bucket_lengths((8, 16, 32, 100), 64)
  assert buckets == [8, 16, 32, 64]
  it = pipeline.TrainIterator(enc, batch_size=16, buckets=buckets, seed=0, sort_window=4)
  seen = 0
  for _ in range(it.steps_per_epoch):
    batch, _ = next(it)
    length = batch["input_ids"].shape[1]
    assert length in buckets and batch["input_ids"].shape[0] == 16
    real = batch["weights"] > 0
    assert (batch["attention_mask"][~real] == 0).all()
    lengths = batch["attention_mask"].sum(1)
    assert length == min(b for b in buckets if b >= lengths[real].max())  # the smallest that fits
    seen += int(real.sum())
  assert seen == len(enc)
  stats = pipeline.padding_stats(enc, it.plan(0), 16, buckets)
  assert 0 <= stats["pad_fraction"] < stats["pad_fraction_unbucketed"]


def test_iterator_state_resumes_exactly():
  enc = _fake_encoded()
  kw = dict(batch_size=16, buckets=[16, 32, 64], seed=7, sort_window=2)
  ref = pipeline.TrainIterator(enc, **kw)
  stream = [next(ref)[0] for _ in range(30)]  # crosses an epoch boundary (13 steps/epoch)
  it = pipeline.TrainIterator(enc, **kw)
  for _ in range(17):
    _, state = next(it)
  resumed = pipeline.TrainIterator(enc, **kw)
  resumed.set_state(state)
  for want in stream[17:]:
    got, _ = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(ValueError, match="seed"):
    pipeline.TrainIterator(enc, **(kw | {"seed": 8})).set_state(state)


def test_process_slices_tile_the_global_batch():
  enc = _fake_encoded()
  kw = dict(batch_size=16, buckets=[64], seed=1)
  whole = next(pipeline.TrainIterator(enc, **kw))[0]
  parts = [next(pipeline.TrainIterator(enc, **kw, process_index=p, process_count=4))[0] for p in range(4)]
  np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), whole["input_ids"])


def test_eval_covers_every_example_once():
  enc = _fake_encoded(n=101)
  seen = []
  for batch in pipeline.eval_batches(enc, batch_size=16, buckets=[16, 32, 64]):
    real = batch["weights"] > 0
    assert (batch["index"][~real] == -1).all()
    seen += batch["index"][real].tolist()
    np.testing.assert_array_equal(batch["labels"][real], enc.labels[batch["index"][real]])
  assert sorted(seen) == list(range(101))
