"""Copies the generated result tables (results/*.md) into experiments/README.md between markers, so the numbers
quoted there are always the committed results: `python -m experiments.report`."""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("expert_count", "capacity_factor", "sparse_vs_dense", "init_scale", "adam_moments", "regime", "regime_every2",
         "regime_gate8", "regime_long_gate8", "lm_regime", "balancing", "upcycling", "distillation", "quantization",
         "merging", "extraction",
         "expert_count_2800", "expert_count_2800_every2", "sparse_vs_dense_2800")  # longer variants (--tag)


def tables(results: Path = HERE / "results") -> dict[str, str]:
  """{experiment: its Markdown table (without the generator comment)} for the results that exist."""
  out = {}
  for name in NAMES:
    path = results / f"{name}.md"
    if path.exists():
      out[name] = "\n".join(l for l in path.read_text().splitlines() if not l.startswith("<!--")).strip()
  return out


def main() -> None:
  readme = HERE / "README.md"
  text = readme.read_text()
  for name, table in tables().items():
    text = re.sub(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)",
                  lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
  readme.write_text(text)
  print(f"updated {readme}")


if __name__ == "__main__":
  main()
