"""Timing and memory helpers shared by the benchmarks.

Every comparison runs jxent and its references in the same process, alternating
their order from one repetition to the next, after warm-up, and reports the
median of the per-repetition ratios to the reference: on a shared, noisy
machine a ratio measured side by side is far steadier than a lone time.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax

RESULTS = Path(__file__).with_name("RESULTS.md")


def time_side_by_side(
    variants: dict[str, Callable[[], object]], *, reference: str, warmup: int = 1,
    reps: int = 7,
) -> dict[str, dict[str, float]]:
  """Times zero-argument callables that block until their result is ready.

  Returns ``{name: {"median_s": ..., "ratio": median(t_name / t_reference), "lo": ...,
  "hi": ..., "times": [...]}}`` with ``lo``/``hi`` the smallest and largest per-repetition
  ratio (the spread to print beside the median) and the raw seconds per repetition (for
  ``pair``).
  """
  for fn in variants.values():
    for _ in range(warmup):
      fn()
  names = list(variants)
  times: dict[str, list[float]] = {k: [] for k in names}
  for rep in range(reps):
    order = names if rep % 2 == 0 else names[::-1]
    for name in order:
      t0 = time.perf_counter()
      variants[name]()
      times[name].append(time.perf_counter() - t0)
  ref = times[reference]
  out = {}
  for k, v in times.items():
    ratios = [a / b for a, b in zip(v, ref)]
    out[k] = {"median_s": statistics.median(v), "ratio": statistics.median(ratios),
              "lo": min(ratios), "hi": max(ratios), "times": v}
  return out


def pair(res: dict, a: str, b: str) -> dict[str, float]:
  """Median (and min, max) of the per-repetition ratios t_a / t_b of one side-by-side run."""
  ratios = [x / y for x, y in zip(res[a]["times"], res[b]["times"])]
  return {"ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios)}


def spread(r: dict[str, float] | None, digits: int = 2, suffix: str = "") -> str:
  """``median (lo–hi)`` of a ratio entry (``time_side_by_side`` or ``pair``); "" for None."""
  if r is None:
    return ""
  f = f".{digits}f"
  return f"{r['ratio']:{f}}{suffix} ({r['lo']:{f}}–{r['hi']:{f}})"


def blocking(fn: Callable, *args) -> Callable[[], object]:
  return lambda: jax.block_until_ready(fn(*args))


def xla_memory(jitted, *args) -> dict[str, int]:
  """XLA's own accounting of a compiled function: temp (scratch), output and argument bytes."""
  m = jitted.lower(*args).compile().memory_analysis()
  return {
      "temp": int(m.temp_size_in_bytes),
      "output": int(m.output_size_in_bytes),
      "argument": int(m.argument_size_in_bytes),
  }


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"model name\s*:\s*(.*)", f.read())
      if names:
        cpu = names[0]
  except OSError:
    pass
  dev = jax.devices()[0]
  return (f"{dev.platform.upper()} ({dev.device_kind}); host: {cpu}, {os.cpu_count()} cores; "
          f"jax {jax.__version__}")


def write_section(name: str, markdown: str) -> None:
  """Replaces (or appends) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
  start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
  block = f"{start}\n{markdown.rstrip()}\n{end}\n"
  text = RESULTS.read_text() if RESULTS.exists() else "# jxent benchmark results\n\n"
  if start in text and end in text:
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    after = after.lstrip("\n")
    text = before + block + ("\n" + after if after else "")  # a blank line before what follows
  else:
    text = text.rstrip("\n") + "\n\n" + block
  RESULTS.write_text(text)
  print(f"wrote section '{name}' of {RESULTS}")
