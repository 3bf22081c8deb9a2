"""What sft.py's and grpo.py's loops share, as plain functions they call: a run directory that a
fresh run and a resumed one may use, resumable checkpoints, metrics, a stop on a non-finite value.

    start_run(cfg.out, asdict(cfg), cfg.resume, preset)   # before any model is loaded
    start = resume(cfg, model, optimizer)                 # 0, or the step out/latest holds
    with stop_on_non_finite(step + 1, cfg.out): ...       # the step; a NaN ends the run with advice
    save_state(run_dir, step, model, optimizer, meta)     # resumable (torch.distributed.checkpoint), atomic
    finish(cfg, stop, total_steps, model, optimizer, tokenizer, export)   # last checkpoint, HF export

A run directory holds config.json (the settings the run started with, and its data files'
digests), step_N/ checkpoints with `latest` naming the newest, metrics.jsonl and the hf/ export.
"""

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

import data
import lora
from checkpoint import append_whole, disk_errors, publish, tensor_bytes, write_atomic
from distributed import barrier, check_finite, is_main, log, save_hf


# ---- the run directory ----

# Settings a resumed run may change: they do not change what a step computes, or (lr, the fix a
# non-finite stop advises) they change it on purpose, from the resumed step on. Each is logged.
SAFE_TO_CHANGE = {"resume", "resume_step", "max_steps", "save_every", "eval_every", "wandb_project", "dist_timeout_min",
                  "check_memory", "plan", "plan_world_size", "plan_gpu_gib", "keep_last", "export_every",
                  "log_traces_every", "out", "lr", "resume_data_changed", "plan_alternatives",
                  "judge_url", "judge_retries", "judge_timeout_min"}  # where the same judge is served, how patiently
# The data files whose contents a run is tied to, by digest: the same path holding other records
# is another run (resume_data_changed says the change is meant).
DATA_FIELDS = ("data", "eval_data")


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
    current |= {f"{k}_sha256": data.content_digest(config[k]) for k in DATA_FIELDS
                if config.get(k) and os.path.exists(config[k])}
    if config.get("lora_rank") and config.get("model"):  # its checkpoints hold adapters alone, trained on this base
        current["model_sha256"] = lora.base_digest(config["model"])
    if not resume and (saved is not None or latest_checkpoint(run_dir)):
        raise ValueError(f"--out {run_dir} holds a run already: pass --resume to continue it, or another "
                         f"--out (or delete {run_dir})")
    back_to = config.get("resume_step", -1)
    if resume and back_to < 0 and latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume: {run_dir} has no checkpoint to continue from (no {run_dir}/latest); "
                         f"check --out, or start without --resume")
    if resume and back_to > 0 and back_to not in kept_steps(run_dir):
        raise ValueError(f"--resume_step {back_to}: {run_dir} holds no complete step_{back_to:08d}; its "
                         f"checkpoints are at steps {kept_steps(run_dir) or 'none'} (0: start again from --model)")
    if resume and saved is not None:
        changed = {k for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
        if current.get("resume_data_changed"):
            changed -= {f"{k}_sha256" for k in DATA_FIELDS}
            log("resume: --resume_data_changed: the data files' contents are not compared")
        if changed - SAFE_TO_CHANGE:
            diff = ", ".join(f"--{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(changed - SAFE_TO_CHANGE))
            hint = "; if the data was changed on purpose, add --resume_data_changed" if any(
                k.endswith("_sha256") and k != "model_sha256" for k in changed - SAFE_TO_CHANGE) else ""
            if "model_sha256" in changed:
                hint += (f"; --model {config['model']} holds other weights than the base this LoRA run's adapters "
                         f"were trained on: put that base back at --model")
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
            if back_to >= 0:
                roll_back(run_dir, back_to)
        if saved != current:  # a fresh run, or a resume that changed safe settings: they are the run's now
            write_atomic(path, json.dumps(current, indent=2) + "\n")
    barrier()


def kept_steps(run_dir) -> list[int]:
    """The steps of the complete step_N checkpoints in run_dir, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return [int(d[5:]) for d in sorted(os.listdir(run_dir)) if re.fullmatch(r"step_\d{8}", d)
            and os.path.isfile(os.path.join(run_dir, d, "trainer_state.json"))]


def roll_back(run_dir, step):
    """--resume_step K (rank 0): the run goes on from step_K (0: from --model); the checkpoints
    after it are moved to run_dir/abandoned/ (kept, out of the run's way: the run writes its own
    step_N again), and `latest` names step_K."""
    later = [k for k in kept_steps(run_dir) if k > step]
    if later:
        os.makedirs(os.path.join(run_dir, "abandoned"), exist_ok=True)
    for k in later:
        name = f"step_{k:08d}"
        shutil.rmtree(os.path.join(run_dir, "abandoned", name), ignore_errors=True)
        os.replace(os.path.join(run_dir, name), os.path.join(run_dir, "abandoned", name))
    if step:
        write_atomic(os.path.join(run_dir, "latest"), f"step_{step:08d}")
    elif os.path.exists(os.path.join(run_dir, "latest")):
        os.remove(os.path.join(run_dir, "latest"))
    log(f"resume: from {f'step {step}' if step else 'the start (--model)'}"
        + (f"; steps {later} moved to {os.path.join(run_dir, 'abandoned')}" if later else ""))


# ---- resumable training state ----

def run_rules(cfg) -> list:
    """check_fields rules of the settings these functions read (and init's timeout), for both trainers."""
    return [
        ("max_steps", cfg.max_steps >= 0, "must be >= 0 (0: no limit)"),
        ("resume_step", cfg.resume_step >= -1, "must be >= 0 (a step_N checkpoint's N; 0: from --model), "
         "or -1 for the latest"),
        ("resume_step", cfg.resume_step == -1 or cfg.resume, "goes with --resume"),
        ("save_every", cfg.save_every >= 0, "must be >= 0 (0: at the end only)"),
        ("keep_last", cfg.keep_last >= 0, "must be >= 0 (0: keep every checkpoint)"),
        ("export_every", cfg.export_every >= 0, "must be >= 0 (0: at the end only)"),
        ("dist_timeout_min", cfg.dist_timeout_min > 0, "must be > 0"),
    ]


def resume(cfg, model, optimizer) -> int:
    """The step a run starts from: with --resume, that of the checkpoint out/latest names,
    restored into model and optimizer (a run's data order and sampling noise are functions of the
    step, so a resumed run sees what an uninterrupted one would); else 0."""
    state = load_state(cfg.out, model, optimizer) if cfg.resume else None
    if state is None:
        return 0
    log(f"resumed from step {state['step']}")
    return state["step"]


def last_step(cfg, start, total_steps) -> int:
    """Where this run stops: after all total_steps, or --max_steps after `start`."""
    return min(total_steps, start + cfg.max_steps) if cfg.max_steps else total_steps


def due(every, step) -> bool:
    """Whether a thing done every `every` steps (0: never) is due after step `step`."""
    return bool(every) and step % every == 0


@contextlib.contextmanager
def stop_on_non_finite(step, run_dir):
    """Around a step: a non-finite loss or gradient (FloatingPointError, raised before the
    optimizer step) ends the run with exit status 1 and advice that works (non_finite_exit)."""
    try:
        yield
    except FloatingPointError as e:
        raise non_finite_exit(step, e, run_dir) from None


class Timings:
    """The seconds a step spends in each of its phases, as `time_<key>` metrics: what a step is
    handed as its `phases` in training (the memory plan hands it a plan.Plan, which measures the
    same phases' memory instead)."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def phase(self, key, name="", advice=""):
        start = time.time()
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - start

    def metrics(self) -> dict:
        return {f"time_{k}": v for k, v in self.seconds.items()}


def finish(cfg, stop, total_steps, model, optimizer, tokenizer, export):
    """After the last step of this run: its resumable checkpoint; once all total_steps are done,
    the Hugging Face export to `export`; a run stopped early by --max_steps says how to go on."""
    save_state(cfg.out, stop, model, optimizer, {}, cfg.keep_last)
    if stop < total_steps:
        log(f"stopped after step {stop} of {total_steps}; continue with --resume")
    else:
        save_hf(model, tokenizer, export, base_model=cfg.model)
        log(f"wrote {export}")


def non_finite_exit(step, error, run_dir) -> SystemExit:
    """How a trainer stops on a non-finite loss or gradient: the step was not taken, and no
    checkpoint or export is ever written from non-finite weights. But the steps before it may
    have ruined the weights without making them non-finite (a learning rate far too high does
    that in a step or two), so the advice names every checkpoint kept and how to start from each."""
    kept = kept_steps(run_dir)
    where = (f"The checkpoints kept: steps {', '.join(map(str, kept))} (the newest, {latest_checkpoint(run_dir)}, "
             f"holds finite weights, which the steps before the failure may already have ruined)."
             if kept else "No checkpoint was saved yet.")
    return SystemExit(f"step {step}: {error}; stopped before the optimizer step. {where} Go on from an earlier "
                      f"step with --resume --resume_step K (K one of {[0, *kept]}; 0 starts again from --model, "
                      f"in this --out) and a lower --lr, or check the data")


def latest_checkpoint(run_dir) -> str | None:
    pointer = os.path.join(run_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run_dir, f.read().strip())


def trained_state(model, optimizer) -> tuple[dict, dict]:
    """What a checkpoint holds: the model's entries that train (a LoRA run's adapters, not its frozen
    base, which --model holds already; for full fine-tuning, all of them) and the optimizer's. A
    tied LM head keeps its entry only if the embedding it shares trains (torch's
    ignore_frozen_params drops a frozen parameter under its first name alone)."""
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    trains = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trains}, osd


# Loading a checkpoint leaves the frozen base as --model gave it (dcp.load has refused a checkpoint
# that lacks an entry of trained_state by then, so strict=False lets nothing trained go missing).
INTO_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_state(run_dir, step: int, model, optimizer, meta: dict, keep_last=0):
    """Sharded model (what trains: trained_state) + optimizer (torch.distributed.checkpoint), a JSON of
    the step, and the model's config.json (so export.py can make a HF directory of it), written under a temporary
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
    msd, osd = trained_state(model, optimizer)
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
    msd, osd = trained_state(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=INTO_TRAINED)
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def _logged_step(line) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


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
