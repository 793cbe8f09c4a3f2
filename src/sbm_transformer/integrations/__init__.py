"""Integrations with other libraries, imported on first use.

``sbm_transformer.integrations.huggingface`` (extra ``hf``): SBM attention in Hugging Face
transformers models (:func:`sbmify`, :func:`sbm_density`, :func:`sbm_graphs`, :class:`SBMHead`).
The names below are loaded lazily, so that ``import sbm_transformer`` (or this package) never
imports transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sbm_transformer.integrations.huggingface import (
        SBMHead,
        sbm_attention_forward,
        sbm_density,
        sbm_graphs,
        sbm_heads,
        sbmify,
    )

__all__ = ["SBMHead", "sbm_attention_forward", "sbm_density", "sbm_graphs", "sbm_heads", "sbmify"]

#: Where each lazily exported name lives.
_LAZY = {name: "sbm_transformer.integrations.huggingface" for name in __all__}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
