"""sentinel: training-health statistics and stabilisers that live inside the trainer.

sn = sentinel.attach(model, optimizer, config="sentinel.yaml")
for batch in sn.batches(loader):
    ...; optimizer.step(); optimizer.zero_grad()
    sn.observe(loss=loss)
sn.close()
"""

from sentinel.attach import Sentinel, attach
from sentinel.config import Config, load_config
from sentinel.stabilise import z_loss
from sentinel_contract.typedconfig import ConfigError

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Sentinel", "attach", "load_config", "z_loss", "__version__"]
