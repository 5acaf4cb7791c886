"""Interaction logs: reading, splits, the item vocabulary, windows and the rows a run trains on."""

import json

import pytest

from pretune.data.interactions import (CLS, MASK, PAD, SEP, UNK, InteractionsConfig, build_interactions, item_tokenizer,
                                       leave_last_out, read_log, sequence_row, time_split, windows)
from pretune.errors import DataError

LOG = """user,item,rating,time
a,x,5,3
a,y,4,1
a,z,3,2
a,w,2,4
b,x,1,10
b,y,2,11
c,y,3,5
c,y,3,5
c,x,4,6
c,z,5,7
"""


def log_file(tmp_path, text=LOG, name="log.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config(path, **kwargs):
    return InteractionsConfig(**{"file": str(path), "user": "user", "item": "item", "time": "time", **kwargs})


def test_events_are_sorted_by_time_and_exact_duplicates_dropped(tmp_path):
    log = read_log(config(log_file(tmp_path), target="rating"), target=True)
    assert [e.item for e in log.users["a"]] == ["y", "z", "x", "w"]  # times 1, 2, 3, 4
    assert [e.target for e in log.users["a"]] == ["4", "3", "5", "2"]
    assert [e.item for e in log.users["c"]] == ["y", "x", "z"]  # the repeated (c, y, 5) row once
    assert log.duplicates == 1


def test_without_a_time_column_the_file_order_is_the_time_order(tmp_path):
    log = read_log(config(log_file(tmp_path), time=None))
    assert [e.item for e in log.users["a"]] == ["x", "y", "z", "w"]


def test_leave_last_out_on_a_hand_made_log(tmp_path):
    split = leave_last_out(read_log(config(log_file(tmp_path))))
    assert [e.item for e in split.train["a"]] == ["y", "z"]
    history, target = split.validation["a"]
    assert ([e.item for e in history], target.item) == (["y", "z"], "x")
    history, target = split.test["a"]
    assert ([e.item for e in history], target.item) == (["y", "z", "x"], "w")
    assert [e.item for e in split.train["b"]] == ["x", "y"] and "b" not in split.validation and "b" not in split.test  # < 3 events
    assert [e.item for e in split.train["c"]] == ["y"]


def test_time_split_cuts_every_user_at_the_same_moment(tmp_path):
    text = "user,item,time\n" + "".join(f"u{u},i{t},{t}\n" for u in range(2) for t in range(10))
    split = time_split(read_log(config(log_file(tmp_path, text))), (0.8, 0.9))
    assert [e.item for e in split.train["u0"]] == [f"i{t}" for t in range(8)]
    history, target = split.validation["u1"]
    assert (len(history), target.item) == (8, "i8")
    history, target = split.test["u1"]
    assert (len(history), target.item) == (9, "i9")


@pytest.mark.parametrize("row, message", [
    ("a,,1\n", "row 2 of .*log.csv column 'item': missing item id"),
    ("a,x,noon\n", "row 2 of .*log.csv column 'time': timestamp 'noon' is not a number"),
    ("a,my item,1\n", "row 2 .*'my item' contains whitespace"),
    (",x,1\n", "column 'user': missing user id"),
])
def test_bad_rows_get_one_line_naming_row_and_column(tmp_path, row, message):
    path = log_file(tmp_path, "user,item,time\nb,y,0\n" + row)
    with pytest.raises(DataError, match=message):
        read_log(config(path))


def test_a_missing_column_is_named(tmp_path):
    with pytest.raises(DataError, match="has no column 'time'"):
        read_log(config(log_file(tmp_path, "user,item\na,x\n")))


def test_the_item_vocabulary_is_specials_then_most_frequent_items(tmp_path):
    split = leave_last_out(read_log(config(log_file(tmp_path))))
    tokenizer = item_tokenizer(split.train, "encoder", 10)
    assert tokenizer.convert_ids_to_tokens([PAD, UNK, CLS, SEP, MASK]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.convert_ids_to_tokens([5, 6, 7]) == ["y", "x", "z"]  # y: 3 training events, x: 1 (b), z: 1 (a), tie by id
    assert len(tokenizer) == 8  # w only appears as a test target: not in the vocabulary
    encoded = tokenizer("y z", "w")
    assert encoded["input_ids"] == [CLS, 5, 7, SEP, UNK, SEP]  # BERT's pair template; an unseen item is [UNK]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    cut = tokenizer("y x z y", "w", truncation=True, max_length=5)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(cut) == ["[CLS]", "y", "[SEP]", "[UNK]", "[SEP]"]  # too long: the latest item is kept


def test_the_item_vocabulary_round_trips_as_a_hugging_face_tokenizer(tmp_path):
    import transformers

    split = leave_last_out(read_log(config(log_file(tmp_path))))
    tokenizer = item_tokenizer(split.train, "encoder", 10)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded("x y w z")["input_ids"] == tokenizer("x y w z")["input_ids"]
    assert loaded.mask_token_id == MASK and loaded.pad_token_id == PAD


def test_windows_keep_every_item_and_end_at_the_last():
    assert windows([1, 2, 3], 5) == [[1, 2, 3]]
    cut = windows(list(range(10)), 4)
    assert cut[-1] == [6, 7, 8, 9] and cut[0] == [0, 1, 2, 3]
    assert all(len(w) == 4 for w in cut)
    assert set(sum(cut, [])) == set(range(10))


def test_rows_are_padded_with_an_attention_mask():
    assert sequence_row([7, 8], "encoder", 4) == {"input_ids": [CLS, 7, 8, SEP, PAD, PAD], "attention_mask": [1, 1, 1, 1, 0, 0]}
    assert sequence_row([7, 8], "decoder", 4) == {"input_ids": [7, 8, PAD, PAD], "attention_mask": [1, 1, 0, 0]}


def test_pretraining_rows_hold_only_training_events_and_validation_ends_at_its_target(tmp_path):
    data = build_interactions(config(log_file(tmp_path), max_length=4), "corpus", family="decoder")
    tokens = data.tokenizer.convert_ids_to_tokens
    rows = [[t for t, m in zip(r["input_ids"], r["attention_mask"]) if m] for r in data.train]
    assert sorted(tokens(r) for r in rows) == [["x", "y"], ["y"], ["y", "z"]]  # a: y z, b: x y, c: y
    validation = [tokens([t for t, m in zip(r["input_ids"], r["attention_mask"]) if m]) for r in data.validation]
    assert sorted(validation) == [["y", "x"], ["y", "z", "x"]]  # c: y + target x; a: y z + target x
    test = data.ranking["test"]
    assert sorted((tokens(h), tokens([t])[0]) for h, t in zip(test.histories, test.targets)) == \
        [(["y", "x"], "z"), (["y", "z", "x"], "[UNK]")]  # a's test item w was never trained on: unscorable


def test_labelled_pairs_and_a_budget_of_users(tmp_path):
    path = log_file(tmp_path)
    tokenizer = item_tokenizer(leave_last_out(read_log(config(path))).train, "encoder", 10)
    data = build_interactions(config(path, target="rating"), "labelled", tokenizer=tokenizer, head="regression")
    rows = sorted(zip(data.train["history"], data.train["item"], data.train["labels"]))
    assert ("", "y", 4.0) in rows and ("y", "z", 3.0) in rows and ("x", "y", 2.0) in rows
    assert len(rows) == 5  # a: 2 training events, b: 2, c: 1
    assert list(zip(data.test["history"], data.test["item"], data.test["labels"])) == [("y z x", "w", 2.0), ("y x", "z", 5.0)]
    one = build_interactions(config(path, target="rating", budget=1), "labelled", tokenizer=tokenizer, head="regression")
    per_user = [{("", "y", 4.0), ("y", "z", 3.0)}, {("", "x", 1.0), ("x", "y", 2.0)}, {("", "y", 3.0)}]  # a, b, c
    assert set(zip(one.train["history"], one.train["item"], one.train["labels"])) in per_user  # exactly one user's events
    assert one.test["labels"] == data.test["labels"]  # the budget never changes what is evaluated


def test_a_non_numeric_rating_is_named(tmp_path):
    path = log_file(tmp_path, "user,item,rating,time\na,x,good,1\n")
    tokenizer = item_tokenizer({"a": []}, "encoder", 10)
    with pytest.raises(DataError, match="regression target 'good' in row 1 of .*log.csv column 'rating' is not a number"):
        build_interactions(config(path, target="rating"), "labelled", tokenizer=tokenizer, head="regression")


def test_jsonl_and_an_explicit_format(tmp_path):
    path = tmp_path / "log.inter"
    path.write_text("".join(json.dumps({"user": "a", "item": f"i{t}", "time": t}) + "\n" for t in range(3)))
    log = read_log(config(path, format="jsonl"))
    assert [e.item for e in log.users["a"]] == ["i0", "i1", "i2"]
