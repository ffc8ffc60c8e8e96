"""Every notebook in colabs/ runs top to bottom, headless (nbclient), on this CPU; the committed notebooks carry no
outputs; each starts with the install cell and is linked from the README with an "Open in Colab" badge.

The training notebooks (2, 3) run here with fewer steps (SWITCHX_NOTEBOOK_STEPS) to keep the suite short; their
full-length run times are in colabs/README.md."""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/switchx/switchx/blob/main/colabs/"


def test_there_are_the_five_notebooks():
  assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_and_linked(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: strip its outputs"
  assert "REPOSITORY" in code[0].source and "pip" in code[0].source, "the first code cell installs switchx"
  badge = f"({COLAB}{path.name})"
  assert badge in nb.cells[0].source, f"{path.name}: its first cell needs its own Open in Colab badge"
  assert badge in (ROOT / "README.md").read_text(), f"README.md: link {path.name} with an Open in Colab badge"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  monkeypatch.setenv("SWITCHX_NOTEBOOK_STEPS", "30")
  nb = nbformat.read(path, as_version=4)
  started = time.perf_counter()
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert images, f"{path.name}: every notebook draws its results"
  print(f"{path.name}: {time.perf_counter() - started:.0f} s")


def test_install_cell_fetches_the_repository_on_a_clean_runtime(tmp_path):
  """Outside a checkout the install cell clones the repository (here: this checkout, by path, as git clones a
  URL) and finds the package in the clone; the pip step then installs what `make` installs (`pip install .`)."""
  import subprocess
  import sys
  source = nbformat.read(NOTEBOOKS[0], as_version=4).cells[1].source
  assert "git\", \"clone\"" in source and "\"pip\", \"install\"" in source
  source = source.replace('REPOSITORY = "https://github.com/switchx/switchx"', f"REPOSITORY = {str(ROOT)!r}")
  script = source + "\nassert (ROOT / 'switchx' / '__init__.py').is_file() and ROOT.parent == pathlib.Path.cwd()\n"
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "switchx" / "setup.py").is_file()
