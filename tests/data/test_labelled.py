import csv
import json
import os
from collections import Counter

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from pretune.data.labelled import (  # noqa: E402
    LabelledDataConfig,
    apply_budget,
    build_labelled,
    label_map_json,
    load_label_map,
    read_labelled,
    read_table,
    strata,
    stratified_split,
)
from pretune.errors import DataError, RecipeError  # noqa: E402
from pretune.recipe import validate  # noqa: E402

SENTIMENT = [("good film", "pos"), ("bad film", "neg"), ("fine", "neu"), ("great", "pos"), ("awful", "neg")] * 4


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def build(kind="single", seed=0, label_names=None, **cfg):
    return build_labelled(LabelledDataConfig(**cfg), kind, seed, label_names)


# ---------------------------------------------------------------- formats


def test_csv_string_labels_sorted_and_split(tmp_path):
    data = build(train=write_csv(tmp_path / "train.csv", ["text", "label", "extra"], [(t, y, 1) for t, y in SENTIMENT]))
    assert data.head.name == "single" and data.label_names == ["neg", "neu", "pos"]
    assert data.train.column_names == ["text", "labels"]
    assert isinstance(data.train.features["labels"], datasets.ClassLabel)
    assert len(data.train) + len(data.validation) == 20 and len(data.validation) == 2
    by_text = dict(SENTIMENT)
    for row in list(data.train) + list(data.validation):
        assert data.label_names[row["labels"]] == by_text[row["text"]]
    assert data.test is None


def test_tsv_jsonl_json_parquet_and_disk_read_the_same(tmp_path):
    rows = [{"text": t, "label": y} for t, y in SENTIMENT]
    paths = [
        write_csv(tmp_path / "a.tsv", ["text", "label"], SENTIMENT, delimiter="\t"),
        write_jsonl(tmp_path / "a.jsonl", rows),
        str(tmp_path / "a.json"),
        str(tmp_path / "a.parquet"),
        str(tmp_path / "disk"),
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), paths[3])
    datasets.Dataset.from_list(rows).save_to_disk(paths[4])
    for path in paths:
        table = read_table(path, ["label", "text"])
        assert table.column_names == ["label", "text"]
        assert list(table["text"]) == [t for t, _ in SENTIMENT], path
        assert build(train=path).label_names == ["neg", "neu", "pos"]


def test_disk_folder_class_labels_are_read_back_as_names(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [1, 0, 1, 1]}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    data = build(train=str(tmp_path / "ds"), validation_fraction=0.25)
    assert data.label_names == ["no", "yes"]
    rows = list(data.train) + list(data.validation)
    assert {r["text"]: r["labels"] for r in rows} == {"a": 1, "b": 0, "c": 1, "d": 1}


def test_integer_labels_sort_numerically_and_map_is_kept(tmp_path):
    rows = [{"text": f"t{i}", "label": y} for i, y in enumerate([10, 2, 2, 10, 1, 1, 2, 10])]
    data = build(train=write_jsonl(tmp_path / "train.jsonl", rows))
    assert data.label_names == ["1", "2", "10"]
    csv_rows = [(r["text"], r["label"]) for r in rows]
    csv_data = build(train=write_csv(tmp_path / "train.csv", ["text", "label"], csv_rows))
    assert csv_data.label_names == ["1", "2", "10"]  # CSV cells are strings; they still sort as numbers
    fixed = build(train=str(tmp_path / "train.jsonl"), label_names=["10", "2", "1", "7"])
    assert fixed.label_names == ["10", "2", "1", "7"]
    got = {r["text"]: r["labels"] for r in list(fixed.train) + list(fixed.validation)}
    assert got == {r["text"]: ["10", "2", "1"].index(str(r["label"])) for r in rows}


def test_validation_and_test_files_use_the_train_label_map(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], SENTIMENT)
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], [("ok", "neu"), ("yes", "pos")])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [("no", "neg")])
    data = build(train=train, validation=dev, test=test, budget=2)
    assert list(data.validation["labels"]) == [1, 2] and list(data.test["labels"]) == [0]
    assert len(data.train) == 6  # no split when a validation file is given; 2 per class


def test_text_pair_column(tmp_path):
    rows = [("a cat", "a feline", "same"), ("a dog", "a car", "diff")] * 3
    data = build(train=write_csv(tmp_path / "p.csv", ["s1", "s2", "y"], rows), text="s1", text_pair="s2", label="y")
    assert data.train.column_names == ["s1", "s2", "labels"]


def test_read_labelled_with_a_saved_label_map(tmp_path):
    path = write_csv(tmp_path / "new.csv", ["text", "label"], [("x", "pos"), ("y", "neg")])
    dataset = read_labelled(path, LabelledDataConfig(), "single", ["neg", "pos"])
    assert list(dataset["labels"]) == [1, 0]
    with pytest.raises(DataError, match=r"label 'pos' in row 1 of .*new.csv column 'label' is not in the label map"):
        read_labelled(path, LabelledDataConfig(), "single", ["neg", "neu"])


def test_label_map_round_trip(tmp_path):
    text = label_map_json(["neg", "pos"])
    assert json.loads(text) == {"id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}
    (tmp_path / "label_map.json").write_text(text)
    assert load_label_map(str(tmp_path)) == load_label_map(str(tmp_path / "label_map.json")) == ["neg", "pos"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"id2label": {"1": "b", "0": "a"}, "hidden_size": 8}))
    assert load_label_map(str(model)) == ["a", "b"]


# ---------------------------------------------------------------- splits and budgets


def test_stratified_split_keeps_proportions_and_is_deterministic():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert Counter(labels[i] for i in val) == {"a": 12, "b": 6, "c": 2}
    assert stratified_split(labels, 0.2, seed=3) == (train, val)
    assert stratified_split(labels, 0.2, seed=4) != (train, val)


def test_stratified_split_small_classes_keep_a_train_row():
    labels = ["a", "a", "b", "c", "c", "c", "d", "d"]
    train, val = stratified_split(labels, 0.8, seed=0)
    assert {labels[i] for i in train} == {"a", "b", "c", "d"}  # every class still in train
    assert 2 not in val  # a class of one stays in train
    _, tiny = stratified_split(["x", "x", "y", "y", "z"], 0.1, seed=0)
    assert len(tiny) == 1  # at least one validation row


def test_budget_per_class_fraction_and_count():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 1
    kept = apply_budget(labels, 0.2, seed=0)
    assert Counter(labels[i] for i in kept) == {"a": 10, "b": 2, "c": 1}  # at least one per class
    kept = apply_budget(labels, 5, seed=0)
    assert Counter(labels[i] for i in kept) == {"a": 5, "b": 5, "c": 1}
    assert kept == sorted(kept) == apply_budget(labels, 5, seed=0)
    assert kept != apply_budget(labels, 5, seed=1)
    assert apply_budget(labels, 1.0, seed=0) == list(range(61))


def test_budget_subsets_are_nested():
    labels = [i % 4 for i in range(200)]
    for seed in range(3):
        subsets = [set(apply_budget(labels, b, seed)) for b in (1, 3, 10, 25, 50)]
        subsets += [set(apply_budget(labels, f, seed)) for f in (0.05, 0.1, 0.3, 0.7, 1.0)]
        for small, large in zip(subsets[:4] + subsets[5:9], subsets[1:5] + subsets[6:]):
            assert small <= large


def test_budget_leaves_validation_unchanged(tmp_path):
    path = write_csv(tmp_path / "train.csv", ["text", "label"], [(f"t{i}", "ab"[i % 2]) for i in range(60)])
    runs = [build(train=path, budget=b, validation_fraction=0.2) for b in (None, 0.5, 0.1, 3)]
    assert all(list(r.validation["text"]) == list(runs[0].validation["text"]) for r in runs)
    assert [len(r.train) for r in runs] == [48, 24, 4, 6]  # 24 per class: 24, 12, round(2.4), 3
    texts = [set(r.train["text"]) for r in runs]
    assert texts[2] <= texts[1] <= texts[0]
    assert build(train=path, budget=0.5, budget_seed=1).train["text"][:] != runs[1].train["text"][:]


def test_budget_config_is_validated():
    assert LabelledDataConfig(budget=1).budget == 1 and isinstance(LabelledDataConfig(budget=1.0).budget, float)
    for bad in (0, -2, 0.0, 1.5, True, "half"):
        with pytest.raises(RecipeError, match="data.budget"):
            validate(LabelledDataConfig, {"budget": bad}, prefix="data.")
    with pytest.raises(RecipeError, match="validation_fraction"):
        validate(LabelledDataConfig, {"validation_fraction": 0.95}, prefix="data.")


# ---------------------------------------------------------------- kinds


def test_multi_label_lists_and_semicolon_strings(tmp_path):
    rows = [("x1", "sport;news"), ("x2", "news"), ("x3", ""), ("x4", "art ; sport"), ("x5", "news")]
    train = write_csv(tmp_path / "m.csv", ["text", "label"], rows)
    test = write_jsonl(tmp_path / "m.jsonl", [{"text": "y", "label": ["art", "news"]}, {"text": "z", "label": []}])
    data = build("multi", train=train, test=test, validation_fraction=0.2)
    assert data.label_names == ["art", "news", "sport"]
    assert list(data.test["labels"]) == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    everything = {r["text"]: r["labels"] for r in list(data.train) + list(data.validation)}
    assert everything["x1"] == [0.0, 1.0, 1.0] and everything["x3"] == [0.0, 0.0, 0.0]
    assert strata([[0, 1, 1], [0, 0, 0], [1, 0, 1]], "multi") == [1, -1, 0]


def test_regression_targets_and_bins(tmp_path):
    rows = [(f"t{i}", str(i / 2)) for i in range(20)]
    data = build("regression", train=write_csv(tmp_path / "r.csv", ["text", "score"], rows), label="score")
    assert data.label_names == [] and data.head.name == "regression"
    values = sorted(list(data.train["labels"]) + list(data.validation["labels"]))
    assert values == [i / 2 for i in range(20)]
    assert Counter(strata([float(i) for i in range(100)], "regression")) == {b: 20 for b in range(5)}
    kept = apply_budget([float(i) for i in range(100)], 2, seed=0, head="regression")
    assert len(kept) == 10  # 2 per quantile bin


def test_tags_from_jsonl(tmp_path):
    rows = [
        {"tokens": ["Ada", "met", "Bob"], "ner": ["B-PER", "O", "B-PER"]},
        {"tokens": ["in", "Paris"], "ner": ["O", "B-LOC"]},
        {"tokens": ["hi"], "ner": ["O"]},
    ]
    path = write_jsonl(tmp_path / "ner.jsonl", rows)
    data = build("tags", train=path, test=path, text="tokens", label="ner")
    assert data.label_names == ["B-LOC", "B-PER", "O"]
    assert list(data.test["labels"]) == [[1, 2, 1], [2, 0], [2]]
    assert data.test[0]["tokens"] == ["Ada", "met", "Bob"]
    assert isinstance(data.test.features["labels"].feature, datasets.ClassLabel)
    spaced = write_csv(tmp_path / "ner.csv", ["tokens", "ner"], [("Ada met Bob", "B-PER O B-PER"), ("hi", "O")])
    assert build("tags", train=spaced, test=spaced, text="tokens", label="ner").test[0]["labels"] == [0, 1, 0]


# ---------------------------------------------------------------- errors


def _error_cases(tmp_path):
    """(kind, config, words the message must hold) for every kind of bad input."""
    def raw(name, content):
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(tmp_path / name)

    def table(name, rows, header=("text", "label")):
        return write_csv(tmp_path / name, header, rows)

    def jsonl(name, records):
        return write_jsonl(tmp_path / name, records)

    train = table("train.csv", SENTIMENT, header=("text", "sentiment"))
    dev = table("dev.csv", [("a", "pos")] * 6 + [("b", "x")], header=("text", "sentiment"))
    two_tags = [{"text": ["a", "b"], "label": ["O", "O"]}, {"text": ["c", "d"], "label": ["O"]}]
    return [
        ("single", dict(train=str(tmp_path / "nope.csv")), ["nope.csv", "does not exist"]),
        ("single", dict(train=raw("empty.csv", "")), ["empty.csv", "no rows"]),
        ("single", dict(train=table("head.csv", [])), ["head.csv", "no rows"]),
        ("single", dict(train=jsonl("none.jsonl", [])), ["none.jsonl", "no rows"]),
        ("single", dict(train=raw("data.xlsx", b"PK")), ["data.xlsx", "unsupported", ".xlsx"]),
        ("single", dict(train=train), ["train.csv", "no column 'label'", "text, sentiment"]),
        ("single", dict(train=train, validation=dev, label="sentiment"),
         ["label 'x' in row 7 of", "dev.csv column 'sentiment' never appears in", "train.csv"]),
        ("single", dict(train=table("blank.csv", [("a", "p"), ("  ", "q")])),
         ["empty text in row 2 of", "blank.csv column 'text'"]),
        ("single", dict(train=table("nolabel.csv", [("a", "p"), ("b", "")])),
         ["missing label in row 2 of", "nolabel.csv column 'label'"]),
        ("regression", dict(train=table("nan.csv", [("a", "1"), ("b", "nan")])),
         ["row 2 of", "nan.csv column 'label'", "NaN"]),
        ("regression", dict(train=table("gap.csv", [("a", "1"), ("b", "2"), ("c", "")])),
         ["missing regression target in row 3 of", "gap.csv column 'label'"]),
        ("regression", dict(train=table("word.csv", [("a", "1"), ("b", "high")])),
         ["'high' in row 2 of", "word.csv column 'label'", "not a number"]),
        ("regression", dict(train=jsonl("r.jsonl", [{"text": "a", "label": None}])),
         ["missing regression target in row 1 of", "r.jsonl column 'label'"]),
        ("tags", dict(train=jsonl("tags.jsonl", two_tags)), ["row 2 of", "tags.jsonl", "1 tags", "2 words"]),
        ("single", dict(train=raw("latin.csv", "text,label\nok,pos\ncaf\xe9,neg\n".encode("latin-1"))),
         ["latin.csv", "not valid UTF-8", "line 3"]),
        ("single", dict(train=raw("ragged.csv", "text,label\na,pos\nb,neg,extra\n")),
         ["row 2 of", "ragged.csv", "3 fields"]),
        ("single", dict(train=raw("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": \n')),
         ["broken.jsonl line 2", "invalid JSON"]),
        ("multi", dict(train=jsonl("m.jsonl", [{"text": "a", "label": None}])),
         ["missing label in row 1 of", "m.jsonl"]),
        ("single", dict(train=jsonl("l.jsonl", [{"text": "a", "label": ["x", "y"]}])),
         ["row 1 of", "l.jsonl", "multi-label"]),
    ]


def test_every_error_is_one_line_naming_file_row_and_column(tmp_path):
    for kind, config, words in _error_cases(tmp_path):
        with pytest.raises(DataError) as info:
            build(kind, **config)
        message = str(info.value)
        assert "\n" not in message, message
        for word in words:
            assert word in message, (word, message)


def test_folder_errors(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain is a folder but not one written by datasets' save_to_disk"):
        read_table(str(tmp_path / "plain"), ["text"])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"several splits \(train\).*dd/train"):
        read_table(str(tmp_path / "dd"), ["text"])
    with pytest.raises(DataError, match="no label map"):
        load_label_map(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="data.train is not set"):
        build()
