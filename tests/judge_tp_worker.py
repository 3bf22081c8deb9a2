"""torchrun --nproc_per_node=2 tests/judge_tp_worker.py OUT: a judge over a TP group of 2 gathering each
rank's own groups (grpo.py --reward judge --judge_tp 2), where rank 1's responses are all too long
to judge: it must still join the group's sampler, or rank 0 waits in the gather forever. Writes
each rank's rewards and too-long counts to OUT/rank_R.json."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
import distributed  # noqa: E402
from judge import Judge  # noqa: E402

torch.set_num_threads(1)
with distributed.running():
    ctx = distributed.init(1.0, tp=2)  # a one-minute collective timeout: a hang fails the test, not CI
    judge = Judge.load(demo.SHIPPED, ctx, max_new_tokens=16, max_prompt_len=200, batch_size=32, gather=True)
    question = "What is 2 + 3?"
    responses = ["5", "6", "2 + 3 = 5"] if ctx.rank == 0 else ["word " * 300 + str(i) for i in range(3)]
    found = []
    for method in ("round_robin", "knockout"):
        [group] = judge.rewards([(question, responses)], method)
        distributed.barrier()
        found.append({"method": method, "rewards": group.rewards, "too_long": group.too_long})
    (Path(sys.argv[1]) / f"rank_{ctx.rank}.json").write_text(json.dumps(found))
