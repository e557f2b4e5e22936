"""Well-known model configs, as their publishers give them in ``config.json``.

Only the fields that decide shapes and training-time behaviour are kept
(sizes, activation, dropout, tied embeddings); the rest are transformers'
defaults for the architecture. ``loralab estimate --model NAME`` uses these
without any download. The loralab aliases ``minilm`` and ``smollm2-135m`` are
presets too, so estimating them needs no model load either.
"""

from __future__ import annotations

_BERT_BASE = {
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512, "type_vocab_size": 2, "vocab_size": 30522,
    "layer_norm_eps": 1e-12, "pad_token_id": 0,
}

_LLAMA_3 = {
    "hidden_act": "silu", "vocab_size": 128256, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "bos_token_id": 128000,
    "eos_token_id": 128001, "tie_word_embeddings": False,
}

# name -> (publisher's hub id, config.json fields)
PRESETS: dict[str, tuple[str, dict]] = {
    "gpt2": ("openai-community/gpt2", {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
        "n_positions": 1024, "n_ctx": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
        "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-05, "bos_token_id": 50256,
        "eos_token_id": 50256,
    }),
    "bert-base-uncased": ("google-bert/bert-base-uncased", {
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768,
        "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        **_BERT_BASE,
    }),
    "distilbert-base-uncased": ("distilbert/distilbert-base-uncased", {
        "model_type": "distilbert", "architectures": ["DistilBertForMaskedLM"], "dim": 768,
        "n_layers": 6, "n_heads": 12, "hidden_dim": 3072, "activation": "gelu",
        "dropout": 0.1, "attention_dropout": 0.1, "max_position_embeddings": 512,
        "vocab_size": 30522, "sinusoidal_pos_embds": False, "qa_dropout": 0.1,
        "seq_classif_dropout": 0.2, "pad_token_id": 0, "tie_weights_": True,
    }),
    "roberta-base": ("FacebookAI/roberta-base", {
        "model_type": "roberta", "architectures": ["RobertaForMaskedLM"], "hidden_size": 768,
        "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 514, "type_vocab_size": 1, "vocab_size": 50265,
        "layer_norm_eps": 1e-05, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    }),
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", {
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 384,
        "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
        **_BERT_BASE,
    }),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "vocab_size": 49152, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2,
    }),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "vocab_size": 151936, "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    }),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "vocab_size": 32000,
        "bos_token_id": 1, "eos_token_id": 2,
    }),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, **_LLAMA_3,
    }),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 32768,
        "sliding_window": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 1,
        "eos_token_id": 2,
    }),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, **_LLAMA_3,
    }),
}


def preset_names() -> list[str]:
    return list(PRESETS)
