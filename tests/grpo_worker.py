"""Runs grpo_step under torchrun or plain python for tests/test_grpo_run.py; not a test itself.

    python tests/grpo_worker.py MODEL_DIR OUT.json STEPS LR [CONFIG_JSON]

CONFIG_JSON overrides GRPOConfig fields (filter_equal_groups, oversample, ...).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenization  # noqa: E402
from data import step_prompts  # noqa: E402
import distributed as D  # noqa: E402
import lora  # noqa: E402
from grpo import GRPOConfig, Policy, Prompts, grpo_step  # noqa: E402


def even_first_token(completions, texts, records):
    """A reward a tiny random model can learn in a few steps: +1 if the first sampled token id
    is even, else -1."""
    return torch.tensor([1.0 if c.token_ids[0] % 2 == 0 else -1.0 for c in completions])


def run(model_dir, out, steps, lr, overrides=None):
    cfg = GRPOConfig(model=model_dir, lr=lr, rollout_batch_size=8, mini_batch_size=4, n_samples=4,
                     max_response_len=6, micro_batch_tokens=40, kl_coef=0.01, bf16=False,
                     activation_checkpointing=False, rollout_slots=32, entropy_coef=0.001)
    cfg = replace(cfg, **json.loads(overrides or "{}"))
    ctx = D.init(tp=cfg.rollout_tp)
    model = D.load_model(model_dir, ctx, adapters=lora.of(cfg))  # with --lora_rank: the reference is the base
    policy = Policy(model, D.adamw(model, ctx, lr=cfg.lr, weight_decay=0.0), tokenization.load_tokenizer(model_dir),
                    None if cfg.lora_rank else D.load_model(model_dir, ctx, frozen=True))
    gen = torch.Generator().manual_seed(0)
    # Short prompts where rank 0 of two samples, long ones where rank 1 does (the batch positions
    # 0, 1, 4, 5 are rank 0's, in the order the steps draw the records): the ranks pack different
    # numbers of rows and must still run the same number of FSDP forwards.
    n = 2 * cfg.rollout_batch_size
    place = {record: q for q, record in enumerate(step_prompts(n, 0, cfg) + step_prompts(n, 1, cfg))}
    ids = [torch.randint(3, 300, (3 if place[i] % 4 < 2 else 20,), generator=gen).tolist() for i in range(n)]
    prompts = Prompts([{"label": "model_a"}] * n, ids)
    history = []
    for step in range(steps):
        history.append(grpo_step(policy, prompts, step, cfg, ctx, score=even_first_token).metrics)
    checksum = float(sum(p.double().sum() for p in D.full_state_dict(model).values()))
    if D.is_main():
        Path(out).write_text(json.dumps({"history": history, "checksum": checksum}))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), *sys.argv[5:6])
    D.shutdown()  # after run(): what it built on the process group is gone
