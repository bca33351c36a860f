"""The default run name: stable across relaunches of the same job, the same on every rank.

The run name is the ``run`` label of every series and the key of the agent's state, so a name
that changed with each process (host and pid) made every relaunch a new series and a new
status card.  The rule, first match wins:

1. ``run:`` in the configuration (or ``run=`` to ``attach``);
2. ``$SENTINEL_RUN`` (on Kubernetes, set it from the Job's ``job-name`` label with the
   downward API, as ``deploy/kubernetes/training-pod.yaml`` does from the pod's name);
3. ``$TORCHELASTIC_RUN_ID``, torchrun's ``--rdzv-id`` (unless it is torchrun's default ``none``);
4. ``$SLURM_JOB_ID`` as ``slurm-<id>`` (an array task: ``slurm-<array id>_<task id>``);
5. the script's file name without ``.py`` (``train.py`` gives ``train``); ``run`` when there is
   no script (an interactive session).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._:@/-]+")


def default_run_name(environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> str:
    """The run name when the configuration gives none (rule in the module docstring)."""
    env = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    if env.get("SENTINEL_RUN"):
        return env["SENTINEL_RUN"]
    elastic = env.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        return elastic
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    script = argv[0] if argv else ""
    if script and script not in ("-c", "-m", "-") and not script.startswith("<"):
        stem = _UNSAFE.sub("-", Path(script).name.removesuffix(".py")).strip("-")
        if stem:
            return stem[:128]
    return "run"
