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
import functools
import gc
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from checkpoint import (append_whole, disk_errors, iter_checkpoint, load_config, publish, save_pretrained, set_tensor, shapes,
                        tensor_bytes, write_atomic)
from model import ModelConfig, Transformer, varlen_attn


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device
    gpu: bool = False  # a CUDA run, or the memory plan's simulation of one (bf16 reference, varlen)
    mesh: DeviceMesh | None = None  # the ranks FSDP2 shards over; None: a world of one, unsharded
    decode_mesh: DeviceMesh | None = None  # (dp, tp) ranks of a tensor-parallel rollout (tp.py); None: no TP
    host: torch.device = torch.device("cpu")  # where offloaded state waits (the memory plan: meta, off its GPU)
    simulated: bool = False  # the memory plan's walk: fake tensors, so no weights to read and no tokens to sample
    memory: Callable[[], tuple[int, int]] | None = None  # (free, total) bytes of this rank's device; None: no limit

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """This rank's tensor-parallel group (a 1-D mesh), or None without TP."""
        return self.decode_mesh["tp"] if self.decode_mesh is not None else None

    @property
    def dp(self) -> tuple[int, int]:
        """(index, count) of this rank's data-parallel group: the ranks of a TP group decode the
        same prompts, so decoding work splits over the groups, not the ranks."""
        if self.decode_mesh is None:
            return self.rank, self.world_size
        dp = self.decode_mesh["dp"]
        return dp.get_local_rank(), dp.size()

    @property
    def distributed(self):
        """True when a process group exists (torchrun, or any CUDA run): the model is sharded."""
        return self.mesh is not None


def world_size() -> int:
    """Ranks torchrun started (1 for a plain `python x.py`), known before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(timeout_min: float = 60.0, tp: int = 1) -> Context:
    """Join the process group that torchrun describes; a plain `python x.py` is a world of one.
    tp > 1 also makes the (dp, tp) mesh of a tensor-parallel rollout (decode_mesh).

    timeout_min bounds how long a rank waits at a collective. NCCL's default (10 minutes) is
    shorter than the gap between ranks whose rollouts end minutes apart, so it is a setting.
    """
    world, rank = world_size(), int(os.environ.get("RANK", "0"))
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
    return Context(rank, world, device, gpu=device.type == "cuda", mesh=mesh,
                   decode_mesh=make_decode_mesh(device.type, world, tp),
                   memory=functools.partial(cuda_memory, device) if device.type == "cuda" else None)


def cuda_memory(device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, counting what the caching allocator holds unused as free."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def make_decode_mesh(device_type: str, world: int, tp: int) -> DeviceMesh | None:
    """The (dp, tp) mesh of a tensor-parallel rollout, TP ranks adjacent (within a node); None for
    tp 1. Every rank must call it (it makes the groups)."""
    if tp == 1:
        return None
    if world % tp:
        raise ValueError(f"tensor parallelism of {tp} needs the {world} ranks to divide by {tp}")
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def shutdown():
    """Leave the process group, every rank done first, and end the groups' C++ objects here, their
    worker threads joined, while the interpreter still runs. A group lives as long as anything
    holds it: the callers drop what they built on it (models, contexts: the trainers return none),
    and torch's DTensor caches keep device meshes, each holding its groups, for the process's
    life, so the meshes let go of theirs. A gloo worker thread left alive frees its last
    collective's work object whenever it gets to it; if that is during interpreter teardown, the
    tensors' Python objects can no longer be released (no GIL to take), and the process aborts,
    "terminate called without an active exception" (a 2-rank TP worker: 18 of 200 runs under
    load, before)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # FSDP2 modules hold reference cycles, and with them their meshes and groups
    for mesh in [o for o in gc.get_objects() if isinstance(o, DeviceMesh)]:
        mesh._pg_registry.clear()
    gc.collect()


def log(*args, **kw):
    """Print on rank 0 only."""
    if is_main():
        print(*args, **kw, flush=True)


def comm_device() -> torch.device:
    """The device the default process group's backend serves: NCCL only CUDA tensors, gloo CPU ones."""
    config = str(dist.get_backend_config())  # e.g. "cuda:nccl", "cpu:gloo,cuda:gloo", "cuda:fake"
    return torch.device("cpu") if "cpu:" in config or ":" not in config else torch.device("cuda")


def _all_reduce(x: torch.Tensor, op, group=None) -> torch.Tensor:
    """x reduced over ranks (of `group`, default all), as a new tensor on x's device; the
    collective itself runs on the backend's device, so callers may pass host tensors under NCCL."""
    if not dist.is_initialized():
        return x.clone()
    y = x.detach().to(comm_device(), copy=True)
    dist.all_reduce(y, op=op, group=group)
    return y.to(x.device)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.SUM, group)


def all_reduce_max(x: torch.Tensor, group=None) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.MAX, group)


def all_gather_objects(obj, group=None) -> list:
    """Every rank's picklable `obj` (of `group`, default all), in rank order. The memory plan's
    fake process group moves no bytes: there every rank holds what this one does (its ranks are
    alike by construction)."""
    if not dist.is_initialized():
        return [obj]
    if dist.get_backend(group) == "fake":
        return [obj] * dist.get_world_size(group)
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, obj, group=group)
    return every


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / (dist.get_world_size() if dist.is_initialized() else 1)


def pad_to_ranks(mine: list, empty: dict) -> list:
    """This rank's items, then copies of `empty` up to the most any rank holds: FSDP needs every
    rank to run the same number of forwards (each one's collectives), so the short ranks run
    empty rows that carry no loss."""
    return mine + [dict(empty) for _ in range(max_over_ranks(len(mine)) - len(mine))]


def max_over_ranks(n: int, group=None) -> int:
    """The largest of every rank's host integer (of `group`, default all). Host values are real
    even under the memory plan's fake tensors, so this runs outside them."""
    if not dist.is_initialized():
        return n
    with unset_fake_temporarily():
        return int(all_reduce_max(torch.tensor([n]), group))


def sum_over_ranks(n: int) -> int:
    """The sum of every rank's host integer (real even under the memory plan's fake tensors)."""
    if not dist.is_initialized():
        return n
    with unset_fake_temporarily():
        return int(all_reduce_sum(torch.tensor([n])))


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

    Gradients are summed over ranks, not averaged (FSDP's divide factor 1, as in torchtitan), so
    a loss is a plain sum over its global count (tokens, sequences) on every rank, whatever the
    number of ranks.
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
    if not frozen:
        for module in (*model.layers, model):
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # a plain SUM, which gloo has too;
                module.set_force_sum_reduction_for_comms(True)        # older torch: NCCL's PreMulSum(1)
    return model


def load_model(path, ctx: Context, bf16=False, activation_checkpointing=False,
               config: ModelConfig | None = None, seed=0, frozen=False):
    """Build on the meta device, shard, then fill each rank's rows straight from safetensors.

    With `path` None a fresh model is initialized from `config` (the demo), identically on every
    rank. No rank ever holds more than its shard plus the rows being read. A trained model's
    weights stay fp32 (the optimizer's master copy); bf16 compute comes from FSDP2's
    mixed-precision policy (every CUDA run is wrapped, one GPU included). A frozen model (the
    reference: eval mode, no gradients) is stored in bf16 on GPU runs, since it never trains.
    Under the memory plan (ctx.simulated) the weights stay unset: fake tensors hold no values.
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
    if ctx.simulated:
        pass
    elif path is None:
        init_weights(model, seed)
    else:
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
    for name, weight in iter_checkpoint(path, shapes(model), model.config.tie_word_embeddings):
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


def place(optimizer, where):
    """Move an optimizer's state (AdamW's moments, not its step counts) to device `where`: GRPO's
    --offload_states keeps it in host memory outside the updates."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if k != "step" and torch.is_tensor(v):
                state[k] = v.to(where)


def adamw(model, ctx: Context, **kw):
    """AdamW over the model's (sharded) parameters. GPU runs use the multi-tensor (foreach)
    update, torch's CUDA default, named here so that the memory plan's CPU tensors measure it too."""
    return torch.optim.AdamW(model.parameters(), foreach=True if ctx.gpu else None, **kw)


def clip_and_step(model, optimizer, max_norm, ctx: Context, loss=None) -> torch.Tensor:
    """Clip the global gradient norm, take the optimizer step, clear gradients; returns the norm
    before clipping as a 0-d tensor.

    The norm is summed from each rank's own shards and all-reduced once, the same number as
    torch's clip_grad_norm_ without its DTensor reductions, which the memory plan showed
    gathering whole gradients. A non-finite norm, or a non-finite `loss` (the step's, summed
    over ranks), raises FloatingPointError before the step, so the weights never take it (the
    one host sync of the step; the memory plan's fake tensors have no value to check).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squares = torch.stack(torch._foreach_norm(local, 2)).float().pow(2).sum()
    if any(isinstance(g, DTensor) for g in grads):
        squares = all_reduce_sum(squares)
    norm = squares.sqrt()
    checked = norm if loss is None else torch.stack([norm, loss.detach().float().reshape(())])
    if not ctx.simulated and not bool(torch.isfinite(checked).all()):
        optimizer.zero_grad(set_to_none=True)
        what = "gradient norm" if loss is None or torch.isfinite(loss) else "loss"
        raise FloatingPointError(f"non-finite {what} ({float(norm if what[0] == 'g' else loss):g})")
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
    check_finite(model, out_dir)
    sd = full_state_dict(model)
    if is_main():
        save_pretrained(model, out_dir, state_dict=sd, tokenizer=tokenizer)
    barrier()


# ---- the run directory ----

# Settings a resumed run may change: they do not change what a step computes, or (lr, the fix a
# non-finite stop advises) they change it on purpose, from the resumed step on. Each is logged.
SAFE_TO_CHANGE = {"resume", "max_steps", "save_every", "eval_every", "wandb_project", "dist_timeout_min",
                  "check_memory", "plan", "plan_world_size", "plan_gpu_gib", "keep_last", "export_every",
                  "log_traces_every", "out", "lr", "resume_data_changed", "plan_alternatives"}
# The data files whose contents a run is tied to, by digest: the same path holding other records
# is another run (resume_data_changed says the change is meant).
DATA_FIELDS = ("data", "eval_data")


def content_digest(path) -> str:
    """sha256 of a data file's bytes (a folder: of each file's name and bytes, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else [Path(path)]
    for file in files:
        h.update(str(file.relative_to(path) if os.path.isdir(path) else "").encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                h.update(block)
    return h.hexdigest()


def adopt_newest_checkpoint(run_dir):
    """A kill after a step's checkpoint was renamed into place and before `latest` moved leaves a
    complete step_N that latest does not name: point latest to it (rank 0)."""
    steps = sorted(d for d in os.listdir(run_dir) if re.fullmatch(r"step_\d{8}", d)
                   and os.path.isfile(os.path.join(run_dir, d, "trainer_state.json")))
    latest = latest_checkpoint(run_dir)
    if steps and (latest is None or os.path.basename(latest) < steps[-1]):
        write_atomic(os.path.join(run_dir, "latest"), steps[-1])
        log(f"resume: {steps[-1]} is complete but `latest` still named {latest and os.path.basename(latest)}; "
            f"it now names {steps[-1]}")


def start_run(run_dir, config: dict, resume: bool, preset: str = ""):
    """Before any model is loaded. A fresh run needs an unused run_dir; --resume needs a
    checkpoint there and the settings the run started with, but for SAFE_TO_CHANGE (logged).
    Writes the resolved config (and the preset it took, if any) to run_dir/config.json and
    removes what a killed save left (*.tmp, *.old)."""
    path = os.path.join(run_dir, "config.json")
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    current = {**config, "preset": preset}
    current |= {f"{k}_sha256": content_digest(config[k]) for k in DATA_FIELDS
                if config.get(k) and os.path.exists(config[k])}
    if not resume and (saved is not None or latest_checkpoint(run_dir)):
        raise ValueError(f"--out {run_dir} holds a run already: pass --resume to continue it, or another "
                         f"--out (or delete {run_dir})")
    if resume and latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume: {run_dir} has no checkpoint to continue from (no {run_dir}/latest); "
                         f"check --out, or start without --resume")
    if resume and saved is not None:
        changed = {k for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
        if current.get("resume_data_changed"):
            changed -= {f"{k}_sha256" for k in DATA_FIELDS}
            log("resume: --resume_data_changed: the data files' contents are not compared")
        if changed - SAFE_TO_CHANGE:
            diff = ", ".join(f"--{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(changed - SAFE_TO_CHANGE))
            hint = "; if the data was changed on purpose, add --resume_data_changed" if any(
                k.endswith("_sha256") for k in changed - SAFE_TO_CHANGE) else ""
            raise ValueError(f"--resume: {run_dir} was started with other settings ({diff}); resume with "
                             f"the same ones, or start a new --out{hint}")
        for k in sorted(changed):
            log(f"resume: --{k} {saved.get(k)!r} -> {current.get(k)!r}")
    barrier()  # every rank has read the directory before rank 0 writes to it
    if is_main():
        os.makedirs(run_dir, exist_ok=True)
        for name in os.listdir(run_dir):
            if name.endswith((".tmp", ".old")):
                stale = os.path.join(run_dir, name)
                shutil.rmtree(stale) if os.path.isdir(stale) else os.remove(stale)
        if resume:
            adopt_newest_checkpoint(run_dir)
        if saved != current:  # a fresh run, or a resume that changed safe settings: they are the run's now
            write_atomic(path, json.dumps(current, indent=2) + "\n")
    barrier()


# ---- resumable training state ----

def run_rules(cfg) -> list:
    """check_fields rules of the settings run_steps reads (and init's timeout), for both trainers."""
    return [
        ("max_steps", cfg.max_steps >= 0, "must be >= 0 (0: no limit)"),
        ("save_every", cfg.save_every >= 0, "must be >= 0 (0: at the end only)"),
        ("keep_last", cfg.keep_last >= 0, "must be >= 0 (0: keep every checkpoint)"),
        ("export_every", cfg.export_every >= 0, "must be >= 0 (0: at the end only)"),
        ("dist_timeout_min", cfg.dist_timeout_min > 0, "must be > 0"),
    ]


def run_steps(cfg, model, optimizer, tokenizer, total_steps, step_fn, export, show=("loss", "lr"),
              on_start=None) -> int:
    """The loop both trainers run, around their step_fn(step) -> metrics dict:
    - resume from out/latest with cfg.resume (the data order is a function of the step, so a
      resumed run sees what an uninterrupted one would), then on_start(start, metrics) if given;
    - steps start..stop, stop = total_steps or cfg.max_steps later; each step's metrics logged as
      step + 1; a non-finite loss or gradient (FloatingPointError) stops the run, naming the last
      good checkpoint;
    - a resumable checkpoint every cfg.save_every steps (keeping cfg.keep_last), an HF export to
      export/step_N every cfg.export_every, and one at `stop`; once all total_steps are done, the
      HF export to `export`; a run stopped early by --max_steps says how to go on.
    Returns stop."""
    start = 0
    if cfg.resume and (state := load_state(cfg.out, model, optimizer)) is not None:
        start = state["step"]
        log(f"resumed from step {start}")
    metrics = MetricsLogger(cfg.out, total_steps, asdict(cfg), cfg.wandb_project, start)
    if on_start is not None:
        on_start(start, metrics)
    stop = min(total_steps, start + cfg.max_steps) if cfg.max_steps else total_steps
    for step in range(start, stop):
        try:
            m = step_fn(step)
        except FloatingPointError as e:
            raise non_finite_exit(step + 1, e, cfg.out) from None
        metrics.log(step + 1, m, show=show)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < stop:
            save_state(cfg.out, step + 1, model, optimizer, {}, cfg.keep_last)
        if cfg.export_every and (step + 1) % cfg.export_every == 0 and step + 1 < total_steps:
            save_hf(model, tokenizer, os.path.join(export, f"step_{step + 1:08d}"))
    metrics.close()
    save_state(cfg.out, stop, model, optimizer, {}, cfg.keep_last)
    if stop < total_steps:
        log(f"stopped after step {stop} of {total_steps}; continue with --resume")
    else:
        save_hf(model, tokenizer, export)
        log(f"wrote {export}")
    return stop


def check_finite(model, what):
    """Refuse to write weights that hold NaN or inf (every rank checks its shards)."""
    bad = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        bad = torch.maximum(bad, (~torch.isfinite(local)).any().float())
    if all_reduce_max(bad):
        raise FloatingPointError(f"the weights hold non-finite values: {what} not written")


def non_finite_exit(step, error, run_dir) -> SystemExit:
    """How a trainer stops on a non-finite loss or gradient: the step was not taken, and the
    newest checkpoint is good (no checkpoint or export is ever written from non-finite weights)."""
    latest = latest_checkpoint(run_dir)
    return SystemExit(f"step {step}: {error}; stopped before the optimizer step. The last good checkpoint: "
                      f"{latest or 'none (none was saved yet)'}. Resume from it with a lower --lr, or check "
                      f"the data")


def latest_checkpoint(run_dir) -> str | None:
    pointer = os.path.join(run_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run_dir, f.read().strip())


def save_state(run_dir, step: int, model, optimizer, meta: dict, keep_last=0):
    """Sharded model + optimizer (torch.distributed.checkpoint), a JSON of the step, and the
    model's config.json (so export.py can make a HF directory of it), written under a temporary
    name and renamed; `latest` is switched last, so a kill at any moment leaves the previous
    checkpoint intact and pointed to. A step's checkpoint is written once: a run resumed after
    its last step (which then trains nothing) keeps it. keep_last > 0 then removes all but the
    newest keep_last step_N directories."""
    final = os.path.join(run_dir, f"step_{step:08d}")
    if os.path.isdir(final):
        return
    check_finite(model, final)
    tmp = final + ".tmp"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    with disk_errors(tmp, tensor_bytes(tensors_of((msd, osd)))):
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
        if is_main():
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, **meta}, f)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(model.config.to_hf(), f, indent=2)
            publish(tmp, final)
            write_atomic(os.path.join(run_dir, "latest"), os.path.basename(final))
    if is_main() and keep_last:
        old = sorted(d for d in os.listdir(run_dir) if re.fullmatch(r"step_\d{8}", d))[:-keep_last]
        for d in old:
            # renamed first, so a kill mid-delete leaves a *.old that the next start removes
            os.replace(os.path.join(run_dir, d), os.path.join(run_dir, d + ".old"))
            shutil.rmtree(os.path.join(run_dir, d + ".old"))
    barrier()


def tensors_of(tree) -> list:
    """The tensors in a nest of dicts, lists and tuples (a state dict: what a save writes; a DTensor
    counts its local shard)."""
    if isinstance(tree, torch.Tensor):
        return [tree.to_local() if isinstance(tree, DTensor) else tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for item in items for t in tensors_of(item)]


def load_state(run_dir, model, optimizer) -> dict | None:
    """Restore the checkpoint `latest` points to; None when the run has none yet."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def _logged_step(line) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def is_main():
    """Rank 0, or a world of one: the process that writes shared files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


# ---- metrics ----

class MetricsLogger:
    """Rank 0: a JSON line per step in run_dir/metrics.jsonl, a tqdm bar, and wandb if asked.
    A run resumed at step `start` first drops the lines past it (written after that checkpoint
    by the run that was killed), so every step has one line."""

    def __init__(self, run_dir, total_steps, config: dict, wandb_project: str = "", start=0):
        self.main = is_main()
        self.bar = self.path = self.wandb = None
        if not self.main:
            return
        from tqdm import tqdm
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines()
            # a torn last line (a kill mid-write) does not parse: it is past the checkpoint too
            kept = [line for line in lines if line.strip() and _logged_step(line) <= start]
            write_atomic(path, "".join(line + "\n" for line in kept))
        self.path = path
        self.bar = tqdm(total=total_steps, initial=start, file=sys.stderr, dynamic_ncols=True)
        if wandb_project:
            import wandb  # optional extra: pip install wandb
            self.wandb = wandb.init(project=wandb_project, config=config)
        self.t0 = time.time()

    def log(self, step: int, metrics: dict, show=("loss", "lr")):
        if not self.main:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        append_whole(self.path, json.dumps({"step": step, "time": time.time() - self.t0, **metrics}) + "\n")
        self.bar.n = step
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in show if k in metrics})
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.main:
            self.bar.close()
            if self.wandb:
                self.wandb.finish()
