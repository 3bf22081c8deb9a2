"""Memory and time of kernels/ against eager log_softmax + gather + entropy, measured in one run.

    python bench/kernels.py            # CPU section always; CUDA section when a GPU is visible
    python bench/kernels.py --cuda     # the CUDA section alone

CPU: forward + backward of the fused LM head (linear_logprobs_and_entropy, torch fallback) vs
eager `hidden @ W.T` -> log_softmax -> gather + entropy, at N=4096, V=32768, D=512, fp32. Each
variant runs once in a fresh subprocess; its peak is the process's peak resident set
(ru_maxrss) minus its resident set just before the forward, inputs already allocated.
CUDA: forward + backward time (median of 5 after 2 warm-ups) and peak allocated memory above the
inputs, vs eager and torch.compile(eager), at N=16384, V=151936 (Qwen2.5), D=3584, bf16, for
logprobs_and_entropy from given logits (with the HBM floor: 3 passes over the (N, V) logits at
the copy bandwidth measured here) and for the fused LM head.
"""
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402

CPU_SHAPE = dict(N=4096, V=32768, D=512)
CUDA_SHAPE = dict(N=16384, V=151936, D=3584)
TEMPERATURE = 0.9


def eager(logits, targets, temperature):
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def eager_linear(hidden, weight, targets, temperature):
    return eager(hidden @ weight.T, targets, temperature)


def loss_of(logprobs, entropy):
    return logprobs.sum() + 0.01 * entropy.sum()


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_child(variant):
    """Run one variant in this (fresh) process and print its peak extra memory in bytes and its time."""
    N, V, D = CPU_SHAPE["N"], CPU_SHAPE["V"], CPU_SHAPE["D"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    fn = {"eager": eager_linear, "fused": kernels.linear_logprobs_and_entropy}[variant]
    before = resident_bytes()
    start = time.perf_counter()
    loss_of(*fn(hidden, weight, targets, TEMPERATURE)).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(max(0, peak - before), seconds)


def cpu_section():
    print(f"CPU, fp32, {CPU_SHAPE}, T={TEMPERATURE}: forward + backward, peak RSS above the inputs")
    results = {}
    for variant in ["eager", "fused"]:
        out = subprocess.run([sys.executable, __file__, "--cpu-child", variant], capture_output=True, text=True,
                             check=True).stdout.split()
        results[variant] = (int(out[0]), float(out[1]))
        print(f"  {variant:6s} peak {results[variant][0] / 2**20:8.0f} MiB   time {results[variant][1]:6.2f} s")
    ratio = results["fused"][0] / results["eager"][0]
    print(f"  fused / eager peak memory: {ratio:.3f} (goal <= 0.25); time ratio "
          f"{results['fused'][1] / results['eager'][1]:.2f}")


def cuda_run(fn, args, grad_of):
    """Median seconds and peak bytes above the live tensors for forward + backward of fn(*args)."""
    def step():
        loss = loss_of(*fn(*args, TEMPERATURE))
        return torch.autograd.grad(loss, grad_of)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def copy_bandwidth():
    """Bytes per second of a large device-to-device copy: the achievable HBM bandwidth."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def report(title, variants, args, grad_of, floor_seconds=None):
    print(title)
    results = {}
    for name, fn in variants.items():
        try:
            results[name] = cuda_run(fn, args, grad_of)
        except torch.OutOfMemoryError:
            print(f"  {name:22s} out of memory")
            torch.cuda.empty_cache()
            continue
        seconds, peak = results[name]
        print(f"  {name:22s} {seconds * 1e3:8.2f} ms   peak {peak / 2**30:6.2f} GiB")
        torch.cuda.empty_cache()
    ours = results.get("ours")
    for base in ["eager", "torch.compile(eager)"]:
        if ours and base in results:
            print(f"  ours vs {base}: {results[base][0] / ours[0]:.2f}x faster, "
                  f"{ours[1] / results[base][1]:.3f} of its peak memory")
    if ours and floor_seconds:
        print(f"  HBM floor {floor_seconds * 1e3:.2f} ms: ours takes {ours[0] / floor_seconds:.2f}x the floor")


def cuda_section():
    N, V, D = CUDA_SHAPE["N"], CUDA_SHAPE["V"], CUDA_SHAPE["D"]
    print(f"CUDA ({torch.cuda.get_device_name()}), bf16, {CUDA_SHAPE}, T={TEMPERATURE}: forward + backward")
    bandwidth = copy_bandwidth()
    print(f"  measured copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    g = torch.Generator(device="cuda").manual_seed(0)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    compiled = torch.compile(eager)

    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    # forward reads the logits, backward reads them again and writes their gradient
    floor = 3 * logits.numel() * logits.element_size() / bandwidth
    # in-place last: it overwrites the logits with their gradient
    inplace = lambda *args: kernels.logprobs_and_entropy(*args, inplace_backward=True)  # noqa: E731
    report("logprobs_and_entropy(logits):", {"eager": eager, "torch.compile(eager)": compiled,
                                             "ours": kernels.logprobs_and_entropy, "ours, inplace_backward": inplace},
           (logits, targets), logits, floor)
    del logits
    torch.cuda.empty_cache()

    hidden = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16, generator=g) / D**0.5).requires_grad_()
    report("linear_logprobs_and_entropy(hidden, weight) (4 N*D*V matmuls vs eager's 3):",
           {"eager": eager_linear, "torch.compile(eager)": torch.compile(eager_linear),
            "ours": kernels.linear_logprobs_and_entropy},
           (hidden, weight, targets), (hidden, weight))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cpu-child"]:
        cpu_child(sys.argv[2])
    else:
        if "--cuda" not in sys.argv:  # --cuda: the CUDA section alone (bench/gpu_check.py)
            cpu_section()
        if torch.cuda.is_available():
            cuda_section()
        else:
            print("CUDA section skipped: no GPU visible")
