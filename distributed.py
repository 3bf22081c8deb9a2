"""Training plumbing shared by sft.py and grpo.py: process group, FSDP2, checkpoints, logging.

    ctx = init()                                   # torchrun env -> NCCL (CUDA) or gloo (CPU)
    model = load_model(path, ctx, ...)             # meta build, fully_shard, each rank reads its rows
    with full_weights(model): generate(...)        # gather once for a whole rollout
    save_hf(model, tokenizer, out_dir)             # HF safetensors straight from the run
    save_state(dir, step, model, optimizer, meta)  # resumable (DCP), atomic rename
A single process without torchrun works too: no process group, no sharding.
"""

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from model import ModelConfig, Transformer, iter_checkpoint, load_config, save_pretrained


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        """True when a process group exists (torchrun, or any CUDA run): the model is sharded."""
        return dist.is_initialized()


def init() -> Context:
    """Join the process group that torchrun describes; a plain `python x.py` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        elif device.type == "cuda":
            # One GPU without torchrun: a world of one, so FSDP2's bf16 policy applies all the same.
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return Context(rank, world, device)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def log(*args, **kw):
    """Print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kw, flush=True)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / (dist.get_world_size() if dist.is_initialized() else 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---- FSDP2 ----

def shard(model: Transformer, ctx: Context, bf16: bool, activation_checkpointing: bool):
    """fully_shard each block, then the root (which holds embeddings, final norm and LM head).

    On CUDA with bf16, parameters are gathered in bf16 and gradients reduced in fp32; the
    sharded master weights and the optimizer state stay fp32.
    """
    model.gradient_checkpointing = activation_checkpointing
    if not ctx.distributed:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    # The root's parameters are used again right at the start of backward: keep them gathered.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def load_model(path, ctx: Context, bf16=False, activation_checkpointing=False,
               config: ModelConfig | None = None, seed=0):
    """Build on the meta device, shard, then fill each rank's rows straight from safetensors.

    With `path` None a fresh model is initialized from `config` (the demo), identically on every
    rank. No rank ever holds more than its shard plus the rows being read. Weights stay fp32
    (the optimizer's master copy); bf16 compute comes from FSDP2's mixed-precision policy (every
    CUDA run is wrapped, one GPU included).
    """
    config = config or load_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    shard(model, ctx, bf16, activation_checkpointing)
    model.to_empty(device=ctx.device)
    if config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        # to_empty() of plain tensors creates one new parameter per module; FSDP2 keeps the tie.
        model.lm_head.weight = model.embed_tokens.weight
    model.materialize_buffers(ctx.device)
    if path is None:
        init_weights(model, seed)
    else:
        load_shards(model, path)
    return model


def init_weights(model: Transformer, seed: int):
    """Normal(0, 0.02) weights, zero biases, unit norms: the usual init for a fresh decoder."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = torch.zeros(p.shape) if name.endswith("bias") else \
                torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02
            copy_rows_into(p, full)


def copy_rows_into(p: torch.Tensor, source):
    """Copy this rank's rows of `source` (a full tensor, or a safetensors slice, which then reads
    only those rows from disk) into a parameter that may be an FSDP2 shard (rows split by
    torch.chunk)."""
    local = p.to_local() if hasattr(p, "to_local") else p
    start = shard_start(p)
    local.copy_(source[start:start + local.shape[0]].to(local.dtype))


def shard_start(p: torch.Tensor) -> int:
    if not hasattr(p, "to_local"):
        return 0
    rank, world = dist.get_rank(), dist.get_world_size()
    return min(rank * math.ceil(p.shape[0] / world), p.shape[0])


def load_shards(model: Transformer, path):
    """Fill each parameter (an FSDP2 shard or a whole tensor) with its rows of the checkpoint."""
    params = dict(model.named_parameters())
    for name, weight in iter_checkpoint(path, set(params), model.config.tie_word_embeddings):
        with torch.no_grad():
            copy_rows_into(params[name], weight)


@contextlib.contextmanager
def full_weights(model):
    """Gather full parameters once for many forwards (a rollout), then shard them again.

    Without this, FSDP2 would all-gather every block on every decoded token.
    """
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


def clip_and_step(model, optimizer, max_norm) -> float:
    """Clip the global gradient norm, take the optimizer step, clear gradients; returns the
    norm before clipping. With FSDP2 the norm is a DTensor over all shards: made a plain number."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def full_state_dict(model) -> dict:
    """Full (unsharded) CPU tensors on every rank; only rank 0 needs to write them."""
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_hf(model, tokenizer, out_dir):
    """Export a Hugging Face directory (config.json + safetensors + tokenizer), atomically."""
    sd = full_state_dict(model)
    if _main():
        save_pretrained(model, out_dir, state_dict=sd, tokenizer=tokenizer)
    barrier()


# ---- resumable training state ----

def finish_run(run_dir, stop: int, total_steps: int, model, optimizer, tokenizer, export):
    """End of a training run: a resumable checkpoint at `stop`, then, once all total_steps are
    done, the Hugging Face export to `export`; a run stopped early by --max_steps says how to go on."""
    save_state(run_dir, stop, model, optimizer, {})
    if stop < total_steps:
        log(f"stopped after step {stop} of {total_steps}; continue with --resume")
        return
    save_hf(model, tokenizer, export)
    log(f"wrote {export}")


def save_state(run_dir, step: int, model, optimizer, meta: dict):
    """Sharded model + optimizer (torch.distributed.checkpoint) and a JSON of step and data
    position, written under a temporary name and renamed; `latest` is switched last, so a kill
    at any moment leaves the previous checkpoint intact and pointed to."""
    final = os.path.join(run_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if _main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    if _main():
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **meta}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(os.path.join(run_dir, "latest"), os.path.basename(final))
    barrier()


def load_state(run_dir, model, optimizer) -> dict | None:
    """Restore the checkpoint `latest` points to; None when the run has none yet."""
    pointer = os.path.join(run_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, f.read().strip())
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _main():
    return not dist.is_initialized() or dist.get_rank() == 0


# ---- metrics ----

class MetricsLogger:
    """Rank 0: a JSON line per step in run_dir/metrics.jsonl, a tqdm bar, and wandb if asked."""

    def __init__(self, run_dir, total_steps, config: dict, wandb_project: str = "", start=0):
        self.main = _main()
        self.bar = self.file = self.wandb = None
        if not self.main:
            return
        from tqdm import tqdm
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.bar = tqdm(total=total_steps, initial=start, file=sys.stderr, dynamic_ncols=True)
        if wandb_project:
            import wandb  # optional extra: pip install wandb
            self.wandb = wandb.init(project=wandb_project, config=config)
        self.t0 = time.time()

    def log(self, step: int, metrics: dict, show=("loss", "lr")):
        if not self.main:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": time.time() - self.t0, **metrics}) + "\n")
        self.file.flush()
        self.bar.n = step
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in show if k in metrics})
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.main:
            self.bar.close()
            self.file.close()
            if self.wandb:
                self.wandb.finish()
