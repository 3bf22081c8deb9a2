"""Hugging Face checkpoints of model.Transformer, and the one way this project writes a file or a
directory that must never be seen half-written.

    model = load_pretrained("Qwen2.5-7B-Instruct", dtype=torch.bfloat16, device="cuda")
    save_pretrained(model, "out/hf", tokenizer=tokenizer)   # transformers loads it with identical logits
    write_atomic("out/scores.json", text)                   # a temporary file, then a rename

Everything written goes to a temporary name first and is moved into place by `publish` (a rename
on the same file system), so a run killed at any moment leaves the previous version or the new
one, never a mix; `publish` also brings back the previous version of a directory that a kill
between its two renames left aside.
"""

import contextlib
import errno
import json
import os
import shutil

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from model import ModelConfig, Transformer, on_meta, rope_inv_freq


def hf_to_ours(name: str) -> str:
    return name.removeprefix("model.")


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def checkpoint_files(path) -> list[str]:
    """The safetensors files of a HF model directory, single-file or sharded."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        bins = sorted(n for n in os.listdir(path) if n.endswith(".bin")) if os.path.isdir(path) else []
        how = (f"; it holds {', '.join(bins)}: only safetensors are read (pickled .bin files can run code). "
               "Convert once with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
               ".save_pretrained(NEW_DIR, safe_serialization=True)") if bins else ""
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{how}")
    return [single]


class CheckedSlice:
    """A safetensors slice whose reads are checked: `slice[a:b]` reads rows a..b (a rank of a
    sharded run reads only its own), and a read that holds NaN or inf is an error naming the
    file and the tensor, before a judge built from it says anything."""

    def __init__(self, file, hf_name, raw):
        self.file, self.hf_name, self.raw = file, hf_name, raw

    def __getitem__(self, index):
        t = self.raw[index]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{self.file}: tensor {self.hf_name!r} holds NaN or inf values; "
                             f"this checkpoint cannot be used (was it written by a run that diverged?)")
        return t


def iter_checkpoint(path, expected: dict, tie_word_embeddings: bool):
    """Yield (our_name, CheckedSlice) for every weight of a HF checkpoint.

    Checks the names and shapes against `expected` (our parameter names -> full shapes): an
    unknown tensor, a missing one or one of another shape is an error naming the file and the
    tensor. A tied checkpoint that still stores lm_head.weight is fine.
    """
    seen = set()
    for file in checkpoint_files(path):
        try:
            f = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as e:
            size = os.path.getsize(file) if os.path.exists(file) else 0
            raise ValueError(f"{file}: not a readable safetensors file ({size:,} bytes; {e}); a copy or "
                             f"download cut short leaves such a file: copy it again") from None
        with f:
            for hf_name in f.keys():
                name = hf_to_ours(hf_name)
                if name not in expected:
                    if name == "lm_head.weight" and tie_word_embeddings:
                        continue  # it equals the embedding
                    raise ValueError(f"{file}: unexpected tensor {hf_name!r} in checkpoint")
                raw = f.get_slice(hf_name)
                shape = tuple(raw.get_shape())
                if shape != tuple(expected[name]):
                    raise ValueError(f"{file}: tensor {hf_name!r} has shape {list(shape)}, but config.json "
                                     f"makes it {list(expected[name])}; the weights and config.json are "
                                     f"of different models")
                seen.add(name)
                yield name, CheckedSlice(file, hf_name, raw)
    missing = set(expected) - seen
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {sorted(ours_to_hf(n) for n in missing)[:5]}")


def load_config(path) -> ModelConfig:
    """The model's config.json, checked field by field (model.ModelConfig) before anything is built."""
    repair_export(path)
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no such model directory" if not os.path.isdir(path) else
                         f"{path}: no config.json (a Hugging Face model directory holds one)")
    try:
        with open(file) as f:
            hf = json.load(f)
        if not isinstance(hf, dict):
            raise ValueError(f"holds a {type(hf).__name__}, not an object of fields")
        return ModelConfig.from_hf(hf)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None


def tensor_bytes(tensors) -> int:
    """Bytes the tensors hold: what writing them takes."""
    return sum(t.numel() * t.element_size() for t in tensors)


def shapes(model: nn.Module) -> dict:
    """Parameter name -> full shape (an FSDP2 or TP parameter's global one): what iter_checkpoint checks."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def load_pretrained(path, dtype=None, device=None) -> Transformer:
    """Read a HF model directory (config.json + safetensors) into a Transformer.

    The model is built on the meta device and each weight is assigned as it is read, so no
    random initialization is spent and only one copy of the weights ever exists.
    """
    config = load_config(path)
    model = on_meta(config)
    for name, weight in iter_checkpoint(path, shapes(model), config.tie_word_embeddings):
        tensor = weight[:]
        set_tensor(model, name, tensor.to(device=device, dtype=dtype or tensor.dtype))
    model.inv_freq = rope_inv_freq(config).to(device)
    return model


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor):
    """Replace parameter `name` (meta or real) with `tensor`, keeping ties intact."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    if name == "embed_tokens.weight":
        model.tie()


def save_pretrained(model: Transformer, path, state_dict=None, max_shard_bytes=5 * 2**30,
                    tokenizer=None, beside=None):
    """Write config.json + safetensors (sharded past max_shard_bytes) that transformers loads,
    and the tokenizer's files when one is given.

    `state_dict` (our names -> full tensors) may be passed by callers that gathered a sharded
    model; by default it is the model's own. Files are written to a temporary directory and
    renamed into place, so a crash never leaves a half-written checkpoint under `path`;
    beside(tmp) writes what else belongs in it first (a LoRA run's adapter), in the same rename.
    """
    config = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for name, t in sd.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[ours_to_hf(name)] = t.detach().to("cpu").contiguous()
    tmp = str(path).rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
    with disk_errors(tmp, tensor_bytes(tensors.values())):
        write_shards(model, tensors, tmp, max_shard_bytes, tokenizer)
        if beside is not None:
            beside(tmp)
    publish(tmp, path)


def write_shards(model, tensors, tmp, max_shard_bytes, tokenizer):
    """save_pretrained's files, in directory tmp."""
    config = model.config
    os.makedirs(tmp)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = tensor_bytes([t])
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = tensor_bytes(tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = config.to_hf()
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def publish(tmp, path):
    """Move `tmp` (a file, or a directory) to `path`, never leaving `path` half-written. A
    directory keeps the files already in `path` that tmp lacks (tokenizer files written beside
    the weights)."""
    path = str(path).rstrip("/")
    if not os.path.isdir(tmp):
        os.replace(tmp, path)
        return
    repair_export(path)
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(path):
        for name in os.listdir(path):
            if not os.path.exists(os.path.join(tmp, name)):
                os.replace(os.path.join(path, name), os.path.join(tmp, name))
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def repair_export(path):
    """A kill between publish's two renames leaves the previous directory at path.old and none at
    path: put it back. Every reader of a model directory calls this first (load_config)."""
    path = str(path).rstrip("/")
    if os.path.isdir(path + ".old") and not os.path.exists(path):
        os.replace(path + ".old", path)
        print(f"{path}: an interrupted write had left it at {path}.old; moved back")


def write_atomic(path, text):
    """Write `text` to file `path` through a temporary file (flushed to disk) and publish."""
    tmp = path + ".tmp"
    with disk_errors(tmp, len(text.encode())), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)


def append_whole(path, text):
    """Append `text` to file `path`, whole or not at all: a write that fails (a full disk) cuts
    the file back to where it was, so no torn line is left, and says so (disk_errors)."""
    start = os.path.getsize(path) if os.path.exists(path) else 0
    with disk_errors(path, len(text.encode()), undo=lambda: os.truncate(path, start)):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


@contextlib.contextmanager
def disk_errors(partial, needed_bytes, undo=None):
    """A write that fails for want of space says so, with the path and the bytes it needed, and
    removes its partial output (or calls undo(), for a file appended to). Writers word a full disk
    in many ways (errno 28; torch's zip writer "enforce fail ... unexpected pos"; safetensors' own
    error), and dcp.save wraps each rank's failure in a CheckpointException, which is no
    Exception: so the test is the space left on the disk once the partial output is gone."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        if undo is not None:
            undo()
        elif os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)
        elif os.path.exists(partial):
            os.remove(partial)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(partial))).free
        if getattr(e, "errno", None) == errno.ENOSPC or free < max(needed_bytes, 2**20) + 2**20:
            raise OSError(errno.ENOSPC, f"no space left to write {partial}: it needs about "
                                        f"{needed_bytes / 2**20:,.1f} MiB and its disk has {free / 2**20:,.1f} MiB "
                                        f"free: free some, or write elsewhere (--out)") from e
        raise
