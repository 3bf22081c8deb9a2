"""LoRA (Hu et al., 2021) for both trainers: a frozen base and a trainable low-rank update of chosen
linear projections, so that one GPU trains a 7B judge.

    add_adapters(model, LoRAConfig(rank=64, alpha=128))   # on the meta model, before sharding
    with adapters_off(model): ref = model(...)             # the base model: GRPO's reference, for free
    weight + delta(module)                                  # W + (alpha / r) B A: the rollout's merged weight
    merged_state_dict(state, model)                         # what transformers loads (distributed.save_hf)
    save_peft(state, model, base_dir, out_dir)              # adapter_config.json + adapter_model.safetensors

A projection y = x W^T + b becomes y = x W^T + b + (alpha / r) (x A^T) B^T, A (r, in) drawn as
PEFT draws it (Kaiming-uniform, a = sqrt(5)) and B (out, r) zero, so training starts from the base
model exactly. The base weights are frozen (bf16 on CUDA: no fp32 master copy, no optimizer
state); A and B are fp32 parameters that AdamW trains. The names are PEFT's (q_proj.lora_A /
lora_B), and the export writes PEFT's files, so peft.PeftModel.from_pretrained(base, dir) loads an
adapter trained here. No dropout (PEFT's default for RL recipes is 0; a dropout would make the
rollout's policy differ from the trainer's).
"""

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from checkpoint import checkpoint_files, ours_to_hf
from data import content_digest

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every block's linear ones


@dataclass
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = PROJECTIONS


@dataclass
class LoRASettings:
    """The trainers' LoRA flags (sft.py and grpo.py configs extend this)."""
    lora_rank: int = 0                 # 0: full fine-tuning; R > 0: rank-R adapters on a frozen base (lora.py)
    lora_alpha: float = 0.0            # the update's scale is lora_alpha / lora_rank; 0: 2 x lora_rank
    lora_targets: str = ",".join(PROJECTIONS)  # the block projections that get adapters, comma-separated


def of(cfg: LoRASettings) -> LoRAConfig | None:
    """The LoRAConfig of a trainer's settings; None for full fine-tuning."""
    if not cfg.lora_rank:
        return None
    return LoRAConfig(cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank,
                      tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()))


def rules(cfg: LoRASettings) -> list:
    """check_fields rules of the LoRA flags: before any model is read."""
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in PROJECTIONS]
    return [
        ("lora_rank", cfg.lora_rank >= 0, "must be >= 0 (0: full fine-tuning)"),
        ("lora_alpha", cfg.lora_alpha >= 0, "must be >= 0 (0: 2 x --lora_rank)"),
        ("lora_targets", not cfg.lora_rank or targets and not unknown,
         f"names {', '.join(unknown) or 'no module'}: the block projections are {','.join(PROJECTIONS)}"),
    ]


class LoRALinear(nn.Linear):
    """A linear layer with a low-rank update beside its weight; `adapters` False leaves the base
    layer alone (the reference model of GRPO's KL term)."""

    def __init__(self, in_features, out_features, bias, rank, alpha, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=torch.float32))
        self.scale = alpha / rank
        self.adapters = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.adapters:
            return y
        # under FSDP2's bf16 policy A and B arrive in bf16, as x does; plain fp32 runs stay fp32
        return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale


def add_adapters(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Replace every target projection of every block with a LoRALinear (same weight and bias) and
    freeze all but the adapters. On a model on the meta device, before sharding: the adapters are
    then sharded with their block, and init_adapters fills them."""
    found = set()
    for block in model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if name in cfg.targets and type(child) is nn.Linear:
                    lora = LoRALinear(child.in_features, child.out_features, child.bias is not None, cfg.rank,
                                      cfg.alpha, device=child.weight.device, dtype=child.weight.dtype)
                    lora.weight, lora.bias = child.weight, child.bias
                    setattr(parent, name, lora)
                    found.add(name)
    missing = set(cfg.targets) - found
    if missing:
        raise ValueError(f"--lora_targets {','.join(sorted(missing))}: no such module in the model's blocks "
                         f"(its projections: {', '.join(PROJECTIONS)})")
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    model.lora = cfg
    return model


def is_adapter(name) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def adapted(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def init_adapters(model, seed, copy_rows_into):
    """A as PEFT draws it (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), the same on
    every rank from `seed`; B zero. copy_rows_into writes a rank's rows of a full tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_A"):
                bound = 1 / math.sqrt(p.shape[1])
                copy_rows_into(p, torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            elif name.endswith(".lora_B"):
                copy_rows_into(p, torch.zeros(p.shape))


@contextlib.contextmanager
def adapters_off(model):
    """The base model: every adapter skipped while inside (GRPO's reference log-probs)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.adapters = False
    try:
        yield model
    finally:
        for m in layers:
            m.adapters = True


def delta(module: LoRALinear, lora_A=None, lora_B=None) -> torch.Tensor:
    """(alpha / r) B A in fp32: what merging adds to the weight (A and B given when gathered elsewhere)."""
    A = module.lora_A if lora_A is None else lora_A
    B = module.lora_B if lora_B is None else lora_B
    return (B.float() @ A.float()) * module.scale


def merged_state_dict(state: dict, model) -> dict:
    """A full state dict (our names -> whole tensors) with every adapter merged into its weight and
    dropped: a plain model's, what transformers loads."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            w = state[f"{name}.weight"]
            merged[f"{name}.weight"] = (w.float() + delta(m, state[f"{name}.lora_A"], state[f"{name}.lora_B"])).to(w.dtype)
    return merged


def base_digest(path) -> str:
    """sha256 of a base model's config.json and weight files. A LoRA checkpoint holds adapters
    alone, trained on these weights: a resume or an export onto other weights at the same path (an
    SFT run written there again) is refused by it (run.start_run, export.py). It reads every byte
    of the base, on every rank (15 GB for a 7B)."""
    h = hashlib.sha256()
    for file in [os.path.join(path, "config.json"), *checkpoint_files(path)]:
        h.update(os.path.basename(file).encode() + content_digest(file).encode())
    return h.hexdigest()


def save_peft(state: dict, model, base_model: str, out_dir):
    """The adapters of a full state dict in PEFT's format, in a new directory out_dir:
    adapter_config.json and adapter_model.safetensors with PEFT's names
    (base_model.model.<HF name>.lora_A.weight). distributed.save_hf writes it into the merged
    export's temporary directory, so both appear in one rename."""
    cfg = model.lora
    tensors = {f"base_model.model.{ours_to_hf(k).removesuffix('.lora_A').removesuffix('.lora_B')}."
               f"{k.rsplit('.', 1)[1]}.weight": v.detach().to("cpu", torch.float32).contiguous()
               for k, v in state.items() if is_adapter(k)}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": sorted(cfg.targets), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    os.makedirs(out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
