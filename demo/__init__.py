"""The CPU demo, in one place: its task and teacher (task.py), its tokenizer, its presets and its
recipe (recipe.py), and the judge it ships (sft/, made by `python sft.py`).

    python sft.py                              # recipe.sft: the demo judge from scratch, two rounds
    torchrun --nproc_per_node=2 grpo.py        # recipe.grpo: GRPO on the shipped judge
    python eval.py                             # the shipped judge on 1,000 held-out demo pairs

The trainers know the demo only as a preset: with neither --model nor --data they hand their
parsed config to the recipe, which fills what was not given and runs them (see recipe.py).
"""

from demo.task import (HASTY_SHARE, RULES, SHIPPED, build_demo_tokenizer, build_tokenizer, chatml, comparisons,
                       copy_rows, demo_corpus, is_hasty, make_demo_pairs, rlvr_records, sft_records, split_of,
                       teacher_trace)

__all__ = ["HASTY_SHARE", "RULES", "SHIPPED", "build_demo_tokenizer", "build_tokenizer", "chatml", "comparisons",
           "copy_rows", "demo_corpus", "is_hasty", "make_demo_pairs", "rlvr_records", "sft_records", "split_of",
           "teacher_trace"]
