"""Fixtures and helpers shared by the test modules (helpers: `from conftest import ...`)."""

import json
from pathlib import Path

import pytest
import torch

import demo
from checkpoint import save_pretrained
from distributed import init_weights
from model import ModelConfig, Transformer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (the shared benchmark data) is absent")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """(model directory, tokenizer) of a 2-layer Qwen2 over the demo tokenizer (400 traces' worth),
    with small normal weights: a near-uniform policy with room to learn."""
    path = tmp_path_factory.mktemp("policy")
    tokenizer = demo.build_demo_tokenizer(str(path), n=400)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    eos_token_id=tokenizer.eos_token_id))
    init_weights(model, seed=0)
    save_pretrained(model, path, tokenizer=tokenizer)
    return str(path), tokenizer


def loss_row(old, ref, advantages, mask, seq, sampler=None):
    """An objective.Row holding what policy_loss reads (old and reference log-probs, advantages,
    response mask, trace ids), the rest zeros."""
    from objective import Row
    zeros = torch.zeros(len(mask), dtype=torch.long)
    return Row(zeros, zeros, zeros, mask, advantages, seq, torch.zeros(len(mask)) if sampler is None else sampler,
               [len(mask)], sorted(set(seq.tolist())), int(mask.sum()), old_logprobs=old, ref_logprobs=ref)
