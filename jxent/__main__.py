"""Command line: ``python -m jxent {demo,grads,compare}``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import textwrap
import time

_EXTRAS = "pip install 'jxent[demo]'"


def _missing(*modules: str) -> int:
  """Exit status 2 with one line naming the extra to install, or 0 when all are present."""
  gone = [m for m in modules if importlib.util.find_spec(m) is None]
  if gone:
    print(f"error: this command needs {', '.join(gone)} (the demo extras): {_EXTRAS}",
          file=sys.stderr)
    return 2
  return 0


def _demo(args) -> int:
  if rc := _missing("matplotlib"):
    return rc
  from jxent._apps import demo as _demo

  t0 = time.perf_counter()
  print("jxent demo: the information quantities behind cross-entropy, computed by jxent.\n")
  _demo.information_tour()
  print("\n6. Gradients (short version of `python -m jxent grads`)")
  _demo.gradient_tour(num_examples=64)
  print("\n7. Why cross-entropy: the same logistic regression trained with CE and with MSE")
  print("   (short version of `python -m jxent compare`; blobs data, 4 seeds, 300 SGD/Adam steps)")
  from jxent._apps import compare as _compare

  result = _compare.run(("blobs",), steps=300, seeds=4, progress=False)
  print(_compare.table(result["runs"]))
  print()
  for line in _compare.saturated_summary(result["runs"]):
    print(textwrap.fill(line, width=96, initial_indent="   ", subsequent_indent="   "))
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
  datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
  needs = ["sklearn"] if set(datasets) - {"blobs"} else []
  needs += ["flax"] if "digits" in datasets else []
  needs += ["matplotlib"] if args.plot else []
  if rc := _missing(*needs):
    return rc
  from jxent._apps import compare as _compare
  t0 = time.perf_counter()
  result = _compare.run(datasets, optimizers=args.optimizers.split(","), steps=args.steps,
                        seeds=args.seeds, progress=not args.no_progress)
  table = _compare.table(result["runs"])
  settings = (f"({args.seeds} seeds per row, {args.steps} full-batch steps, learning rates "
              f"{_compare.OPTIMIZERS}, {time.perf_counter() - t0:.1f} s)")
  print(table)
  print(settings)
  if args.markdown:
    command = " ".join(["python -m jxent", *args.argv])
    with open(args.markdown, "w") as f:
      f.write(f"Printed by `{command}`:\n\n{table}\n\n{settings}\n")
    print(f"markdown written to {args.markdown}")
  if args.plot:
    _compare.plot(result, args.plot)
    print(f"plot written to {args.plot}")
  if args.json:
    _compare.to_json(result, args.json)
    print(f"json written to {args.json}")
  return 0


# Kept here (not imported from the apps) so that --help and argument errors need no JAX.
DATASETS = ("blobs", "breast_cancer", "digits")
OPTIMIZERS = ("sgd", "adam")


def _choices(allowed: tuple[str, ...], what: str):
  def parse(text: str) -> str:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in allowed]
    if bad or not names:
      raise argparse.ArgumentTypeError(
          f"unknown {what} {', '.join(map(repr, bad)) or '(none given)'}; choose from "
          f"{', '.join(allowed)} (comma-separated)")
    return ",".join(names)
  return parse


def _positive(text: str) -> int:
  value = int(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def main(argv=None) -> int:
  fmt = argparse.ArgumentDefaultsHelpFormatter
  parser = argparse.ArgumentParser(
      prog="python -m jxent", formatter_class=fmt,
      description="jxent's demo and studies. demo, compare (and their plots) need the demo "
                  f"extras: {_EXTRAS}.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,grads,compare}")
  p = sub.add_parser("demo", formatter_class=fmt,
                     help="walk through the information quantities, gradients and CE vs MSE")
  p.add_argument("--plot", default=os.path.join("out", "demo_compare.png"),
                 help="where to write the CE-vs-MSE plot")
  p.set_defaults(func=_demo)
  p = sub.add_parser("grads", formatter_class=fmt,
                     help="check the closed-form gradients against jax.grad, jvp and hessian")
  p.add_argument("--examples", type=_positive, default=1024, help="examples in the batch")
  p.add_argument("--classes", type=_positive, default=10, help="number of classes")
  p.add_argument("--seed", type=int, default=0, help="random seed of the logits and labels")
  p.set_defaults(func=_grads)
  p = sub.add_parser("compare", formatter_class=fmt,
                     help="train the same classifiers with cross-entropy and with MSE")
  p.add_argument("--datasets", type=_choices(DATASETS, "dataset"), default="blobs,breast_cancer",
                 help=f"comma-separated, from: {', '.join(DATASETS)}")
  p.add_argument("--optimizers", type=_choices(OPTIMIZERS, "optimizer"), default="sgd,adam",
                 help=f"comma-separated, from: {', '.join(OPTIMIZERS)}")
  p.add_argument("--steps", type=_positive, default=300, help="full-batch training steps")
  p.add_argument("--seeds", type=_positive, default=8,
                 help="random starts per setting (curves are means over seeds)")
  p.add_argument("--plot", metavar="PATH", help="write a PNG of the curves")
  p.add_argument("--json", metavar="PATH", help="write the runs as JSON")
  p.add_argument("--markdown", metavar="PATH",
                 help="write the table, its settings and this command line as markdown")
  p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
  p.set_defaults(func=_compare)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  args.argv = argv
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
