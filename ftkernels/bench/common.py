"""Timing, ceilings and result files shared by the benchmark suites."""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

# ``--dtype``: the activation/weight dtype of the per-layer suites (lora_linear, lora_conv, masked,
# loreft, optimizer); None keeps each case's own (bf16 on GPU, fp32 on CPU).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as case names and results files spell it."""
    return str(dtype).replace("torch.", "")


def short_dtype(dtype: torch.dtype | None) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` (None: the default fp32), for case names."""
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def compile_baselines(device: torch.device) -> bool:
    """Whether to time the ``torch.compile`` baselines: on GPU, unless ``FTKERNELS_BENCH_COMPILE=0``
    (compiling takes minutes; a short run can skip it)."""
    return device.type == "cuda" and os.environ.get("FTKERNELS_BENCH_COMPILE", "1") != "0"


def sync(device: torch.device) -> None:
    """Wait for queued work on a CUDA device (a no-op on CPU) before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of one ``fn()`` in ms. GPU: the reps are queued back to back, as a training
    loop queues its steps and as ``triton.testing.do_bench`` times, each bracketed by CUDA events
    and synchronized once at the end: a rep's time is its device time while the host keeps ahead,
    and the host's time per call when the host is the slower side (a host-bound step still shows
    as such). Synchronizing after every rep would add the host's launch latency to a device-bound
    call (0.6 ms on the LoReFT case, 2026-11-23). CPU: perf_counter per rep."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_pair_ms(fa, fb, device: torch.device, rounds: int = 4, reps: int = 5) -> tuple[float, float]:
    """Medians of ``fa`` and ``fb`` timed in alternating rounds, so drift in machine speed (turbo,
    neighbours on a shared host) hits both sides alike."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(time_ms(fa, device, warmup=1, reps=reps))
        tb.append(time_ms(fb, device, warmup=1, reps=reps))
    return statistics.median(ta), statistics.median(tb)


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache inputs could sit in between timed calls: the CUDA device's L2, or on
    CPU the largest cache sysfs lists for cpu0 (32 MiB where it lists none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with contextlib.suppress(OSError, ValueError), open(index) as f:
            text = f.read().strip()  # "32768K"
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:])
            sizes.append(int(text[:-1]) * unit if unit else int(text))
    return max(sizes, default=32 * 2**20)


def input_sets(make, device: torch.device, cap: int = 8) -> list:
    """Independent sets of one case's inputs (``make()`` returns a tensor or a tuple of them, fresh random
    values each call): enough that cycling through them streams at least twice the last-level cache
    between two uses of a set (``cap`` at most), so a timed call does not find its inputs in cache left
    by the previous call, as it would not in a network where other layers run in between. One set when a
    single set is already that large; the extra memory is at most twice the cache plus one set."""
    first = make()
    tensors = first if isinstance(first, tuple) else (first,)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    n = max(1, min(cap, -(-2 * cache_bytes(device) // max(nbytes, 1))))
    return [first] + [make() for _ in range(n - 1)]


def step_inputs(x_shape, g_shape, device: torch.device, dtype: torch.dtype | None = None) -> tuple[list, list]:
    """:func:`input_sets` of a layer step's x (requiring grad) and output gradient g, as two lists."""

    def make():
        x = torch.randn(x_shape, device=device, dtype=dtype, requires_grad=True)
        return x, torch.randn(g_shape, device=device, dtype=dtype)

    sets = input_sets(make, device)
    return [s[0] for s in sets], [s[1] for s in sets]


def layer_step(layer, x, g, autocast: torch.dtype | None = None):
    """A closure running one layer's training-step work: clear the grads of x and the layer's
    params, forward (under autocast when given), backward with ``g``. ``x`` and ``g`` may be equal-length
    lists (from :func:`input_sets`): each call takes the next pair."""
    xs, gs = (x, g) if isinstance(x, list) else ([x], [g])
    turn = [0]

    def fn():
        i = turn[0] = (turn[0] + 1) % len(xs)
        x, g = xs[i], gs[i]
        x.grad = None
        for q in layer.parameters():
            q.grad = None
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            y = layer(x)
        y.backward(g.to(y.dtype))

    return fn


def time_rounds_ms(fns: dict, device: torch.device, reps: int, rounds: int = 3, warmup: int = 1) -> dict:
    """Median ms of each ``fns`` entry, timed in alternating rounds (every variant once per round),
    so drift in machine speed hits all variants alike."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(time_ms(fn, device, warmup=warmup, reps=reps))
    return {k: statistics.median(v) for k, v in times.items()}


def decoder_step_parser(doc: str, dtype_flag: str):
    """The argument parser of the scripts that time a small Llama-style decoder's training step: device,
    ``dtype_flag`` (float32 / bfloat16), hidden / MLP width, layers, batch x seq and LoRA r (each script
    adds its own options)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(dtype_flag, default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    return ap


def lm_train_step(model, ids):
    """A closure running one forward + backward of causal LM ``model`` on ``ids`` (labels = ids), then
    dropping the grads (what the scripts comparing PEFT's layers with ours time)."""

    def fn():
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None

    return fn


@contextlib.contextmanager
def _quiet_fd2():
    """Send file descriptor 2 (C++ libraries' stderr) to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_extra_mb(fn) -> float | None:
    """Peak of torch's CPU allocations made during ``fn()`` (MB): the maximum prefix sum of the
    profiler's raw allocation and free records (``profile_memory``) in time order. ``fn`` runs once
    unprofiled first, so every block alive before the profiled call (e.g. last step's grads) was
    made outside the profiler: its free is not recorded and cannot lower the sum (an upper bound on
    the GPU column's peak above the memory live before). tracemalloc cannot see torch's allocator,
    and RSS keeps freed pages. Blocks made on OpenMP worker threads inside a kernel may be missed
    (small here: per-thread buffers). None when this torch's profiler does not expose the records."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():  # kineto prints a line at each start and stop; fn's own output stays visible
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_fd2():
            prof.__exit__(None, None, None)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    records = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in records:
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2**20


def peak_extra_mb(fn, device: torch.device) -> float | None:
    """Peak memory ``fn()`` allocates beyond what is live before it (MB): the CUDA allocator's peak
    on GPU, :func:`cpu_peak_extra_mb` on CPU."""
    if device.type == "cpu":
        return cpu_peak_extra_mb(fn)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured memory bandwidth in bytes/s (reads + writes counted) on buffers of ``nbytes``.

    GPU: ``dst.copy_(src)``. CPU: an in-place ``a += b`` (2 reads, 1 write). A CPU copy reads each
    destination line before writing it (write-allocate), so ``copy_`` moves 3 bytes for the 2 it is
    credited with and understates the DRAM rate ~1.5x (30 against 46 GB/s on the 2-core EPYC VM);
    the kernels measured against this floor (optimizer steps, in-place updates) write lines they have
    just read, as an in-place add does."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).uniform_()
    if device.type == "cpu":
        ms = time_ms(lambda: dst.add_(src), device, warmup=3, reps=10)
        return 3 * src.numel() * 4 / (ms * 1e-3)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (with the thread count torch uses) for results files."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """The short commit of the working tree, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    """Device, versions, date and commit for a result file."""
    from ..info import build_info, triton_version

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "ftkernels": build_info()["version"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
    }


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Rows as a fixed-width table; ``columns`` = [(key, header)]; floats shown with 3 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
