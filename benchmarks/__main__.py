"""python -m benchmarks [NAME] [options]: jxent measured side by side with its references."""

import importlib
import sys

COMMANDS = {
    "losses": "dense losses: jxent vs Optax vs PyTorch (CPU), forward and forward+backward",
    "fused": "fused linear + cross-entropy vs the unfused loss: time, XLA scratch, peak RSS",
    "lmhead": "log-probs, entropy, KL, JS, top-k KL of an LM head, fused vs unfused",
    "extras": "the fused loss's statistics and token scaling in its pass vs extra calls",
    "sharded": "vocab-parallel cross-entropy on an 8-device CPU mesh vs the unsharded loss",
    "floors": "what bounds a forward: read floor against the exp/softplus compute floors",
    "bad_values": "NaN/inf inputs: what jxent, Optax and PyTorch return",
    "ctc": "CTC loss: jxent vs Optax (and PyTorch where installed), forward and forward+backward",
    "sharp": "the sharp logsumexp's cost: integer-label CE with and without it, vs Optax",
    "gpu": "on an accelerator: test suite, dense losses, fused loss vs Cut Cross-Entropy/Liger",
}
NAMES = tuple(COMMANDS)

USAGE = "\n".join([
    "usage: python -m benchmarks [NAME] [options]      (NAME defaults to losses)",
    "       python -m benchmarks NAME --help            (that benchmark's options)",
    "",
    "benchmarks:",
    *[f"  {k:<11} {v}" for k, v in COMMANDS.items()],
    "",
    "A full run (no --quick/--smoke) rewrites its own section of benchmarks/RESULTS.md.",
    "Every ratio is a median of per-repetition ratios, measured alternating in one process.",
])


def main():
  args = sys.argv[1:]
  if args and args[0] in ("-h", "--help"):
    print(USAGE)
    return
  name = args.pop(0) if args and args[0] in NAMES else "losses"
  if args and not args[0].startswith("-"):
    sys.exit(f"unknown benchmark {args[0]!r}\n\n{USAGE}")
  sys.argv[0] = f"python -m benchmarks {name}"
  importlib.import_module(f"benchmarks.{name}").main(args)


if __name__ == "__main__":
  main()
