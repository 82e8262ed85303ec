"""The ``ftkernels`` command: ``ftkernels info`` (build and backend table)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftkernels", description="ftkernels: fused kernels for fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="show how ftkernels was built and which backend serves each op")
    p_info.add_argument("--json", action="store_true", help="print the build_info() dict as JSON")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import build_info, format_info

        info = build_info()
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
