"""Expert count at equal FLOPs per token (Switch paper, Figure 4): dense vs 2 ... 64 experts.

    python -m experiments.expert_count            # full: 7 configurations x 2 seeds (see README for time)
    python -m experiments.expert_count --quick    # seconds: checks the script works

Every expert has the dense model's d_ff and each token goes to one expert, so FLOPs per token stay fixed
(only the router's few FLOPs grow) while parameters grow with the expert count.
"""

from __future__ import annotations

from pathlib import Path

from experiments import common

EXPERTS = (0, 2, 4, 8, 16, 32, 64)   # 0: the dense twin
QUICK_EXPERTS = (0, 2)


def overrides(experts: int) -> list[str]:
  if experts == 0:
    return ["ModelConfig.encoder_sparse='none'", "ModelConfig.decoder_sparse='none'"]
  return [f"MoeConfig.num_experts={experts}"]


def label(experts: int) -> str:
  return "dense" if experts == 0 else f"switch-{experts}"


def parser():
  return common.parser(__doc__.splitlines()[0], experts=EXPERTS)


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base = common.setting(args)
  rows, curves = [], {}
  for experts in (QUICK_EXPERTS if args.quick else args.experts):
    runs = [common.run(label(experts), overrides(experts), seed, base, args.work_dir) for seed in range(base["seeds"])]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    rows.append({"experts": experts, "total_params": runs[0]["total_params"],
                 "flops_per_token": runs[0]["flops_per_token"], "eval_loss_mean": mean, "eval_loss_spread": spread,
                 "dropped_fraction": runs[0]["dropped_fraction"], "runs": runs})
    curves[label(experts)] = [r["eval_curve"] for r in runs]
  dense = next((row["eval_loss_mean"] for row in rows if row["experts"] == 0), None)   # --experts may omit it
  lines = [f"Held-out loss after {base['steps']} steps, mean ± half-range over {base['seeds']} seed(s).", "",
           "| model | parameters | FLOPs / token | held-out loss | vs dense |", "|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {label(row['experts'])} | {row['total_params'] / 1e6:.2f}M | "
                 f"{row['flops_per_token'] / 1e6:.2f}M | {common.fmt(row['eval_loss_mean'], row['eval_loss_spread'])} | "
                 f"{'-' if dense is None else format(row['eval_loss_mean'] - dense, '+.3f')} |")
  out = Path(args.out)
  name = common.result_name("expert_count", args)
  common.plot(out / f"{name}.png", curves, "Held-out loss: more experts at equal FLOPs per token")
  common.write(name, args.out, {"setting": base, "rows": rows}, "\n".join(lines), common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()
