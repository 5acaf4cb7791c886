"""MLM against BERT's definition: selection rate, 80/10/10 split, loss only at selected positions."""

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

from pretune.tasks.mlm import IGNORE, MaskedLM, MLMConfig, mask_tokens

VOCAB, MASK = 1000, 4
SPECIAL = torch.zeros(VOCAB, dtype=torch.bool)
SPECIAL[:5] = True  # [PAD] [UNK] [CLS] [SEP] [MASK]


def corrupt_many(cfg, n=400, length=128, continuation=None):
    ids = torch.randint(5, VOCAB, (n, length))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    results = [mask_tokens(row, torch.Generator().manual_seed(i), cfg, mask_id=MASK, vocab_size=VOCAB,
                           special=SPECIAL, continuation=continuation) for i, row in enumerate(ids)]
    return ids, torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


def test_selection_rate_and_80_10_10_split():
    ids, corrupted, labels = corrupt_many(MLMConfig())
    selected = labels != IGNORE
    candidates = ~SPECIAL[ids]
    rate = selected.sum() / candidates.sum()
    assert abs(rate - 0.15) < 0.005  # 50,800 candidates: std of the rate is 0.0016
    masked = (corrupted == MASK) & selected
    kept = (corrupted == ids) & selected
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.015
    assert abs(kept.sum() / n - 0.1 - 0.1 / VOCAB) < 0.015  # a random replacement can draw the same id
    assert abs((selected & ~masked & ~kept).sum() / n - 0.1) < 0.015


def test_labels_only_at_selected_positions_and_specials_never_selected():
    ids, corrupted, labels = corrupt_many(MLMConfig(), n=50)
    selected = labels != IGNORE
    assert torch.equal(labels[selected], ids[selected])
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert torch.equal(corrupted[~selected], ids[~selected])  # nothing else is touched


def test_same_seed_same_masks_other_seed_other_masks():
    row = torch.randint(5, VOCAB, (64,))
    a = mask_tokens(row, torch.Generator().manual_seed(7), MLMConfig(), mask_id=MASK, vocab_size=VOCAB, special=SPECIAL)
    b = mask_tokens(row, torch.Generator().manual_seed(7), MLMConfig(), mask_id=MASK, vocab_size=VOCAB, special=SPECIAL)
    c = mask_tokens(row, torch.Generator().manual_seed(8), MLMConfig(), mask_id=MASK, vocab_size=VOCAB, special=SPECIAL)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_whole_word_masking_selects_all_pieces_of_a_word():
    continuation = torch.zeros(VOCAB, dtype=torch.bool)
    continuation[500:] = True  # ids >= 500 are '##' pieces
    ids, _, labels = corrupt_many(MLMConfig(whole_word=True), n=100, continuation=continuation)
    selected = labels != IGNORE
    for row, sel in zip(ids, selected):
        for t in range(1, len(row)):
            if continuation[row[t]] and not SPECIAL[row[t - 1]]:
                assert sel[t] == sel[t - 1]  # a piece goes with the token before it
    rate = selected.sum() / (~SPECIAL[ids]).sum()
    assert 0.10 < rate < 0.20


def tiny_bert(cls):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cls(config).eval()


def test_loss_equals_hugging_face_full_projection_loss():
    model = tiny_bert(BertForMaskedLM)
    ids, corrupted, labels = corrupt_many(MLMConfig(), n=4, length=32)
    out = MaskedLM(model, nsp=False)({"input_ids": corrupted, "labels": labels})
    reference = model(input_ids=corrupted, labels=labels).loss  # mean over selected positions
    n = (labels != IGNORE).sum()
    torch.testing.assert_close(out["mlm"] / n, reference, rtol=1e-5, atol=1e-6)


def test_nsp_loss_matches_bert_for_pretraining():
    model = tiny_bert(BertForPreTraining)
    ids, corrupted, labels = corrupt_many(MLMConfig(), n=6, length=32)
    nsp_labels = torch.tensor([0, 1, 0, 1, 1, 0])
    batch = {"input_ids": corrupted, "labels": labels, "next_sentence_label": nsp_labels,
             "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    out = MaskedLM(model, nsp=True)(batch)
    ref = model(input_ids=corrupted, token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"])
    expected_nsp = F.cross_entropy(ref.seq_relationship_logits, nsp_labels, reduction="sum")
    expected_mlm = F.cross_entropy(ref.prediction_logits[labels != IGNORE], labels[labels != IGNORE], reduction="sum")
    torch.testing.assert_close(out["nsp"], expected_nsp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mlm"], expected_mlm, rtol=1e-5, atol=1e-4)


def test_gradient_reaches_encoder_and_head_only_through_selected_positions():
    model = tiny_bert(BertForMaskedLM).train()
    ids, corrupted, labels = corrupt_many(MLMConfig(), n=2, length=16)
    out = MaskedLM(model, nsp=False)({"input_ids": corrupted, "labels": labels})
    out["mlm"].backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    decoder_bias_grad = model.cls.predictions.bias.grad  # d loss / d bias_v is nonzero for every v (softmax)
    assert decoder_bias_grad.abs().sum() > 0
