"""Peak memory of one configuration's training steps, measured in a fresh process:
`python -m benchmarks.memory '<json of case-3 arguments>'` prints {"peak_bytes", "params", ...} as JSON.

Peak = the process's maximum resident set size minus its size after jax started and the batch was made, so it
counts parameters, optimizer state, gradients and activations (and XLA's buffers), not the interpreter."""

from __future__ import annotations

import json
import resource
import sys


def resident_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def main() -> None:
  args = json.loads(sys.argv[1])
  import jax  # noqa: F401  (start the runtime before the baseline)
  from benchmarks import programs
  config = programs.case1_config(**args["config"])
  host_batch = programs.batch(config, *args["batch"])
  jax.numpy.zeros(1).block_until_ready()
  baseline = resident_bytes()
  step, num_params = programs.switchx_step(config, host_batch, optimizer=args.get("optimizer", "adamw"))
  for _ in range(args.get("steps", 3)):
    step()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"peak_bytes": peak - baseline, "params": num_params, "baseline_bytes": baseline}))


if __name__ == "__main__":
  main()
