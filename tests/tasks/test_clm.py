import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pretune.tasks.clm import CausalLM


def check_against_hf(model):
    ids = torch.randint(0, 300, (3, 20))
    out = CausalLM(model.eval())({"input_ids": ids})
    reference = model(input_ids=ids, labels=ids).loss  # HF shifts internally, mean over 3 * 19 tokens
    torch.testing.assert_close(out["clm"] / (3 * 19), reference, rtol=1e-5, atol=1e-5)


def test_gpt2_next_token_loss_matches_hugging_face():
    torch.manual_seed(0)
    check_against_hf(GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2)))


def test_llama_next_token_loss_matches_hugging_face():
    torch.manual_seed(0)
    check_against_hf(LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=64)))


def test_causal_no_information_from_the_future():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 300, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 300
    a = model.transformer(input_ids=ids).last_hidden_state[0, :8]
    b = model.transformer(input_ids=changed).last_hidden_state[0, :8]
    torch.testing.assert_close(a, b)
