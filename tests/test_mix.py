"""data.weights: several training sources mixed in proportion, repeats kept, the mix seeded and reported."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import write_jsonl

from adapterkit.config import load_recipe
from adapterkit.data.loading import read_training_rows
from adapterkit.errors import ConfigError
from adapterkit.stages import STAGES


def _sources(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big review {i}", "label": "positive"} for i in range(60)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small review {i}", "label": "negative"} for i in range(20)])
    return str(big), str(small)


def test_sources_are_drawn_in_proportion_repeating_a_small_one(tmp_path):
    big, small = _sources(tmp_path)
    rows, mixed = read_training_rows([big, small], "train", [1, 1], seed=0)
    origin = Counter(r.values["text"].split()[0] for r in rows)
    assert len(rows) == 80 and origin == {"big": 40, "small": 40}
    assert len({r.values["text"] for r in rows if r.values["text"].startswith("small")}) == 20  # each used twice
    assert {r.copy for r in rows if r.values["text"].startswith("small")} == {0, 1}
    assert len({r.values["text"] for r in rows if r.values["text"].startswith("big")}) == 40  # sampled, no repeat
    assert "20 rows, 20 repeated" in mixed[1] and "20 left out" in mixed[0]
    again, _ = read_training_rows([big, small], "train", [1, 1], seed=0)
    other, _ = read_training_rows([big, small], "train", [1, 1], seed=1)
    assert [r.values for r in again] == [r.values for r in rows] != [r.values for r in other]


def test_a_mix_trains_its_repeats_and_reports_them(tmp_path, fast_builtin):
    big, small = _sources(tmp_path)
    recipe, _ = load_recipe("lora-sentiment", [f"data.train=[{big}, {small}]", "data.weights=[0.25, 0.75]",
                                               "data.eval=null"])
    data = STAGES["sft"].data(recipe, say=lambda *a, **k: None)
    report = data.reports[0]
    assert report.examples == 80 and not report.dropped  # repeats are not dropped as duplicates
    assert report.labels == {"positive": 20, "negative": 60}
    assert any("75%" in line for line in report.mixed) and "mixed:" in report.summary()


@pytest.mark.parametrize("weights,said", [("[1]", "1 weights for 2"), ("[1, -1]", "not proportions"),
                                           ("[0, 0]", "not proportions")])
def test_bad_weights_name_the_key(tmp_path, weights, said):
    big, small = _sources(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_recipe("lora-sentiment", [f"data.train=[{big}, {small}]", f"data.weights={weights}"])
    assert any(p.key == "data.weights" and said in p.message for p in e.value.problems)
