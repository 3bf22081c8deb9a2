"""Every GPU-only path, checked at once on the first GPU at hand (one H100/H200, within 10 minutes).

    python bench/gpu_check.py --out runs/gpu_check.json

Sections, most important first. Each runs in a process of its own under its own wall-clock limit
(SECTIONS; the whole budget is printed at the start), so a hang, a crash or a segfault costs that
section alone; the JSON is rewritten after every section, so a kill keeps what finished. A section
that fails is followed by a probe of the device: if the GPU no longer answers (a sticky CUDA
error), the run ends there and the sections left are named as not run. Exit status 1 if any
section failed or did not run.
1. pytest on the GPU: the Triton kernels on CUDA against torch (V = 151,936 / 152,064, bf16,
   T != 1), the paged decode attention kernel against its fp64 reference, the CUDA-graph
   decode test, and the CPU-form tests of the CUDA paths that need a CUDA build of torch (fake CUDA tensors with the fused kernels' strides, NCCL's device map).
2. packed-row attention: FlashAttention's varlen kernel against one fp32 SDPA per document,
   forward and backward.
3. a Qwen2.5-0.5B-shaped random model in bf16: prefill + decode through the fused kernels against
   a full forward, packed documents against separate forwards, CUDA-graph generate against eager,
   and (a figure, not a check) the share of traces a budget that forces preemption leaves unchanged.
4. one FSDP2 GRPO step on one GPU (NCCL, a world of one) on that model, graphs on, with its time
   split and peak memory (allocated, reserved, and what the device holds outside torch) against
   the memory plan of the same run (grpo.py --plan): more than PLAN_TOLERANCE over it fails; then
   the tensor-parallel decoder (DTensor over NCCL, tp = 1) under CUDA graphs against the plain
   model, and a GRPO step with --offload_states against one without (same losses, its peak memory);
   the same step with LoRA (--lora_rank 16: a frozen bf16 base, fp32 adapters under FSDP2's bf16
   policy, the reference with the adapters off) against its own plan.
5. the CUDA sections of bench/kernels.py and bench/rollout.py, their output kept (what they printed
   before a time limit, too).

    python bench/gpu_check.py --smoke      # sections 3 and 4 on the CPU, tiny shape (tests/test_gpu_check.py)
"""

import argparse
import json
import os
import signal
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Before torch can start CUDA: the allocator reads this once, when the first tensor is allocated.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import distributed as D  # noqa: E402
from bench.shapes import QWEN25  # noqa: E402
import grpo  # noqa: E402
import tp  # noqa: E402
from checkpoint import save_pretrained, write_atomic  # noqa: E402
from kvcache import KVCache  # noqa: E402
from model import ModelConfig, Transformer, packed_attention  # noqa: E402
from plan import read_table  # noqa: E402
from kvcache import PAGE_SIZE, cache_pages  # noqa: E402
from scheduler import as_prompts  # noqa: E402
from rollout import SamplingParams, generate  # noqa: E402

QWEN25_05B = dict(QWEN25["0.5B"], rope_theta=1e6, max_position_embeddings=32768)
TINY = dict(QWEN25_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
# What the sections run on: the GPU in bf16 at the 0.5B shape, or (--smoke) the CPU in fp32 at a tiny one.
TARGET = dict(device="cuda", dtype=torch.bfloat16, shape=QWEN25_05B)


def rel_err(ours, ref):
    """max |ours - ref| / max |ref|, in fp32."""
    ours, ref = ours.float(), ref.float()
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def sync():
    if TARGET["device"] == "cuda":
        torch.cuda.synchronize()


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def child(cmd):
    """Run a command from the repo root, passing its output on as it comes (a section killed at its
    limit keeps what it printed); its exit status and the tail of its output. The section's own
    limit bounds it: its process group is killed with it."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    out = "".join(lines)[-6000:]
    return {"returncode": proc.wait(), "seconds": round(time.time() - start, 1), "output": out}


def pytest_on_gpu():
    res = child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                 "tests/test_paged_kernel.py", "tests/test_gpu_paths.py",
                 "tests/test_rollout.py::test_cuda_graph_decode_equals_eager"])
    summary = re.findall(r"\d+ (?:passed|failed|skipped|error)", res["output"])
    res["summary"] = ", ".join(summary)
    check(res["returncode"] == 0, f"pytest failed: {res['summary']}")
    return res


def varlen_attention():
    g = torch.Generator(device="cuda").manual_seed(0)
    docs = [3000, 1, 5000, 191]
    N, H, H_kv, Dh = sum(docs), 28, 4, 128  # Qwen2.5-7B's heads
    q, k, v = (torch.randn(N, h, Dh, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (H, H_kv, H_kv))
    grad_out = torch.randn(N, H, Dh, device="cuda", generator=g, dtype=torch.bfloat16)
    out = packed_attention(q, k, v, docs, "varlen")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = packed_attention(*ref_inputs, docs, "sdpa")  # fp32, one SDPA per document
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.float())
    errs = {"out": rel_err(out, ref)}
    errs.update({f"grad_{n}": rel_err(a, b) for n, a, b in zip("qkv", grads, ref_grads)})
    check(all(e < 2e-2 for e in errs.values()), f"varlen vs per-document fp32 SDPA: {errs}")
    return {"docs": docs, "relative_error": errs}


def random_model(config):
    torch.manual_seed(0)
    with torch.device(TARGET["device"]):
        model = Transformer(config)
    D.init_weights(model, seed=0)
    return model.to(TARGET["dtype"]).eval()


def model_paths():
    config = ModelConfig(**TARGET["shape"])
    model = random_model(config)
    dev = TARGET["device"]
    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        ids = torch.randint(0, config.vocab_size, (1, 300), generator=g).to(dev)
        full = model(ids)[0]
        # prefill 299 tokens into slot 1 of a 3-slot cache, then decode the last one
        cache = KVCache(config, 3, 512, model.embed_tokens.weight.dtype, dev)  # one page per slot
        model.prefill(ids[:, :299], torch.arange(299, device=dev)[None], cache, cache_slots=torch.tensor([1], device=dev))
        step = model.decode(ids[:, 299:].expand(3, 1), torch.full((3, 1), 299, device=dev), cache,
                            kv_len=512, cache_slots=torch.tensor([0, 1, 2], device=dev))[1, 0]
        out["decode_vs_full_forward"] = rel_err(step, full[-1])
        docs = [120, 1, 179]
        packed_ids = torch.randint(0, config.vocab_size, (1, sum(docs)), generator=g).to(dev)
        positions = torch.cat([torch.arange(n) for n in docs])[None].to(dev)
        packed = model(packed_ids, position_ids=positions, doc_lens=docs)[0]
        start, errs = 0, []
        for n in docs:
            errs.append(rel_err(packed[start:start + n], model(packed_ids[:, start:start + n])[0]))
            start += n
        out["packed_vs_separate"] = max(errs)
    check(out["decode_vs_full_forward"] < 3e-2 and out["packed_vs_separate"] < 3e-2, f"bf16 paths: {out}")
    prompts = torch.randint(0, config.vocab_size, (6, 40), generator=g).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=48, n=2, seed=7)
    times = {}
    for graphs in (True, False):
        sync()
        start = time.time()
        times[graphs] = (generate(model, prompts, params, max_batch_size=8, use_cuda_graph=graphs),
                         time.time() - start)
    same = [a.token_ids == b.token_ids for a, b in zip(times[True][0], times[False][0])]
    out.update(cuda_graph_equals_eager=sum(same) / len(same), seconds_graph=round(times[True][1], 2),
               seconds_eager=round(times[False][1], 2))
    # bf16 ties can flip a sampled token between two kernel orders; graphs replay the same kernels.
    check(out["cuda_graph_equals_eager"] == 1.0, f"CUDA-graph sampling differs from eager on {same}")
    # A preempted sequence regenerates its trace in other batches and buckets, through other
    # kernels, and under a tight budget the others run in other batches too: in bf16 a near-tied
    # sample can flip (each trace stays self-consistent, which is what GRPO needs). A figure, not a
    # check: the share of traces a budget that forces preemption leaves unchanged.
    least = cache_pages(config, as_prompts(prompts), params, TARGET["dtype"], None, 1)
    page = KVCache.bytes_per_slot(config, PAGE_SIZE, TARGET["dtype"])
    tight, stats = generate(model, prompts, params, max_batch_size=8, kv_budget_bytes=(least + 2) * page,
                            return_stats=True)
    same = [a.token_ids == b.token_ids for a, b in zip(tight, times[True][0])]
    out.update(tight_budget_traces_equal=sum(same) / len(same), preemptions=stats.preemptions)
    return out


class NoTokenizer:
    """What grpo_step asks of a tokenizer, for random token ids: an EOS a random model almost
    never samples, empty text."""
    @property
    def eos_token_id(self):
        return TARGET["shape"]["vocab_size"] - 1

    def decode(self, ids, skip_special_tokens=True):
        return ""


def first_token_even(completions, texts, records):
    return torch.tensor([1.0 if c.token_ids[0] % 2 == 0 else -1.0 for c in completions])


def random_prompts(n, length) -> "grpo.Prompts":
    """n prompts of random token ids, as a step draws them."""
    g = torch.Generator().manual_seed(0)
    return grpo.Prompts([{"label": "model_a"}] * n,
                        [torch.randint(0, TARGET["shape"]["vocab_size"], (length,), generator=g).tolist()
                         for _ in range(n)])


def grpo_step_one_gpu(tmp, **extra):
    model_dir = Path(tmp) / "model"
    save_pretrained(random_model(ModelConfig(**TARGET["shape"])), model_dir)
    on_gpu = TARGET["device"] == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
    ctx = D.init()
    check(ctx.distributed == ctx.gpu == on_gpu, "a CUDA run is a world of one over NCCL")
    flags = dict(model=str(model_dir), rollout_batch_size=16, mini_batch_size=8, n_samples=7,
                 max_prompt_len=512, max_response_len=256 if on_gpu else 16, micro_batch_tokens=8192,
                 lr=1e-6, bf16=on_gpu, **extra)
    cfg = grpo.GRPOConfig(**flags)
    policy = grpo.build_policy(cfg, ctx, NoTokenizer())
    policy.ref_model = grpo.build_reference(cfg, ctx)
    prompts = random_prompts(16, cfg.max_prompt_len)
    steps = []
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(2):  # step 1 makes AdamW's state; step 2 is the steady state the plan walks
        # Without EOS, traces run to max_response_len: the plan's worst case.
        m = grpo.grpo_step(policy, prompts, step, cfg, ctx, score=first_token_even).metrics
        steps.append({k: m[k] for k in ("time_generate", "time_logprobs", "time_update", "tokens_per_s",
                                        "rollout_logprob_diff_max", "loss", "grad_norm", "kl")})
    check(all(abs(s["loss"]) < 1e3 and s["grad_norm"] == s["grad_norm"] for s in steps), f"losses {steps}")
    out = {"steps": steps}
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.max_memory_reserved() / 2**30
        outside = (total - free) / 2**30 - torch.cuda.memory_reserved() / 2**30  # context, NCCL, cuBLAS
        argv = [x for k, v in flags.items() if k != "bf16" for x in (f"--{k}", str(v))]
        gpu_gib = total / 2**30  # the card as it reports itself, as plan.check_before_training reads it
        planned = child([sys.executable, "grpo.py", "--plan", "--plan_world_size", "1", "--no-plan_alternatives",
                         "--plan_gpu_gib", f"{gpu_gib:.1f}", *argv])
        peaks = [peak for _, peak, _ in read_table(planned["output"])[0] if peak is not None]
        check(peaks, f"the plan of this run printed no table: {planned['output'][-1500:]}")
        plan_peak = max(peaks)
        out.update(peak_allocated_gib=round(peak, 2), peak_reserved_gib=round(reserved, 2),
                   outside_torch_gib=round(outside, 2), plan_peak_gib=plan_peak,
                   measured_over_plan=round(peak / plan_peak, 3), plan_fits=planned["returncode"] == 0,
                   plan=planned["output"][-2500:])
        check(peak <= plan_peak * (1 + PLAN_TOLERANCE),
              f"the step's peak {peak:.2f} GiB is over its plan's {plan_peak:.2f} GiB by more than "
              f"{PLAN_TOLERANCE:.0%}: the plan undercounts, and its verdicts cannot be trusted")
    return out


def tp_and_offload_one_gpu(tmp):
    """The tensor-parallel decoder (DTensor, NCCL) at tp = 1 under CUDA graphs against the plain
    model, and a GRPO step with --offload_states (AdamW state and reference sent to the host and
    back) against one without: the same losses, less peak memory."""
    on_gpu = TARGET["device"] == "cuda"
    ctx = D.init()
    out = {}
    config = ModelConfig(**TARGET["shape"])
    model = random_model(config)
    if not torch.distributed.is_initialized():  # the CPU smoke run: a gloo world of one for DTensor
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(TARGET["device"], (1,))
    decoder = tp.build(config, mesh, TARGET["dtype"], ctx.device)
    tp.fill_from_fsdp(decoder, model)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, config.vocab_size, (6, 40), generator=g).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=48, n=2, seed=7)
    got, want = generate(decoder, prompts, params, max_batch_size=8), generate(model, prompts, params, max_batch_size=8)
    same = [a.token_ids == b.token_ids for a, b in zip(got, want)]
    out["tp1_graph_decode_equals_plain"] = sum(same) / len(same)
    check(out["tp1_graph_decode_equals_plain"] == 1.0, f"TP decode differs from the plain model on {same}")
    del decoder
    model_dir = Path(tmp) / "offload-model"
    save_pretrained(model, model_dir)
    del model
    prompts = random_prompts(8, 256)
    runs = {}
    for offload in (False, True):
        cfg = grpo.GRPOConfig(model=str(model_dir), rollout_batch_size=8, mini_batch_size=8, n_samples=2,
                              max_prompt_len=256, max_response_len=64 if on_gpu else 8, micro_batch_tokens=4096,
                              lr=1e-6, bf16=on_gpu, offload_states=offload)
        policy = grpo.build_policy(cfg, ctx, NoTokenizer())
        policy.ref_model = None if offload else grpo.build_reference(cfg, ctx)  # as train() does
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        steps = [grpo.grpo_step(policy, prompts, step, cfg, ctx, score=first_token_even).metrics for step in range(2)]
        # at ratio 1 over traces of one length the loss is 0 whatever the weights: compare gradients too
        runs[offload] = {"grad_norms": [m["grad_norm"] for m in steps], "losses": [m["loss"] for m in steps],
                         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_gpu else None}
        del policy
    out["offload"] = runs
    same = all(abs(a - b) <= 1e-3 * abs(b) + 1e-6 for key in ("grad_norms", "losses")
               for a, b in zip(runs[True][key], runs[False][key]))
    check(same, f"--offload_states changes the steps: {runs}")
    return out


def bench(script):
    res = child([sys.executable, script, "--cuda"])
    check(res["returncode"] == 0, f"{script} exited {res['returncode']}")
    return res


def probe():
    """Does the device still answer? After a sticky CUDA error (an illegal address, an Xid) every
    later kernel fails: then the run stops instead of failing each section the same way."""
    if TARGET["device"] == "cuda":
        x = torch.ones(1024, device="cuda")
        check(float(x.sum()) == 1024.0, "the GPU computed a wrong sum")
    return {}


# Measured peak over the plan's: what the plan may miss on one GPU (allocator rounding, what the
# fake backward does not allocate) before its verdicts are not to be trusted.
PLAN_TOLERANCE = 0.10

# name: (what it runs, its wall-clock limit in seconds, its process's start-up included). The
# limits add up to 10 minutes, inside the 15 a lent GPU gives a session (start and transfers apart).
SECTIONS = {
    "pytest_on_gpu": (pytest_on_gpu, 150),
    "varlen_attention": (varlen_attention, 30),
    "model_paths": (model_paths, 60),
    "grpo_step_one_gpu": (lambda: grpo_step_one_gpu(tempfile.mkdtemp()), 90),
    "tp_and_offload_one_gpu": (lambda: tp_and_offload_one_gpu(tempfile.mkdtemp()), 60),
    "grpo_step_lora_one_gpu": (lambda: grpo_step_one_gpu(tempfile.mkdtemp(), lora_rank=16), 60),
    "bench_kernels": (lambda: bench("bench/kernels.py"), 60),
    "bench_rollout": (lambda: bench("bench/rollout.py"), 90),
}
SMOKE = ("model_paths", "grpo_step_one_gpu", "tp_and_offload_one_gpu", "grpo_step_lora_one_gpu")
PROBE_LIMIT_S = 60


def run_section(name, part, inject):
    """In the section's own process: run it and write its entry to `part` (JSON)."""
    fault = inject.get(name)
    if fault == "hang":  # for tests/test_gpu_check.py: a section that never returns
        time.sleep(10**6)
    if fault == "crash":  # ... and one that dies as a segfault or an abort does, writing nothing
        os.abort()
    try:
        fn = probe if name == "probe" else SECTIONS[name][0]
        check(fault != "sticky", "injected: the device does not answer")
        entry = {"ok": True, **fn()}
    except Exception as e:  # recorded, and the parent goes on with the next section
        entry = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    write_atomic(part, json.dumps(entry) + "\n")
    D.shutdown()  # once the section's models are gone: the process groups end here, not at exit
    return 0 if entry["ok"] else 1


def in_own_process(name, limit_s, argv, tmp):
    """Run one section in a child process (its own session, so a limit kills its children too);
    its entry, or what went wrong: a time limit (with the output so far) or a death without one."""
    part = Path(tmp) / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part), *argv]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit_s)
        if part.exists():
            entry = json.loads(part.read_text())
        else:
            how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"status {proc.returncode}"
            entry = {"ok": False, "error": f"its process died ({how}) without a result"}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        entry = {"ok": False, "error": f"timed out: still running after its limit of {limit_s} s; killed"}
    entry["seconds"] = round(time.time() - start, 1)
    entry.setdefault("output", output[-6000:])
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--only", default="", help="comma-separated section names")
    parser.add_argument("--smoke", action="store_true", help="sections 3-4 on the CPU, tiny shape")
    parser.add_argument("--limits", default="", help="name=seconds,... overrides of SECTIONS' limits")
    parser.add_argument("--inject", default="", help="name=hang|crash|sticky,... (tests of the runner itself)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # the child: run this one section
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    inject = dict(kv.split("=") for kv in args.inject.split(",") if kv)
    if args.smoke:
        TARGET.update(device="cpu", dtype=torch.float32, shape=TINY)
    if args.section:
        sys.exit(run_section(args.section, args.part, inject))
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no GPU visible: this check is for a machine with one (--smoke runs part of it on the CPU)")
    names = args.only.split(",") if args.only else list(SMOKE if args.smoke else SECTIONS)
    limits = {n: SECTIONS[n][1] for n in names} | {k: float(v) for k, v in
                                                   (kv.split("=") for kv in args.limits.split(",") if kv)}
    print("budget: " + ", ".join(f"{n} {limits[n]:.0f} s" for n in names) +
          f"; {sum(limits.values()) / 60:.1f} min in all, in this order", flush=True)
    child_argv = (["--smoke"] if args.smoke else []) + (["--inject", args.inject] if args.inject else [])
    results = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "budget_s": limits, "sections": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stopped = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if stopped:
                entry = {"ok": False, "not_run": f"the device stopped answering after {stopped}"}
            else:
                print(f"== {name} (limit {limits[name]:.0f} s)", flush=True)
                entry = in_own_process(name, limits[name], child_argv, tmp)
                if not entry["ok"]:
                    health = in_own_process("probe", PROBE_LIMIT_S, child_argv, tmp)
                    entry["device_answers_after"] = health["ok"]
                    stopped = None if health["ok"] else name
            results["sections"][name] = entry
            write_atomic(args.out, json.dumps(results, indent=2) + "\n")  # a kill keeps what finished
            print(json.dumps({k: v for k, v in entry.items() if k not in ("output", "plan", "traceback")}),
                  flush=True)
            if not entry["ok"] and "not_run" not in entry:
                print(entry.get("traceback") or entry["output"][-3000:], flush=True)
    failed = [n for n, e in results["sections"].items() if not e["ok"]]
    print(f"wrote {args.out}; " + (f"FAILED or not run: {failed}" if failed else "all sections passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
