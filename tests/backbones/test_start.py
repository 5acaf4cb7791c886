"""Continuing a checkpoint: the missing head is the only new parameter, the encoder is unchanged at step 0,
and what the objective does not use (BERT's pooler, the sentence-transformers pooling) survives into the saved folder."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pretune.backbones.start import load_start, save_continued
from pretune.backbones.transformers import declared_pooling
from pretune.data.builtin import load_stdlib_docstrings
from pretune.data.tokenizer import train_tokenizer


def bare_encoder(path, seed=0):
    """A bare BertModel folder with a pooler, its WordPiece tokenizer and sentence-transformers files (mean pooling):
    the layout of all-MiniLM-L6-v2, 32 wide."""
    tokenizer = train_tokenizer(load_stdlib_docstrings().select(range(300)), "wordpiece", "encoder", 400)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    return path


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return bare_encoder(tmp_path_factory.mktemp("bare") / "encoder")


def test_the_mlm_head_is_the_only_new_parameter_and_the_encoder_is_unchanged(encoder_folder):
    model, start = load_start(transformers.AutoModelForMaskedLM, encoder_folder)
    assert start.new and all(name.startswith("cls.predictions.") for name in start.new)
    head = {n for n, _ in model.named_parameters() if n.startswith("cls.")}
    assert set(start.new) == head  # every head parameter, nothing else (the decoder weight is the word embeddings)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert "tied to the input embeddings" in start.describe(model)
    bare = transformers.AutoModel.from_pretrained(encoder_folder).eval()
    ids = torch.randint(5, 400, (2, 12))
    with torch.no_grad():
        expected = bare(input_ids=ids).last_hidden_state
        got = model.eval().bert(input_ids=ids).last_hidden_state
    assert torch.equal(got, expected)


def test_the_pooler_and_sentence_files_survive_into_the_saved_model(encoder_folder, tmp_path):
    model, start = load_start(transformers.AutoModelForMaskedLM, encoder_folder)
    original = load_file(str(encoder_folder / "model.safetensors"))
    assert set(start.kept) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_folder)
    save_continued(model, tokenizer, tmp_path, start)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(saved["bert.pooler.dense.weight"], original["pooler.dense.weight"])
    assert declared_pooling(tmp_path) == "mean"
    classifier, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}  # the pooler is not new downstream
    assert torch.equal(classifier.bert.pooler.dense.weight, original["pooler.dense.weight"])
    again, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]  # the head trained in adaptation is part of the folder


def test_a_checkpoint_with_its_head_has_nothing_new(encoder_folder, tmp_path):
    model, _ = load_start(transformers.AutoModelForMaskedLM, encoder_folder)
    model.save_pretrained(tmp_path)
    _, start = load_start(transformers.AutoModelForMaskedLM, tmp_path)
    assert start.new == [] and start.kept == {}
