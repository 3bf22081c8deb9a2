"""Tensor-parallel decoding: the rollout and eval.py split every matrix over the ranks of a
tensor-parallel (TP) group, so that a 14B or 32B judge's weights and KV cache fit beside the
trainer's shards.

    ctx = distributed.init(tp=2)                               # a (dp, tp) mesh from the torchrun environment
    decoder = tp.weights(model, ctx.tp_mesh, dtype, device)   # from the FSDP2 shards, 1/tp each
    completions, stats = tp.generate_in_group(decoder, prompts, params, ctx)  # [Prompt]: the group's together
    decoder = tp.load(path, ctx.tp_mesh, dtype, device)       # eval.py: straight from safetensors

The layout is Megatron's, applied with torch.distributed.tensor.parallel: q, k, v, gate and up
are split by output rows (ColwiseParallel), o and down by input columns (RowwiseParallel), so each
rank holds heads / tp query heads and KV heads / tp KV heads, and a block costs two all-reduces;
the embedding is split by vocabulary rows and the LM head by its output rows, gathered into full
logits, so every rank of a group samples the same token from the same numbers. A TP rank's model
holds the config of its shard (`decoder.config`: heads and intermediate size divided by tp), which
is what its KV cache and the memory plan's page count read.

The mesh is (data parallel, tensor parallel) with the TP ranks adjacent (one node's NVLink); the
trainer's FSDP2 shards stay on the flat world mesh, and the rollout copies them into the TP layout
once per rollout, one FSDP2 unit at a time: no rank ever holds more than one block's full weights
beside its 1/tp of the model.
"""

import dataclasses
import zlib

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import distributed
import lora
import rollout
import kvcache
from checkpoint import iter_checkpoint, load_config, shapes
from model import ModelConfig, Transformer, on_meta


def check_divisible(config: ModelConfig, tp: int):
    """Heads, KV heads and the MLP's width split evenly (the vocabulary may not: DTensor gives the
    last rank fewer rows)."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"tensor parallelism of {tp} needs {name} ({getattr(config, name)}) to divide "
                             f"by {tp}; pick a tp that divides it")


def shard_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config of one TP rank's shard: what its KV cache holds (vocab_size stays whole: the
    logits are gathered)."""
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp,
                               num_key_value_heads=config.num_key_value_heads // tp,
                               intermediate_size=config.intermediate_size // tp, head_dim=config.head_dim)


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Split a (meta-device) model over a 1-D TP mesh in place; see the module docstring."""
    tp = mesh.size()
    config = model.config
    check_divisible(config, tp)
    plan = {"embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(config.num_hidden_layers):
        plan.update({f"layers.{i}.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")})
        plan.update({f"layers.{i}.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
        plan.update({f"layers.{i}.self_attn.o_proj": RowwiseParallel(), f"layers.{i}.mlp.down_proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    model.tie()  # both are split by vocabulary rows (Shard(0)): one tensor again
    for block in model.layers:
        block.self_attn.n_heads //= tp
        block.self_attn.n_kv_heads //= tp
    model.config = shard_config(config, tp)
    return model


def build(config: ModelConfig, mesh: DeviceMesh, dtype, device) -> Transformer:
    """An empty TP model: built on the meta device, split, then given storage for its shards only."""
    model = parallelize(on_meta(config, dtype), mesh)
    return model.materialize(device).eval().requires_grad_(False)


def copy_shard(dst: torch.Tensor, full):
    """Copy this rank's part of `full` (a whole tensor, or a safetensors slice, which then reads only
    that part from disk) into a TP parameter: a DTensor split on one dimension, or a replicated one."""
    local = dst.to_local() if isinstance(dst, DTensor) else dst
    index = [slice(None)] * local.dim()
    if isinstance(dst, DTensor) and dst.placements[0].is_shard():
        d = dst.placements[0].dim
        start = dst.device_mesh.get_local_rank() * -(-dst.shape[d] // dst.device_mesh.size())  # torch.chunk's split
        index[d] = slice(start, start + local.shape[d])
    local.copy_(full[tuple(index)].to(local.dtype))


def load(path, mesh: DeviceMesh, dtype, device) -> Transformer:
    """A judge for decoding, each rank reading only its 1/tp of every matrix from safetensors."""
    config = load_config(path)
    model = build(config, mesh, dtype, device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in iter_checkpoint(path, shapes(model), config.tie_word_embeddings):
            copy_shard(params[name], weight)
    return model


def fill_from_fsdp(decoder: Transformer, model):
    """Copy the trainer's weights (FSDP2 shards) into the TP model: each FSDP2 unit (the root's
    embedding, norm and LM head, then each block) is gathered, copied from, and resharded in turn.
    LoRA's adapters are merged into their weights on the way (a matrix at a time)."""
    params = dict(decoder.named_parameters())
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    with torch.no_grad():
        for unit in units or [model]:
            owned = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDPModule)
                     for p in m.parameters()}
            if units:
                unit.unshard()
            prefix = next(name for name, m in model.named_modules() if m is unit)
            modules = dict(unit.named_modules())
            for name, p in unit.named_parameters():
                full_name = f"{prefix}.{name}" if prefix else name
                if full_name in params and id(p) not in owned:
                    owner = modules[name.rpartition(".")[0]]
                    merged = isinstance(owner, lora.LoRALinear) and name.endswith(".weight")
                    copy_shard(params[full_name], p.detach().float() + lora.delta(owner) if merged else p.detach())
            if units:
                unit.reshard()


def weights(model, mesh: DeviceMesh, dtype, device) -> Transformer:
    """The trainer's current weights (an FSDP2 model, or a plain one) as a TP model on `mesh`, in
    `dtype` (the rollout's: bf16 on GPUs): built empty, then filled from the shards."""
    decoder = build(model.config, mesh, dtype, device)
    decoder.attention = model.attention  # varlen where the trainer's takes it (on CUDA, and in the memory plan)
    fill_from_fsdp(decoder, model)
    return decoder


def gather_group(items: list, mesh: DeviceMesh) -> tuple[list, int]:
    """Every TP rank's items, in rank order, and where this rank's own start: a TP group decodes
    its ranks' prompts together, each rank then keeping its own completions."""
    every = distributed.all_gather_objects(list(items), mesh.get_group())
    mine = mesh.get_local_rank()
    return [x for part in every for x in part], sum(len(part) for part in every[:mine])


def check_same(token_lists, mesh: DeviceMesh):
    """Every rank of a TP group must have sampled the same tokens (they sample from the same gathered
    logits); a difference would silently train on mismatched traces, so it is an error."""
    h = zlib.crc32(repr(token_lists).encode())
    group = mesh.get_group()
    if distributed.max_over_ranks(h, group) != -distributed.max_over_ranks(-h, group):  # max == min: every rank's hash is the same
        raise RuntimeError("the ranks of a tensor-parallel group sampled different tokens from what should be "
                           "the same logits; this is a bug, please report it with the command")


def kv_budget(kv_budget_bytes, ctx):
    """The KV budget a rollout or a judge decodes with, decided here alone: kv_budget_bytes when
    given (--kv_budget_gib), else what this rank's device has free less 10% (kvcache.kv_budget; None:
    no limit, on the CPU); and within a TP group the smallest of its ranks' budgets. The ranks of a
    group must schedule alike, step for step, since every step's all-reduces pair them up: a rank
    with a larger pool would admit more and fall out of step."""
    budget = kv_budget_bytes or (kvcache.kv_budget(*ctx.memory()) if ctx.memory is not None else None)
    if ctx.tp_mesh is None or budget is None:
        return budget
    return -distributed.max_over_ranks(-budget, ctx.tp_mesh.get_group())


def generate_in_group(model, prompts, params, ctx, kv_budget_bytes=None, max_batch_size=64):
    """rollout.generate over the prompts (scheduler.Prompts: tokens, noise key, own limits) of
    every rank of this rank's TP group (without TP: its own), decoded together under one KV
    budget (kv_budget); returns this rank's completions (prompt_index local to `prompts` again)
    and the sampler's RolloutStats. The Prompts are gathered whole, so what is per prompt stays
    with its prompt. Under the memory plan (ctx.simulated) the sampler is walked, not run
    (rollout.Sampler.walk)."""
    mesh = ctx.tp_mesh
    every, start = gather_group(prompts, mesh) if mesh is not None else (list(prompts), 0)
    # the memory plan's placeholder prompts are all alike: walk them as prompts that share nothing, the worst case
    sampler = rollout.Sampler(model, every, params, max_batch_size, kv_budget_bytes=kv_budget(kv_budget_bytes, ctx),
                              share_prefixes=not ctx.simulated)
    completions, stats = sampler.walk() if ctx.simulated else sampler.run()
    if mesh is None:
        return completions, stats
    check_same([c.token_ids for c in completions], mesh)
    n = params.n
    mine = completions[start * n:(start + len(prompts)) * n]
    return [dataclasses.replace(c, prompt_index=c.prompt_index - start) for c in mine], stats
