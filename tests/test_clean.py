"""`adapterkit data clean`: each check on rows that really have the problem, streaming, the report, errors.

    python -m pytest -q tests/test_clean.py
"""

from __future__ import annotations

import json

import pytest

from adapterkit.cli import main
from adapterkit.errors import DataError
from adapterkit.config import CleanConfig
from adapterkit.data.clean import clean_file, normalise
from conftest import shared_data, write_jsonl


def _clean(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["data", "clean", *args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


LONG = ("the film follows a young woman who leaves her village to study medicine in the city and finds that "
        "the hospital she trained for is closing down within the year")


def test_each_reason_drops_the_rows_that_have_it_and_keeps_the_rest(tmp_path, capsys):
    rows = [
        {"text": "Cafe\u0301  menu\t\tis   great ", "label": "positive"},   # kept, normalised (NFC, spaces)
        {"text": "Café menu is great", "label": "positive"},               # exact duplicate once normalised
        {"text": "   ", "label": "negative"},                               # empty after normalising
        {"text": "bad \x07 bell", "label": "negative"},                     # a control character
        {"text": "mojibake \ufffd here", "label": "negative"},              # U+FFFD
        {"text": LONG, "label": "positive"},                                # kept
        {"text": LONG + " indeed", "label": "positive"},                    # near duplicate of the one above
        {"text": "Das ist ein wirklich schrecklicher Film, den niemand sehen sollte.", "label": "negative"},
        {"text": "An honest, moving and beautifully acted story about a family.", "label": "positive"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code, stdout, _ = _clean(capsys, str(src), "--task", "sentiment", "--out", str(out), "--language", "en")
    assert code == 0
    kept = _rows(out)
    assert [r["text"] for r in kept] == ["Café menu is great", LONG,
                                         "An honest, moving and beautifully acted story about a family."]
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["dropped"] == {"empty": 1, "control": 2, "duplicate": 1, "near_duplicate": 1, "language": 1}
    assert report["rows_read"] == 9 and report["kept"] == 3 and report["normalised"] == 1
    assert report["examples"]["control"][0]["where"].endswith("in.jsonl:4")
    assert "\\x07" in report["examples"]["control"][0]["text"]  # shown escaped, not rung
    assert "| an exact duplicate of a row kept before | 1 | 11.1% |" in stdout


def test_normalising_keeps_paragraphs_and_nested_messages():
    assert normalise("a  b \r\nc\n\n\n\nd\u00a0e ") == "a b\nc\n\nd e"
    assert normalise({"messages": [{"role": "user", "content": " hi  there "}], "n": 3}) == {
        "messages": [{"role": "user", "content": "hi there"}], "n": 3}


def test_token_limits_need_a_tokenizer_and_count_with_it(tmp_path, capsys, tiny_model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "short", "label": "a"}, {"text": LONG, "label": "b"}])
    code, _, err = _clean(capsys, str(src), "--task", "sentiment", "--out", str(tmp_path / "o.jsonl"),
                          "--max-tokens", "10")
    assert code == 2 and "--tokenizer" in err and not (tmp_path / "o.jsonl").exists()
    code, _, _ = _clean(capsys, str(src), "--task", "sentiment", "--out", str(tmp_path / "o.jsonl"),
                        "--max-tokens", "10", "--tokenizer", str(tiny_model_dir))
    assert code == 0 and [r["text"] for r in _rows(tmp_path / "o.jsonl")] == ["short"]


@pytest.mark.parametrize("args, needle", [
    (["--task", "sentimnt"], "did you mean 'sentiment'"),
    (["--task", "sentiment", "--column", "label"], "is not FIELD=COLUMN"),
    (["--task", "sentiment", "--near-duplicates", "1.5"], "is not a similarity"),
    (["--task", "sentiment", "--language", "english"], "is not a language the detector knows"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, args, needle):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine", "label": "a"}])
    out = tmp_path / "out.jsonl"
    code, _, err = _clean(capsys, str(src), "--out", str(out), *args)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not out.exists()


def test_an_interrupted_clean_leaves_the_old_output_as_it_was(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"row {i} " * 3, "label": "a"} for i in range(50)])
    out = tmp_path / "out.jsonl"
    out.write_text("earlier output\n")

    def stop(message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        clean_file(str(src), out, "sentiment", {}, CleanConfig(), say=stop, every=0)
    assert out.read_text() == "earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file left


def test_real_instruction_data_streams_through_with_its_duplicates_found(tmp_path, capsys):
    real = shared_data("instruction", "train.jsonl")
    lines = [x for x in real.read_text(encoding="utf-8").split("\n") if x]  # not splitlines: U+2028 is in the text
    doubled = tmp_path / "doubled.jsonl"
    # the real rows, then each again with whitespace noise: every second copy is a duplicate once normalised
    noisy = [json.dumps({k: (v.replace(" ", "  ") + " " if isinstance(v, str) else v) for k, v in json.loads(x).items()})
             for x in lines]
    doubled.write_text("\n".join(lines + noisy) + "\n", encoding="utf-8")
    code, _, _ = _clean(capsys, str(doubled), "--task", "generation", "--out", str(tmp_path / "o.jsonl"),
                        "--near-duplicates", "off")
    report = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert code == 0 and report["rows_read"] == 2 * len(lines)
    assert report["dropped"]["duplicate"] >= len(lines)
    assert report["kept"] == len(_rows(tmp_path / "o.jsonl")) <= len(lines)


def test_a_recipe_cleans_its_training_rows_with_data_clean(tmp_path, fast_builtin):
    from adapterkit.config import load_recipe
    from adapterkit.stages import STAGES

    import random

    words = "plot cast score pacing ending dialogue camera story actor scene music light colour humour".split()
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(words, k=12)) + "  !", "label": "positive" if i % 2 else "negative"}
            for i in range(40)]  # 40 distinct rows, none a near duplicate of another
    rows += rows[:10] + [{"text": "bad \x00 byte", "label": "negative"}]  # 10 repeats, one control character
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    base = ["data.task=sentiment", f"data.train={src}", "data.eval=null"]
    recipe, _ = load_recipe("lora-sentiment", [*base, "data.clean=true"])
    report = STAGES["sft"].data(recipe).reports[0]
    assert report.rows_read == 40 and report.examples == 40  # max_dropped sees only what the formatter dropped
    assert report.cleaned == {"an exact duplicate of a row kept before": 10,
                              "control characters or U+FFFD (text decoded with the wrong encoding)": 1}
    assert "data.clean dropped 10 first: an exact duplicate" in report.summary()
    plain, _ = load_recipe("lora-sentiment", base)  # without it the formatter drops the repeats, too many
    with pytest.raises(DataError) as e:
        STAGES["sft"].data(plain)
    assert "10 of 51 rows" in str(e.value) and "data.clean=true" in str(e.value)


@pytest.mark.parametrize("override, needle", [("data.clean.near_duplicates=2", "is not a similarity"),
                                              ("data.clean.languages=[klingon]", "not a language the detector"),
                                              ("data.clean.nearduplicates=0.5", "did you mean 'near_duplicates'")])
def test_a_bad_data_clean_setting_is_exit_2(capsys, override, needle):
    with pytest.raises(SystemExit) as e:
        main(["recipe", "run", "lora-sentiment", override, "--dry-run"])
    assert e.value.code == 2 and needle in capsys.readouterr().err
