"""Step time and peak memory of one configuration's training steps, measured in a fresh process:
`python -m benchmarks.memory '<json of case-3 arguments>'` prints {"step_s", "peak_bytes", "params", ...} as JSON.
The step is timed as everywhere else (`timing.alternate`: warm-up calls, then the median over rounds), here with
one program, so the process compiles it once for both figures.

Peak = the process's peak resident set size (VmHWM) minus its size after jax started and the batch was made, so it
counts parameters, optimizer state, gradients and activations (and XLA's buffers), not the interpreter. Beside it:
the arrays alive after the steps (the training state) and XLA's temporary buffer for one step (gradients and
activations, from the compiled step's memory analysis); the rest of the peak is the runtime's and the
allocator's (freed memory glibc keeps, code)."""

from __future__ import annotations

import json
import statistics
import sys


def status_bytes(field: str) -> int:
  """A size from /proc/self/status: VmRSS (resident now) or VmHWM (peak resident). Not getrusage's ru_maxrss:
  Linux carries that across exec, so a child started by a big parent would report the parent's peak."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field} (peak memory is measured on Linux only)")


def main() -> None:
  args = json.loads(sys.argv[1])
  import jax  # noqa: F401  (start the runtime before the baseline)
  from benchmarks import programs, timing
  config = programs.case1_config(**args["config"])
  host_batch = programs.batch(config, *args["batch"])
  jax.numpy.zeros(1).block_until_ready()
  baseline = status_bytes("VmRSS")
  step, num_params = programs.switchx_step(config, host_batch, optimizer=args.get("optimizer", "adamw"),
                                           moments=args.get("moments", "float32"))
  times = timing.alternate({"step": step}, args.get("rounds", 1), args.get("repeats", 1))["step"]
  peak = status_bytes("VmHWM")
  state = sum(a.nbytes for a in jax.live_arrays())       # parameters, optimizer state (and the small batch)
  temps = step.compiled().memory_analysis().temp_size_in_bytes
  print(json.dumps({"step_s": statistics.median(times), "step_times_s": times, "peak_bytes": peak - baseline,
                    "params": num_params, "baseline_bytes": baseline, "state_bytes": state,
                    "xla_temp_bytes": temps}))


if __name__ == "__main__":
  main()
