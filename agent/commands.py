"""Old home of the command wire format, now ``sentinel_contract.commands`` (docs/architecture.md).

Kept so that ``import agent.commands`` in existing code goes on working: the module *is* the contract's,
so the names, the classes and anything patched on it are the same objects either way.
"""

import sys

from sentinel_contract import commands as _contract

sys.modules[__name__] = _contract
