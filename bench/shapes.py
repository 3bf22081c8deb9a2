"""Qwen2.5's shapes (the Instruct models' config.json, the fields the model reads), for the
benchmarks, the GPU check and the memory plan's tables."""

QWEN25 = {"0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
          "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
          "3B": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                     intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
          "7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
          "14B": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                      intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
          "32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                      intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False)}


def config_json(size) -> dict:
    """The config.json of Qwen2.5 of `size` (a model directory that holds it alone is what the
    memory plan reads)."""
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=32768, **QWEN25[size])
