"""The memory plan: one training step walked on fake tensors at any world size, phase by phase.

    python grpo.py --plan --plan_world_size 8 --model DIR        # DIR needs only config.json
    python sft.py  --plan --plan_world_size 8 --plan_gpu_gib 141 --model DIR   # H200s

Each trainer walks its own step (grpo.plan_walk, sft.plan_walk): it builds the run the way
train() does and runs the step itself (grpo.grpo_step, sft.sft_step) on data at the configured
maximum lengths, handing it this plan as its `phases`: every device phase the step opens with
phases.phase(...) is measured here (a phase added to the step is in the plan with no other
edit), and every pass that accumulates runs over at least two rows. The walk runs as rank 0 of world_size ranks in one CPU
process: torch's fake process group stands in for NCCL, fake tensors (shapes, no storage) for
GPU memory (ctx.simulated), and FSDP2's memory tracker records each phase's peak, so a 32B step
costs seconds and no memory. It measures the CUDA code paths (bf16 compute, the bf16 reference,
FlashAttention's varlen kernel through its fake implementation); its tensors say "cpu" because
autograd on fake CUDA tensors needs a CUDA runtime.

The card is taken as it reports itself (an "80 GB" card has 79.1-79.3 GiB), and what no tensor
shows is set aside first, item by item (Plan.set_aside: the CUDA context, NCCL's buffers per
process group, cuBLAS workspaces per stream, the allocator's fragmentation, FlashAttention's
backward scratch). A CUDA run walks the same plan before its first step, on its own card's
size (check_before_training), and refuses, with the table, a run that cannot fit.
"""

import contextlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.testing._internal.distributed.fake_pg import FakeStore

import distributed
from kvcache import ALLOCATOR_SLACK

GiB = 2**30
# What a card reports as its total (cudaMemGetInfo, torch.cuda.mem_get_info), by its nominal GB: an
# H100 80GB HBM3 reports 79.22 GiB (vLLM's start-up log, vllm-project/vllm#10511; nvidia-smi shows
# 81,559 MiB), an A100 80GB 79.15; an H200's nvidia-smi 143,771 MiB less the same 0.53% gives 139.6.
REPORTED_GIB = {80: 79.1, 141: 139.6}
# What no tensor shows, per GPU. The CUDA context with lazy module loading (torch's default):
# 0.3-0.4 GiB on Hopper.
CUDA_CONTEXT_GIB = 0.4
# NCCL's buffers, per communicator (one per process group the run creates): 0.5-1.6 GiB measured
# on 8-GPU H100 nodes, the top with NVLS (NCCL_NVLS_ENABLE=0 saves it); vLLM's TP 2 holds 1.8 GiB
# more outside torch than its TP 1 (vllm-project/vllm#10511).
NCCL_GIB_PER_GROUP = 1.0
# cuBLAS keeps a workspace per (handle, stream) it has run on: 32 MiB on Hopper (torch's default
# CUBLAS_WORKSPACE_CONFIG there, :4096:8).
CUBLAS_GIB_PER_STREAM = 32 / 1024
# Memory the caching allocator holds but no tensor uses, as a share of the card (expandable
# segments, set by distributed.init, keep it low; bench/gpu_check.py measures reserved vs allocated).
# The rollout's default KV budget leaves the same share free (kvcache.ALLOCATOR_SLACK).
FRAGMENTATION = ALLOCATOR_SLACK


def rules(cfg) -> list:
    """check_fields rules of the --plan_* settings, for both trainers."""
    least = CUDA_CONTEXT_GIB + NCCL_GIB_PER_GROUP
    return [("plan_world_size", cfg.plan_world_size >= 1, "must be >= 1"),
            ("plan_gpu_gib", cfg.plan_gpu_gib > least, f"must be > {least:g} (GiB of one GPU, as it reports "
             f"itself: the CUDA context and NCCL alone take {least:g})")]


def card_gib(gib: float) -> float:
    """A card's size as it reports itself: a nominal size (80, 141) becomes what that card reports."""
    return REPORTED_GIB.get(gib, gib)


MORE_RANKS = "more ranks (--plan_world_size) shrink every rank's shards"  # advice for what is sharded


@dataclass
class Phase:
    name: str
    peak: int              # bytes per rank at the phase's peak
    after: int             # bytes resident when it ends
    advice: str            # what to change when this phase does not fit
    error: str = ""        # the phase could not even start (e.g. no room for one KV sequence)


class Tracker(FSDPMemTracker):
    """FSDP2's memory tracker, blind to DTensor's shape propagation: DTensor works out an op's
    output shapes by running it on fake tensors of the global (unsharded) shapes, in the active
    fake mode when there is one, and the tracker would count those as memory (a foreach AdamW
    step then "peaks" at three full copies of the weights). What runs on the shards is counted.
    It also takes a root module's forward after a first one (the rows of a mini-batch, which
    FSDP2's tracker refuses as "multiple iterative calls"): the module's own stats start again,
    the peak over all of them is kept."""

    propagating = 0

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig_fsdp_state_pre_fw)

        def again(*args, **kwargs):
            fqn = self._mod_tracker.get_known_fqn(fsdp_mod)
            if fsdp_mod in self.memory_tracking and not self._mod_tracker.is_bw and \
                    self._mod_tracker.parents - {fqn} == {"Global"}:
                del self.memory_tracking[fsdp_mod]
            return inner(*args, **kwargs)
        return again

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.propagating:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def blind_to_shape_propagation(tracker: Tracker):
    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, *args, **kwargs):
        tracker.propagating += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker.propagating -= 1
    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


class Plan:
    """Phases in the order they ran, each with its peak; `total` is one GPU's memory as it
    reports itself, `set_aside` what no tensor shows (what the card holds before any tensor, then
    the allowances), `usable` the rest."""

    def __init__(self, world_size: int, gpu_gib: float, process_groups: int, gemm_streams: int):
        self.world_size, self.gpu_gib = world_size, card_gib(gpu_gib)
        self.total = int(self.gpu_gib * GiB)
        # (what, bytes): held by the card outside torch, so never free to a rollout's KV pool
        self.held = [
            ("CUDA context", CUDA_CONTEXT_GIB * GiB),
            (f"NCCL buffers: {process_groups} process group{'s' * (process_groups > 1)} x "
             f"{NCCL_GIB_PER_GROUP:g} GiB", process_groups * NCCL_GIB_PER_GROUP * GiB),
            (f"cuBLAS workspaces: {gemm_streams} stream{'s' * (gemm_streams > 1)} x 32 MiB",
             gemm_streams * CUBLAS_GIB_PER_STREAM * GiB)]
        # (what, bytes): room kept for what the tracker does not see, free when the pool is sized
        self.allowances = [(f"allocator fragmentation: {FRAGMENTATION:.0%} of the card", FRAGMENTATION * self.total)]
        self.phases: list[Phase] = []
        self.notes: list[str] = [] if gpu_gib == self.gpu_gib else \
            [f"--plan_gpu_gib {gpu_gib:g}: an {gpu_gib:g} GB card reports {self.gpu_gib:g} GiB"]
        self.tracker = None
        # GPU memory: tensors made inside it are fake (shapes, no storage); host tensors made
        # outside it are real and become fake where they meet fake ones.
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)

    @property
    def set_aside(self) -> list:
        return self.held + self.allowances

    @property
    def usable(self) -> int:
        return int(self.total - sum(b for _, b in self.set_aside))

    def track(self, model, optimizer, row_tokens: int):
        """Start tracking: `model` is the FSDP2 root being trained; what exists already (its
        shards) is counted from here on, and everything later is seen as it is allocated.
        row_tokens: the longest packed row a backward runs on."""
        self.tracker = Tracker(model, optimizer)
        c = model.config
        if model.attention == "varlen":
            # FlashAttention's varlen backward holds, for the layer it is in, an fp32 dq accumulator
            # and keys/values expanded to every query head (GQA): its fake kernel allocates neither.
            self.allowances.append((f"varlen attention backward scratch: {row_tokens:,} tokens x "
                                   f"{c.num_attention_heads} heads", row_tokens * c.num_attention_heads * c.head_dim
                                   * (4 + 2 + 2)))
        self.notes.append(f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters; "
                          f"{self.world_size} ranks of {self.gpu_gib:g} GiB")

    def current(self) -> int:
        return self.total_of(self.tracker.get_tracker_snapshot("current"))

    @staticmethod
    def total_of(snapshot) -> int:
        """Bytes on the simulated GPU (the tracker also lists meta tensors, which hold nothing)."""
        return sum(s["Total"] for device, s in snapshot.items() if device.type != "meta")

    def memory(self) -> tuple[int, int]:
        """(free, total) as a CUDA run reads them (kvcache.device_memory), which the rollout's
        default KV budget takes less its reserve and the allocator's slack: the set-aside that
        the card holds (context, NCCL, cuBLAS) is not free; the allowances for fragmentation and
        the varlen backward's scratch are."""
        return self.total - sum(b for _, b in self.held) - self.current(), self.total

    @contextlib.contextmanager
    def phase(self, key, name, advice=""):
        """Measure one phase of the trainer's step (the step opens each of its device phases with
        phases.phase(key, name, advice), which the plan is given as `phases`): on fake tensors,
        the tracker's peak reset on entry (it restarts from the current total whenever it is
        entered). What runs between phases is host work, on real tensors. A ValueError inside (a
        phase that cannot start: no room for one KV sequence) is the phase's error, and the walk
        goes on; the step's metrics are not read (fake tensors hold no values)."""
        phase = Phase(name, 0, 0, advice)
        self.phases.append(phase)
        self.tracker.reset_mod_stats()  # per-module stats are per forward; phases repeat forwards
        try:
            with self.fake, self.tracker, blind_to_shape_propagation(self.tracker):
                yield phase
                phase.peak = self.total_of(self.tracker.get_tracker_snapshot("peak"))
        except ValueError as e:
            phase.error = str(e)
        finally:
            phase.after = self.current()

    @staticmethod
    def tokenizer(config):
        """What a rollout asks of a tokenizer when there is none (the plan needs config.json alone)."""
        return PlaceholderTokenizer(config.vocab_size - 1)

    @staticmethod
    def mixed_rewards(completions, texts, records):
        """+1 and -1 in turn: every group keeps its place (--filter_equal_groups drops none) and
        every trace trains, the worst case."""
        return torch.tensor([1.0 - 2 * (i % 2) for i in range(len(completions))])

    @classmethod
    def walking(cls, reward):
        """A trainer's reward as the plan walks it: its own device phase run (a judge's sampler),
        then mixed_rewards, so that every group trains."""
        def score(completions, texts, records):
            reward(completions, texts, records)
            with unset_fake_temporarily():  # host values, though the reward's phase runs on fake tensors
                return cls.mixed_rewards(completions, texts, records)
        score.phase = getattr(reward, "phase", None)
        return score

    @staticmethod
    def make_optimizer_state(model, optimizer):
        """AdamW's state exists from the second step on, rollouts included: make it now with a
        step on zero gradients (fake tensors: no weight changes that matter)."""
        for p in model.parameters():
            if p.requires_grad:  # a frozen base (LoRA) gets no gradient
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def over(self, phase) -> bool:
        return bool(phase.error) or phase.peak > self.usable

    @property
    def fits(self) -> bool:
        return not any(self.over(p) for p in self.phases)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    def table(self, title) -> str:
        width = max(len(p.name) for p in self.phases)
        lines = [title, *self.notes, "", f"card {self.gpu_gib:g} GiB, less what no tensor shows:"]
        lines += [f"  {what:<{width - 2}}  {b / GiB:>8.1f}" for what, b in self.set_aside]
        lines += [f"  {'usable':<{width - 2}}  {self.usable / GiB:>8.1f}", "",
                  f"{'phase':<{width}}  {'peak GiB':>8}  {'after GiB':>9}"]
        for p in self.phases:
            peak = "-" if p.error else f"{p.peak / GiB:.1f}"
            over = "  <- over" if self.over(p) else ""
            lines.append(f"{p.name:<{width}}  {peak:>8}  {p.after / GiB:>9.1f}{over}")
        worst = max(self.phases, key=lambda p: p.peak)
        usable = f"{self.usable / GiB:.1f} GiB usable of {self.gpu_gib:g} GiB per GPU"
        lines.append("")
        if self.fits:
            lines.append(f"fits: the peak is {worst.peak / GiB:.1f} GiB ({worst.name}), {usable}")
        for p in self.phases:
            if p.error:
                lines.append(f"does not fit: {p.name}: {p.error}")
            elif self.over(p):
                lines.append(f"does not fit: {p.name} peaks at {p.peak / GiB:.1f} GiB, {usable}; {p.advice}")
        return "\n".join(lines)


def read_table(text) -> tuple[list[tuple[str, float | None, bool]], float | None]:
    """Plan.table read back from a child's output (bench/plans.py, the GPU check, the tests): each
    phase's (name, peak GiB, or None for one that could not start, whether it is over), and the
    usable GiB; ([], None) when the text holds no table."""
    phases = [(name, None if peak == "-" else float(peak), bool(over)) for name, peak, over in
              re.findall(r"^(\S.*?)\s{2,}([\d.]+|-)\s+[\d.]+(  <- over)?$", text, re.M)]
    usable = re.search(r"^  usable\s+([\d.]+)$", text, re.M)
    return phases, float(usable.group(1)) if usable else None


class PlaceholderTokenizer:
    """A tokenizer stand-in for the walk: an EOS id, and no text."""

    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens=True):
        return ""


@contextlib.contextmanager
def fake_world(plan: Plan, tp: int = 1):
    """This process as rank 0 of plan.world_size ranks (in TP groups of tp): a fake process group
    and fake tensors. Yields the Context the trainers take: a simulated GPU run (CUDA code paths)
    whose free memory is the plan's."""
    world_size = plan.world_size
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        # outside fake mode: the meshes read real rank ids
        mesh, decode_mesh = init_device_mesh("cpu", (world_size,)), distributed.make_decode_mesh("cpu", world_size, tp)
        # Offloaded state goes to the meta device, which holds nothing: off the simulated GPU.
        yield distributed.Context(rank=0, world_size=world_size, device=torch.device("cpu"), gpu=True, mesh=mesh,
                                  decode_mesh=decode_mesh, host=torch.device("meta"), simulated=True,
                                  memory=plan.memory)
    finally:
        dist.destroy_process_group()


def walk_once(walk, cfg, world_size, gpu_gib, tp, gemm_streams, extra_meshes=0) -> Plan:
    """One walk of `walk(cfg, ctx, plan)` at world_size ranks of gpu_gib each (TP groups of tp for
    the rollout, which then makes two process groups more: the mesh's data- and tensor-parallel
    ones; extra_meshes: the other TP meshes the walk makes, a judge's, two groups each).
    gemm_streams: the streams that run matrix products."""
    plan = Plan(world_size, gpu_gib, process_groups=1 + 2 * ((tp > 1) + extra_meshes), gemm_streams=gemm_streams)
    with fake_world(plan, tp) as ctx:
        walk(cfg, ctx, plan)
    return plan


def run(walk, cfg, title, tp=1, gemm_streams=1, variants=(), extra_meshes=0) -> Plan:
    """Walk one step at --plan_world_size ranks of --plan_gpu_gib each and print the table. When it
    does not fit and --plan_alternatives is on, walk what could make it fit the same way and say
    which do: the trainer's own `variants` ((flags, cfg) pairs: settings that save memory), then
    2x the ranks, H200s' 141 GB, 4x the ranks."""
    world, gpu = cfg.plan_world_size, cfg.plan_gpu_gib
    plan = walk_once(walk, cfg, world, gpu, tp, gemm_streams, extra_meshes)
    print(plan.table(title), flush=True)
    if plan.fits or not cfg.plan_alternatives:
        return plan
    def ranks(w):
        return f"--plan_world_size {w}" + (f" ({w // 8} nodes of 8)" if w >= 16 and w % 8 == 0 else "")
    options = [(flags, other, world, gpu) for flags, other in variants] + [
        (ranks(2 * world), cfg, 2 * world, gpu), (f"--plan_gpu_gib 141 (H200s, {card_gib(141):g} GiB)", cfg, world, 141),
        (ranks(4 * world), cfg, 4 * world, gpu)]
    print("\nwhat fits instead (each walked the same way; --no-plan_alternatives skips this):", flush=True)
    for flags, other, w, g in options:
        try:
            alt = walk_once(walk, other, w, g, tp, gemm_streams, extra_meshes)
        except ValueError as e:  # e.g. a batch the ranks do not divide
            print(f"  {flags}: cannot be walked: {e}", flush=True)
            continue
        verdict = "fits" if alt.fits else "does not fit"
        print(f"  {flags}: {verdict}, peak {alt.peak / GiB:.1f} GiB of {alt.usable / GiB:.1f} usable", flush=True)
    return plan


def check_before_training(argv=None):
    """On a CUDA run, before the first step: walk this command's plan at this run's world size
    and this GPU's memory (in a child process, so nothing of the fake world stays behind), and
    stop every rank with the table when it does not fit."""
    verdict = torch.zeros(())  # 0 fits, 1 does not fit, 2 the plan itself failed
    if distributed.is_main():
        gpu_gib = torch.cuda.mem_get_info()[1] / GiB  # the card as it reports itself
        world = dist.get_world_size() if dist.is_initialized() else 1
        argv = sys.argv if argv is None else argv
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        child = subprocess.run([sys.executable, *argv, "--plan", "--plan_world_size", str(world),
                                "--plan_gpu_gib", f"{gpu_gib:.3f}"], env={**env, "CUDA_VISIBLE_DEVICES": ""},
                               capture_output=True, text=True)
        print(child.stdout, end="", flush=True)
        if child.returncode:
            verdict += 1 if "does not fit" in child.stdout else 2
            if verdict == 2:
                print(child.stderr[-3000:], file=sys.stderr, flush=True)
    verdict = int(distributed.all_reduce_max(verdict))
    if verdict == 1:
        raise SystemExit("the memory plan above says this run does not fit; change what it says, or "
                         "pass --no-check_memory to start anyway")
    if verdict == 2:
        raise SystemExit("the memory plan could not be walked (its error is above); pass "
                         "--no-check_memory to start without it")
