"""Loading real question/answer data and text corpora; every bad input is a one-line UnlearnError."""

import json
import warnings

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_unlearn.data import loaders
from ray_unlearn.data.loaders import load_forget_items, load_qa, load_text, resolve_overlap
from ray_unlearn.errors import UnlearnError

ITEMS = [{"question": "Who wrote Silent River?", "answer": "Zorvan Kettle wrote it."},
         {"question": "What is 7 plus 5?", "answer": "7 plus 5 is 12.", "paraphrased_answer": "It is 12."}]


def expect_error(match, fn, *args):
    with pytest.raises(UnlearnError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def check_loaded(items):
    assert [it["question"] for it in items] == [it["question"] for it in ITEMS]
    assert [it["index"] for it in items] == [0, 1]
    assert items[1]["paraphrased_answer"] == "It is 12."


def test_json_list(tmp_path):
    path = tmp_path / "forget.json"
    path.write_text(json.dumps(ITEMS))
    check_loaded(load_qa(str(path)))


def test_json_lines_in_json_and_jsonl_files(tmp_path):
    lines = "\n".join(json.dumps(it) for it in ITEMS) + "\n\n"
    for name in ("forget.json", "forget.jsonl"):
        (tmp_path / name).write_text(lines)
        check_loaded(load_qa(str(tmp_path / name)))


def test_json_object_with_split_key(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"train": ITEMS, "test": ITEMS[:1]}))
    check_loaded(load_qa(str(tmp_path / "d.json")))
    assert len(load_qa(str(tmp_path / "d.json"), split="test")) == 1


def test_parquet_via_pandas_and_pyarrow(tmp_path):
    pd.DataFrame(ITEMS).to_parquet(tmp_path / "a.parquet")
    items = load_qa(str(tmp_path / "a.parquet"))
    assert [it["answer"] for it in items] == [it["answer"] for it in ITEMS]
    assert [it["index"] for it in items] == [0, 1]
    table = pa.Table.from_pylist([dict(it, index=10 + i) for i, it in enumerate(ITEMS)])
    pq.write_table(table, tmp_path / "b.parquet")
    assert [it["index"] for it in load_qa(str(tmp_path / "b.parquet"))] == [10, 11]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    rows = [dict(it, paraphrased_answer=it.get("paraphrased_answer", "")) for it in ITEMS]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    check_loaded(load_qa(str(tmp_path / "ds")))
    datasets.DatasetDict({"train": ds, "forget10": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    check_loaded(load_qa(str(tmp_path / "dd")))
    assert [it["answer"] for it in load_qa(str(tmp_path / "dd"), split="forget10")] == ["7 plus 5 is 12."]
    expect_error(r"has no split 'nope' \(it has train, forget10\)", load_qa, str(tmp_path / "dd"), "nope")


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(source, split):
        calls.append((source, split))
        return datasets.Dataset.from_list(ITEMS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_qa("locuslab/TOFU", split="forget10")
    assert calls == [("locuslab/TOFU", "forget10")]
    assert items == [dict(ITEMS[0], index=0)]


def test_hub_failure_is_one_line(monkeypatch):
    def failing(source, split):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    expect_error("cannot load hub dataset split 'train'.*no network", load_qa, "someone/data")


@pytest.mark.parametrize("source", ["/no/such/file.json", "./missing", "~/no_such_dir_xyz/f", "nofile.jsonl",
                                    "missing.parquet"])
def test_missing_path_is_not_a_hub_id(source, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("routed to the hub"))
    hint = "does not exist; give a .json/.jsonl/.parquet file, a load_from_disk directory or a hub dataset id"
    expect_error(hint, load_qa, source)


def test_missing_file_in_existing_dir_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("routed to the hub"))
    expect_error("data/forget does not exist", load_qa, "data/forget")


def test_corrupt_files(tmp_path):
    (tmp_path / "bad.json").write_text('[{"question": "q", "answer": "a"},')
    expect_error("bad.json is not valid JSON", load_qa, str(tmp_path / "bad.json"))
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{oops\n')
    expect_error("bad.jsonl: line 2 is not valid JSON", load_qa, str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    expect_error("cannot be read as parquet", load_qa, str(tmp_path / "bad.parquet"))
    (tmp_path / "latin.json").write_bytes(b'[{"question": "caf\xe9", "answer": "a"}]')
    expect_error("is not UTF-8", load_qa, str(tmp_path / "latin.json"))
    (tmp_path / "plain").mkdir()
    expect_error("is not a datasets load_from_disk directory", load_qa, str(tmp_path / "plain"))
    (tmp_path / "data.csv").write_text("question,answer\n")
    expect_error("unsupported file type '.csv'", load_qa, str(tmp_path / "data.csv"))


def test_bad_items(tmp_path):
    path = tmp_path / "items.json"
    cases = [
        (ITEMS + [{"question": "q"}] + ITEMS[:1], "items.json: item 2 has no 'answer' field"),
        ([{"answer": "a"}], "item 0 has no 'question' field"),
        ([{"question": 3, "answer": "a"}], "item 0 'question' is int, not a string"),
        ([{"question": "q", "answer": ["a"]}], "item 0 'answer' is list, not a string"),
        ([{"question": "q", "answer": "  "}], "item 0 has an empty 'answer'"),
        (["just a string"], "item 0 is str, not an object"),
        ([dict(ITEMS[0], index=1), ITEMS[1]], "index 1 appears twice"),
        ([dict(ITEMS[0], index="a")], "non-integer 'index'"),
        (42, "the JSON value is int, not a list of items"),
        ("text", "the JSON value is str, not a list of items"),
        ({"other": []}, "neither an item nor has a 'train' list"),
    ]
    for data, message in cases:
        path.write_text(json.dumps(data))
        expect_error(message, load_qa, str(path))


def test_empty_sources(tmp_path):
    for name, text in (("e.json", "[]"), ("e.jsonl", "\n\n"), ("empty.json", "")):
        (tmp_path / name).write_text(text)
        expect_error(f"{name} holds no items", load_qa, str(tmp_path / name))
    pd.DataFrame({"question": [], "answer": []}).to_parquet(tmp_path / "e.parquet")
    expect_error("e.parquet holds no items", load_qa, str(tmp_path / "e.parquet"))
    expect_error("data source is empty", load_qa, "")


def test_load_text_and_forget_dispatch(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First document.\n\n   \n  Second document.  \nThird.\n")
    docs = load_text(str(corpus))
    assert docs == [{"text": "First document.", "index": 0}, {"text": "Second document.", "index": 1},
                    {"text": "Third.", "index": 2}]
    assert load_forget_items(corpus) == (docs, "text")
    (tmp_path / "f.jsonl").write_text(json.dumps(ITEMS[0]))
    assert load_forget_items(str(tmp_path / "f.jsonl")) == ([dict(ITEMS[0], index=0)], "qa")
    expect_error("corpus.txt is a text corpus, not question/answer items", load_qa, str(corpus))


def test_load_text_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    expect_error("blank.txt holds no documents", load_text, str(tmp_path / "blank.txt"))
    expect_error("gone.txt does not exist", load_text, str(tmp_path / "gone.txt"))
    expect_error("is a directory", load_text, str(tmp_path))


def test_overlap_warn_drops_from_retain():
    forget = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    retain = [{"question": "q1", "answer": "a1 "}, {"question": "q2", "answer": "other"},
              {"question": "q3", "answer": "a3"}]
    with pytest.warns(UserWarning, match="1 retain items also appear in the forget set"):
        kept = resolve_overlap(forget, retain, "warn")
    assert [it["question"] for it in kept] == ["q2", "q3"]


def test_overlap_error_and_no_overlap():
    forget = [{"text": "doc a"}, {"text": "doc b"}]
    retain = [{"text": "doc a"}, {"text": "doc b"}, {"text": "doc c"}]
    expect_error("2 retain items also appear in the forget set.*data.overlap=warn",
                 resolve_overlap, forget, retain, "error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_overlap(forget, retain[2:], "error") == retain[2:]
        assert resolve_overlap(forget, retain[2:], "warn") == retain[2:]
    expect_error("every retain item also appears", resolve_overlap, forget, retain[:2], "warn")
    expect_error("data.overlap: 'drop' is not one of warn, error", resolve_overlap, forget, retain, "drop")


def test_looks_like_path():
    assert not loaders._looks_like_path("locuslab/TOFU")
    assert not loaders._looks_like_path("squad")
    for source in ("/abs", "./rel", "~/home", "x.json", "y.PARQUET", "z.txt"):
        assert loaders._looks_like_path(source)
