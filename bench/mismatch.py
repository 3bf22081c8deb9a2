"""How far the sampler's log-probs are from the trainer's for the same weights: the figures
grpo.py logs every step (rollout_logprob_diff_mean / _p99 / _max, rollout_kl_k1 / _k3), measured
here so the README can say what a healthy run shows.

    python bench/mismatch.py

A random Qwen2-shaped model at Qwen2.5's 151,936-token vocabulary samples 16 prompts x 4 traces
of 64 tokens at T = 1 with rollout.generate (the paged KV cache, one token a step), then the
trainer's forward pass (packed rows, the fused log-prob) scores the same tokens, with the
weights in fp32 and then in bf16 (what a GPU run computes in; on the CPU, the same kernels).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from distributed import init_weights  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from objective import logprob_mismatch, mismatch_metrics  # noqa: E402
from passes import forward_logprobs, pack_rows, traces  # noqa: E402
from scheduler import as_prompts  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402

SHAPE = dict(vocab_size=151936, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def measure(dtype) -> dict:
    model = Transformer(ModelConfig(**SHAPE))
    init_weights(model, seed=0)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (48,), generator=g).tolist() for _ in range(16)]
    params = SamplingParams(temperature=1.0, max_new_tokens=64, n=4, seed=1)
    completions = generate(model, prompts, params, max_batch_size=64)
    rows = pack_rows(traces(as_prompts(prompts), completions, torch.zeros(len(completions))), 4096)
    sums = None
    with torch.no_grad():
        for row in rows:
            trainer, _ = forward_logprobs(model, row, 1.0)
            part = logprob_mismatch(trainer, row.sampler_logprobs, row.mask)
            sums = part if sums is None else {k: torch.maximum(sums[k], v) if k == "max" else sums[k] + v
                                              for k, v in part.items()}
    return mismatch_metrics(sums)


def main():
    print(f"vocabulary {SHAPE['vocab_size']:,}, 16 prompts x 4 traces x 64 tokens, T = 1")
    names = ["rollout_logprob_diff_mean", "rollout_logprob_diff_p99", "rollout_logprob_diff_max", "rollout_kl_k1",
             "rollout_kl_k3"]
    print(f"{'weights':<8}" + "".join(f"{n.removeprefix('rollout_'):>20}" for n in names))
    for dtype in (torch.float32, torch.bfloat16):
        m = measure(dtype)
        print(f"{str(dtype).removeprefix('torch.'):<8}" + "".join(f"{m[n]:>20.3g}" for n in names), flush=True)


if __name__ == "__main__":
    main()
