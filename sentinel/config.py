"""Trainer-side configuration: a typed dataclass tree loaded from YAML or a dict.

Every key is documented in docs/configuration.md (generated from the ``doc=`` strings here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentinel_contract.channels import ClientCurve
from sentinel_contract.typedconfig import ConfigError, load, option, reference_markdown

__all__ = ["Config", "ConfigError", "StatsConfig", "PublishConfig", "RolesConfig", "load_config"]


@dataclass
class StatsConfig:
    enabled: bool = option(True, doc="Compute per-tensor statistics after optimizer steps.")
    every: int = option(1, range=(1, None), doc="Compute statistics every N steps (step % N == 0).")
    update: str = option(
        "auto",
        choices=("auto", "reconstruct", "copy", "off"),
        doc=(
            "How the update dW is measured. 'reconstruct' rebuilds it from Adam/AdamW state (no extra "
            "memory beyond a bounded scratch buffer); 'copy' keeps a copy of the parameters from before "
            "the step on statistics steps (1x parameter memory); 'auto' reconstructs for Adam/AdamW "
            "and copies otherwise; 'off' skips update statistics."
        ),
    )
    chunk_elements: int = option(
        1 << 25,
        range=(1 << 10, None),
        doc="Largest number of elements processed in one batched (foreach) reduction; bounds scratch memory.",
    )


#: the trainer's CURVE sections (``publish.curve``, ``control.curve``): one type, sentinel_contract.channels
PublishCurveConfig = CurveConfig = ClientCurve


@dataclass
class PublishConfig:
    enabled: bool = option(True, doc="Send statistics to the agent over ZeroMQ.")
    endpoint: str = option("tcp://127.0.0.1:5557", doc="ZeroMQ endpoint of the agent's statistics socket.")
    queue: int = option(
        1000, range=(1, 1_000_000), doc="Messages buffered while the agent is slow; beyond this they drop."
    )
    ranks: str = option("zero", choices=("zero", "all"), doc="Which ranks publish: rank 0 only, or every rank.")
    job_scalars: bool = option(
        True,
        doc="Under torch.distributed, reduce every rank's loss, step time and error count with one small "
        "all-reduce per step and publish their job-level min/mean/max and arg-max rank from rank 0 "
        "(docs/distributed.md); every rank must have the same value.",
    )
    insecure: bool = option(
        False,
        doc="Publish without CURVE when `publish.curve` is not set. By default the keys come from the local "
        "agent's discovery file (docs/security.md); without them any process that binds the endpoint first "
        "receives the statistics. Logged as a WARNING at every start.",
    )
    allow_insecure_remote: bool = option(
        False,
        doc="With `publish.insecure`, allow a non-loopback `endpoint`: statistics then travel in clear "
        "to whoever listens there.",
    )
    curve: ClientCurve = field(default_factory=ClientCurve)

    def __post_init__(self) -> None:
        from sentinel.publish import check_endpoint

        check_endpoint(self)


@dataclass
class RolesConfig:
    preset: str = option(
        "auto",
        choices=("auto", "llama", "gpt2", "megatron", "te", "generic"),
        doc=(
            "Parameter-name patterns that give each weight matrix its role (docs/roles.md): 'llama' (Hugging "
            "Face LLaMA-style), 'gpt2' (HF GPT-2, nanoGPT), 'megatron' (Megatron-LM, Megatron-Core), 'te' "
            "(Transformer Engine modules), 'generic' (common embedding/head/norm names only); 'auto' takes the "
            "preset that assigns the most matrices and fails when two tie with different roles."
        ),
    )
    overrides: dict[str, str] = option(
        {},
        doc=(
            "Regex (full match on the parameter name) to role, applied after the preset and the structure; "
            "roles: embedding, pos_embedding, q, k, v, qkv, o, up, gate, gate_up, down, router, head, norm, bias."
        ),
    )
    structure: bool = option(
        True,
        doc=(
            "Find roles and attention from the model's dataflow: one forward on 1x8 tokens at attach, under "
            "no_grad in eval mode, RNG restored (docs/roles.md). Where it gives a role it wins over the preset. "
            "false: parameter names only."
        ),
    )

    def __post_init__(self) -> None:
        from sentinel.roles import validate_overrides

        validate_overrides(self.overrides, key="roles.overrides")


@dataclass
class GuardConfig:
    enabled: bool = option(
        False, doc="Skip (or clip) an update whose gradient norm is an outlier. Non-finite gradients always skip."
    )
    action: str = option(
        "skip",
        choices=("skip", "clip"),
        doc="What an outlier does: skip the update, or scale gradients to the EMA bound.",
    )
    z: float = option(
        6.0,
        range=(1.0, None),
        doc="z-score of the global gradient norm against its EMA that counts as an outlier (OLMo-core: 6).",
    )
    alpha: float = option(
        0.97, range=(0.5, 0.9999), doc="EMA decay of the gradient-norm mean and variance (ZClip: 0.97)."
    )
    warmup: int = option(25, range=(1, None), doc="Steps before z-scores are trusted (ZClip: 25).")


@dataclass
class WeSaRConfig:
    enabled: bool = option(False, doc="WeSaR: train W̄ = α·W with one gate per matrix (papers/001).")
    init: str = option(
        "keep",
        choices=("keep", "wesar"),
        doc="'keep': gates chosen so the model is unchanged; 'wesar': re-initialise every W ~ N(0, σ²) with Table 1's gates.",
    )
    sigma2: float = option(4e-5, range=(1e-12, 1.0), doc="σ² of every actual weight (WeSaR §4.3: 4e-5).")
    gate_lr_scale: float = option(
        1.0, range=(0.0, None), doc="Learning rate of the gates relative to param group 0 (followed every step)."
    )
    gate_weight_decay: float = option(0.0, range=(0.0, None), doc="Weight decay of the gates.")
    d_model: int | None = option(None, range=(1, None), doc="Hidden size d; default: inferred from the role map.")
    d_ffn: int | None = option(None, range=(1, None), doc="FFN size; default: inferred from the role map.")
    n_layers: int | None = option(None, range=(1, None), doc="Number of blocks N; default: inferred from the role map.")


@dataclass
class EpsConfig:
    enabled: bool = option(
        False,
        doc="Lower Adam's ε per tensor to at most ratio × RMS(√v̂), never above the optimizer's ε (papers/003 §3.4).",
    )
    ratio: float = option(1e-3, range=(1e-9, 1.0), doc="ε is kept at most this fraction of the tensor's RMS(√v̂).")
    floor: float = option(1e-16, range=(1e-30, 1e-6), doc="Smallest ε ever used.")
    every: int = option(10, range=(1, None), doc="Retune every N steps.")
    per_decade: int = option(4, range=(1, 100), doc="ε values are rounded down to this many buckets per decade.")


@dataclass
class ClampConfig:
    enabled: bool = option(
        False, doc="Pull any matrix whose update ratio ‖ΔW‖/‖W‖ exceeds its role's maximum back to it."
    )
    max_ratio: dict = option({}, doc="Maximum update ratio per role, e.g. {down: 0.02, o: 0.02}.")
    default: float | None = option(
        None, range=(0.0, None), doc="Maximum for matrices whose role has no entry (null: not clamped)."
    )


@dataclass
class OptimConfig:
    guard: GuardConfig = option(GuardConfig, doc="In-step guard (sentinel/optim/guard.py).")
    wesar: WeSaRConfig = option(WeSaRConfig, doc="WeSaR reparameterisation (sentinel/optim/wesar.py).")
    eps: EpsConfig = option(EpsConfig, doc="Adam-ε auto-tuning (sentinel/optim/eps.py).")
    clamp: ClampConfig = option(ClampConfig, doc="Update-ratio clamp (sentinel/optim/clamp.py).")
    fused: str = option(
        "auto",
        choices=("auto", "off"),
        doc="'auto': with WeSaR, ε or the clamp on and torch.optim.Adam/AdamW, sentinel makes the update in one "
        "fused Adam pass (sentinel/optim/fused.py); 'off': the transforms act around the optimizer's own step.",
    )


@dataclass
class ControlConfig:
    enabled: bool = option(True, doc="Take commands from the agent (rank 0 connects; all ranks apply them together).")
    endpoint: str = option("tcp://127.0.0.1:5558", doc="ZeroMQ endpoint of the agent's command socket.")
    every: int = option(
        1,
        range=(1, None),
        doc="Look for commands every N steps. Under torch.distributed each look is one 8-byte broadcast on a CPU group.",
    )
    hello_interval: float = option(5.0, range=(0.1, 3600.0), doc="Seconds between hellos to the agent.")
    remember: int = option(
        1024, range=(16, 1_000_000), doc="Command ids remembered (in sentinel's state_dict) to refuse duplicates."
    )
    insecure: bool = option(
        False,
        doc="Take commands without CURVE when `control.curve` is not set. By default the keys come from the "
        "local agent's discovery file (docs/security.md); without them any process that binds the endpoint "
        "first can roll back or stop the run. Logged as a WARNING at every start.",
    )
    allow_insecure_remote: bool = option(
        False, doc="With `control.insecure`, allow a non-loopback `endpoint`. Commands can roll back or stop the run."
    )
    curve: ClientCurve = field(default_factory=ClientCurve)

    def __post_init__(self) -> None:
        from sentinel.control import check_endpoint

        check_endpoint(self)


@dataclass
class CheckpointConfig:
    dir: str | None = option(
        None, doc="Folder of the checkpoints, shared by all ranks; null turns checkpointing (and rollback) off."
    )
    every: int = option(500, range=(1, None), doc="Save a checkpoint every N steps (step % N == 0).")
    keep: int = option(
        3, range=(2, None), doc="Good checkpoints kept; older ones are deleted once a newer one is good."
    )
    good_after: int = option(
        100, range=(1, None), doc="Clean steps after a save before the checkpoint counts as good (rollback target)."
    )
    async_save: bool = option(
        False, doc="Save with dcp.async_save (staged to CPU memory, written in the background; one save in flight)."
    )
    checksum: bool = option(True, doc="Record and verify the sha256 of every checkpoint file, not only its size.")
    on_failure: str = option(
        "continue",
        choices=("continue", "stop"),
        doc="A save that fails (disk full, I/O error) is logged, counted and its partial folder removed; "
        "'continue' trains on with the older good checkpoints, 'stop' also ends the run (sn.should_stop).",
    )


@dataclass
class ProbesConfig:
    enabled: bool = option(
        False,
        doc="Per-layer forward probes (docs/probes.md): linear output RMS/L2, attention logit max, residual, "
        "embedding and norm-input std, log Z at the head, Takase's bounds; sent as their own messages.",
    )
    every: int = option(
        10, range=(1, None), doc="Probe every N steps (step % N == 0); other steps run with no hooks at all."
    )
    sample: int = option(
        64,
        range=(1, None),
        doc="Query positions per sequence scored for the attention logit max, and token positions per sequence "
        "for log Z; evenly spaced, first and last included; exact when it covers the whole sequence.",
    )
    top_heads: int = option(
        4, range=(0, 1024), doc="Per attention module, also send the k largest per-head logit maxima and their heads."
    )
    bounds: bool = option(True, doc="Send Takase et al.'s per-layer gradient-norm bounds (eq. 15, 20) per block.")


@dataclass
class StabiliseConfig:
    init: str = option(
        "keep",
        choices=("keep", "small", "scaled", "small_scaled"),
        doc="Re-initialise at attach: 'small' N(0, 2/(5d)) for every matrix, 'scaled' W_o and W_down / √(2N), "
        "'small_scaled' both (Takase's Vanilla, papers/000 §4); 'keep' leaves the weights alone.",
    )
    scaled_embed: bool = option(
        False, doc="Multiply the token-embedding output by √d (Takase §4 'Scaled Embed': shortcut std near 1)."
    )
    embed_ln: bool = option(
        False, doc="Layer-normalise the token-embedding output, without affine parameters (Takase §4 'Embed LN')."
    )


@dataclass
class Config:
    enabled: bool = option(True, doc="Master switch: false installs no hooks and publishes nothing.")
    run: str | None = option(
        None,
        doc="Run name used as the `run` label; default: $SENTINEL_RUN, $TORCHELASTIC_RUN_ID, "
        "slurm-$SLURM_JOB_ID, else the script's name (sentinel/run_name.py).",
    )
    log_level: str = option(
        "info", choices=("debug", "info", "warning", "error"), doc="Level of the 'sentinel' logger."
    )
    stats: StatsConfig = field(default_factory=StatsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    stabilise: StabiliseConfig = field(default_factory=StabiliseConfig)


def load_config(source: str | Path | dict | Config | None = None, **overrides: Any) -> Config:
    """Load a Config from a YAML path, dict or Config; keyword overrides may use dotted keys."""
    return load(Config, source, **overrides)


if __name__ == "__main__":
    print(reference_markdown(Config), end="")
