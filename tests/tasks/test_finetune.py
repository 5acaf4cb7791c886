"""Fine-tuning pieces against their definitions: cached-feature heads, tag alignment, weighted loss, LLRD."""

import torch
import torch.nn.functional as F
import transformers

from pretune import strategies
from pretune.data.labelled import LabelledDataConfig
from pretune.tasks.features import head_logits, last_token
from pretune.tasks.finetune import FinetuneConfig, FinetuneTask, FineTuneModel


def tiny(cls, config_cls, **kw):
    torch.manual_seed(0)
    return cls(config_cls(vocab_size=100, num_labels=3, pad_token_id=0, **kw)).eval()


def test_cached_feature_head_equals_the_full_forward():
    ids = torch.randint(1, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    ids[1, 6:] = 0
    models = [
        tiny(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32, num_hidden_layers=1,
             num_attention_heads=2, intermediate_size=64),
        tiny(transformers.DistilBertForSequenceClassification, transformers.DistilBertConfig, dim=32, n_layers=1, n_heads=2, hidden_dim=64),
        tiny(transformers.RobertaForSequenceClassification, transformers.RobertaConfig, hidden_size=32, num_hidden_layers=1,
             num_attention_heads=2, intermediate_size=64),
        tiny(transformers.GPT2ForSequenceClassification, transformers.GPT2Config, n_embd=32, n_layer=1, n_head=2),
    ]
    for model in models:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            if "GPT2" in type(model).__name__:
                features = hidden[torch.arange(4), last_token(ids, 0)]
            else:
                features = hidden[:, 0]
            torch.testing.assert_close(head_logits(model, features), expected, msg=type(model).__name__)


def test_tags_go_to_the_first_piece_of_each_word():
    task = FinetuneTask(FinetuneConfig(name="tag"), LabelledDataConfig(train="x"))
    word_ids = [[None, 0, 0, 1, 2, 2, 2, None, None]]
    assert task.align_tags(word_ids, [[5, 6, 7]]).tolist() == [[-100, 5, -100, 6, 7, -100, -100, -100, -100]]
    task_all = FinetuneTask(FinetuneConfig(name="tag", label_all_subwords=True), LabelledDataConfig(train="x"))
    assert task_all.align_tags(word_ids, [[5, 6, 7]]).tolist() == [[-100, 5, 5, 6, 7, 7, 7, -100, -100]]


def test_class_weighted_loss_is_pytorchs_weighted_mean():
    model = tiny(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64)
    weights = torch.tensor([1.0, 3.0, 0.5])
    task = FinetuneTask(FinetuneConfig(), LabelledDataConfig(train="x"))
    task.class_weights = weights
    module = FineTuneModel(model, "single", set(), strategies.parse("full"), weights, 1.0)
    batch = {"input_ids": torch.randint(1, 100, (6, 7)), "labels": torch.tensor([0, 1, 2, 1, 0, 2])}
    out = module(batch)
    expected = F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"], weight=weights)
    torch.testing.assert_close(out["ce"] / task.units(batch)["ce"], expected)


def test_llrd_scales_decay_from_the_top():
    model = tiny(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32, num_hidden_layers=3,
                 num_attention_heads=2, intermediate_size=64)
    new = {"classifier.weight", "classifier.bias"}
    scales = strategies.lr_scales(strategies.parse("llrd:0.5"), model, new, head_lr_scale=2.0)
    assert scales["classifier.weight"] == 2.0
    assert scales["bert.encoder.layer.2.attention.self.query.weight"] == 0.5
    assert scales["bert.encoder.layer.0.attention.self.query.weight"] == 0.125
    assert scales["bert.embeddings.word_embeddings.weight"] == 0.0625


def test_strategy_strings():
    assert strategies.parse("freeze-bottom:4").layers == 4
    assert strategies.parse("llrd:0.8").decay == 0.8
    assert strategies.parse("lora:r=8,alpha=32").lora == {"r": 8, "alpha": 32, "dropout": 0.05}
    import pytest

    from pretune.errors import RecipeError

    for bad in ("freeze", "freeze-bottom:x", "llrd:2", "lora:q=1", "full:3"):
        with pytest.raises(RecipeError, match="strategy"):
            strategies.parse(bad)
