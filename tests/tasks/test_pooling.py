"""Text pooling that matches the checkpoint: pooling formulas, the sentence-transformers declaration,
and the pooled classifier's folder (AutoModel + head.safetensors + sentence-transformers files)."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from pretune import heads
from pretune.backbones.transformers import (HF, HFClassifier, PooledClassifier, TransformerConfig, choose_pooling, declared_pooling,
                                            pool)
from pretune.errors import RecipeError

WORDS = "the a cat dog bird fish runs sleeps eats sings blue red green small big".split()


def hidden_and_mask():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # full, right-padded, left-padded
    return hidden, mask


def test_pooling_equals_hand_computations_with_padding():
    hidden, mask = hidden_and_mask()
    real = [[0, 1, 2, 3, 4], [0, 1, 2], [2, 3, 4]]
    for row, positions in enumerate(real):
        h = hidden[row, positions]
        torch.testing.assert_close(pool(hidden, mask, "mean")[row], h.mean(0))
        torch.testing.assert_close(pool(hidden, mask, "max")[row], h.max(0).values)
        torch.testing.assert_close(pool(hidden, mask, "cls")[row], h[0])  # the first real token
        torch.testing.assert_close(pool(hidden, mask, "last")[row], h[-1])  # the last real token


def test_pooling_agrees_with_sentence_transformers():
    pytest.importorskip("sentence_transformers")
    with warnings.catch_warnings():  # the import path every version has (newer ones call it deprecated)
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.models import Pooling
    hidden, mask = hidden_and_mask()
    for ours, theirs in (("cls", "cls"), ("mean", "mean"), ("max", "max"), ("last", "lasttoken")):
        module = Pooling(4, pooling_mode=theirs)
        expected = module({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
        torch.testing.assert_close(pool(hidden, mask, ours), expected, msg=ours)


def st_folder(path, config, modules=None):
    path.mkdir(parents=True, exist_ok=True)
    modules = modules or [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                          {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return path


def test_the_pooling_a_sentence_transformers_folder_declares(tmp_path, capsys):
    legacy = {"word_embedding_dimension": 8, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_max_tokens": True, "pooling_mode_mean_sqrt_len_tokens": False}
    assert declared_pooling(st_folder(tmp_path / "legacy", legacy)) == "max"
    assert declared_pooling(st_folder(tmp_path / "new", {"embedding_dimension": 8, "pooling_mode": "lasttoken"})) == "last"
    assert declared_pooling(st_folder(tmp_path / "cls", {"pooling_mode": ["cls"]})) == "cls"
    assert declared_pooling(tmp_path / "nothing") is None
    assert declared_pooling(st_folder(tmp_path / "both", {"pooling_mode": ["mean", "max"]})) is None  # concatenated: not computed
    assert "mean+max" in capsys.readouterr().err
    mean = st_folder(tmp_path / "mean", {"pooling_mode_mean_tokens": True})
    assert choose_pooling(mean, "auto", decoder=False, linear=False)[0] == "mean"
    assert choose_pooling(tmp_path / "nothing", "auto", decoder=False, linear=False)[0] is None  # BERT's own pooled [CLS] head
    assert choose_pooling(tmp_path / "nothing", "auto", decoder=False, linear=True)[0] == "cls"  # a probe: one linear layer
    assert choose_pooling(tmp_path / "nothing", "auto", decoder=True, linear=True)[0] == "last"
    assert choose_pooling(tmp_path / "nothing", "last", decoder=True, linear=False)[0] is None  # a decoder's own head reads it
    assert choose_pooling(mean, "max", decoder=False, linear=False)[0] == "max"


def tiny_st_folder(path, pooling="mean", decoder=False):
    """A tiny sentence-transformers folder: random BERT (or GPT-2), word-level tokenizer, modules.json + 1_Pooling."""
    torch.manual_seed(0)
    if decoder:
        model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    else:
        model = transformers.BertModel(transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                               intermediate_size=32, max_position_embeddings=32))
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                         sep_token="[SEP]").save_pretrained(path)
    return st_folder(path, {"word_embedding_dimension": 16, f"pooling_mode_{'lasttoken' if pooling == 'last' else pooling + '_tokens'}": True})


def build(folder, kind="single", labels=("a", "b", "c"), **options):
    head = heads.get(kind)
    data = SimpleNamespace(tokenizer=transformers.AutoTokenizer.from_pretrained(folder), max_length=16)
    return HF(TransformerConfig(name="hf", path=str(folder))).classifier(head, list(labels), data, **options), data


def batch(tokenizer):
    encoded = tokenizer(["cat dog runs", "the small blue bird sings", "fish"], padding=True, return_tensors="pt")
    return {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}


def test_a_sentence_transformers_folder_gets_its_own_pooling_and_round_trips(tmp_path):
    folder = tiny_st_folder(tmp_path / "st", "mean")
    classifier, data = build(folder)
    assert isinstance(classifier, PooledClassifier) and classifier.pooling == "mean"
    assert classifier.new_parameters == {"model.classifier.weight", "model.classifier.bias"}
    assert classifier.linear_head() is classifier.model.classifier
    torch.nn.init.normal_(classifier.model.classifier.weight)  # a head that is not the initial one
    classifier.eval()
    inputs = batch(data.tokenizer)
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(folder)(**inputs).last_hidden_state
        torch.testing.assert_close(classifier.encode(inputs), pool(hidden, inputs["attention_mask"], "mean"))
        expected = classifier(inputs)
    saved = tmp_path / "model"
    saved.mkdir()
    HF(TransformerConfig(name="hf", path=str(folder))).save(classifier, saved, data)
    meta = {**json.loads((saved / "pretune.json").read_text()), "kind": "single", "label_names": ["a", "b", "c"]}
    assert meta["pooling"] == "mean" and (saved / "head.safetensors").is_file()
    loaded, _ = HF.load_classifier(saved, meta, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), expected)
        # AutoModel loads the base as it trained, and the folder declares the pooling the head read
        base = transformers.AutoModel.from_pretrained(saved)(**inputs).last_hidden_state
        torch.testing.assert_close(pool(base, inputs["attention_mask"], "mean"), classifier.encode(inputs))
    assert declared_pooling(saved) == "mean"
    assert json.loads((saved / "sentence_bert_config.json").read_text())["max_seq_length"] == 16
    (saved / "pretune.json").write_text(json.dumps(meta))
    again, _ = build(saved)  # the same kind and labels: the saved head is the starting head (it still trains)
    torch.testing.assert_close(again.model.classifier.weight, classifier.model.classifier.weight)
    other, _ = build(saved, labels=("x", "y"))
    assert other.model.classifier.weight.shape[0] == 2


def test_sentence_transformers_reads_the_saved_folder_as_the_head_does(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    folder = tiny_st_folder(tmp_path / "st", "max")
    classifier, data = build(folder)
    saved = tmp_path / "model"
    saved.mkdir()
    HF(TransformerConfig(name="hf", path=str(folder))).save(classifier.eval(), saved, data)
    texts = ["cat dog runs", "the small blue bird sings"]
    encoded = data.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = classifier.encode({k: encoded[k] for k in ("input_ids", "attention_mask")})
    theirs = st.SentenceTransformer(str(saved), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours)


def test_the_pooling_override_and_what_stays_on_the_architectures_head(tmp_path):
    folder = tiny_st_folder(tmp_path / "st", "mean")
    assert build(folder, pooling="cls")[0].pooling == "cls"
    assert build(folder, "tags", labels=("O", "B-X"))[0].__class__ is HFClassifier  # tagging reads every token
    decoder = tiny_st_folder(tmp_path / "gpt2", "last", decoder=True)
    classifier, data = build(decoder, "regression", labels=())
    assert isinstance(classifier, PooledClassifier) and classifier.pooling == "last"
    assert isinstance(build(decoder, pooling="last")[0], HFClassifier)  # last token of a decoder: its own head
    with torch.no_grad():
        assert classifier(batch(data.tokenizer)).shape == (3, 1)


def test_lora_on_a_pooled_classifier_trains_adapters_and_merges_on_export(tmp_path):
    from pretune import strategies

    classifier, data = build(tiny_st_folder(tmp_path / "st", "mean"))
    strategy = strategies.parse("lora:r=2")
    strategies.prepare(strategy, classifier)
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trainable - classifier.new_parameters and all(".lora_" in n for n in trainable - classifier.new_parameters)
    scales = strategies.lr_scales(strategy, classifier, head_scale=3.0)
    assert {scales[n] for n in trainable - classifier.new_parameters} == {20.0}  # adapters: 20x trainer.lr
    assert {scales[n] for n in classifier.new_parameters} == {3.0}  # the head: trainer.head_lr
    for name, param in classifier.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # adapters that change the function
    classifier.eval()
    inputs = batch(data.tokenizer)
    with torch.no_grad():
        merged = classifier.exportable()
        torch.testing.assert_close(merged.classifier(pool(merged.base_model(**inputs).last_hidden_state, inputs["attention_mask"], "mean")),
                                   classifier(inputs), rtol=1e-4, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_pooling_applies_to_text_sequence_heads_only(tmp_path):
    from pretune.recipe import load_recipe
    from pretune.run import assemble

    with pytest.raises(RecipeError, match="task.pooling"):
        assemble(load_recipe("recipes/image-classify.yaml", ["task.pooling=mean", "data.size=8", "data.max_examples=40"]))
