"""Item sequences through the language-model objectives: padding, masking, next-item queries and scores."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from pretune.data.interactions import CLS, MASK, PAD, SEP, SPECIALS, Event, item_tokenizer
from pretune.tasks.clm import CausalLM, CausalLMTask, CLMConfig
from pretune.tasks.mlm import MLMConfig, mask_tokens
from pretune.tasks.recommend import next_item_scores, query_batch, rank_queries

ITEMS = [f"i{n}" for n in range(20)]


def tokenizer(family):
    return item_tokenizer({"u": [Event(item, t) for t, item in enumerate(ITEMS)]}, family, 16)


def tiny_gpt2(vocab):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("training", [True, False])
def test_padded_item_rows_lose_nothing_to_padding(training):
    model = CausalLM(tiny_gpt2(len(tokenizer("decoder"))))
    model.train(training)
    short, long = [7, 9, 11], [5, 6, 7, 8, 9]
    batch = {"input_ids": torch.tensor([short + [PAD, PAD], long]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])}
    loss = model(batch)["clm"]
    alone = sum(model({"input_ids": torch.tensor([row])})["clm"] for row in (short, long))
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)
    task = CausalLMTask(CLMConfig())
    assert int(task.units(batch)["clm"]) == 2 + 4  # targets that are items, not padding


def test_masked_item_modelling_masks_only_items_and_always_with_mask():
    tok = tokenizer("encoder")
    special = torch.zeros(len(tok), dtype=torch.bool)
    special[tok.all_special_ids] = True
    cfg = MLMConfig(mask_prob=0.2, replace_mask=1.0, replace_random=0.0)
    row = torch.tensor([CLS, *range(len(SPECIALS), len(SPECIALS) + 12), SEP, PAD, PAD])
    selected = total = 0
    for seed in range(300):
        corrupted, labels = mask_tokens(row, torch.Generator().manual_seed(seed), cfg, mask_id=MASK, vocab_size=len(tok), special=special)
        chosen = labels != -100
        assert not chosen[[0, 13, 14, 15]].any()  # [CLS], [SEP] and padding are never selected
        assert (corrupted[chosen] == MASK).all() and (corrupted[~chosen] == row[~chosen]).all()
        selected, total = selected + int(chosen.sum()), total + 12
    assert selected / total == pytest.approx(0.2, abs=0.02)


def test_next_item_queries_read_at_the_appended_mask_or_the_last_item():
    ids, mask, position = query_batch([[5, 6, 7], [8]], "encoder", max_length=3)
    assert ids.tolist() == [[CLS, 6, 7, MASK, SEP], [CLS, 8, MASK, SEP, PAD]]  # the last max_length - 1 items, then [MASK]
    assert position.tolist() == [3, 2] and mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    ids, mask, position = query_batch([[5, 6, 7], [8]], "decoder", max_length=3)
    assert ids.tolist() == [[5, 6, 7], [8, PAD, PAD]] and position.tolist() == [2, 0]


def test_scores_exclude_specials_and_seen_items_and_padding_changes_nothing():
    model = tiny_gpt2(len(tokenizer("decoder"))).eval()
    head = model.get_output_embeddings()
    scores = next_item_scores(model.base_model, head, [[5, 6, 7], [8]], family="decoder", max_length=8)
    assert torch.isinf(scores[:, :len(SPECIALS)]).all()
    assert torch.isinf(scores[0, [5, 6, 7]]).all() and torch.isfinite(scores[0, 8:]).all()
    alone = next_item_scores(model.base_model, head, [[8]], family="decoder", max_length=8)
    torch.testing.assert_close(scores[1], alone[0], rtol=1e-5, atol=1e-5)  # batched with a longer history: same scores
    with torch.no_grad():
        direct = head(model.base_model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state[0, -1])
    torch.testing.assert_close(scores[0, 8:], direct[8:], rtol=1e-5, atol=1e-5)


def test_a_target_seen_before_is_still_ranked_and_an_unknown_target_is_a_miss():
    model = tiny_gpt2(len(tokenizer("decoder"))).eval()
    head = model.get_output_embeddings()
    scores = next_item_scores(model.base_model, head, [[5, 6]], family="decoder", max_length=8, exclude_seen=False)[0]
    best = int(scores[len(SPECIALS):].argmax()) + len(SPECIALS)
    history = [5, 6, best]  # the best item was consumed before: it stays a candidate when it is the target
    scores = next_item_scores(model.base_model, head, [history], family="decoder", max_length=8, exclude_seen=False)[0]
    target = int(scores[len(SPECIALS):].argmax()) + len(SPECIALS)
    found = rank_queries(model.base_model, head, [history], [target], family="decoder", max_length=8)
    assert found["hr@5"] == 1.0 and found["mrr"] == 1.0
    missed = rank_queries(model.base_model, head, [history], [1], family="decoder", max_length=8)  # [UNK]
    assert missed["hr@20"] == 0.0


def test_clm_loss_on_items_equals_the_formula():
    model = CausalLM(tiny_gpt2(len(tokenizer("decoder")))).eval()
    ids = torch.tensor([[5, 9, 6, PAD]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = model.model(input_ids=ids[:, :3], attention_mask=mask[:, :3]).logits[0]
    expected = F.cross_entropy(logits[:2], ids[0, 1:3], reduction="sum")
    torch.testing.assert_close(model({"input_ids": ids, "attention_mask": mask})["clm"], expected, rtol=1e-5, atol=1e-5)


def two_tower(temperature=0.1):
    from pretune.tasks.two_tower import TwoTower, TwoTowerConfig, TwoTowerTask

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer("encoder")), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return TwoTower(transformers.BertModel(config, add_pooling_layer=False), temperature), TwoTowerTask(TwoTowerConfig(temperature=temperature))


def test_two_tower_rows_are_cut_into_a_history_and_the_next_item_by_their_seed():
    _, task = two_tower()
    row = [CLS, 5, 6, 7, 8, SEP, PAD]
    rows = {"input_ids": [row, row], "attention_mask": [[1] * 6 + [0], [1] * 6 + [0]]}
    batch = task.collate(rows, [3, 3])
    again = task.collate(rows, [3, 3])
    assert torch.equal(batch["input_ids"], again["input_ids"]) and torch.equal(batch["positive"], again["positive"])
    for ids, mask, positive in zip(batch["input_ids"], batch["attention_mask"], batch["positive"]):
        cut = int(mask.sum()) - 1  # where [SEP] now stands: the positive item's old position
        assert ids[cut] == SEP and positive == row[cut] and ids[1:cut].tolist() == row[1:cut] and cut >= 2
        assert (ids[cut + 1:] == PAD).all() and (mask[cut + 1:] == 0).all()
    cuts = {int(task.collate(rows, [seed, seed])["attention_mask"][0].sum()) for seed in range(40)}
    assert cuts == {3, 4, 5}  # every position after the first item is drawn


def test_two_tower_loss_is_infonce_with_in_batch_negatives_and_trains_both_towers():
    model, task = two_tower(temperature=0.5)
    ids = torch.tensor([[CLS, 5, 6, SEP], [CLS, 7, SEP, PAD], [CLS, 9, 10, SEP]])
    mask = (ids != PAD).long()
    batch = {"input_ids": ids, "attention_mask": mask, "positive": torch.tensor([7, 8, 11])}
    loss = model(batch)["contrastive"]
    users = F.normalize(model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0], dim=1)
    items = F.normalize(model.model.get_input_embeddings().weight[[7, 8, 11]], dim=1)
    logits = users @ items.T / 0.5
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(3), reduction="sum"))
    loss.backward()
    embeddings = model.model.get_input_embeddings().weight.grad
    assert embeddings[[7, 8, 11]].abs().sum() > 0  # the item tower (positives and in-batch negatives)
    assert model.model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0  # the user tower
    assert embeddings[12:].abs().sum() == 0  # items in no row get no gradient
    scores = model.head(users)
    torch.testing.assert_close(scores[:, [7, 8, 11]], logits)  # retrieval scores are the plain similarities
    model.zero_grad()
    model.log_q[[7, 8, 11]] = torch.log(torch.tensor([0.5, 0.1, 0.4]))  # Yi et al. 2019: s_ij - log q_j in training only
    corrected = model(batch)["contrastive"]
    torch.testing.assert_close(corrected, F.cross_entropy(logits - model.log_q[[7, 8, 11]], torch.arange(3), reduction="sum"))
    torch.testing.assert_close(model.head(users)[:, [7, 8, 11]], logits)
