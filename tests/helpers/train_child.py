"""A training run in its own process, for the kill / signal tests: `python train_child.py MODEL_DIR STEPS DELAY
[MOE_CHANGES_JSON]`.

DELAY seconds of sleep per batch (added here, not in switchx) make the run slow enough to be interrupted mid-way.
"""

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers.tiny_run import configs  # noqa: E402
from switchx.train import loop  # noqa: E402


def main():
  model_dir, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
  model, train, data = configs(steps, json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
  original = loop.load_data

  def slow_load_data(*args, **kwargs):
    tokenizer, pipeline, eval_batches = original(*args, **kwargs)
    next_batch = pipeline.__next__
    pipeline.__class__ = type("SlowPipeline", (pipeline.__class__,), {
        "__next__": lambda self: (time.sleep(delay), next_batch())[1]})
    return tokenizer, pipeline, eval_batches

  loop.load_data = slow_load_data
  summary = loop.train(model, train, data, model_dir=model_dir, show_progress=False)
  print("FINAL_STEP", summary["final_step"], "INTERRUPTED", summary["interrupted"], flush=True)


if __name__ == "__main__":
  main()
