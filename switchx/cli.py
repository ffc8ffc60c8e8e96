"""The `switchx` command line. Each subcommand parses its flags, fails fast on bad input, then runs."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
  from switchx.demo import run_demo
  run_demo(out_dir=args.out_dir, num_steps=args.steps, seeds=args.seeds, seed=args.seed)
  return 0


def _add_gin_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file or preset name (repeatable; later files win), e.g. switch_base_8")
  parser.epilog = ("Any field can be overridden with --gin.NAME=VALUE, e.g. --gin.MoeConfig.num_experts=16 "
                   "(see docs/configuration.md).")


def _add_run_flags(parser: argparse.ArgumentParser, model_dir_help: str) -> None:
  """The flags of every command that trains: gin files and bindings, --model_dir, --mesh."""
  _add_gin_flags(parser)
  parser.add_argument("--model_dir", required=True, help=model_dir_help)
  parser.add_argument("--mesh", default="", help="mesh axis sizes, e.g. data=2,expert=4,model=1 (default: all "
                                                 "devices on 'data', or MeshConfig bindings)")


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
  lengths = (f"causal LM, sequences of {train.inputs_length + train.targets_length} tokens"
             if hasattr(model, "num_layers") else f"inputs {train.inputs_length}, targets {train.targets_length}")
  print(f"forward FLOPs/token  {fmt(stats['flops_per_token']):>10s}  ({lengths})")
  for kind, n in model_stats.module_table(model):
    print(f"  {kind:<36s} {n:>16,d}")
  if args.quantized:
    print(ledger_text(model, args.quantized))
  return 0


def ledger_text(model, bits: int) -> str:
  """The bytes of `model` with its expert matrices quantized to `bits` (switchx/quantize.py), from shapes."""
  from switchx import model_stats, quantize
  book = quantize.ledger(model_stats.param_shapes(model), bits)
  mb = lambda n: f"{n / 2**20:10.2f} MiB"
  return "\n".join([
      f"quantized to int{bits} (expert matrices; the rest float32):",
      f"  expert codes         {mb(book['expert_code_bytes'])}  ({bits} bits x {book['expert_params']:,d})",
      f"  expert scales        {mb(book['scale_bytes'])}  (float16, one per expert output channel)",
      f"  everything else      {mb(book['other_bytes'])}  (float32)",
      f"  total                {mb(book['total_bytes'])}  ({book['bits_per_param']:.2f} bits per parameter; "
      f"experts {book['expert_bits_per_param']:.2f}; float32: {book['total_params'] * 4 / 2**20:.2f} MiB)"])


def _merge(args: argparse.Namespace) -> int:
  import json
  from switchx.interop.native import load, save
  from switchx.merge import merge_experts, similar_experts
  config, params = load(args.model)
  if not getattr(config, "is_sparse", False):
    raise ValueError(f"{args.model} is a dense model: there are no experts to merge.")
  groups = similar_experts(params, config, args.experts)
  usage = json.loads(args.usage) if args.usage else None
  merged_config, merged = merge_experts(config, params, groups, usage)
  save(merged_config, merged, args.out)
  print(f"merged {config.moe.num_experts} experts into {args.experts}: groups {groups}; wrote {args.out}")
  return 0


def _extract(args: argparse.Namespace) -> int:
  import jax
  from switchx.extract import extract_task, task_usage
  from switchx.interop.native import save
  from switchx.train import restore
  loaded = restore.load_model(args.model)
  config, params = loaded.config, jax.device_get(loaded.params)
  if not getattr(config, "is_sparse", False):
    raise ValueError(f"{args.model} is a dense model: there is no task routing to extract from.")
  usage = task_usage(config, params) if config.moe.route_by == "task" else {}
  task_config, task_params = extract_task(config, params, args.task)
  save(task_config, task_params, args.out)
  try:                               # the tokenizer travels with the task's model, so it decodes text alone
    restore.load_tokenizer(args.model).save(os.path.join(args.out, restore.TOKENIZER_FILE))
  except ValueError:
    print(f"  (no tokenizer found with {args.model}: {args.out} holds the model only)")
  for layer, experts in usage.items():
    print(f"  {layer}: task {args.task} uses experts {experts[args.task]}")
  print(f"task {args.task}: {config.moe.num_experts} -> {task_config.moe.num_experts} experts per layer; wrote "
        f"{args.out}")
  return 0


def _quantize(args: argparse.Namespace) -> int:
  from switchx import quantize
  from switchx.interop.native import PARAMS_FILE, load, save
  config, params = load(args.model)
  save(config, quantize.quantize_experts(params, args.bits), args.out)
  size = os.path.getsize(os.path.join(args.out, PARAMS_FILE))
  print(ledger_text(config, args.bits))
  print(f"wrote {args.out}/{PARAMS_FILE}: {size / 2**20:.2f} MiB")
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


def _summary_line(summary: dict) -> str:
  if summary["train_loss"] is None:        # resumed at the last step: nothing left to train
    return f"step {summary['final_step']}: already trained (the run in {summary['model_dir']} is complete)"
  eval_loss = summary["eval_loss"]
  return (f"step {summary['final_step']}: train loss {summary['train_loss']:.4f}"
          + (f", held-out loss {eval_loss:.4f}" if eval_loss is not None else "")
          + (f" (stopped by {summary['interrupted']})" if summary["interrupted"] else ""))


def _run_training(args: argparse.Namespace, command: str, start) -> int:
  """What train / upcycle / distill share: logging, gin, the mesh, a non-finite stop, the summary line.
  start(gin_config, mesh) -> the run's summary."""
  import logging
  from switchx import gin_config
  from switchx.parallel.mesh import MeshConfig
  from switchx.train.loop import NonFiniteLossError
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  gin_config.parse(args.gin_file, args.gin_bindings)
  mesh = MeshConfig.parse(args.mesh) if args.mesh else gin_config.mesh_config()
  try:
    summary = start(gin_config, mesh)
  except NonFiniteLossError as e:
    print(f"switchx {command}: stopped: {e}", file=sys.stderr)
    return 3
  print(_summary_line(summary))
  return 0


def _train(args: argparse.Namespace) -> int:
  from switchx.train.loop import train
  return _run_training(args, "train", lambda gin, mesh: train(
      gin.model_config(), gin.train_config(), gin.data_config(), mesh, model_dir=args.model_dir,
      operative_config=gin.operative_config()))


def _plan(args: argparse.Namespace) -> int:
  import json
  from switchx import gin_config, model_stats
  from switchx.parallel.mesh import MeshConfig
  from switchx.train.plan import plan
  mesh = MeshConfig.parse(args.mesh)
  if -1 in (mesh.data, mesh.expert, mesh.model):
    raise ValueError("--mesh: give every axis size, e.g. data=16,expert=128,model=1 (plan looks at no devices).")
  model, train = gin_config.load(args.gin_file, args.gin_bindings)
  result = plan(model, train, {"data": mesh.data, "expert": mesh.expert, "model": mesh.model})
  if args.json:
    print(json.dumps(result))
    return 0
  gib = lambda n: f"{n / 2**30:10.3f} GiB"
  print(f"mesh {result['mesh']} ({result['devices']} devices), {model_stats.format_count(result['total_params'])}"
        f" parameters, batch {train.batch_size} x ({train.inputs_length} + {train.targets_length}) tokens")
  print(f"per device:  parameters {gib(result['params_bytes'])}")
  print(f"             optimizer  {gib(result['optimizer_bytes'])}   ({train.optimizer})")
  print(f"             activations{gib(result['activation_bytes'])}   (estimate; see switchx/train/plan.py)")
  print(f"             total      {gib(result['total_bytes'])}")
  return 0


def _convert(args: argparse.Namespace) -> int:
  from switchx import gin_config
  from switchx.api import convert
  config = args.config or None
  if args.from_format == "t5x" and config is None and args.gin_file:
    config = gin_config.load(args.gin_file, args.gin_bindings)[0]
  result = convert(args.src, args.dst, args.from_format, args.to_format, config_for_t5x=config)
  layers = (f"{result.num_layers} decoder-only" if hasattr(result, "num_layers") else
            f"{result.num_encoder_layers}+{result.num_decoder_layers}")
  print(f"wrote {args.dst} ({args.to_format}): d_model {result.d_model}, {layers} layers, "
        f"{result.moe.num_experts if result.is_sparse else 0} experts")
  return 0


def _bound(name: str) -> dict:
  """The fields of config class `name` that the parsed gin files and flags bind (not its defaults)."""
  import gin
  return dict(gin.get_bindings(name))


def _checkpoint_path(args: argparse.Namespace) -> str:
  from pathlib import Path
  return str(Path(args.model_dir) / "best") if args.best else args.model_dir


def _eval(args: argparse.Namespace) -> int:
  import json
  from switchx import gin_config
  from switchx.parallel.mesh import MeshConfig
  from switchx.train.evaluate import EVAL_FILE, evaluate_run
  gin_config.parse(args.gin_file, args.gin_bindings)
  mesh = MeshConfig.parse(args.mesh) if args.mesh else gin_config.mesh_config()
  result = evaluate_run(_checkpoint_path(args), _bound("ModelConfig"), _bound("MoeConfig"), _bound("TrainConfig"),
                        mesh)
  print(f"{result['checkpoint']} (step {result['step']})")
  for key, value in result.items():
    if isinstance(value, float):
      print(f"  {key:<32s} {value:.4f}")
  for layer, metrics in result.get("router", {}).items():
    usage = json.dumps([round(u, 3) for u in metrics["expert_usage"]])
    print(f"  {layer:<20s} dropped {metrics['dropped_fraction']:.2%}  confidence "
          f"{metrics['router_confidence']:.3f}  dead experts {metrics['dead_experts']}  usage {usage}")
  print(f"wrote {args.model_dir}/{EVAL_FILE}")
  return 0


def _decode(args: argparse.Namespace) -> int:
  from switchx import gin_config
  from switchx.decode import decode_texts
  from switchx.train import restore
  gin_config.parse(args.gin_file, args.gin_bindings)
  flags = {name: getattr(args, name) for name in ("strategy", "max_decode_length", "beam_size", "length_penalty",
                                                  "temperature", "top_k", "top_p", "seed", "moe_routing")
           if getattr(args, name) is not None}
  decode_config = gin_config.build("DecodeConfig", **flags)
  texts = list(args.input)
  if args.input_file:
    with open(args.input_file, encoding="utf-8") as f:
      texts += [line.rstrip("\n") for line in f if line.strip()]
  if not texts:
    raise ValueError("nothing to decode: give --input TEXT (repeatable) or --input_file FILE (one input a line).")
  path = _checkpoint_path(args)
  loaded = restore.load_model(path)
  config = restore.apply_overrides(loaded.config, _bound("ModelConfig"), _bound("MoeConfig"))
  tokenizer = restore.load_tokenizer(path, gin_config.data_config())
  outputs = decode_texts(config, loaded.params, tokenizer, texts, decode_config, batch_size=args.batch_size)
  for text, output in zip(texts, outputs):
    print(output if args.quiet else f"{text}\t-> {output}")
  return 0


def parse_task(text: str):
  """--task NAME=TRAIN.jsonl[,VALIDATION.jsonl][@RATE] -> a TaskConfig."""
  from switchx.config import TaskConfig
  name, sep, rest = text.partition("=")
  rate = 1.0
  if "@" in rest:
    rest, rate_text = rest.rsplit("@", 1)
    try:
      rate = float(rate_text)
    except ValueError:
      rate = float("nan")
  paths = [p for p in rest.split(",") if p]
  if not (sep and name and 1 <= len(paths) <= 2):
    raise ValueError(f"--task {text!r}: expected NAME=TRAIN.jsonl[,VALIDATION.jsonl][@RATE], e.g. "
                     "topics=task/train.jsonl,task/validation.jsonl@2.")
  return TaskConfig(name=name, train_path=paths[0], validation_path=paths[1] if len(paths) > 1 else "",
                    rate=rate)


def _finetune(args: argparse.Namespace) -> int:
  import logging
  from switchx import gin_config
  from switchx.parallel.mesh import MeshConfig
  from switchx.train.finetune import finetune
  from switchx.train.loop import NonFiniteLossError
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("switchx").setLevel(logging.INFO)    # also when a library configured logging first
  cli_tasks = tuple(parse_task(t) for t in args.task)          # bad --task flags fail before anything loads
  gin_config.parse(["runs/finetune"] + list(args.gin_file), args.gin_bindings)
  flags = {name: getattr(args, name) for name in ("init_from", "freeze") if getattr(args, name) is not None}
  finetune_config = gin_config.build("FinetuneConfig", **flags)
  if cli_tasks:
    import dataclasses
    finetune_config = dataclasses.replace(finetune_config, tasks=finetune_config.tasks + cli_tasks)
  mesh = MeshConfig.parse(args.mesh) if args.mesh else gin_config.mesh_config()
  try:
    summary = finetune(gin_config.train_config(), finetune_config, args.model_dir,
                       model_changes=_bound("ModelConfig"), moe_changes=_bound("MoeConfig"), mesh_config=mesh,
                       data_config=gin_config.data_config(), operative_config=gin_config.operative_config())
  except NonFiniteLossError as e:
    print(f"switchx finetune: stopped: {e}", file=sys.stderr)
    return 3
  best = summary["best"]
  print(f"step {summary['final_step']}"
        + (f": best {best['metric']} {best['value']:.4f} at step {best['step']} ({args.model_dir}/best)"
           if best else "")
        + (f" (stopped by {summary['interrupted']})" if summary["interrupted"] else ""))
  return 0


def _upcycle(args: argparse.Namespace) -> int:
  from switchx.train.upcycle import upcycle
  return _run_training(args, "upcycle", lambda gin, mesh: upcycle(
      args.init_from, gin.model_config(), gin.train_config(), gin.data_config(), mesh, model_dir=args.model_dir,
      router_stddev=args.router_stddev, reinit_fraction=args.reinit_fraction, continue_data=args.continue_data,
      carry_optimizer_state=args.carry_optimizer_state, operative_config=gin.operative_config()))


def _distill(args: argparse.Namespace) -> int:
  import dataclasses
  from switchx.train.distill import distill

  def start(gin, mesh):
    train_config = gin.train_config()
    if not any(b.startswith("TrainConfig.distill_soft_weight") for b in args.gin_bindings):
      train_config = dataclasses.replace(train_config, distill_soft_weight=args.soft_weight)
    return distill(args.teacher, gin.model_config(), train_config, gin.data_config(), mesh,
                   model_dir=args.model_dir, init_from_teacher=not args.fresh_student,
                   operative_config=gin.operative_config())

  return _run_training(args, "distill", start)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="switchx", description="Switch Transformers and sparse MoE in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser("demo", help="train a tiny Switch model and its dense twin on the built-in corpus")
  demo.add_argument("--out_dir", default="demo_out", help="where the plot and results.json go")
  demo.add_argument("--steps", type=int, default=None,
                    help="training steps per run (default: configs/runs/demo_lm.gin's)")
  demo.add_argument("--seeds", type=int, default=2, help="seeds per model (the spread is their half-range)")
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo)

  params = sub.add_parser("params", help="parameter counts and FLOPs per token of a config, from shapes alone")
  _add_gin_flags(params)
  params.add_argument("--json", action="store_true",
                      help="print one JSON object: total_params, expert_params, active_params, flops_per_token")
  params.add_argument("--all", action="store_true", help="a Markdown table of every model preset")
  params.add_argument("--quantized", type=int, choices=(8, 4, 2), default=0,
                      help="also the bytes with expert weights quantized to 8, 4 or 2 (ternary) bits")
  params.set_defaults(run=_params)

  train = sub.add_parser("train", help="train (or resume) a model: span-corruption pre-training")
  _add_run_flags(train, "checkpoints, metrics.jsonl, TensorBoard, config.gin")
  train.set_defaults(run=_train)

  up = sub.add_parser("upcycle", help="sparse upcycling: a trained dense model's FFN copied into every expert "
                                      "of the sparse config (--gin_file: a Switch preset), fresh routers, then train")
  _add_run_flags(up, "the upcycled run (re-running resumes it)")
  up.add_argument("--init_from", required=True, help="the dense model: a `switchx train` directory (or its best/) "
                                                     "or a switchx.save directory")
  up.add_argument("--router_stddev", type=float, default=0.02, help="the fresh routers' init standard deviation")
  up.add_argument("--reinit_fraction", type=float, default=0.0,
                  help="Drop-Upcycling: share of each expert's hidden units re-initialised (default 0: plain)")
  up.add_argument("--continue_data", action="store_true",
                  help="start the data where the dense run's checkpoint stopped (same corpus and settings), not at "
                       "the beginning")
  up.add_argument("--carry_optimizer_state", action="store_true",
                  help="start from the dense run's optimizer state (each expert's moments its dense FFN's, the "
                       "routers' fresh; the same optimizer) instead of a fresh one")
  up.set_defaults(run=_upcycle)

  dist = sub.add_parser("distill", help="distil a trained (sparse) teacher into the student config (--gin_file: "
                                        "e.g. a dense preset): targets mix the teacher's probabilities in")
  _add_run_flags(dist, "the student's run (re-running resumes it)")
  dist.add_argument("--teacher", required=True, help="the teacher: a `switchx train` directory (or its best/) or "
                                                     "a switchx.save directory")
  dist.add_argument("--soft_weight", type=float, default=0.25, help="weight of the teacher's probabilities in "
                                                                    "the target (Switch paper: 0.25)")
  dist.add_argument("--fresh_student", action="store_true", help="do not copy the teacher's non-expert weights "
                                                                  "into the student")
  dist.set_defaults(run=_distill)

  plan = sub.add_parser("plan", help="per-device memory of a config on a mesh, from shapes alone (no devices)")
  _add_gin_flags(plan)
  plan.add_argument("--mesh", required=True, help="mesh axis sizes, e.g. data=16,expert=128,model=1")
  plan.add_argument("--json", action="store_true")
  plan.set_defaults(run=_plan)

  convert = sub.add_parser("convert", help="convert checkpoints: transformers / t5x / switchx -> switchx / "
                                           "transformers (see docs/interop.md)")
  convert.add_argument("--from", dest="from_format", required=True, choices=("hf", "t5x", "switchx"))
  convert.add_argument("--to", dest="to_format", required=True, choices=("switchx", "hf"))
  convert.add_argument("src")
  convert.add_argument("dst")
  _add_gin_flags(convert)
  convert.add_argument("--config", default="", help="t5x only: a switchx config.json describing the model "
                                                     "(or give its preset with --gin_file)")
  convert.set_defaults(run=_convert)

  quant = sub.add_parser("quantize", help="quantize a saved model's expert weights (round to nearest, per output "
                                          "channel) to int8 or int4; decode and eval run from the result")
  quant.add_argument("--model", required=True, help="a switchx.save directory (or a transformers one)")
  quant.add_argument("--bits", type=int, choices=(8, 4, 2), default=8, help="8, 4 or 2 (ternary: codes -1, 0, 1)")
  quant.add_argument("--out", required=True, help="where the quantized model goes (a switchx.save directory)")
  quant.set_defaults(run=_quantize)

  merge = sub.add_parser("merge", help="merge a saved model's experts into fewer (grouped by weight similarity, "
                                       "usage-weighted averages; the router keeps its columns)")
  merge.add_argument("--model", required=True, help="a switchx.save directory")
  merge.add_argument("--experts", type=int, required=True, help="experts after merging")
  merge.add_argument("--usage", default="", help="JSON list: each expert's share of tokens (default: uniform), "
                                                 "e.g. from `switchx eval`'s expert usage")
  merge.add_argument("--out", required=True, help="where the merged model goes")
  merge.set_defaults(run=_merge)

  extract = sub.add_parser("extract", help="write the sub-network one task uses (a task-routed model, MoeConfig."
                                           "route_by='task') as a smaller model that loads and decodes alone")
  extract.add_argument("--model", required=True, help="a run directory (or RUN/best) or a switchx.save directory")
  extract.add_argument("--task", type=int, required=True, help="the task's index in the fine-tuning mixture")
  extract.add_argument("--out", required=True, help="where the task's model goes (a switchx.save directory)")
  extract.set_defaults(run=_extract)

  evaluate = sub.add_parser("eval", help="held-out metrics of a run's newest checkpoint (eval capacity factor): "
                                         "neg. log perplexity, token accuracy, router metrics -> eval.json")
  _add_gin_flags(evaluate)
  evaluate.add_argument("--model_dir", required=True, help="a `switchx train` or `switchx finetune` directory")
  evaluate.add_argument("--best", action="store_true", help="the run's best checkpoint (fine-tuning runs)")
  evaluate.add_argument("--mesh", default="", help="mesh axis sizes (default: all devices on 'data')")
  evaluate.set_defaults(run=_eval)

  decode = sub.add_parser("decode", help="generate text from a run's newest checkpoint (or a saved model)")
  _add_gin_flags(decode)
  decode.add_argument("--model_dir", required=True, help="a run directory, or a switchx.save / transformers one")
  decode.add_argument("--best", action="store_true", help="the run's best checkpoint (fine-tuning runs)")
  decode.add_argument("--input", action="append", default=[], help="input text (repeatable)")
  decode.add_argument("--input_file", default="", help="a text file, one input a line")
  decode.add_argument("--strategy", choices=("greedy", "beam", "sample"), default=None)
  decode.add_argument("--max_decode_length", type=int, default=None)
  decode.add_argument("--beam_size", type=int, default=None)
  decode.add_argument("--length_penalty", type=float, default=None, help="beam: alpha in ((5 + len) / 6) ** alpha")
  decode.add_argument("--temperature", type=float, default=None, help="sample: 0 takes the most likely token")
  decode.add_argument("--top_k", type=int, default=None)
  decode.add_argument("--top_p", type=float, default=None)
  decode.add_argument("--seed", type=int, default=None)
  decode.add_argument("--moe_routing", choices=("no_drop", "eval_capacity"), default=None,
                      help="MoE routing while decoding (default no_drop: nothing dropped; docs/finetuning.md)")
  decode.add_argument("--batch_size", type=int, default=None, help="inputs decoded together (default: all)")
  decode.add_argument("--quiet", action="store_true", help="print only the outputs, one a line")
  decode.set_defaults(run=_decode)

  tune = sub.add_parser("finetune", help="fine-tune a checkpoint on a task or a mixture of tasks (configs/runs/"
                                         "finetune.gin is applied first: Adafactor, constant 1e-3, dropout 0.1)")
  _add_gin_flags(tune)
  tune.add_argument("--model_dir", required=True, help="checkpoints/ (latest), best/ (best metric), metrics")
  tune.add_argument("--init_from", default=None, help="a `switchx train` / `switchx finetune` directory (or its "
                                                      "best/), or a switchx.save / transformers directory")
  tune.add_argument("--task", action="append", default=[],
                    help="NAME=TRAIN.jsonl[,VALIDATION.jsonl][@RATE] (repeatable: a mixture at those rates); "
                         "tfds tasks and input prefixes through gin (TaskConfig)")
  tune.add_argument("--freeze", choices=("none", "experts", "non_experts", "router"), default=None)
  tune.add_argument("--mesh", default="", help="mesh axis sizes, e.g. data=2,expert=4,model=1")
  tune.set_defaults(run=_finetune)
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
  except (ValueError, FileNotFoundError) as e:  # bad input: say what is wrong and how to fix it, no traceback
    print(f"switchx {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
