"""sentinel.integrations.lightning on a real Lightning Trainer (the tiny GPT, CPU) and a real agent.

The agent is ``sentinel-agent run`` on loopback; its policy answers a non-finite loss (one
injected batch) with the command under test, so every command crosses the real channel.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from agent_proc import applied, nonfinite_policy, trainer_config
from sentinel.examples.tiny_gpt import GPT, GPTConfig, Windows, stdlib_corpus

from sentinel.integrations.adapter import Adapter, load
from sentinel.integrations.checkpoints import FrameworkCheckpoints
from sentinel.integrations.lightning import SentinelCallback, fit


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a busy machine: intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyLM(pl.LightningModule):
    """The tiny GPT; ``nan_step`` (1-based optimizer step) poisons one batch's loss, once."""

    def __init__(self, nan_step: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32))
        self.nan_step, self.injected = nan_step, False
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.gpt(x, y)
        self.losses.append(float(loss))
        if self.nan_step is not None and not self.injected and self.trainer.global_step + 1 == self.nan_step:
            self.injected = True
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Windows(stdlib_corpus(100_000), 16, 400), batch_size=4)


def make_trainer(cb: SentinelCallback, max_steps: int, *extra: pl.Callback, **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=[cb, *extra],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


class Probe(pl.Callback):
    """Records per-step parameter changes and guard skips; after the NaN step it waits until the agent has
    sent its command, so that the command is applied at the next step boundary however loaded the machine is."""

    def __init__(self, cb: SentinelCallback, agent: Any, nan_step: int):
        self.cb, self.agent, self.nan_step = cb, agent, nan_step
        self.before: dict[str, torch.Tensor] = {}
        self.changed: dict[int, bool] = {}
        self.skips_at: dict[int, int] = {}
        self.resumed_params: list[dict[str, torch.Tensor]] = []
        self.guard_at: dict[int, dict[str, Any]] = {}  # the guard's state after each step, first trajectory
        self.resumed_guard: list[dict[str, Any]] = []
        self._skips = 0
        self._started = False

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step > 0:
            self.resumed_params.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            self.resumed_guard.append(self.cb.sentinel.guard.state_dict())
        if not self._started:
            self._started = True
            time.sleep(0.6)  # the hello at connect may precede the TCP connection; it is retried after 0.5 s
        self._skips = self.cb.sentinel.skipped_updates

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.changed[step] = any(not torch.equal(v.detach(), self.before[k]) for k, v in pl_module.named_parameters())
        skips = self.cb.sentinel.skipped_updates
        self.skips_at[step], self._skips = skips - self._skips, skips
        self.guard_at.setdefault(step, self.cb.sentinel.guard.state_dict())
        if step == self.nan_step and pl_module.injected:
            deadline = time.monotonic() + 15
            while not any(e.get("type") == "sent" for e in self.agent.events()):
                assert time.monotonic() < deadline, f"the agent sent no command; its log:\n{self.agent.log()}"
                time.sleep(0.02)
            time.sleep(0.3)  # loopback delivery, with margin for a loaded machine


def test_statistics_reach_the_agent_with_the_loss_of_each_optimizer_step(start_agent) -> None:
    agent = start_agent(config={"policy": {"enabled": False}})
    cb = SentinelCallback(trainer_config(agent, "pl-stats"))
    model = TinyLM()
    fit(make_trainer(cb, 5, accumulate_grad_batches=2), model, loader())

    scrape = agent.wait_for(lambda s: s.value("sentinel_training_step", run="pl-stats") == 4)
    assert len(model.losses) == 10  # 5 updates of 2 accumulated batches
    expected = sum(model.losses[-2:]) / 2
    assert scrape.value("sentinel_loss", run="pl-stats") == pytest.approx(expected, rel=1e-5)
    params = {
        lab.get("param") for lab, _ in scrape.samples("sentinel_param_update_ratio") if lab.get("run") == "pl-stats"
    }
    assert "gpt.h.0.attn.c_attn.weight" in params
    assert cb.sentinel.counters["errors"] == 0


def test_an_agent_skip_update_leaves_the_parameters_of_that_step_untouched(start_agent) -> None:
    agent = start_agent(config=nonfinite_policy("skip_update", steps=1))
    cb = SentinelCallback(trainer_config(agent, "pl-skip"))
    probe = Probe(cb, agent, nan_step=3)
    trainer = make_trainer(cb, 10, probe)
    fit(trainer, TinyLM(nan_step=3), loader())

    (ack,) = applied(agent.wait_acked("skip_update"))
    assert ack["step"] == 4  # applied at the boundary after update 4: update 5 is skipped
    assert [s for s, n in probe.skips_at.items() if n] == [3, 5]  # the NaN step by the guard, then the command
    assert probe.changed[3] is False and probe.changed[5] is False
    assert all(probe.changed[s] for s in probe.changed if s not in (3, 5))
    assert trainer.global_step == 10


def test_an_agent_stop_ends_training_at_that_step(start_agent) -> None:
    agent = start_agent(config=nonfinite_policy("stop"))
    cb = SentinelCallback(trainer_config(agent, "pl-stop"))
    trainer = make_trainer(cb, 200, Probe(cb, agent, nan_step=3))
    fit(trainer, TinyLM(nan_step=3), loader())

    (ack,) = applied(agent.wait_acked("stop"))
    assert trainer.global_step == ack["step"] == 4  # the boundary after the NaN step's


def test_an_agent_rollback_resumes_from_the_good_checkpoint_it_names(start_agent, tmp_path: Path) -> None:
    agent = start_agent(config=nonfinite_policy("rollback", steps_back=0, skip=2))
    ckpt = tmp_path / "ckpt"
    cb = SentinelCallback(
        trainer_config(agent, "pl-rollback", checkpoint={"dir": str(ckpt), "every": 2, "good_after": 2, "keep": 10})
    )
    probe = Probe(cb, agent, nan_step=7)
    trainer = make_trainer(cb, 14, probe)
    fit(trainer, TinyLM(nan_step=7), loader())

    (ack,) = applied(agent.wait_acked("rollback"))
    # step-6 was pending when the NaN came (step 7): only step-4 and older are good
    (rollback,) = cb.rollbacks
    assert rollback == {"from_step": 8, "to_step": 4, "path": str(ckpt / "step-4.ckpt"), "skip": 2}
    assert ack["step"] == 8
    assert json.loads((ckpt / "step-4.ckpt.sentinel.json").read_text())["verdict"] == "good"

    (resumed,) = probe.resumed_params
    saved = torch.load(ckpt / "step-4.ckpt", weights_only=False)["state_dict"]
    assert saved.keys() == resumed.keys()
    for name, tensor in saved.items():
        assert torch.equal(resumed[name], tensor), name
    # the guard continues from its state at the checkpoint (EMA, counts), plus the 2 skips of the rollback
    (guard,) = probe.resumed_guard
    assert guard == {**probe.guard_at[4], "pending_skips": 2} and guard["seen"] == 4
    assert [probe.skips_at[s] for s in (5, 6, 7)] == [1, 1, 0]  # the updates of 2 batches skipped after the resume
    assert trainer.global_step == 14


def test_without_a_checkpoint_dir_a_rollback_is_rejected_and_training_goes_on(start_agent) -> None:
    agent = start_agent(config=nonfinite_policy("rollback", steps_back=0, skip=2))
    cb = SentinelCallback(trainer_config(agent, "pl-no-dir"))
    trainer = make_trainer(cb, 8, Probe(cb, agent, nan_step=3))
    fit(trainer, TinyLM(nan_step=3), loader())

    deadline = time.monotonic() + 10
    while not (acks := [e for e in agent.events() if e.get("type") == "ack"]):
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    assert acks[0]["status"] == "rejected" and "checkpoint.dir is null" in acks[0]["detail"]
    assert cb.rollbacks == [] and trainer.global_step == 8


class WeightsAtStart(pl.Callback):
    """The module's tensors when training starts, after the callbacks before it (sentinel's) have run."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.seen.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_a_resume_keeps_the_restored_weights_when_an_init_scheme_is_configured(tmp_path: Path, caplog) -> None:
    """``stabilise.init`` re-initialises at the first attach of a fresh run only: a new process resuming
    from a checkpoint (Lightning restores it before ``on_train_start``) trains on the restored weights."""
    ckpt = tmp_path / "ckpt"
    config = {
        "publish": {"enabled": False},
        "control": {"endpoint": "tcp://127.0.0.1:9"},  # nothing listens: commands cost nothing
        "checkpoint": {"dir": str(ckpt), "every": 2, "good_after": 2, "keep": 5},
        "stabilise": {"init": "small_scaled"},
    }
    first = WeightsAtStart()
    fit(make_trainer(SentinelCallback(config), 4, first), TinyLM(), loader())
    (fresh,) = first.seen
    assert not torch.equal(fresh["gpt.h.0.attn.c_attn.weight"], TinyLM().state_dict()["gpt.h.0.attn.c_attn.weight"])

    after = WeightsAtStart()  # a restart: new callback, new trainer, resumed from step-2.ckpt
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        fit(make_trainer(SentinelCallback(config), 3, after), TinyLM(), loader(), ckpt_path=str(ckpt / "step-2.ckpt"))
    (resumed,) = after.seen
    saved = torch.load(ckpt / "step-2.ckpt", weights_only=False)["state_dict"]
    assert saved.keys() == resumed.keys()
    for name, tensor in saved.items():
        assert torch.equal(resumed[name], tensor), name
    assert any("stabilise.init='small_scaled' not applied at a resume" in r.getMessage() for r in caplog.records)


def test_only_the_first_attach_of_a_fresh_run_re_initialises() -> None:
    """A second ``fit()``/``train()`` call at step 0 re-attaches too: it must not re-initialise the weights
    the first call trained; the embedding hook (``stabilise.scaled_embed``) is kept."""
    config = {"publish": {"enabled": False}, "control": {"enabled": False}}
    config["stabilise"] = {"init": "small", "scaled_embed": True}
    config["optim"] = {"wesar": {"enabled": True, "init": "wesar"}}
    adapter = Adapter(load(config, {}), FrameworkCheckpoints(2))
    model = TinyLM()
    adapter.attach(model, torch.optim.AdamW(model.parameters()), None, step=0)
    after_first = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter.attach(model, torch.optim.AdamW(model.parameters()), None, step=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, after_first[name]), name
    sn = adapter.sentinel
    assert sn.config.stabilise.init == "keep" and sn.config.optim.wesar.init == "keep"
    assert sn.config.stabilise.scaled_embed and len(sn._stabilisers.hooks) == 1
    assert adapter.config.stabilise.init == "small"  # the user's config is unchanged
    adapter.close()


def test_checkpoints_are_judged_and_only_the_newest_good_ones_kept(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    config = {
        "publish": {"enabled": False},
        "control": {"endpoint": "tcp://127.0.0.1:9"},  # nothing listens: commands cost nothing
        "checkpoint": {"dir": str(ckpt), "every": 2, "good_after": 2, "keep": 2},
    }
    cb = SentinelCallback(config)
    fit(make_trainer(cb, 10), TinyLM(), loader())

    verdicts = {p.name: json.loads(p.read_text())["verdict"] for p in ckpt.glob("*.sentinel.json")}
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == ["step-10.ckpt", "step-6.ckpt", "step-8.ckpt"]
    assert verdicts == {"step-6.ckpt.sentinel.json": "good", "step-8.ckpt.sentinel.json": "good",
                        "step-10.ckpt.sentinel.json": "pending"}  # fmt: skip
    assert "sentinel" in torch.load(ckpt / "step-8.ckpt", weights_only=False)
