"""Held-out samples are not held-out captions: the synthetic captions repeat, so adherence is
reported apart for the captions seen in training (read from the run's shards, pixel or
precomputed latent) and the novel ones, or says that it cannot tell."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.precompute import precompute, toy_encoder
from data_pipeline.synth import synth_samples
from data_pipeline.write import write_shards
from tests.eval.eval_helpers import tiny_config, write_checkpoint
from trainer.cascade import Cascade
from trainer.checkpoint_format import resolve
from trainer.evaluate import evaluate_adherence, judge_with_references, seen_captions
from trainer.heldout import HELDOUT_SEED, heldout_set, normalize_caption, training_captions
from trainer.sampling import SamplerSettings


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Pixel shards holding the first 12 held-out samples (so their captions are seen) and
    their precomputed latents beside them."""
    root = tmp_path_factory.mktemp("split")
    write_shards(synth_samples(12, seed=HELDOUT_SEED, size=16), str(root / "data"), shard_size=6, progress=False)
    precompute(str(root / "data"), str(root / "latents"), toy_encoder(), DataConfig(resolution=16), progress=False)
    return root


def test_training_captions_from_pixel_and_latent_shards(shards):
    expected = {normalize_caption(s["txt"].decode()) for s in synth_samples(12, seed=HELDOUT_SEED, size=16)}
    assert training_captions([DataConfig(shards=str(shards / "data"))]) == expected
    assert training_captions([DataConfig(shards=str(shards / "latents"))]) == expected
    assert normalize_caption(" A  Large red circle ") == "a large red circle"


def test_training_captions_refuse_missing_shards(tmp_path):
    with pytest.raises(DataError, match="matches no tar file"):
        training_captions([DataConfig(shards=str(tmp_path / "gone"))])


def test_report_splits_seen_and_novel_captions(tmp_path):
    pixels, captions = heldout_set(DataConfig(shards="unused", resolution=32), 8, workdir=tmp_path)
    seen = {normalize_caption(c) for c in captions[:3]}
    result = judge_with_references(pixels, captions, pixels, captions, seen=seen)
    seen_n = sum(normalize_caption(c) in seen for c in captions)
    assert result.splits["seen"].num_samples == seen_n and result.splits["novel"].num_samples == 8 - seen_n
    assert result.splits["seen"].accuracy["overall"] == 1.0  # real images: the judge is exact
    assert result.generated.num_samples == 8  # the overall figures are unchanged
    record = result.as_dict()
    assert record["splits"]["novel"]["counts"]["overall"] == [8 - seen_n, 8 - seen_n]
    table = result.table()
    assert f"captions seen in training ({seen_n} samples)" in table and "novel captions" in table


def test_evaluate_adherence_reads_the_runs_training_captions(shards, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(shards / "latents", root / "latents")
    cascade = Cascade.load(write_checkpoint(tiny_config(root, f"data.shards={root}/latents")),
                           SamplerSettings(steps=1))
    result, _, _ = evaluate_adherence(cascade, num=16, num_real=16)
    assert result.splits["seen"].num_samples == 12 and result.splits["novel"].num_samples == 4
    assert "distinct captions of" in result.split_note and str(root / "latents") in result.split_note

    shutil.rmtree(root / "latents")  # shards gone: say so instead of guessing
    result, _, _ = evaluate_adherence(cascade, num=4, num_real=4)
    assert result.splits == {} and "could not be read" in result.split_note
    assert "could not be read" in result.table()


def test_a_students_seen_captions_include_its_teachers(shards, tmp_path):
    """A student distilled on other shards than its teacher trained on (data.shards is free to
    differ): the teacher's captions are not novel to it (they were counted novel: only the
    student's own shards were read)."""
    teacher = write_checkpoint(tiny_config(tmp_path / "teacher", f"data.shards={shards}/data"))
    write_shards(synth_samples(8, seed=7, size=16), str(tmp_path / "student_data"), shard_size=8, progress=False)
    student = write_checkpoint(tiny_config(tmp_path / "student", f"data.shards={tmp_path}/student_data",
                                           "stage.kind=progressive", f"stage.teacher={teacher}", "stage.rounds=[2]",
                                           "stage.guidance_max=1"))
    seen, note = seen_captions(Cascade.load(student, SamplerSettings()))
    assert training_captions([DataConfig(shards=str(shards / "data"))]) <= seen
    assert str(shards / "data") in note and str(tmp_path / "student_data") in note

    config = resolve(teacher) / "config.yaml"
    config.write_text(config.read_text() + "retired_section: {key: 1}\n")  # a config this version cannot read
    seen, note = seen_captions(Cascade.load(student, SamplerSettings()))
    assert seen is None and "could not be read" in note and f"the teacher's config {config}" in note

    shutil.rmtree(tmp_path / "teacher")  # the teacher is gone: say so instead of guessing
    seen, note = seen_captions(Cascade.load(student, SamplerSettings()))
    assert seen is None and "could not be read" in note


def test_demo_prints_the_split_from_the_eval_record(tmp_path, capsys):
    import json

    from launch.demo import print_adherence_splits

    pixels, captions = heldout_set(DataConfig(shards="unused", resolution=32), 6, workdir=tmp_path)
    result = judge_with_references(pixels, captions, pixels, captions, seen={normalize_caption(captions[0])})
    result.split_note = "seen: from the test"
    (tmp_path / "adherence.json").write_text(json.dumps(result.as_dict()))
    print_adherence_splits(tmp_path / "adherence.json")
    out = capsys.readouterr().out
    seen_n = result.splits["seen"].num_samples
    assert "captions seen in training: overall 100.0%" in out and f"({seen_n} of {seen_n} samples)" in out
    assert f"({6 - seen_n} of {6 - seen_n} samples)" in out and "seen: from the test" in out
