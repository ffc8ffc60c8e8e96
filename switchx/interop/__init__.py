"""Checkpoint interop: transformers (hf.py) in and out, t5x / flaxformer (t5x.py) in. Converting between formats
(`switchx convert`) is switchx.api.convert.

    from switchx.interop import import_hf, export_hf, import_t5x

See docs/interop.md.
"""

from __future__ import annotations

from switchx.interop.hf import export_hf, import_hf
from switchx.interop.t5x import import_t5x

__all__ = ["export_hf", "import_hf", "import_t5x"]
