"""The sentinel sidecar agent: receives training statistics, exports them to Prometheus.

This package never imports torch: it runs as a separate process beside the trainer.
"""

__version__ = "0.1.0"
