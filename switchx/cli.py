"""The `switchx` command line. Each subcommand parses its flags, fails fast on bad input, then runs."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
  from switchx.demo import run_demo
  run_demo(out_dir=args.out_dir, num_steps=args.steps, seed=args.seed)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="switchx", description="Switch Transformers and sparse MoE in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser("demo", help="train a tiny Switch model and its dense twin on the built-in corpus")
  demo.add_argument("--out_dir", default="demo_out", help="where the plot and results.json go")
  demo.add_argument("--steps", type=int, default=300, help="training steps per model")
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "run", None):
    parser.print_help()
    return 2
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
