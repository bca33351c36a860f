"""The reference docs carry the tables generated from the code, so they cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.typedconfig import reference, reference_markdown
from sentinel.config import Config

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("cls, module", [(Config, "sentinel.config"), (AgentConfig, "agent.config")])
def test_configuration_doc_has_the_generated_table(cls: type, module: str) -> None:
    text = (DOCS / "configuration.md").read_text()
    assert reference_markdown(cls) in text, f"docs/configuration.md is stale: paste `python -m {module}`"
    assert all(f"`{key}`" in text for key, *_ in reference(cls))
