"""Training plumbing shared by sft.py and grpo.py: process group, FSDP2, checkpoints, logging.

    ctx = init()                                   # torchrun env -> NCCL (CUDA) or gloo (CPU)
    model = load_model(path, ctx, ...)             # meta build, fully_shard, each rank reads its rows
    with full_weights(model) as plain: generate(plain, ...)  # gather once for a whole rollout
    save_hf(model, tokenizer, out_dir)             # HF safetensors straight from the run
    save_state(dir, step, model, optimizer, meta)  # resumable (DCP), atomic rename
A single process without torchrun works too: no process group, no sharding.
"""

import contextlib
import datetime
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
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from model import (ModelConfig, Transformer, iter_checkpoint, load_config, save_pretrained,
                   set_tensor, varlen_attn)


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device
    gpu: bool = False  # a CUDA run, or the memory plan's simulation of one (bf16 reference, varlen)
    mesh: DeviceMesh | None = None  # the ranks FSDP2 shards over; None: a world of one, unsharded

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        """True when a process group exists (torchrun, or any CUDA run): the model is sharded."""
        return self.mesh is not None


def init(timeout_min: float = 60.0) -> Context:
    """Join the process group that torchrun describes; a plain `python x.py` is a world of one.

    timeout_min bounds how long a rank waits at a collective. NCCL's default (10 minutes) is
    shorter than the gap between ranks whose rollouts end minutes apart, so it is a setting.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # Rollout KV caches and training activations take turns in the same memory: expandable
    # segments keep the caching allocator from fragmenting between them (must precede CUDA init).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(minutes=timeout_min)
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        elif device.type == "cuda":
            # One GPU without torchrun: a world of one, so FSDP2's bf16 policy applies all the same.
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    mesh = init_device_mesh(device.type, (world,)) if dist.is_initialized() else None
    return Context(rank, world, device, gpu=device.type == "cuda", mesh=mesh)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def log(*args, **kw):
    """Print on rank 0 only."""
    if _main():
        print(*args, **kw, flush=True)


def comm_device() -> torch.device:
    """The device the default process group's backend serves: NCCL only CUDA tensors, gloo CPU ones."""
    config = str(dist.get_backend_config())  # e.g. "cuda:nccl", "cpu:gloo,cuda:gloo", "cuda:fake"
    return torch.device("cpu") if "cpu:" in config or ":" not in config else torch.device("cuda")


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """x reduced over ranks, as a new tensor on x's device; the collective itself runs on the
    backend's device, so callers may pass host tensors under NCCL."""
    if not dist.is_initialized():
        return x.clone()
    y = x.detach().to(comm_device(), copy=True)
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.MAX)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / (dist.get_world_size() if dist.is_initialized() else 1)


def max_over_ranks(n: int) -> int:
    """The largest of every rank's host integer. Host values are real even under the memory
    plan's fake tensors, so this runs outside them."""
    if not dist.is_initialized():
        return n
    with unset_fake_temporarily():
        return int(all_reduce_max(torch.tensor([n])))


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---- FSDP2 ----

def shard(model: Transformer, ctx: Context, bf16: bool, activation_checkpointing: bool,
          frozen: bool = False):
    """fully_shard each block, then the root (which holds embeddings, final norm and LM head).

    With bf16, parameters are gathered in bf16 and gradients reduced in fp32; a trained model's
    sharded master weights and optimizer state stay fp32. A frozen model (the reference) only
    runs forward, so its root is resharded after forward too.
    """
    model.gradient_checkpointing = activation_checkpointing
    if not ctx.distributed:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=ctx.mesh, mp_policy=mp)
    # A trained root's parameters are used again right at the start of backward: keep them gathered.
    fully_shard(model, mesh=ctx.mesh, mp_policy=mp, reshard_after_forward=frozen)
    return model


def load_model(path, ctx: Context, bf16=False, activation_checkpointing=False,
               config: ModelConfig | None = None, seed=0, frozen=False, fill=True):
    """Build on the meta device, shard, then fill each rank's rows straight from safetensors.

    With `path` None a fresh model is initialized from `config` (the demo), identically on every
    rank. No rank ever holds more than its shard plus the rows being read. A trained model's
    weights stay fp32 (the optimizer's master copy); bf16 compute comes from FSDP2's
    mixed-precision policy (every CUDA run is wrapped, one GPU included). A frozen model (the
    reference: eval mode, no gradients) is stored in bf16 on GPU runs, since it never trains.
    fill=False leaves the weights unset: the memory plan's fake tensors have no values to read.
    """
    config = config or load_config(path)
    with unset_fake_temporarily(), torch.device("meta"):  # meta tensors: shapes only, fake or not
        model = Transformer(config)
        if frozen and bf16 and ctx.gpu:
            model.to(torch.bfloat16)
    if ctx.gpu and varlen_attn is not None:
        model.attention = "varlen"  # what "auto" picks on CUDA; the memory plan's fake CPU tensors too
    shard(model, ctx, bf16, activation_checkpointing, frozen)
    model.to_empty(device=ctx.device)
    if config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        # to_empty() of plain tensors creates one new parameter per module; FSDP2 keeps the tie.
        model.lm_head.weight = model.embed_tokens.weight
    model.materialize_buffers(ctx.device)
    if fill and path is None:
        init_weights(model, seed)
    elif fill:
        load_shards(model, path)
    if frozen:
        model.eval().requires_grad_(False)
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
    """Gather every FSDP2 shard once for many forwards (a rollout) and yield a plain module that
    shares the gathered tensors; shard again on exit.

    Without the gather, FSDP2 would all-gather every block on every decoded token. The yielded
    module has none of FSDP2's hooks, which fork side streams that nothing rejoins inside a
    CUDA-graph capture, so the rollout decodes through it with graphs on. A model that is not
    sharded is yielded as it is.
    """
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        yield model
        return
    for m in fsdp:
        m.unshard()  # sets the gathered (bf16 under the mixed-precision policy) tensors on the modules
    try:
        with unset_fake_temporarily(), torch.device("meta"):
            plain = Transformer(model.config)
        for name, p in model.named_parameters():
            set_tensor(plain, name, p.detach())
        plain.inv_freq = model.inv_freq
        plain.attention = model.attention
        yield plain
    finally:
        for m in fsdp:
            m.reshard()


def adamw(model, ctx: Context, **kw):
    """AdamW over the model's (sharded) parameters. GPU runs use the multi-tensor (foreach)
    update, torch's CUDA default, named here so that the memory plan's CPU tensors measure it too."""
    return torch.optim.AdamW(model.parameters(), foreach=True if ctx.gpu else None, **kw)


def clip_and_step(model, optimizer, max_norm) -> torch.Tensor:
    """Clip the global gradient norm, take the optimizer step, clear gradients; returns the norm
    before clipping as a 0-d tensor (read it when logging: no host sync here).

    The norm is summed from each rank's own shards and all-reduced once, the same number as
    torch's clip_grad_norm_ without its DTensor reductions, which the memory plan showed
    gathering whole gradients.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squares = torch.stack(torch._foreach_norm(local, 2)).float().pow(2).sum()
    if any(isinstance(g, DTensor) for g in grads):
        squares = all_reduce_sum(squares)
    norm = squares.sqrt()
    torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(local[0].dtype))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


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
