"""Adapters that attach sentinel to training frameworks that own the loop (docs/integrations.md).

- ``sentinel.integrations.hf``: a ``transformers.TrainerCallback`` (``pip install llm-sentinel[hf]``);
- ``sentinel.integrations.lightning``: a Lightning ``Callback`` (``pip install llm-sentinel[lightning]``).

Each module imports its framework when it is imported, not before: ``import sentinel`` never
needs either one.
"""

from __future__ import annotations


def missing(package: str, extra: str) -> str:
    """The error message for a framework that is not installed, naming the pip extra that provides it."""
    return f"sentinel.integrations.{extra} needs the '{package}' package: pip install 'llm-sentinel[{extra}]'"
