"""The divergence zoo: each scenario a mechanism, a model and its settings, beside its stable twin.

A scenario is data (``Scenario``); ``twin`` is the same run with the cause removed (QK-norm on,
z-loss on, a small ε, no fault), trained on the same batches from the same seed, so the
difference between their losses is the damage the mechanism did.  ``precursor`` says whether the
mechanism announces itself before the loss moves (a trend, a jump in the optimizer's own numbers)
or is the loss event itself (a bad batch, a NaN): recall and lead time are measured over the first
kind only.  The settings are chosen so that the runs really diverge on a 2-core CPU in a few
hundred steps; ``benchmarks/divergence.py`` says, run by run, whether they did.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from benchmarks.zoo.models import ModelSpec


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str  # mechanism, a row of the table
    precursor: bool
    model: ModelSpec = ModelSpec()
    steps: int = 300  # updates the model holds at the end
    lr: float = 3e-3
    warmup: int = 20
    schedule: str = "constant"  # constant | cosine (to zero at `steps`) | wsd (linear to zero over the last 20 %)
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, no Adam state at all)
    betas: tuple[float, float] = (0.9, 0.95)
    accum: int = 1  # micro-batches per update (the batch split; each backward accumulates)
    weight_decay: float = 0.1
    head_weight_decay: float | None = None  # None: as the rest
    eps: float = 1e-8
    clip: float | None = 1.0
    z_loss: float = 0.0
    batch: int = 16
    lr_jump: tuple[int, float] | None = None  # (model step, factor): the schedule multiplies the LR from there
    rewarm: tuple[int, int, float] | None = None  # (model step, ramp steps, factor): the LR rises linearly to factor×
    loss_scale: tuple[float, float] | None = (
        None  # (initial factor, steps over which it halves): the loss, so the gradient
    )
    bad: tuple[str, int, int] | None = None  # (random|constant, first batch, batches)
    nan_step: int | None = None  # trained step whose loss is multiplied by NaN (once)
    corrupt: tuple[int, str, float] | None = None  # (trained step, parameter, value of its element 0) (once)
    sentinel: dict = field(default_factory=dict)  # more of the trainer's sentinel config (e.g. ε auto-tuning)
    twin_overrides: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.group == "clean"

    def twin(self) -> Scenario:
        """The stable twin: the cause removed, everything else equal."""
        over = dict(self.twin_overrides)
        model = replace(self.model, **over.pop("model", {}))
        return replace(self, name=f"{self.name}~twin", group="clean", precursor=False, model=model, lr_jump=None,
                       bad=None, nan_step=None, corrupt=None, twin_overrides={}, **over)  # fmt: skip


QK = {"model": {"qk_norm": True}}

SCENARIOS: tuple[Scenario, ...] = (
    # attention-logit growth (Wortsman et al. §3.1.1): no QK-norm at a high LR reached over a long warm-up
    Scenario("attn", "attn_logit", True, lr=0.3, warmup=200, clip=None, twin_overrides=QK),
    Scenario("attn-clip", "attn_logit", True, lr=0.3, warmup=200, clip=1.0, twin_overrides=QK),
    Scenario(
        "attn-llama",
        "attn_logit",
        True,
        model=ModelSpec(kind="llama"),
        lr=0.3,
        warmup=200,
        clip=None,
        twin_overrides={"model": {"kind": "qwen3"}},
    ),  # fmt: skip
    # output-logit divergence (Wortsman §3.1.2): no weight decay on the head, no z-loss
    Scenario(
        "logits",
        "log_z",
        True,
        model=ModelSpec(qk_norm=True),
        lr=0.4,
        warmup=100,
        weight_decay=0.0,
        head_weight_decay=0.0,
        clip=None,
        twin_overrides={"weight_decay": 0.1, "head_weight_decay": 0.1, "z_loss": 1e-4},
    ),  # fmt: skip
    # ε-stall (Wortsman §3.4): small gradients that keep shrinking, until Adam's √v̂ meets ε; the twin keeps
    # each tensor's ε below its √v̂ with sentinel's ε auto-tuning (a tiny fixed ε amplifies float noise instead)
    Scenario(
        "eps-stall",
        "adam_eps",
        True,
        loss_scale=(3e-5, 40.0),
        twin_overrides={"sentinel": {"optim": {"eps": {"enabled": True, "every": 1}}}},
    ),  # fmt: skip
    # an LR fault: the schedule's LR jumps ×10 mid-run
    Scenario("lr-jump", "lr_fault", True, lr_jump=(150, 10.0)),
    # a silent corruption: one weight overwritten with a huge value, as a bit flip would
    Scenario("bitflip", "corruption", False, corrupt=(150, "h.1.mlp.c_fc.weight", 3e3)),
    # bad data: random bytes, and one repeated byte (whose loss drops, yet damages the model)
    Scenario("bad-random", "bad_data", False, bad=("random", 150, 20)),
    Scenario("bad-constant", "bad_data", False, bad=("constant", 150, 40)),
    Scenario("nan", "nan", False, nan_step=150),
    # clean runs: constant LR, warm-up + cosine decay to the end (the gradient norm rises as the LR falls),
    # a model in another naming style, a Hugging Face LLaMA
    Scenario("clean", "clean", False, steps=400),
    Scenario("clean-cosine", "clean", False, lr=1e-2, schedule="cosine", warmup=40, steps=400),
    Scenario("clean-plain", "clean", False, model=ModelSpec(kind="plain")),
    Scenario("clean-llama", "clean", False, model=ModelSpec(kind="llama")),
)
# held out: healthy runs of architectures and settings no default was calibrated on (``--only heldout``)
HELDOUT: tuple[Scenario, ...] = (
    Scenario("heldout-neox", "clean", False, model=ModelSpec(kind="neox"), lr=1e-3, schedule="cosine", warmup=30),
    Scenario("heldout-mistral", "clean", False, model=ModelSpec(kind="mistral"), batch=8),
    Scenario("heldout-phi", "clean", False, model=ModelSpec(kind="phi"), lr=2e-3, schedule="cosine", clip=None),
    Scenario("heldout-gemma", "clean", False, model=ModelSpec(kind="gemma"), lr=1e-3, clip=0.5),
    Scenario("heldout-gpt2", "clean", False, model=ModelSpec(kind="gpt2"), lr=6e-4, warmup=100, schedule="cosine",
             weight_decay=0.0),
    Scenario("heldout-opt", "clean", False, model=ModelSpec(kind="opt"), schedule="cosine", steps=400),
    Scenario("heldout-gpt-wide", "clean", False, model=ModelSpec(n_layer=4, n_embd=128, n_head=4), lr=1e-3,
             schedule="cosine", batch=8, steps=300),
    Scenario("heldout-qwen3-moe", "clean", False, model=ModelSpec(kind="qwen3_moe"), lr=2e-3, schedule="cosine"),
    Scenario("heldout-gemma2", "clean", False, model=ModelSpec(kind="gemma2"), lr=1e-3),
    Scenario("heldout-gptj", "clean", False, model=ModelSpec(kind="gptj"), lr=1e-3, schedule="wsd"),
    # settings no default was fitted on: SGD (no Adam state), β₂ 0.999, a batch of 4, warm-up-stable-decay,
    # gradient accumulation over 4 micro-batches
    Scenario("heldout-sgd", "clean", False, optimizer="sgd", lr=0.3, weight_decay=0.0),
    Scenario("heldout-beta999", "clean", False, betas=(0.9, 0.999), lr=1e-3, schedule="cosine"),
    Scenario("heldout-batch4", "clean", False, batch=4, lr=1e-3),
    Scenario("heldout-wsd", "clean", False, lr=5e-3, schedule="wsd", steps=400),
    Scenario("heldout-accum", "clean", False, accum=4, model=ModelSpec(kind="llama")),
    # and mechanisms of the zoo on models they were not calibrated on
    Scenario("heldout-attn-plain", "attn_logit", True, model=ModelSpec(kind="plain"), lr=0.3, warmup=200, clip=None,
             twin_overrides=QK),
    Scenario("heldout-lr-jump-mistral", "lr_fault", True, model=ModelSpec(kind="mistral"), lr_jump=(150, 10.0)),
    Scenario("heldout-eps-stall-neox", "adam_eps", True, model=ModelSpec(kind="neox"), loss_scale=(3e-5, 40.0),
             twin_overrides={"sentinel": {"optim": {"eps": {"enabled": True, "every": 1}}}}),
)  # fmt: skip
QUICK = ("attn", "lr-jump", "bad-random", "clean-cosine")
