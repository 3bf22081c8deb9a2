"""The process group and FSDP2, shared by sft.py, grpo.py and eval.py.

    ctx = init()                                   # torchrun env -> NCCL (CUDA) or gloo (CPU)
    model = load_model(path, ctx, ...)             # meta build, fully_shard, each rank reads its rows
    with full_weights(model) as plain: generate(plain, ...)  # gather once for a whole rollout
    save_hf(model, tokenizer, out_dir)             # HF safetensors straight from the run
    shutdown()                                     # the groups and their threads end here
A single process without torchrun works too: no process group, no sharding. The run directory,
the step loop and resumable checkpoints are run.py's.
"""

import contextlib
import copy
import datetime
import functools
import gc
import sys
import traceback
import warnings
import weakref
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

import lora
from checkpoint import iter_checkpoint, load_config, save_pretrained, set_tensor, shapes
from kvcache import device_memory
from model import ModelConfig, Transformer, on_meta, varlen_attn


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
                   memory=functools.partial(device_memory, device) if device.type == "cuda" else None)


def make_decode_mesh(device_type: str, world: int, tp: int) -> DeviceMesh | None:
    """The (dp, tp) mesh of a tensor-parallel rollout, TP ranks adjacent (within a node); None for
    tp 1. Every rank must call it (it makes the groups)."""
    if tp == 1:
        return None
    if world % tp:
        raise ValueError(f"tensor parallelism of {tp} needs the {world} ranks to divide by {tp}")
    with unset_fake_temporarily():  # the memory plan's fake tensors: the mesh reads real rank ids
        return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


@contextlib.contextmanager
def running():
    """An entry point's body: the process groups end with it however it ends. On an error the
    frames of its traceback let go of their locals (models, contexts, which hold the groups) and
    no rank waits for the others at a barrier."""
    try:
        yield
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        shutdown(wait=False)
        raise
    shutdown()


def shutdown(wait=True):
    """Leave the process group, every rank done first (wait; an entry point that failed does not
    wait: see running), and end the groups' C++ objects here, their worker threads joined, while the
    interpreter still runs. A group lives as long as anything holds it: the callers drop what they
    built on it (models, contexts: the trainers return none), and torch's DTensor caches keep device
    meshes, each holding its groups, for the process's life, so the meshes let go of theirs. A gloo
    worker thread left alive frees its last collective's work object whenever it gets to it; if that
    is during interpreter teardown, the tensors' Python objects can no longer be released (no GIL to
    take), and the process aborts, "terminate called without an active exception" (a 2-rank TP
    worker: 18 of 200 runs under load, before)."""
    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    groups = [weakref.ref(pg) for pg in dist.distributed_c10d._world.pg_map]
    dist.destroy_process_group()
    gc.collect()  # FSDP2 modules hold reference cycles, and with them their meshes and groups
    with warnings.catch_warnings():  # isinstance on every live object wakes torch's deprecation warnings
        warnings.simplefilter("ignore")
        meshes = [o for o in gc.get_objects() if isinstance(o, DeviceMesh)]
    for mesh in meshes:
        mesh._pg_registry.clear()
    gc.collect()
    if any(group() is not None for group in groups):
        print("distributed.shutdown: a process group is still held (a model or context kept past shutdown): its "
              "threads may outlive the interpreter and abort the process at exit; drop them first", file=sys.stderr)


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


def pad_to_ranks(mine: list, empty) -> list:
    """This rank's items, then copies of `empty` up to the most any rank holds: FSDP needs every
    rank to run the same number of forwards (each one's collectives), so the short ranks run
    empty rows that carry no loss."""
    return mine + [copy.copy(empty) for _ in range(max_over_ranks(len(mine)) - len(mine))]


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
               config: ModelConfig | None = None, seed=0, frozen=False, adapters: lora.LoRAConfig | None = None):
    """Build on the meta device, shard, then fill each rank's rows straight from safetensors.

    With `path` None a fresh model is initialized from `config` (the demo), identically on every
    rank. No rank ever holds more than its shard plus the rows being read. A trained model's
    weights stay fp32 (the optimizer's master copy); bf16 compute comes from FSDP2's
    mixed-precision policy (every CUDA run is wrapped, one GPU included). A frozen model (the
    reference: eval mode, no gradients) is stored in bf16 on GPU runs, since it never trains.
    With `adapters` (--lora_rank) the base is frozen likewise (bf16 on GPU runs) and LoRA's fp32
    adapters, drawn from `seed`, are what trains (lora.py).
    Under the memory plan (ctx.simulated) the weights stay unset: fake tensors hold no values.
    """
    config = config or load_config(path)
    model = on_meta(config, torch.bfloat16 if (frozen or adapters) and bf16 and ctx.gpu else None)
    if adapters:
        lora.add_adapters(model, adapters)
    if ctx.gpu and varlen_attn is not None:
        model.attention = "varlen"  # what "auto" picks on CUDA; the memory plan's fake CPU tensors too
    shard(model, ctx, bf16, activation_checkpointing, frozen)
    model.materialize(ctx.device)
    if ctx.simulated:
        pass
    elif path is None:
        init_weights(model, seed)
    else:
        load_shards(model, path)
    if adapters and not ctx.simulated:
        lora.init_adapters(model, seed, copy_rows_into)
    if frozen:
        model.eval().requires_grad_(False)
    return model


def init_weights(model: Transformer, seed: int):
    """Normal(0, 0.02) weights, zero biases, unit norms: the usual init for a fresh decoder."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter(name):
                continue  # lora.init_adapters'
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
    base = {name: shape for name, shape in shapes(model).items() if not lora.is_adapter(name)}
    for name, weight in iter_checkpoint(path, base, model.config.tie_word_embeddings):
        with torch.no_grad():
            copy_rows_into(params[name], weight)


@contextlib.contextmanager
def full_weights(model):
    """Gather every FSDP2 shard once for many forwards (a rollout) and yield a plain module that
    shares the gathered tensors; shard again on exit.

    Without the gather, FSDP2 would all-gather every block on every decoded token. The yielded
    module has none of FSDP2's hooks, which fork side streams that nothing rejoins inside a
    CUDA-graph capture, so the rollout decodes through it with graphs on. LoRA's adapters are
    merged into the gathered weights, in place: those are copies gathered for this rollout, which
    the reshard frees, so the merge costs one matrix's fp32 sum at a time and leaves the trained
    and frozen shards alone. A model
    that is not sharded is yielded as it is (its adapters then run unmerged).
    """
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        yield model
        return
    for m in fsdp:
        m.unshard()  # sets the gathered (bf16 under the mixed-precision policy) tensors on the modules
    try:
        plain = on_meta(model.config)
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, lora.LoRALinear):  # W + delta in fp32, rounded once (as tp.py and the export do)
                    m.weight.copy_(m.weight.float() + lora.delta(m))
        for name, p in model.named_parameters():
            if not lora.is_adapter(name):
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
    update, torch's CUDA default, named here so that the memory plan's CPU tensors measure it too.
    A frozen base (LoRA) has no state: only what trains is the optimizer's."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True if ctx.gpu else None,
                             **kw)


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


def save_hf(model, tokenizer, out_dir, base_model=""):
    """Export a Hugging Face directory (config.json + safetensors + tokenizer), atomically. A LoRA
    model's adapters are merged into its weights there, and written in PEFT's format beside them
    too, in out_dir/adapter (its base: `base_model`)."""
    check_finite(model, out_dir)
    sd = full_state_dict(model)
    if is_main():
        adapter = os.path.join(out_dir, "adapter")
        if not lora.adapted(model) and os.path.isdir(adapter):
            shutil.rmtree(adapter)  # an earlier LoRA export's: these weights are not its base's
        save_pretrained(model, out_dir, state_dict=lora.merged_state_dict(sd, model), tokenizer=tokenizer,
                        beside=(lambda tmp: lora.save_peft(sd, model, base_model, os.path.join(tmp, "adapter")))
                        if lora.adapted(model) else None)
    barrier()


def check_finite(model, what):
    """Refuse to write weights that hold NaN or inf (every rank checks its shards)."""
    bad = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        bad = torch.maximum(bad, (~torch.isfinite(local)).any().float())
    if all_reduce_max(bad):
        raise FloatingPointError(f"the weights hold non-finite values: {what} not written")


def is_main():
    """Rank 0, or a world of one: the process that writes shared files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0
