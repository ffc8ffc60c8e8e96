"""Where one phase of case 1's training step spends its time, by op: the numbers behind README "What limits us".

    python -m benchmarks.trace --experts 8 --dtype bfloat16 --phase "forward + backward"
    python -m benchmarks.trace --experts 8 --framework transformers --autocast   # torch.profiler's view
    python -m benchmarks.trace --quick                                            # seconds (the tests)

switchx: a jax.profiler trace of --steps calls of the phase (forward, forward + backward, full step: the
programs of case 5), op time per step grouped by XLA op kind (`ynn_fusion` = dots, `wrapped_convert` = dtype
conversions, `multiply_add_fusion` = mostly AdamW's update, ...; names without their .N suffix). Op time sums
over the runtime's threads, so it exceeds the wall time where ops overlap. transformers: torch.profiler's self
CPU time per aten op of its full training step (float32, or the forward under bfloat16 autocast). Each op's
name in the switchx trace matches an instruction of `jax.jit(...).lower(...).compile().as_text()`, whose
op_name metadata names the model code.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

from benchmarks import programs, run

PHASES = ("forward", "forward + backward", "full step")
XLA_OP = re.compile(r"^[a-z_\-]+(\.\d+)*$")   # an XLA instruction's name (not a Python or runtime frame)


def _wall_ms(fn, steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return 1000 * (time.perf_counter() - start) / steps


def switchx_ops(config, host_batch: dict, phase: str, steps: int) -> dict:
  """{"wall_ms", "op_ms", "ops": {kind: (ms per step, ops per step)}} for one switchx phase."""
  import jax
  fn = programs.switchx_phases(config, host_batch)[phase]
  for _ in range(3):
    fn()
  wall = _wall_ms(fn, steps)
  with tempfile.TemporaryDirectory(prefix="switchx_trace_") as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        fn()
    [path] = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  ms, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and XLA_OP.match(e.get("name", "")):
      kind = re.sub(r"(\.\d+)+$", "", e["name"])
      ms[kind] += e["dur"] / 1000 / steps
      count[kind] += 1 / steps
  return {"wall_ms": wall, "op_ms": sum(ms.values()),
          "ops": {k: (v, count[k]) for k, v in ms.most_common()}}


def transformers_ops(config, host_batch: dict, autocast: bool, steps: int) -> dict:
  """The same for transformers' full training step: torch.profiler's self CPU time per aten op."""
  import torch
  torch.set_num_threads(run.threads())
  fn = programs.hf_step(config, host_batch, programs.hf_capacity(config, host_batch["encoder_input_tokens"].shape[1]),
                        autocast)
  for _ in range(3):
    fn()
  wall = _wall_ms(fn, steps)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      fn()
  rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)
  ops = {r.key: (r.self_cpu_time_total / 1000 / steps, r.count / steps) for r in rows if r.self_cpu_time_total > 0}
  return {"wall_ms": wall, "op_ms": sum(v for v, _ in ops.values()), "ops": ops}


def table(result: dict, top: int) -> str:
  lines = [f"wall time {result['wall_ms']:.0f} ms a step; op time {result['op_ms']:.0f} ms a step", "",
           "| op | ms a step | share of op time | ops a step |", "|---|---|---|---|"]
  for kind, (ms, n) in list(result["ops"].items())[:top]:
    lines.append(f"| {kind} | {ms:.1f} | {100 * ms / result['op_ms']:.0f}% | {n:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="switchx's dtype")
  p.add_argument("--phase", default="full step", choices=PHASES, help="switchx's phase (transformers: full step)")
  p.add_argument("--framework", default="switchx", choices=("switchx", "transformers"))
  p.add_argument("--autocast", action="store_true", help="transformers' forward under bfloat16 autocast")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
  args = p.parse_args(argv)
  size = dict(run.QUICK_SIZE) if args.quick else {}
  dtype = args.dtype if args.framework == "switchx" else "float32"
  config = programs.case1_config(args.experts, dtype=dtype, **size)
  host = programs.batch(config, *run.BATCH)
  if args.framework == "switchx":
    result = switchx_ops(config, host, args.phase, args.steps)
    title = f"switchx {args.dtype}, {args.experts} experts, {args.phase}"
  else:
    result = transformers_ops(config, host, args.autocast, args.steps)
    title = f"transformers {'autocast' if args.autocast else 'float32'}, {args.experts} experts, full step"
  print(f"{title}: {table(result, args.top)}")
  return result


if __name__ == "__main__":
  main()
