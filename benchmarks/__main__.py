"""`python -m benchmarks [losses|fused|sharded|floors] [options]` (default: losses)."""

import importlib
import sys

NAMES = ("losses", "fused", "sharded", "floors", "bad_values")


def main():
  args = sys.argv[1:]
  name = args.pop(0) if args and args[0] in NAMES else "losses"
  importlib.import_module(f"benchmarks.{name}").main(args)


if __name__ == "__main__":
  main()
