"""Old home of the agent's process launcher, now ``sentinel_contract.agent_process`` (docs/architecture.md).

Kept so that ``import agent.spawn`` in existing code goes on working: the module *is* the contract's,
so the names, the classes and anything patched on it are the same objects either way.
"""

import sys

from sentinel_contract import agent_process as _contract

sys.modules[__name__] = _contract
