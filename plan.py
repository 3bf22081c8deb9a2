"""The memory plan: one training step walked on fake tensors at any world size, phase by phase.

    python grpo.py --plan --plan_world_size 8 --plan_gpu_gib 80 --model DIR   # DIR needs only config.json
    python sft.py  --plan --plan_world_size 8 --plan_gpu_gib 80 --model DIR

Each trainer writes its step as a walk (grpo.plan_walk, sft.plan_walk) that builds the run the
way train() builds it and calls the trainer's own functions in the trainer's order, on data at
the configured maximum lengths, each phase inside `plan.phase(name)`. The walk runs as rank 0
of world_size ranks in one CPU process: torch's fake process group stands in for NCCL, fake
tensors (shapes, no storage) for GPU memory, and FSDP2's memory tracker records each phase's
peak, so a 32B step costs seconds and no memory. It measures the CUDA code paths (bf16
compute, the bf16 reference, FlashAttention's varlen kernel through its fake implementation);
its tensors say "cpu" because autograd on fake CUDA tensors needs a CUDA runtime.

What the tracker cannot see is set aside up front: CONTEXT_GIB per GPU for the CUDA context,
NCCL's buffers and cuBLAS workspaces. A CUDA run walks the same plan before its first step
(check_before_training) and refuses, with the table, a run that cannot fit.
"""

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.testing._internal.distributed.fake_pg import FakeStore

import distributed as D

GiB = 2**30
CONTEXT_GIB = 3.0  # per GPU, outside torch's tensors: CUDA context, NCCL buffers, cuBLAS workspaces
def rules(cfg) -> list:
    """check_fields rules of the --plan_* settings, for both trainers."""
    return [("plan_world_size", cfg.plan_world_size >= 1, "must be >= 1"),
            ("plan_gpu_gib", cfg.plan_gpu_gib > CONTEXT_GIB, f"must be > {CONTEXT_GIB} GiB")]


MORE_RANKS = "more ranks (--plan_world_size) shrink every rank's shards"  # advice for what is sharded


@dataclass
class Phase:
    name: str
    peak: int              # bytes per rank at the phase's peak
    after: int             # bytes resident when it ends
    advice: str            # what to change when this phase does not fit
    error: str = ""        # the phase could not even start (e.g. no room for one KV slot)
    counted: bool = True   # False: only frees memory; its peak is where it started


class Tracker(FSDPMemTracker):
    """FSDP2's memory tracker, blind to DTensor's shape propagation: DTensor works out an op's
    output shapes by running it on fake tensors of the global (unsharded) shapes, in the active
    fake mode when there is one, and the tracker would count those as memory (a foreach AdamW
    step then "peaks" at three full copies of the weights). What runs on the shards is counted."""

    propagating = 0

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
    """Phases in the order they ran, each with its peak; `total` is one GPU's memory."""

    def __init__(self, world_size: int, gpu_gib: float):
        self.world_size, self.gpu_gib = world_size, gpu_gib
        self.total = int(gpu_gib * GiB)
        self.usable = int((gpu_gib - CONTEXT_GIB) * GiB)
        self.phases: list[Phase] = []
        self.notes: list[str] = []
        self.tracker = None

    def track(self, model, optimizer):
        """Start tracking: `model` is the FSDP2 root being trained; what exists already (its
        shards) is counted from here on, and everything later is seen as it is allocated."""
        self.tracker = Tracker(model, optimizer)
        c = model.config
        self.notes.append(f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters; "
                          f"{self.world_size} ranks of {self.gpu_gib:g} GiB")

    def current(self) -> int:
        return self.total_of(self.tracker.get_tracker_snapshot("current"))

    @staticmethod
    def total_of(snapshot) -> int:
        """Bytes on the simulated GPU (the tracker also lists meta tensors, which hold nothing)."""
        return sum(s["Total"] for device, s in snapshot.items() if device.type != "meta")

    def free(self) -> int:
        """What the device would have free now: the rule a rollout's default KV budget reads."""
        return self.usable - self.current()

    @contextlib.contextmanager
    def phase(self, name, advice="", counted=True):
        """Measure one phase: the tracker's peak is reset on entry (it restarts from the
        current total whenever it is entered)."""
        phase = Phase(name, 0, 0, advice, counted=counted)
        self.phases.append(phase)
        self.tracker.reset_mod_stats()  # per-module stats are per forward; phases repeat forwards
        try:
            with self.tracker, blind_to_shape_propagation(self.tracker):
                yield phase
                phase.peak = self.total_of(self.tracker.get_tracker_snapshot("peak"))
        finally:
            phase.after = self.current()

    @staticmethod
    def make_optimizer_state(model, optimizer):
        """AdamW's state exists from the second step on, rollouts included: make it now with a
        step on zero gradients (fake tensors: no weight changes that matter)."""
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def over(self, phase) -> bool:
        return bool(phase.error) or phase.counted and phase.peak > self.usable

    @property
    def fits(self) -> bool:
        return not any(self.over(p) for p in self.phases)

    def table(self, title) -> str:
        width = max(len(p.name) for p in self.phases)
        lines = [title, *self.notes, "",
                 f"{'phase':<{width}}  {'peak GiB':>8}  {'after GiB':>9}",]
        for p in self.phases:
            peak = "-" if p.error or not p.counted else f"{p.peak / GiB:.1f}"
            over = "  <- over" if self.over(p) else ""
            lines.append(f"{p.name:<{width}}  {peak:>8}  {p.after / GiB:>9.1f}{over}")
        worst = max((p for p in self.phases if p.counted), key=lambda p: p.peak)
        usable = f"{self.usable / GiB:.1f} GiB usable of {self.gpu_gib:g} GiB per GPU ({CONTEXT_GIB:g} GiB " \
                 f"set aside for the CUDA context and NCCL)"
        lines.append("")
        if self.fits:
            lines.append(f"fits: the peak is {worst.peak / GiB:.1f} GiB ({worst.name}), {usable}")
        for p in self.phases:
            if p.error:
                lines.append(f"does not fit: {p.name}: {p.error}")
            elif self.over(p):
                lines.append(f"does not fit: {p.name} peaks at {p.peak / GiB:.1f} GiB, {usable}; {p.advice}")
        return "\n".join(lines)


@contextlib.contextmanager
def fake_world(world_size: int, tp: int = 1):
    """This process as rank 0 of world_size ranks (in TP groups of tp): a fake process group and
    fake tensors. Yields the Context the trainers take; it marks the run as a GPU run (CUDA code
    paths)."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        # outside fake mode: the meshes read real rank ids
        mesh, decode_mesh = init_device_mesh("cpu", (world_size,)), D.make_decode_mesh("cpu", world_size, tp)
        # Real tensors made on the host (token lists, counts) become fake when they meet fake ones.
        with FakeTensorMode(allow_non_fake_inputs=True):
            # Offloaded state goes to the meta device, which holds nothing: off the simulated GPU.
            yield D.Context(rank=0, world_size=world_size, device=torch.device("cpu"), gpu=True, mesh=mesh,
                            decode_mesh=decode_mesh, host=torch.device("meta"))
    finally:
        dist.destroy_process_group()


def run(walk, cfg, world_size, gpu_gib, title, tp=1) -> Plan:
    """Walk one step of `walk(cfg, ctx, plan)` at world_size ranks of gpu_gib each (TP groups of tp
    for the rollout); print the table."""
    plan = Plan(world_size, gpu_gib)
    with fake_world(world_size, tp) as ctx:
        walk(cfg, ctx, plan)
    print(plan.table(title), flush=True)
    return plan


def check_before_training(argv=None):
    """On a CUDA run, before the first step: walk this command's plan at this run's world size
    and this GPU's memory (in a child process, so nothing of the fake world stays behind), and
    stop every rank with the table when it does not fit."""
    verdict = torch.zeros(())  # 0 fits, 1 does not fit, 2 the plan itself failed
    if D.is_main():
        gpu_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
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
    verdict = int(D.all_reduce_max(verdict))
    if verdict == 1:
        raise SystemExit("the memory plan above says this run does not fit; change what it says, or "
                         "pass --no-check_memory to start anyway")
    if verdict == 2:
        raise SystemExit("the memory plan could not be walked (its error is above); pass "
                         "--no-check_memory to start without it")
