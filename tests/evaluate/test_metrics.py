import json
import random

import numpy as np
import pytest
from seqeval import metrics as seqeval
from sklearn import metrics as sk

from pretune.evaluate.metrics import (
    classification_metrics,
    entities,
    entity_metrics,
    multilabel_metrics,
    primary_metric,
    probability_metrics,
    regression_metrics,
    summary_table,
)

LABELS = ["cat", "dog", "bird", "fish", "a-very-long-label-name-indeed"]


def close(a, b):
    return a == pytest.approx(b, abs=1e-12)


# ---------------------------------------------------------------- classification


def test_classification_by_hand():
    # y_true = [cat, cat, dog, dog, dog, bird], y_pred = [cat, dog, dog, dog, bird, bird]
    # confusion (rows true): cat [1 1 0], dog [0 2 1], bird [0 0 1]
    # cat:  P = 1/1, R = 1/2, F1 = 2/3     dog: P = 2/3, R = 2/3, F1 = 2/3     bird: P = 1/2, R = 1, F1 = 2/3
    # accuracy = 4/6; macro P = (1 + 2/3 + 1/2)/3 = 13/18; macro R = (1/2 + 2/3 + 1)/3 = 13/18; macro F1 = 2/3
    # weighted P = (2*1 + 3*2/3 + 1*1/2)/6 = 4.5/6 = 0.75
    m = classification_metrics([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2], ["cat", "dog", "bird"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert close(m["accuracy"], 4 / 6) and close(m["f1_micro"], 4 / 6)
    assert close(m["precision_macro"], 13 / 18) and close(m["recall_macro"], 13 / 18) and close(m["f1_macro"], 2 / 3)
    assert close(m["precision_weighted"], 0.75)
    assert m["per_class"]["cat"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["bird"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    json.dumps(m)  # plain Python types only


@pytest.mark.parametrize("seed", range(8))
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k, n = len(LABELS), int(rng.integers(1, 60))
    y_true = rng.integers(0, k - 1, n)  # the last class never occurs ...
    y_pred = rng.integers(0, k, n)
    y_pred[y_pred == 2] = 0  # ... and class 2 is never predicted
    if seed % 2:  # class 1 neither occurs nor is predicted: it still counts (as 0) in the macro average
        y_true[y_true == 1] = 0
        y_pred[y_pred == 1] = 0
    m = classification_metrics(y_true.tolist(), y_pred, LABELS)
    ids = list(range(k))
    assert close(m["accuracy"], sk.accuracy_score(y_true, y_pred))
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=average, zero_division=0)
        assert close(m[f"precision_{average}"], p) and close(m[f"recall_{average}"], r) and close(m[f"f1_{average}"], f)
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    for i, name in enumerate(LABELS):
        assert m["per_class"][name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert m["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=ids).tolist()


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match="indices"):
        classification_metrics([0, 3], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="as many"):
        classification_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        classification_metrics([0], [0], ["a", "a"])


# ---------------------------------------------------------------- multilabel


def test_multilabel_by_hand():
    # sample 0 exactly right; sample 1 misses label b and adds label c: 2 wrong cells of 6
    # a: tp 1 -> P = R = F1 = 1; b: tp 0, fn 1 -> 0; c: tp 1, fp 1 -> P 1/2, R 1, F1 2/3
    # micro: tp 2, fp 1, fn 1 -> P = R = F1 = 2/3
    m = multilabel_metrics([[1, 0, 1], [0, 1, 0]], [[1, 0, 1], [0, 0, 1]], ["a", "b", "c"])
    assert close(m["subset_accuracy"], 0.5) and close(m["hamming_loss"], 2 / 6)
    assert close(m["f1_micro"], 2 / 3) and close(m["f1_macro"], (1 + 0 + 2 / 3) / 3)
    assert m["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})


@pytest.mark.parametrize("seed", range(6))
def test_multilabel_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 40)), 4
    y_true, y_pred = rng.integers(0, 2, (n, k)), rng.integers(0, 2, (n, k))
    y_true[:, 0] = 0  # a label no sample carries
    y_pred[:, 1] = 0  # a label never predicted
    m = multilabel_metrics(y_true, y_pred, LABELS[:k])
    assert close(m["subset_accuracy"], sk.accuracy_score(y_true, y_pred))
    assert close(m["hamming_loss"], sk.hamming_loss(y_true, y_pred))
    for average in ("macro", "micro"):
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert close(m[f"precision_{average}"], p) and close(m[f"recall_{average}"], r) and close(m[f"f1_{average}"], f)
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    for i, name in enumerate(LABELS[:k]):
        assert m["per_class"][name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})


def test_multilabel_rejects_non_indicators():
    with pytest.raises(ValueError, match="0/1"):
        multilabel_metrics([[2, 0]], [[1, 0]], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        multilabel_metrics([[1, 0]], [[1, 0]], ["a", "b", "c"])


# ---------------------------------------------------------------- regression


def test_regression_by_hand():
    # errors 0, 1, -2 -> mse 5/3, mae 1; mean y = 2, SS_tot = 1 + 0 + 1 = 2, SS_res = 5 -> r2 = -1.5
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, 1.0, 5.0])
    assert m == pytest.approx({"mse": 5 / 3, "rmse": (5 / 3) ** 0.5, "mae": 1.0, "r2": -1.5})


@pytest.mark.parametrize("shape", [(1,), (7,), (30,), (12, 3)])
def test_regression_matches_sklearn(shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    y_true, y_pred = rng.normal(size=shape), rng.normal(size=shape)
    m = regression_metrics(y_true, y_pred)
    assert close(m["mse"], sk.mean_squared_error(y_true, y_pred))
    assert close(m["rmse"], sk.root_mean_squared_error(y_true, y_pred))
    assert close(m["mae"], sk.mean_absolute_error(y_true, y_pred))
    if shape[0] > 1:  # sklearn warns and returns nan for one sample
        assert close(m["r2"], sk.r2_score(y_true, y_pred))


def test_regression_constant_targets():
    assert regression_metrics([2.0, 2.0], [2.0, 2.0])["r2"] == 1.0 == sk.r2_score([2.0, 2.0], [2.0, 2.0])
    assert regression_metrics([2.0, 2.0], [2.0, 3.0])["r2"] == 0.0 == sk.r2_score([2.0, 2.0], [2.0, 3.0])


# ---------------------------------------------------------------- entities


def test_entities_chunking():
    assert entities([["B-PER", "I-PER", "O", "B-LOC"]]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities([["I-PER", "I-PER", "I-LOC"]]) == {("PER", 0, 1), ("LOC", 2, 2)}  # IOB1: I- opens a chunk
    assert entities([["B-PER", "I-LOC"]]) == {("PER", 0, 0), ("LOC", 1, 1)}  # type change closes a chunk
    assert entities([["S-PER", "B-LOC", "E-LOC"]]) == {("PER", 0, 0), ("LOC", 1, 2)}  # BIOES
    assert entities([["B-PER"], ["I-PER"]]) == {("PER", 0, 0), ("PER", 2, 2)}  # no entity crosses sentences


HAND_WRITTEN = [
    # (true, pred): the seqeval docstring example, then IOB1 / BIOES / sentence-boundary cases
    ([["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]],
     [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]),
    ([["I-PER", "I-PER", "O", "I-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]]),
    ([["B-ORG", "E-ORG", "S-PER", "O"]], [["B-ORG", "I-ORG", "B-PER", "O"]]),
    ([["B-PER"], ["I-PER", "O"]], [["B-PER"], ["B-PER", "O"]]),
    ([["O", "O"]], [["B-LOC", "O"]]),  # only a false positive: P = R = F1 = 0
    ([["O", "B-DATE", "I-DATE"]], [["O", "O", "O"]]),  # only a miss
]


def check_against_seqeval(true, pred):
    m = entity_metrics(true, pred)
    assert close(m["precision"], seqeval.precision_score(true, pred, zero_division=0))
    assert close(m["recall"], seqeval.recall_score(true, pred, zero_division=0))
    assert close(m["f1"], seqeval.f1_score(true, pred, zero_division=0))
    assert close(m["accuracy"], seqeval.accuracy_score(true, pred))
    report = seqeval.classification_report(true, pred, output_dict=True, zero_division=0)
    per_type = {name: row for name, row in report.items() if not name.endswith(" avg")}
    assert set(m["per_type"]) == set(per_type)
    for name, row in per_type.items():
        ours = m["per_type"][name]
        assert ours == pytest.approx({"precision": row["precision"], "recall": row["recall"],
                                      "f1": row["f1-score"], "support": row["support"]})


@pytest.mark.parametrize("true, pred", HAND_WRITTEN)
def test_entity_metrics_match_seqeval_on_hand_written(true, pred):
    check_against_seqeval(true, pred)


def test_entity_metrics_by_hand():
    # seqeval's example: MISC predicted one token too early (wrong), PER right -> P = R = F1 = 1/2;
    # tokens 2 (O vs B-MISC) and 3 (B-MISC vs I-MISC) wrong -> accuracy 8/10
    m = entity_metrics(*HAND_WRITTEN[0])
    assert m["f1"] == 0.5 and m["accuracy"] == 0.8
    assert m["per_type"]["PER"]["f1"] == 1.0 and m["per_type"]["MISC"]["support"] == 1


@pytest.mark.parametrize("seed", range(10))
def test_entity_metrics_match_seqeval_on_random_tags(seed):
    rnd = random.Random(seed)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    if seed % 2:
        tags += ["E-PER", "S-LOC", "S-ORG", "E-ORG"]

    def sentences(lengths):
        return [[rnd.choice(tags) for _ in range(n)] for n in lengths]

    lengths = [rnd.randint(0, 12) for _ in range(rnd.randint(1, 6))] + [3]
    true = sentences(lengths)
    pred = [[t if rnd.random() < 0.6 else rnd.choice(tags) for t in sentence] for sentence in true]
    check_against_seqeval(true, pred)


def test_entity_metrics_rejects_ragged_predictions():
    with pytest.raises(ValueError, match="as long"):
        entity_metrics([["O", "B-PER"]], [["O"]])


# ---------------------------------------------------------------- primary metric and table


def test_primary_metric():
    assert primary_metric("classification") == ("accuracy", "max")
    assert primary_metric("multilabel") == ("f1_micro", "max")
    assert primary_metric("regression") == ("mse", "min")
    assert primary_metric("entity") == ("f1", "max")
    with pytest.raises(ValueError, match="unknown task kind"):
        primary_metric("ranking")


def test_summary_table_handles_every_kind():
    rng = np.random.default_rng(0)
    table = summary_table(classification_metrics(rng.integers(0, 5, 50), rng.integers(0, 5, 50), LABELS), "val")
    lines = table.splitlines()
    assert lines[:2] == ["val", "==="] and any(line.startswith("accuracy ") for line in lines)
    assert "a-very-long-lab~" in table and "a-very-long-label-name-indeed" not in table  # cut names
    matrix_rows = lines[lines.index("confusion matrix (rows = true, columns = predicted)") + 2:]
    assert len(matrix_rows) == 5 and matrix_rows[0].split()[0] == "cat"

    table = summary_table(multilabel_metrics(rng.integers(0, 2, (9, 3)), rng.integers(0, 2, (9, 3)), ["a", "b", "c"]))
    assert "hamming_loss" in table and "confusion" not in table
    assert "r2" in summary_table(regression_metrics([1.0, 2.0], [1.5, 2.5]))
    table = summary_table(entity_metrics(*HAND_WRITTEN[0]))
    assert "MISC" in table and "PER" in table


def test_summary_table_leaves_out_huge_confusion_matrices():
    labels = [f"class{i}" for i in range(40)]
    table = summary_table(classification_metrics(list(range(40)), list(range(40)), labels))
    assert "left out: 40 classes" in table and table.count("class39") == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_log_loss_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 60)
    p1 = np.round(np.clip(truth * 0.3 + rng.random(60) * 0.7, 0, 1), 1)  # rounded: many ties
    probs = np.stack([1 - p1, p1], axis=1)
    found = probability_metrics(truth, probs)
    assert found["auc"] == pytest.approx(sk.roc_auc_score(truth, p1))
    assert found["log_loss"] == pytest.approx(sk.log_loss(truth, probs, labels=[0, 1]))


def test_auc_by_hand_and_absent_for_one_class_or_many():
    assert probability_metrics([0, 1, 1], [[0.9, 0.1], [0.2, 0.8], [0.9, 0.1]])["auc"] == pytest.approx(0.75)  # 1 tie of 2 pairs
    assert "auc" not in probability_metrics([1, 1], [[0.2, 0.8], [0.4, 0.6]])
    three = probability_metrics([0, 2], [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    assert "auc" not in three and three["log_loss"] == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)
