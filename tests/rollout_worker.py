"""Runs under torchrun for tests/test_gpu_paths.py; not a test itself.

Inside distributed.full_weights the rollout decodes through a module with none of FSDP2's hooks
(they would break a CUDA-graph capture), sharing the gathered tensors, and samples what the same
weights sample unsharded.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed as D  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def run():
    ctx = D.init()
    sharded = D.load_model(None, ctx, config=CONFIG, seed=3)
    plain_ref = Transformer(CONFIG)
    D.init_weights(plain_ref, seed=3)  # the same weights, never sharded
    prompts = [[5, 6, 7], [8, 9], [10]]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=1)
    with D.full_weights(sharded) as plain:
        assert plain is not sharded and not isinstance(plain, FSDPModule)
        hooked = [name for name, m in plain.named_modules()
                  if m._forward_pre_hooks or m._forward_hooks or isinstance(m, FSDPModule)]
        assert not hooked, f"modules with hooks: {hooked}"
        gathered = dict(sharded.named_parameters())
        for name, p in plain.named_parameters():
            assert p.data_ptr() == gathered[name].data_ptr(), f"{name} is a copy, not the gathered tensor"
        assert plain.lm_head.weight is plain.embed_tokens.weight
        got = generate(plain, prompts, params)
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in sharded.parameters()), \
        "shards are back after full_weights"
    want = generate(plain_ref, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    print("ok", flush=True)


if __name__ == "__main__":
    run()
    D.shutdown()  # after run(): what it built on the process group is gone
