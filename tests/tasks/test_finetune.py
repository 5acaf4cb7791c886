"""Fine-tuning pieces against their definitions: cached-feature heads, tag alignment, weighted loss, LLRD."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from pretune import heads, strategies
from pretune.backbones.transformers import HFClassifier, align_tags
from pretune.errors import RecipeError
from pretune.tasks.finetune import Finetune, FinetuneConfig, FineTuneModel


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
    batch = {"input_ids": ids, "attention_mask": mask}
    for model in models:
        classifier = HFClassifier(model, set()).eval()
        assert classifier.supports_cache(heads.get("single"))
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(classifier.head_logits(classifier.encode(batch)), expected, msg=type(model).__name__)
            torch.testing.assert_close(classifier(batch), expected)


def test_tags_go_to_the_first_piece_of_each_word():
    word_ids = [[None, 0, 0, 1, 2, 2, 2, None, None]]
    names = ["O", "B-X", "I-X", "a", "b", "c", "d", "e"]
    assert align_tags(word_ids, [[5, 6, 7]], names, False).tolist() == [[-100, 5, -100, 6, 7, -100, -100, -100, -100]]
    assert align_tags(word_ids, [[5, 6, 7]], names, True).tolist() == [[-100, 5, 5, 6, 7, 7, 7, -100, -100]]
    assert align_tags([[None, 0, 0]], [[1]], names, True).tolist() == [[-100, 1, 2]]  # B-X's later pieces are I-X


def test_class_weighted_loss_is_pytorchs_weighted_mean():
    model = tiny(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64)
    weights = torch.tensor([1.0, 3.0, 0.5])
    task = Finetune(FinetuneConfig())
    task.class_weights = weights
    module = FineTuneModel(HFClassifier(model, set()), heads.get("single"), weights, frozen_backbone=False)
    batch = {"input_ids": torch.randint(1, 100, (6, 7)), "labels": torch.tensor([0, 1, 2, 1, 0, 2])}
    out = module(batch)
    expected = F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"], weight=weights)
    torch.testing.assert_close(out["ce"] / task.units(batch)["ce"], expected)


def test_llrd_scales_decay_from_the_top():
    model = tiny(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32, num_hidden_layers=3,
                 num_attention_heads=2, intermediate_size=64)
    classifier = HFClassifier(model, {"classifier.weight", "classifier.bias"})
    scales = strategies.lr_scales(strategies.parse("llrd:0.5"), classifier, head_scale=2.0)
    assert scales["model.classifier.weight"] == 2.0
    assert scales["model.bert.encoder.layer.2.attention.self.query.weight"] == 0.5
    assert scales["model.bert.encoder.layer.0.attention.self.query.weight"] == 0.125
    assert scales["model.bert.embeddings.word_embeddings.weight"] == 0.0625


def test_strategy_strings():
    assert strategies.parse("freeze-bottom:4").layers == 4
    assert strategies.parse("llrd:0.8").decay == 0.8
    lora = strategies.parse("lora:r=8,alpha=32")
    assert (lora.r, lora.alpha, lora.dropout, lora.backbone_lr_scale) == (8, 32, 0.0, 20.0)
    assert str(lora) == "lora:r=8,alpha=32,dropout=0" and str(strategies.parse("full")) == "full"
    assert strategies.parse("lora:lr_scale=4").backbone_lr_scale == 4 and strategies.parse("llrd:0.9").backbone_lr_scale == 1
    for bad in ("freeze", "freeze-bottom:x", "llrd:2", "lora:q=1", "full:3", "lora:lr_scale=0"):
        with pytest.raises(RecipeError, match="strategy"):
            strategies.parse(bad)


def test_strategy_is_a_typed_recipe_section_checked_before_the_run():
    from pretune.recipe import load_recipe

    assert load_recipe(None, ["strategy=llrd:0.5"]).strategy.decay == 0.5
    assert load_recipe(None, ["strategy=lora", "strategy.r=4"]).strategy.r == 4
    with pytest.raises(RecipeError, match="strategy"):
        load_recipe(None, ["strategy=freeze-bottom:x"])
    with pytest.raises(RecipeError, match="strategy"):
        load_recipe(None, ["strategy.name=nope"])


class Groups:
    """A stand-in classifier with ``n`` layer groups of one parameter each."""

    def __init__(self, n):
        self.layers = [torch.nn.Linear(1, 1) for _ in range(n)]
        self.new_parameters = set()

    def layer_groups(self):
        return [[layer] for layer in self.layers]

    def named_parameters(self):
        return [(f"layer{i}.{n}", p) for i, layer in enumerate(self.layers) for n, p in layer.named_parameters()]


@pytest.mark.parametrize("epochs, groups, unfrozen", [
    (3, 2, [0, 1, 2]),  # ULMFiT: one more group per epoch
    (5, 7, [0, 2, 4, 6, 7]),  # few epochs (MiniLM: embeddings + 6 layers, 5 epochs): several groups per epoch, all by the last
    (30, 4, [0] + [1] * 6 + [2] * 6 + [3] * 6 + [4] * 11),  # many epochs: 6 per stage, everything trains from epoch 19
    (1, 3, [0, 3]),  # one epoch (stretched by min_steps): the head, then everything
])
def test_gradual_unfreezing_is_paced_so_every_group_trains_by_the_last_epoch(epochs, groups, unfrozen):
    model = Groups(groups)
    strategy = strategies.parse("gradual-unfreeze")
    per_stage = strategies.stages(strategy, model, epochs)
    counts = [len(strategies.apply(strategy, model, epoch, per_stage)) for epoch in range(len(unfrozen))]
    assert counts == unfrozen
    assert strategies.stages(strategy, model, None) == 1.0 and strategies.stages(strategies.parse("full"), model, epochs) == 1.0


def test_finetune_passes_the_pacing_to_gradual_unfreezing():
    model = tiny(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32, num_hidden_layers=5,
                 num_attention_heads=2, intermediate_size=64)  # 6 groups: embeddings + 5 layers
    task = Finetune(FinetuneConfig(), strategy=strategies.parse("gradual-unfreeze"), epochs=4)
    module = FineTuneModel(HFClassifier(model, {"classifier.weight", "classifier.bias"}), heads.get("single"), None, False)
    assert task.on_epoch(module, 0).startswith("gradual-unfreeze trains the new task layers and no layer group")
    assert "layer groups 4-5 of 0-5" in task.on_epoch(module, 1)
    assert "all layer groups" in task.on_epoch(module, 3)


def test_lora_adapters_train_at_twenty_times_the_learning_rate_and_are_not_task_layers():
    model = tiny(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64)
    classifier = HFClassifier(model, {"classifier.weight", "classifier.bias"})
    strategy = strategies.parse("lora:r=2")
    strategies.prepare(strategy, classifier)
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    adapters = trainable - classifier.new_parameters
    assert adapters and all(".lora_" in n for n in adapters) and all("classifier" in n for n in classifier.new_parameters)
    assert not any(p.requires_grad for n, p in classifier.named_parameters() if "word_embeddings" in n)  # the base needs no gradient
    scales = strategies.lr_scales(strategy, classifier, head_scale=5.0)
    assert {scales[n] for n in adapters} == {20.0} and {scales[n] for n in classifier.new_parameters} == {5.0}
    assert {strategies.lr_scales(strategies.parse("lora:r=2,lr_scale=3"), classifier)[n] for n in adapters} == {3.0}
    dropouts = [m for n, m in classifier.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)  # no adapter dropout by default


def test_length_grouping_sizes_are_characters_capped_at_max_length_and_none_without_padding():
    import datasets
    from types import SimpleNamespace

    def two_characters_per_token(texts, is_split_into_words=False, add_special_tokens=True):
        joined = [" ".join(t) if is_split_into_words else t for t in texts]
        return {"input_ids": [[0] * ((len(t) + 1) // 2) for t in joined]}

    task = Finetune.__new__(Finetune)  # only lengths() is exercised: it reads task.data
    task.data = SimpleNamespace(tokenizer=two_characters_per_token, text="text", text_pair=None, max_length=100)
    rows = datasets.Dataset.from_dict({"text": ["ab", "a much longer one", ""], "other": ["x", "yy", "zzz"]})
    assert task.lengths(rows) == [2, 17, 0]
    task.data.text_pair = "other"
    assert task.lengths(rows) == [3, 19, 3]
    task.data.text_pair, task.data.max_length = None, 4  # 4 tokens hold about 8 characters (19 characters in 10 tokens here)
    assert task.lengths(rows) == [2, 8, 0]
    task.data.max_length = 100
    tagged = datasets.Dataset.from_dict({"text": [["John", "lives"], ["x"]]})
    assert task.lengths(tagged) == [11, 2]  # words and the spaces between them
    features = datasets.Dataset.from_dict({"text": ["a"], "features": [[0.0]]})
    assert task.lengths(features) is None  # cached features: nothing is padded
    task.data.tokenizer = None
    assert task.lengths(rows) is None  # images / vectors
