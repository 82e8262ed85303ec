"""The ``ftkernels`` command: ``ftkernels info`` (build and backend table) and ``ftkernels bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """``ftkernels info [--json]`` or ``ftkernels bench [options]`` (``--help`` lists them); returns the exit code."""
    parser = argparse.ArgumentParser(prog="ftkernels", description="ftkernels: fused kernels for fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="show how ftkernels was built and which backend serves each op")
    p_info.add_argument("--json", action="store_true", help="print the build_info() dict as JSON")
    p_bench = sub.add_parser("bench", help="run the benchmark suites on this machine's default device")
    p_bench.add_argument("--suite", action="append", help="suite to run (repeatable); default: all built")
    p_bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p_bench.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the per-layer suites' cases (lora_linear, lora_conv autocast, masked, loreft, optimizer)"
        " and of the matmul ceiling; default: each case's own (bf16 on GPU, fp32 on CPU); e2e keeps its own",
    )
    p_bench.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds)")
    p_bench.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile baselines (GPU; compiling takes minutes)"
    )
    p_bench.add_argument("--out", help="directory for results.json and results.md")
    p_bench.add_argument("--plot", action="store_true", help="also write speedup/memory PNGs to --out")
    p_bench.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="show the change between two runs")
    args = parser.parse_args(argv)

    if args.command == "bench":
        return _bench(args, parser)

    if args.command == "info":
        from .info import build_info, format_info

        info = build_info()
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    return 2


def _bench(args, parser) -> int:
    import torch

    from .bench import runner
    from .bench.common import DTYPES, format_table

    if args.compare:
        try:
            print(runner.compare(*args.compare))
        except OSError as e:
            parser.error(f"--compare: {e.filename}: {e.strerror}")
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a results file
            parser.error(f"--compare: {' / '.join(args.compare)} are not both bench results files ({e!r})")
        return 0
    if args.plot and not args.out:
        parser.error("--plot needs --out DIR")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.out:  # fail now, not after minutes of benchmarks
        _check_out(args, parser)
    names = args.suite or list(runner.SUITES)
    if args.no_compile:
        os.environ["FTKERNELS_BENCH_COMPILE"] = "0"
    try:
        results = runner.run_suites(names, device, quick=args.quick, dtype=DTYPES.get(args.dtype))
    except ValueError as e:
        parser.error(str(e))
    env, ceil = results["environment"], results["ceilings"]
    print(f"{env['device']} | torch {env['torch']} | ftkernels {env['ftkernels']} | {env['date']}")
    rate = f"{ceil['matmul_dtype']} matmul {ceil['matmul_TFLOPs']:.2f} TFLOP/s"
    print(f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s, {rate}")
    print(format_table(runner.all_rows(results), runner.COLUMNS))
    if args.out:
        paths = list(runner.write(args.out, results))
        if args.plot:
            paths += runner.plot(results, args.out)
        print("wrote " + ", ".join(paths))
    return 0


def _check_out(args, parser) -> None:
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".ftkernels-write-check")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot write there ({e.strerror or e})")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")


if __name__ == "__main__":
    sys.exit(main())
