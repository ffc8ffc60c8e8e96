"""Expert count at equal FLOPs per token (Switch paper, Figure 4): dense vs 2 ... 64 experts.

    python -m experiments.expert_count            # full: 7 configurations x 2 seeds (see README for time)
    python -m experiments.expert_count --quick    # seconds: checks the script works

Every expert has the dense model's d_ff and each token goes to one expert, so FLOPs per token stay fixed
(only the router's few FLOPs grow) while parameters grow with the expert count.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from experiments import common

EXPERTS = (0, 2, 4, 8, 16, 32, 64)   # 0: the dense twin
QUICK_EXPERTS = (0, 2)


def overrides(experts: int, wide: int = 1, d_ff: int = 512) -> list[str]:
  """Gin bindings of a configuration: `experts` 0 is the dense twin; `wide` > 1 widens the dense twin's FFN
  `wide` times (`d_ff`: the preset's), giving it about switch-`wide`'s parameters at `wide` x the FFN FLOPs."""
  if experts == 0:
    dense = ["ModelConfig.encoder_sparse='none'", "ModelConfig.decoder_sparse='none'"]
    return dense if wide == 1 else [*dense, f"ModelConfig.d_ff={wide * d_ff}"]
  return [f"MoeConfig.num_experts={experts}"]


def label(experts: int, wide: int = 1) -> str:
  if experts == 0:
    return "dense" if wide == 1 else f"dense, d_ff x{wide}"
  return f"switch-{experts}"


def run_name(experts: int, wide: int, d_ff: int) -> str:
  """The run's directory name (the label, without spaces)."""
  return f"dense-dff{wide * d_ff}" if experts == 0 and wide > 1 else label(experts)


def router_cell(row: dict) -> str:
  """Mean router confidence (top-1 router probability) of the encoder's and the decoder's sparse layers at the
  end of training, averaged over seeds, and 1/E (a router that routes uniformly): "-" for dense rows."""
  confidences = [r.get("router_confidence") for r in row["runs"]]
  if row["experts"] == 0 or not all(confidences):
    return "-"
  stack = lambda prefix: [statistics.fmean(v for k, v in c.items() if k.startswith(prefix)) for c in confidences
                          if any(k.startswith(prefix) for k in c)]
  return " / ".join("-" if not v else f"{statistics.fmean(v):.2f}" for v in (stack("encoder"), stack("decoder"))) \
      + f" (1/E = {1 / row['experts']:.3f})"


def parser():
  p = common.parser(__doc__.splitlines()[0], experts=EXPERTS)
  p.add_argument("--wide", default=(), type=lambda s: tuple(int(w) for w in s.split(",")),
                 help="also train dense models with these multiples of d_ff (e.g. 8: switch-8's parameters at 8x "
                      "the FFN FLOPs): how much a bigger FFN helps at all at this budget")
  return p


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base = common.setting(args)
  rows, curves = [], {}
  d_ff = common.model_config(base).d_ff
  configurations = [(e, 1) for e in (QUICK_EXPERTS if args.quick else args.experts)] + [(0, w) for w in args.wide]
  for experts, wide in configurations:
    runs = [common.run(run_name(experts, wide, d_ff), overrides(experts, wide, d_ff), seed, base, args.work_dir)
            for seed in range(base["seeds"])]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    rows.append({"experts": experts, "wide": wide, "total_params": runs[0]["total_params"],
                 "flops_per_token": runs[0]["flops_per_token"], "eval_loss_mean": mean, "eval_loss_spread": spread,
                 "dropped_fraction": runs[0]["dropped_fraction"], "runs": runs})
    curves[label(experts, wide)] = [r["eval_curve"] for r in runs]
  dense = next((row for row in rows if row["experts"] == 0 and row["wide"] == 1), None)   # --experts may omit it
  for row in rows:  # the held-out loss at --at_steps, from each seed's curve
    row["eval_loss_at"] = {step: common.mean_loss_at(row["runs"], step) for step in args.at_steps}
  epoch = None if args.quick else common.steps_per_epoch(base, args.work_dir)
  routers = any(router_cell(row) != "-" for row in rows)   # runs recorded before the field have none
  lines = [f"Held-out loss after {base['steps']} steps, mean ± half-range over {base['seeds']} seed(s)"
           + ("." if epoch is None else f"; one pass over the training text is {epoch:,.0f} steps "
              f"({base['steps'] / epoch:.1f} epochs in all)."), "",
           "| model | parameters | FLOPs / token | "
           + "".join(f"at step {step} | vs dense | " for step in args.at_steps)
           + f"at step {base['steps']} | vs dense |" + (" router confidence, enc / dec |" if routers else ""),
           "|---|---|---|" + "---|---|" * (len(args.at_steps) + 1) + ("---|" if routers else "")]
  for row in rows:
    cells = [(row["eval_loss_at"][step], dense and dense["eval_loss_at"][step]) for step in args.at_steps]
    cells.append(((row["eval_loss_mean"], row["eval_loss_spread"]),
                  dense and (dense["eval_loss_mean"], dense["eval_loss_spread"])))
    text = "".join(f"{common.fmt(*ours)} | {'-' if ref is None else format(ours[0] - ref[0], '+.3f')} | "
                   for ours, ref in cells)
    if routers:
      text += f"{router_cell(row)} |"
    lines.append(f"| {label(row['experts'], row['wide'])} | {row['total_params'] / 1e6:.2f}M | "
                 f"{row['flops_per_token'] / 1e6:.2f}M | {text.rstrip()}")
  out = Path(args.out)
  name = common.result_name("expert_count", args)
  common.plot(out / f"{name}.png", curves, "Held-out loss: more experts at equal FLOPs per token",
              epoch_steps=epoch)
  common.write(name, args.out, {"setting": base, "rows": rows}, "\n".join(lines), common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()
