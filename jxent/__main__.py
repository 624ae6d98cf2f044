"""Command line: ``python -m jxent {demo,grads,compare}``."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _demo(args) -> int:
  from jxent._apps import demo as _demo

  t0 = time.perf_counter()
  print("jxent demo: the information quantities behind cross-entropy, computed by jxent.\n")
  _demo.information_tour()
  print("\n6. Gradients (short version of `python -m jxent grads`)")
  _demo.gradient_tour(num_examples=64)
  print("\n7. Why cross-entropy: the same logistic regression trained with CE and with MSE")
  print("   (short version of `python -m jxent compare`; blobs data, 4 seeds, 200 SGD/Adam steps)")
  from jxent._apps import compare as _compare

  result = _compare.run(("blobs",), steps=200, seeds=4, progress=False)
  print(_compare.table(result["runs"]))
  os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
  _compare.plot(result, args.plot)
  print(f"\n   Plot of the loss, accuracy and gradient-norm curves: {os.path.abspath(args.plot)}")
  print(f"\nDone in {time.perf_counter() - t0:.1f} s.")
  return 0


def _grads(args) -> int:
  from jxent._apps import demo as _demo

  _demo.gradient_tour(num_examples=args.examples, num_classes=args.classes, seed=args.seed)
  return 0


def _compare(args) -> int:
  from jxent._apps import compare as _compare

  datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
  t0 = time.perf_counter()
  result = _compare.run(datasets, optimizers=args.optimizers.split(","), steps=args.steps,
                        seeds=args.seeds, progress=not args.no_progress)
  print(_compare.table(result["runs"]))
  print(f"({args.seeds} seeds per row, {args.steps} full-batch steps, learning rates "
        f"{_compare.OPTIMIZERS}, {time.perf_counter() - t0:.1f} s)")
  if args.plot:
    _compare.plot(result, args.plot)
    print(f"plot written to {args.plot}")
  if args.json:
    _compare.to_json(result, args.json)
    print(f"json written to {args.json}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jxent", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("demo", help="walk through the information quantities and losses")
  p.add_argument("--plot", default=os.path.join("out", "demo_compare.png"),
                 help="where to write the CE-vs-MSE plot (default: out/demo_compare.png)")
  p.set_defaults(func=_demo)
  p = sub.add_parser("grads", help="check the closed-form gradients against jax.grad")
  p.add_argument("--examples", type=int, default=1024)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=_grads)
  p = sub.add_parser("compare", help="train with cross-entropy vs MSE and compare")
  p.add_argument("--datasets", default="blobs,breast_cancer",
                 help="comma-separated: blobs, breast_cancer, digits")
  p.add_argument("--optimizers", default="sgd,adam")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--seeds", type=int, default=8)
  p.add_argument("--plot", metavar="PATH", help="write a PNG of the curves")
  p.add_argument("--json", metavar="PATH", help="write the runs as JSON")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=_compare)
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
