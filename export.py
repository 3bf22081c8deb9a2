"""Turn a resumable checkpoint (OUT/step_N, written by sft.py or grpo.py) into a Hugging Face
model directory, while its run goes on or after it stopped: no run needs to finish for a
mid-run evaluation, and a crash loses no export.

    python export.py runs/grpo7b/step_00000040 runs/grpo7b-step40
    python eval.py --model runs/grpo7b-step40 --bench rm-bench --data rm-bench/

One process, on the CPU: the sharded model state is read whole (the optimizer state is not read),
and the tokenizer comes from the run's --model directory (or the demo's OUT/tokenizer).
"""

import argparse
import json
import os

import torch.distributed.checkpoint as dcp

import tokenization
from checkpoint import save_pretrained
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
    model = on_meta(config).materialize("cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=step_dir)  # reads the model's entries only, resharded to whole tensors
    save_pretrained(model, out, tokenizer=tokenizer)
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
