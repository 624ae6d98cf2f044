"""Command line: ``python -m jxent {demo,grads,compare}``."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
  from jxent import _demo

  t0 = time.perf_counter()
  print("jxent demo: the information quantities behind cross-entropy, computed by jxent.\n")
  _demo.information_tour()
  print("\n6. Gradients (short version of `python -m jxent grads`)")
  _demo.gradient_tour(num_examples=64)
  print(f"\nDone in {time.perf_counter() - t0:.1f} s.")
  return 0


def _grads(args) -> int:
  from jxent import _demo

  _demo.gradient_tour(num_examples=args.examples, num_classes=args.classes, seed=args.seed)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jxent", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("demo", help="walk through the information quantities and losses")
  p.set_defaults(func=_demo)
  p = sub.add_parser("grads", help="check the closed-form gradients against jax.grad")
  p.add_argument("--examples", type=int, default=1024)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=_grads)
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
