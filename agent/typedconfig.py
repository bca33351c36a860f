"""Old home of the typed-configuration machinery, now ``sentinel_contract.typedconfig`` (docs/architecture.md).

Kept so that ``import agent.typedconfig`` in existing code goes on working: the module *is* the contract's,
so the names, the classes and anything patched on it are the same objects either way.
"""

import sys

from sentinel_contract import typedconfig as _contract

sys.modules[__name__] = _contract
