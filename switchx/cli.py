"""The `switchx` command line. Each subcommand parses its flags, fails fast on bad input, then runs."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
  from switchx.demo import run_demo
  run_demo(out_dir=args.out_dir, num_steps=args.steps, seed=args.seed)
  return 0


def _add_gin_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file or preset name (repeatable; later files win), e.g. switch_base_8")
  parser.epilog = ("Any field can be overridden with --gin.NAME=VALUE, e.g. --gin.MoeConfig.num_experts=16 "
                   "(see docs/configuration.md).")


def _params(args: argparse.Namespace) -> int:
  import json
  from switchx import gin_config, model_stats
  if args.all:
    print(preset_table_markdown())
    return 0
  model, train = gin_config.load(args.gin_file, args.gin_bindings)
  stats = model_stats.summary(model, train.inputs_length, train.targets_length)
  if args.json:
    print(json.dumps(stats))
    return 0
  fmt = model_stats.format_count
  print(f"total parameters     {fmt(stats['total_params']):>10s}  ({stats['total_params']:,d})")
  print(f"expert parameters    {fmt(stats['expert_params']):>10s}  ({stats['expert_params']:,d})")
  print(f"active per token     {fmt(stats['active_params']):>10s}  ({stats['active_params']:,d})")
  print(f"forward FLOPs/token  {fmt(stats['flops_per_token']):>10s}  "
        f"(inputs {train.inputs_length}, targets {train.targets_length})")
  for kind, n in model_stats.module_table(model):
    print(f"  {kind:<36s} {n:>16,d}")
  return 0


def preset_table_markdown() -> str:
  """The table of model presets in docs/configuration.md (regenerate with `switchx params --all`)."""
  from switchx import gin_config, model_stats
  fmt = model_stats.format_count
  rows = ["| preset | total params | expert params | active params / token | forward FLOPs / token |",
          "|---|---|---|---|---|"]
  for name in gin_config.presets():
    if not name.startswith("models/") or name in ("models/t5_v1_1", "models/switch_base"):
      continue  # the architecture files that size presets include
    gin_config.parse([name])
    s = model_stats.summary(gin_config.model_config())
    rows.append(f"| {name.removeprefix('models/')} | {fmt(s['total_params'])} | {fmt(s['expert_params'])} | "
                f"{fmt(s['active_params'])} | {fmt(s['flops_per_token'])} |")
  return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="switchx", description="Switch Transformers and sparse MoE in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser("demo", help="train a tiny Switch model and its dense twin on the built-in corpus")
  demo.add_argument("--out_dir", default="demo_out", help="where the plot and results.json go")
  demo.add_argument("--steps", type=int, default=300, help="training steps per model")
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo)

  params = sub.add_parser("params", help="parameter counts and FLOPs per token of a config, from shapes alone")
  _add_gin_flags(params)
  params.add_argument("--json", action="store_true",
                      help="print one JSON object: total_params, expert_params, active_params, flops_per_token")
  params.add_argument("--all", action="store_true", help="a Markdown table of every model preset")
  params.set_defaults(run=_params)
  return parser


def main(argv: list[str] | None = None) -> int:
  from switchx.gin_config import split_gin_flags
  parser = build_parser()
  argv, bindings = split_gin_flags(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  args.gin_bindings = bindings
  if not getattr(args, "run", None):
    parser.print_help()
    return 2
  try:
    return args.run(args)
  except ValueError as e:  # bad input: say what is wrong and how to fix it, without a traceback
    print(f"switchx {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
