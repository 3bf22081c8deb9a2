"""A LoRA policy's rollout: decoding with the adapters merged into the weights (what grpo.py does:
distributed.full_weights and tp.fill_from_fsdp add (alpha / r) B A to the gathered weights) vs
applying them unmerged (two thin matmuls more per projection and token), in the same run.

    python bench/lora_rollout.py            # CPU: the 50M-parameter shape in fp32
    python bench/lora_rollout.py --cuda     # CUDA: Qwen2.5-0.5B's shape in bf16 (a GPU machine)

Both decode the same prompts greedily through rollout.generate with the same random weights and
adapters (rank 64 on every projection), in turns, the best of 3 each; the merged time includes the
merge itself. Prints tokens per second of each, their ratio, and how many of the traces are token for token the same (greedy
argmax over logits that differ by rounding can flip a near-tie).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lora  # noqa: E402
from bench.rollout import SHAPES, timed  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402

RANK, PROMPT_LEN, NEW_TOKENS, REPEATS = 64, 64, 64, 3


def models(shape, device, dtype):
    """(the LoRA model, unmerged; a function that returns the merged plain model)."""
    config = ModelConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device(device):
        adapted = lora.add_adapters(Transformer(config), lora.LoRAConfig(RANK, 2.0 * RANK))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if lora.is_adapter(name):
                p.normal_(0, 0.02)  # B too: a trained adapter
    adapted.to(dtype)  # the base in the rollout's dtype (A and B too, as FSDP2's bf16 policy gathers them)

    def merged():
        plain = Transformer(config).to(device, dtype)
        plain.load_state_dict(lora.merged_state_dict(adapted.state_dict(), adapted))
        return plain
    return adapted.eval(), merged


def section(shape, device, dtype, batch):
    adapted, merge = models(shape, device, dtype)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, n=1)
    run = lambda model: generate(model, prompts, params, max_batch_size=batch, use_cuda_graph=device == "cuda")  # noqa: E731
    with torch.no_grad():
        t_merge, plain = timed(merge, device)
        run(adapted), run(plain)  # warm-up (and CUDA graph capture)
        t_unmerged = t_decode = float("inf")
        for _ in range(REPEATS):  # in turns, the best of each: a busy machine slows both alike
            t, unmerged = timed(lambda: run(adapted), device)
            t_unmerged = min(t_unmerged, t)
            t, merged = timed(lambda: run(plain), device)
            t_decode = min(t_decode, t)
    tokens = batch * NEW_TOKENS
    same = sum(a.token_ids == b.token_ids for a, b in zip(unmerged, merged))
    print(f"{shape} {dtype} on {device}, batch {batch}, {NEW_TOKENS} new tokens, LoRA rank {RANK} on every projection:")
    print(f"  unmerged: {tokens / t_unmerged:,.0f} tokens/s")
    print(f"  merged:   {tokens / (t_merge + t_decode):,.0f} tokens/s (the merge {t_merge:.2f} s of it)")
    print(f"  merged / unmerged: {t_unmerged / (t_merge + t_decode):.2f}x; the same traces: {same} of {batch}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.cuda:
        section("0.5B", "cuda", torch.bfloat16, 64)
    else:
        section("cpu-50M", "cpu", torch.float32, 16)


if __name__ == "__main__":
    main()
