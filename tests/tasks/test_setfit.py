"""SetFit's pieces on known inputs: pair drawing, pair counts, the cosine-similarity loss, the strategy key."""

import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from pretune import strategies
from pretune.errors import RecipeError
from pretune.tasks.setfit import PairAnchors, pair_loss, pair_rows, pair_targets, repeats_per_epoch

LABELS = [0, 0, 0, 1, 1, 2]  # class 2 has one example


def anchors(repeats: int = 2) -> PairAnchors:
    rows = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(LABELS))], "labels": LABELS})
    return PairAnchors(rows, LABELS, repeats)


def test_partners_are_same_class_others_and_other_class_members_drawn_from_each_seed():
    pairs = anchors()
    seeds = list(range(1000, 1000 + 300))
    batch = [i % len(LABELS) for i in range(300)]
    positives, negatives = pairs.partners(batch, seeds)
    for anchor, positive, negative in zip(batch, positives, negatives):
        assert LABELS[positive] == LABELS[anchor]
        assert positive != anchor or LABELS.count(LABELS[anchor]) == 1  # only a lone example pairs with itself
        assert LABELS[negative] != LABELS[anchor]
    assert pairs.partners(batch, seeds) == (positives, negatives)  # a pure function of the seeds: resumable
    assert pairs.partners(batch, [s + 1 for s in seeds]) != (positives, negatives)
    # every allowed partner turns up: anchor 0's positives are 1 and 2, its negatives 3, 4 and 5
    drawn = pairs.partners([0] * 300, seeds)
    assert set(drawn[0]) == {1, 2} and set(drawn[1]) == {3, 4, 5}


def test_anchor_rows_repeat_the_labelled_rows_and_one_class_is_refused():
    pairs = anchors(repeats=3)
    assert len(pairs) == 18
    rows = pairs[[0, 6, 17]]
    assert rows["anchor"] == [0, 0, 5] and rows["text"] == ["t0", "t0", "t5"]
    texts = pair_rows(pairs.rows, [0, 5], [1, 5], [3, 0])
    assert texts["text"] == ["t0", "t5", "t1", "t5", "t3", "t0"]  # anchors, positives, negatives
    with pytest.raises(ValueError, match="at least two classes"):
        PairAnchors(pairs.rows, [1] * 6, 1)


@pytest.mark.parametrize("examples, pairs, max_pairs, epochs, expected", [
    (40, 20, 20_000, 5, 4),  # SetFit's 20 iterations spread over 5 epochs
    (40, 20, 20_000, 1, 20),  # SetFit's one epoch of 20 iterations
    (40, 20, 20_000, 3, 7),  # ceil(20 / 3)
    (100, 20, 3_000, 5, 3),  # capped: floor(3000 pairs / (2 x 100 examples x 5 epochs))
    (5000, 20, 20_000, 5, 1),  # capped below one row per example: one row per example still
])
def test_repeats_per_epoch_spread_the_pair_count_and_respect_the_cap(examples, pairs, max_pairs, epochs, expected):
    assert repeats_per_epoch(examples, pairs, max_pairs, epochs) == expected


def test_pair_loss_is_the_squared_error_of_cosine_similarity_to_the_target():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positive = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cos 1, cos 1/sqrt(2)
    negative = torch.tensor([[0.0, 3.0], [0.0, -1.0]])  # cos 0, cos -1
    embeddings = torch.cat([a, positive, negative])
    targets = pair_targets(2)
    assert targets.tolist() == [1, 1, 0, 0]
    expected = (1 - 1) ** 2 + (1 / math.sqrt(2) - 1) ** 2 + 0 ** 2 + (-1 - 0) ** 2
    assert pair_loss(embeddings, targets).item() == pytest.approx(expected, rel=1e-6)
    # the same as sentence-transformers' CosineSimilarityLoss (MSE of cosine vs label), times the pair count
    u = torch.cat([a, a]); v = torch.cat([positive, negative])
    reference = F.mse_loss(F.cosine_similarity(u, v), targets, reduction="sum")
    assert pair_loss(embeddings, targets).item() == pytest.approx(reference.item(), rel=1e-6)


def test_setfit_strategy_key_parses_and_refuses_bad_arguments():
    spec = strategies.parse("setfit:pairs=10,max_pairs=500")
    assert (spec.name, spec.pairs, spec.max_pairs) == ("setfit", 10, 500)
    assert str(strategies.parse("setfit")) == "setfit:pairs=20,max_pairs=20000"
    with pytest.raises(RecipeError, match="strategy.*bad argument"):
        strategies.parse("setfit:r=4")


def test_the_pair_step_trains_the_encoder_and_leaves_the_fitted_head_alone():
    import transformers

    from pretune import heads
    from pretune.backbones.transformers import PooledClassifier
    from pretune.tasks.finetune import FineTuneModel

    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32))
    model = PooledClassifier(base, "mean", outputs=3)
    strategies.apply(strategies.parse("setfit"), model)
    assert not model.linear_head().weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "classifier" not in n and "pooler" not in n)
    assert set(strategies.lr_scales(strategies.parse("setfit"), model).values()) == {0.0, 0.4}  # head at 0 (fitted), the encoder at 0.4x (SetFit's 2e-5 vs 5e-5)
    module = FineTuneModel(model, heads.get("single"), None, frozen_backbone=False)
    ids = torch.randint(1, 50, (6, 7))  # 2 anchors, 2 positives, 2 negatives
    out = module({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pair_targets": pair_targets(2)})
    assert set(out) == {"pair"} and out["pair"].item() > 0
    out["pair"].backward()
    assert model.linear_head().weight.grad is None
    assert base.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert base.embeddings.word_embeddings.weight.grad.abs().sum() > 0
