"""How far can the experts of a trained Switch model be quantized? Held-out loss and decoding speed against bits.

    python -m experiments.quantization            # the regime study's Switch-8 models, 3 seeds (see serving.py)
    python -m experiments.quantization --quick    # seconds: checks the script works

Each trained model's expert matrices (the rest stays float32) are quantized per output channel: round to nearest
(RTN) at 8, 4 and 2 bits (ternary: codes -1, 0, 1), and GPTQ (switchx/gptq.py, as QMoE) at 4 and 2 bits,
calibrated on training batches. Each row: the saved model's size (safetensors file), expert bits per expert
parameter (codes + float16 scales), held-out loss (the run's own evaluation batches) and its change from
float32, and greedy decoding tokens/s (experts dequantized inside the jitted loop).
"""

from __future__ import annotations

from pathlib import Path

from experiments import common, serving
from switchx import quantize
from switchx.gptq import expert_inputs, quantize_experts_gptq
from switchx.train.step import model_inputs

METHODS = [("float32", None, "none"), ("int8 RTN", 8, "rtn"), ("int4 RTN", 4, "rtn"), ("int4 GPTQ", 4, "gptq"),
           ("ternary RTN", 2, "rtn"), ("ternary GPTQ", 2, "gptq")]
CALIBRATION_BATCHES = 4


def main(argv=None) -> dict:
  p = serving.parser(__doc__.splitlines()[0])
  args = p.parse_args(argv)
  rows = {label: [] for label, _, _ in METHODS}
  models = serving.trained_models(args)
  for trained in models:
    calibration_batches = [model_inputs(next(trained.train_batches)) for _ in range(CALIBRATION_BATCHES)]
    calibration = expert_inputs(trained.config, trained.params, calibration_batches)
    encoder_tokens = trained.held_out[0]["encoder_input_tokens"][:args.decode_rows]
    for label, bits, method in METHODS:
      if method == "none":
        params = trained.params
      elif method == "rtn":
        params = quantize.quantize_experts(trained.params, bits)
      else:
        params = quantize_experts_gptq(trained.config, trained.params, calibration, bits)
      row = {"seed": trained.seed, "bits": bits or 32, "method": method,
             "loss": serving.held_out_loss(trained.config, params, trained.held_out),
             "file_bytes": serving.saved_size(trained.config, params),
             "decode_tokens_per_s": serving.decode_speed(trained.config, params, encoder_tokens)}
      row["expert_bits_per_param"] = quantize.ledger(_shapes(trained.params), bits)["expert_bits_per_param"]
      rows[label].append(row)
      print(f"  seed {trained.seed} {label}: loss {row['loss']:.4f}, {row['file_bytes'] / 2**20:.2f} MiB, "
            f"{row['decode_tokens_per_s']:.0f} tokens/s", flush=True)
  return report(rows, [m.summary for m in models], args)


def _shapes(params) -> dict:
  import flax.traverse_util
  import numpy as np
  return {"/".join(p): np.shape(v) for p, v in flax.traverse_util.flatten_dict(params).items()}


def report(rows: dict, trained: list[dict], args) -> dict:
  base = rows["float32"]
  lines = ["| experts stored as | expert bits / param | model file (MiB) | held-out loss | change vs float32 | "
           "decode tokens/s (x float32) |", "|---|---|---|---|---|---|"]
  summary = {}
  for label, runs in rows.items():
    loss, spread = serving.mean_spread(r["loss"] for r in runs)
    delta, delta_spread = serving.mean_spread(r["loss"] - b["loss"] for r, b in zip(runs, base))
    speed, _ = serving.mean_spread(r["decode_tokens_per_s"] / b["decode_tokens_per_s"] for r, b in zip(runs, base))
    size = runs[0]["file_bytes"] / 2**20
    summary[label] = {"loss": loss, "spread": spread, "delta": delta, "delta_spread": delta_spread,
                      "speed_ratio": speed, "file_mib": size, "expert_bits_per_param": runs[0]["expert_bits_per_param"],
                      "runs": runs}
    lines.append(f"| {label} | {runs[0]['expert_bits_per_param']:.2f} | {size:.2f} | {common.fmt(loss, spread)} | "
                 f"{delta:+.4f} ± {delta_spread:.4f} | {speed:.2f} |")
  seeds = len(base)
  markdown = (f"Expert quantization of the trained Switch models ({seeds} seed{'s' * (seeds > 1)}; ± half the "
              "range over seeds; the change vs float32 is taken per seed on the same held-out batches, then "
              "averaged).\n\n" + "\n".join(lines))
  name = common.result_name("quantization", args)
  common.write(name, args.out, {"rows": summary, "models": trained}, markdown, common.command_line())
  _plot(Path(args.out) / f"{name}.png", summary)
  return summary


def _plot(path: Path, summary: dict) -> None:
  fig, ax = serving.axes()
  for method, marker in (("rtn", "o"), ("gptq", "s"), ("none", "*")):
    points = [(s["expert_bits_per_param"], s["delta"], s["delta_spread"]) for s in summary.values()
              if s["runs"][0]["method"] == method]
    if points:
      x, y, e = zip(*sorted(points))
      ax.errorbar(x, y, yerr=e, marker=marker, capsize=3, label={"rtn": "round to nearest", "gptq": "GPTQ",
                                                                  "none": "float32"}[method])
  ax.set_xscale("log", base=2)
  serving.save_plot(fig, ax, path, "expert bits per parameter (codes + scales)", "held-out loss change vs float32",
                    "Quantizing a trained Switch-8's experts")


if __name__ == "__main__":
  main()
