"""data.streaming: pretraining that reads its corpus as it trains. A streamed run never reads past
what it trains on (a broken row beyond it is never met), a folder of shards streams through datasets
(the hub's code path), a bad row met in training keeps the checkpoint to resume from, and the mix,
cleaning, eval and refusals behave as they do on rows read whole."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from conftest import write_jsonl

from adapterkit.cli import main
from adapterkit.config import load_recipe
from adapterkit.data.loading import RawRow, read_rows, stream_rows
from adapterkit.data.streaming import head
from adapterkit.errors import ConfigError, DataError
from adapterkit.stages import STAGES, run

WORDS = "the cat sat on a warm mat while dogs ran over green hills and birds sang old songs".split()
SMALL = ["model.architecture.hidden_size=32", "model.architecture.num_layers=1",
         "model.architecture.intermediate_size=64", "model.architecture.num_heads=2", "data.max_length=64",
         "train.batch_size=8", "train.log_every=1", "train.save_every=null", "data.eval=null"]


def _docs(n: int, seed: int = 0, words: tuple[int, int] = (4, 12)) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))} for i in range(n)]


def _broken_after(path, rows: list[dict]):
    write_jsonl(path, rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    return path


def _pretrain(tmp_path, tokenizer, *overrides: str):
    return load_recipe("pretrain-tiny", [*SMALL, f"model.tokenizer={tokenizer}", f"output_dir={tmp_path / 'run'}",
                                         *overrides])


def test_a_streamed_run_never_reads_past_what_it_trains_on(tmp_path, tiny_model_dir):
    corpus = _broken_after(tmp_path / "corpus.jsonl", _docs(8000))
    # Read whole, the broken last line stops the run before it starts.
    with pytest.raises(DataError, match="corpus.jsonl:8001"):
        run(*_pretrain(tmp_path, tiny_model_dir, f"data.train={corpus}", "train.max_steps=3"), echo=False)
    recipe, src = _pretrain(tmp_path, tiny_model_dir, f"data.train={corpus}", "data.streaming=true",
                            "train.max_steps=6", f"output_dir={tmp_path / 'streamed'}")
    result = run(recipe, src, echo=False)
    manifest = json.loads((result.out / "manifest.json").read_text())
    streamed = manifest["metrics"]["streamed"]
    assert manifest["metrics"]["steps"] == 6 and 0 < streamed["rows_read"] < 8000, streamed
    assert streamed["tokens"] >= manifest["metrics"]["tokens_seen"] > 0
    report = json.loads((result.out / "data_report.json").read_text())[0]
    assert report["streamed"] and report["rows_read"] == 1000  # read ahead to check the stream


def test_a_folder_of_shards_streams_through_datasets(tmp_path, tiny_model_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", _docs(8000))
    (shards / "part-1.jsonl").write_text("{broken\n", encoding="utf-8")  # never reached
    result = run(*_pretrain(tmp_path, tiny_model_dir, f"data.train={shards}", "data.streaming=true",
                            "train.max_steps=4"), echo=False)
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4 and manifest["data"]["train"][0]["files"] == 2
    first = next(stream_rows(str(shards), "train", None, 0))
    assert first.values["text"].startswith("0 ") and first.where == f"{shards}[train] row 0"
    # The same folder read whole meets the broken shard, and says which folder.
    with pytest.raises(DataError, match="could not load it as a folder of data files"):
        read_rows(str(shards), "train", "data.train")


def test_a_bad_row_met_in_training_keeps_the_checkpoint_to_resume_from(tmp_path, tiny_model_dir, capsys):
    good = _docs(2600, words=(2, 4))
    corpus = _broken_after(tmp_path / "corpus.jsonl", good)
    args = ["recipe", "run", "pretrain-tiny", *SMALL, f"model.tokenizer={tiny_model_dir}", f"data.train={corpus}",
            "data.streaming=true", "train.max_steps=400", "train.save_every=2", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert "corpus.jsonl:2601" in err and "the run stopped at step" in err and "--resume-anyway" in err, err
    kept = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert kept, err
    write_jsonl(corpus, good)  # fixed: the broken line removed
    with pytest.raises(SystemExit) as e:
        main([*args, "--resume-anyway"])
    out = capsys.readouterr().out
    assert e.value.code in (0, None) and f"resuming from {kept[-1]}" in out, out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["steps"] == 400


def test_weighted_streams_draw_by_weight_and_restart_a_source_that_runs_out(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big {i}"} for i in range(300)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(20)])
    rows = list(stream_rows([str(big), str(small)], "train", [0.5, 0.5], seed=0))
    origin = Counter(r.values["text"].split()[0] for r in rows)
    # The stream ends once both have run out: the big one once, the small one about 15 times over.
    assert {r.values["text"] for r in rows if r.values["text"].startswith("big")} == {f"big {i}" for i in range(300)}
    assert 0.4 < origin["small"] / len(rows) < 0.6
    assert max(r.copy for r in rows if r.values["text"].startswith("small")) >= 10
    assert all(r.copy == 0 for r in rows if r.values["text"].startswith("big"))
    again = list(stream_rows([str(big), str(small)], "train", [0.5, 0.5], seed=0))
    other = list(stream_rows([str(big), str(small)], "train", [0.5, 0.5], seed=1))
    assert [r.values for r in again] == [r.values for r in rows] != [r.values for r in other]
    # Without weights the sources follow each other, once.
    plain = [r.values["text"] for r in stream_rows([str(big), str(small)], "train", None, seed=0)]
    assert plain == [f"big {i}" for i in range(300)] + [f"small {i}" for i in range(20)]


def test_an_empty_source_in_a_weighted_stream_is_named(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big {i}"} for i in range(30)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(stream_rows([str(big), str(empty)], "train", [1, 1], seed=0))
    assert e.value.problems[0].where == str(empty) and "holds no rows" in e.value.problems[0].message


def test_streamed_data_is_cleaned_checked_and_evaluated_on_its_first_rows(tmp_path, tiny_model_dir):
    docs = _docs(300)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs + docs)  # every row twice
    evaluation = write_jsonl(tmp_path / "eval.jsonl", _docs(500, seed=1))
    recipe, _ = _pretrain(tmp_path, tiny_model_dir, f"data.train={corpus}", "data.streaming=true",
                          "train.max_steps=5", "data.clean=true", f"data.eval={evaluation}", "eval.limit=40")
    data = STAGES["pretrain"].data(recipe, say=lambda *a, **k: None)
    train, held_out = data.reports
    assert train.streamed and train.rows_read == 300
    assert list(train.cleaned.values()) == [300] and "duplicate" in next(iter(train.cleaned))
    assert held_out.rows_read == 40 and not held_out.streamed
    assert data.stream is not None and len(data.train) == train.examples
    # The stream itself, as training reads it: every pass has its own memory of what it kept.
    first = [ex["input_ids"] for ex in data.stream()]
    assert len(first) == train.examples and [ex["input_ids"] for ex in data.stream()] == first


def test_a_bad_column_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"body": d["text"]} for d in _docs(50)])
    with pytest.raises(DataError) as e:
        run(*_pretrain(tmp_path, tiny_model_dir, f"data.train={corpus}", "data.streaming=true", "train.max_steps=5"),
            echo=False)
    assert "data.columns" in str(e.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,key,said", [
    (["data.streaming=true"], "data.streaming", "is for stage 'pretrain', not 'sft'"),
])
def test_streaming_outside_pretraining_is_refused(overrides, key, said):
    with pytest.raises(ConfigError) as e:
        load_recipe("lora-sentiment", overrides)
    assert any(p.key == key and said in p.message for p in e.value.problems), e.value


def test_a_stream_needs_max_steps(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe("pretrain-tiny", ["data.streaming=true", "train.max_steps=null"])
    assert any(p.key == "train.max_steps" and "no length" in p.message for p in e.value.problems), e.value


def test_a_scratch_tokenizer_learns_from_the_head_of_the_stream():
    rows = (RawRow({"text": "x" * 10, "n": 3}, f"r{i}") for i in range(100))
    assert [r.where for r in head(rows, chars=35)] == ["r0", "r1", "r2", "r3"]
