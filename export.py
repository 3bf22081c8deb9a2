"""Turn a resumable checkpoint (OUT/step_N, written by sft.py or grpo.py) into a Hugging Face
model directory, while its run goes on or after it stopped: no run needs to finish for a
mid-run evaluation, and a crash loses no export.

    python export.py runs/grpo7b/step_00000040 runs/grpo7b-step40
    python eval.py --model runs/grpo7b-step40 --bench rm-bench --data rm-bench/

One process, on the CPU: the sharded model state is read whole (the optimizer state is not read),
and the tokenizer comes from the run's --model directory (or the demo's OUT/tokenizer). A LoRA
run's checkpoint holds its adapters alone: they are read onto the run's --model (refused when
those weights are not the ones the run started from), merged into the weights written, and
written in PEFT's format too, in OUT/adapter, as the run's own export; the weights keep the base
file's dtype (a --no-bf16 run's own export is fp32).
"""

import argparse
import json
import os

import torch.distributed.checkpoint as dcp

import lora
import tokenization
from checkpoint import load_pretrained
from distributed import save_hf
from model import ModelConfig, on_meta


def export(step_dir, out):
    run_dir = os.path.dirname(os.path.abspath(step_dir))
    for need in ("config.json", "trainer_state.json"):
        if not os.path.isfile(os.path.join(step_dir, need)):
            raise ValueError(f"{step_dir}: no {need}; is it a step_N checkpoint of sft.py or grpo.py?")
    with open(os.path.join(step_dir, "config.json")) as f:
        config = ModelConfig.from_hf(json.load(f))
    with open(os.path.join(run_dir, "config.json")) as f:
        run = json.load(f)
    tokenizer = tokenization.load_tokenizer(run["model"] or os.path.join(run_dir, "tokenizer"))
    adapters = lora.of(argparse.Namespace(**{k: run.get(k, 0) for k in ("lora_rank", "lora_alpha", "lora_targets")}))
    if adapters and run.get("model_sha256") != lora.base_digest(run["model"]):
        raise ValueError(f"{step_dir}: its adapters were trained on another base than {run['model']} holds now "
                         f"(the run's config.json keeps its digest): put that base back at {run['model']}")
    model = lora.add_adapters(load_pretrained(run["model"]), adapters) if adapters else on_meta(config).materialize("cpu")
    state = {"model": {k: v for k, v in model.state_dict().items() if lora.is_adapter(k) or not adapters}}
    dcp.load(state, checkpoint_id=step_dir)  # reads the model's entries only, resharded to whole tensors
    save_hf(model, tokenizer, out, base_model=run["model"])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", help="a step_N directory of a run")
    parser.add_argument("out", help="the Hugging Face directory to write")
    args = parser.parse_args(argv)
    print(f"wrote {export(args.checkpoint, args.out)}")


if __name__ == "__main__":
    main()
