"""KG data layer: loading and validation, the filter index, the synthetic KG, the registry.

Names are imported lazily so that ``kgtok data list`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KnowledgeGraph": "kgtok.data.graph",
    "LoadReport": "kgtok.data.graph",
    "load_kg": "kgtok.data.graph",
    "SPLITS": "kgtok.data.graph",
    "FilterIndex": "kgtok.data.filter_index",
    "KGFormatError": "kgtok.data.errors",
    "KGDataWarning": "kgtok.data.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kgtok.data' has no attribute {name!r}")
