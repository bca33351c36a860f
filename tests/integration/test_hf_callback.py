"""sentinel.integrations.hf on a real transformers Trainer (tiny GPT-2 built in code, CPU) and a real agent.

The agent is ``sentinel-agent run`` on loopback; its policy answers a non-finite loss (one
injected batch) with the command under test, so every command crosses the real channel.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from agent_proc import applied, nonfinite_policy, trainer_config
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from sentinel.integrations.hf import SentinelCallback, forward_loss_scale, train, trainer_loss_scale

VOCAB, BLOCK = 64, 16


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a busy machine: intra-op threads only contend (20x slower on two loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=BLOCK, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def token_data(n: int = 512) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (BLOCK,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def trainer_args(out: Path, max_steps: int, **extra: Any) -> TrainingArguments:
    kw: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kw.update(extra)
    return TrainingArguments(**kw)


class Probe(TrainerCallback):
    """Injects one NaN loss at ``nan_step`` (1-based) and records per-step parameter changes and guard skips.

    After the NaN step it waits until the agent has sent its command, so that the command is applied
    at the next step boundary however loaded the machine is."""

    def __init__(self, sentinel_cb: SentinelCallback, nan_step: int | None = None, agent: Any = None):
        self.cb, self.nan_step, self.agent = sentinel_cb, nan_step, agent
        self.injected = False
        self.model: torch.nn.Module | None = None
        self.before: dict[str, torch.Tensor] = {}
        self.changed: dict[int, bool] = {}
        self.skips_at: dict[int, int] = {}
        self.resumed_params: list[dict[str, torch.Tensor]] = []
        self.guard_at: dict[int, dict[str, Any]] = {}  # the guard's state after each step, first trajectory
        self.resumed_guard: list[dict[str, Any]] = []
        self._skips = 0
        self._hook: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        if self._hook is None:
            self._hook = model.register_forward_hook(self._poison, prepend=True)  # before sentinel's
            if self.agent is not None:
                time.sleep(0.6)  # the hello at connect may precede the TCP connection; it is retried after 0.5 s
        if state.global_step > 0:
            self.resumed_params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            self.resumed_guard.append(self.cb.sentinel.guard.state_dict())
        self._skips = self.cb.sentinel.skipped_updates

    def _poison(self, module, args, output):
        if module.training and self.nan_step is not None and not self.injected and self._step == self.nan_step:
            self.injected = True
            output["loss"] = output["loss"] * float("nan")
        return output

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1
        self.before = {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def on_step_end(self, args, state, control, **kwargs):
        self.changed[state.global_step] = any(
            not torch.equal(v.detach(), self.before[k]) for k, v in self.model.named_parameters()
        )
        skips = self.cb.sentinel.skipped_updates
        self.skips_at[state.global_step] = skips - self._skips
        self.guard_at.setdefault(state.global_step, self.cb.sentinel.guard.state_dict())
        self._skips = skips
        if state.global_step == self.nan_step and self.agent is not None:
            deadline = time.monotonic() + 15
            while not any(e.get("type") == "sent" for e in self.agent.events()):
                assert time.monotonic() < deadline, f"the agent sent no command; its log:\n{self.agent.log()}"
                time.sleep(0.02)
            time.sleep(0.3)  # loopback delivery, with margin for a loaded machine


@pytest.mark.parametrize("loss", ["forward", "log"])
def test_statistics_reach_the_agent_with_the_loss_the_trainer_logs(start_agent, tmp_path: Path, loss: str) -> None:
    agent = start_agent(config={"policy": {"enabled": False}})
    cb = SentinelCallback(trainer_config(agent, f"hf-stats-{loss}"), loss=loss)
    args = trainer_args(tmp_path / "out", max_steps=6, gradient_accumulation_steps=2)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[cb])
    train(trainer)

    run = f"hf-stats-{loss}"
    scrape = agent.wait_for(lambda s: s.value("sentinel_training_step", run=run) == 5)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    assert scrape.value("sentinel_loss", run=run) == pytest.approx(logged[-1], rel=1e-5)
    params = {lab.get("param") for lab, _ in scrape.samples("sentinel_param_update_ratio") if lab.get("run") == run}
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"} <= params
    assert cb.sentinel.counters["errors"] == 0


def test_an_agent_skip_update_leaves_the_parameters_of_that_step_untouched(start_agent, tmp_path: Path) -> None:
    agent = start_agent(config=nonfinite_policy("skip_update", steps=1))
    cb = SentinelCallback(trainer_config(agent, "hf-skip"))
    args = trainer_args(tmp_path / "out", max_steps=12)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[cb])
    probe = Probe(cb, nan_step=3, agent=agent)
    trainer.add_callback(probe)
    train(trainer)

    (ack,) = applied(agent.wait_acked("skip_update"))
    skipped = [s for s, n in probe.skips_at.items() if n]
    assert skipped[0] == 3, "the NaN step is skipped by the guard"
    assert len(skipped) == 2, probe.skips_at
    commanded = skipped[1]
    assert ack["step"] == 4 and commanded == 5  # applied at the boundary after update 4: update 5 is skipped
    assert probe.changed[commanded] is False and probe.changed[3] is False
    assert all(probe.changed[s] for s in probe.changed if s not in (3, commanded))
    assert trainer.state.global_step == 12


def test_an_agent_stop_ends_training_at_that_step(start_agent, tmp_path: Path) -> None:
    agent = start_agent(config=nonfinite_policy("stop"))
    cb = SentinelCallback(trainer_config(agent, "hf-stop"))
    trainer = Trainer(
        model=tiny_gpt2(), args=trainer_args(tmp_path / "out", 200), train_dataset=token_data(), callbacks=[cb]
    )
    trainer.add_callback(Probe(cb, nan_step=3, agent=agent))
    train(trainer)

    (ack,) = applied(agent.wait_acked("stop"))
    assert trainer.state.global_step == ack["step"] == 4  # the boundary after the NaN step's


def test_an_agent_rollback_resumes_from_the_good_checkpoint_it_names(start_agent, tmp_path: Path, caplog) -> None:
    agent = start_agent(config=nonfinite_policy("rollback", steps_back=0, skip=2))
    cb = SentinelCallback(trainer_config(agent, "hf-rollback", checkpoint={"good_after": 2}))
    args = trainer_args(tmp_path / "out", max_steps=14, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[cb])
    probe = Probe(cb, nan_step=7, agent=agent)
    trainer.add_callback(probe)
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        train(trainer)

    (ack,) = applied(agent.wait_acked("rollback"))
    # checkpoint-6 was pending when the NaN came (step 7): only checkpoint-4 and older are good
    (rollback,) = cb.rollbacks
    assert rollback["to_step"] == 4 and rollback["path"] == str(tmp_path / "out" / "checkpoint-4")
    assert rollback["from_step"] == ack["step"] == 8 and rollback["skip"] == 2
    assert json.loads((tmp_path / "out" / "checkpoint-4" / "sentinel.json").read_text())["verdict"] == "good"

    (resumed,) = probe.resumed_params
    saved = load_file(str(tmp_path / "out" / "checkpoint-4" / "model.safetensors"))
    assert saved
    for name, tensor in saved.items():
        assert torch.equal(resumed[name], tensor), name
    # the resumed run skipped the updates of 2 batches and finished the schedule
    # the guard continues from its state at the checkpoint (EMA, counts), plus the 2 skips of the rollback
    (guard,) = probe.resumed_guard
    assert guard == {**probe.guard_at[4], "pending_skips": 2} and guard["seen"] == 4
    assert [probe.skips_at[s] for s in (5, 6, 7)] == [1, 1, 0]
    assert trainer.state.global_step == 14
    assert any("resumed from" in r.getMessage() for r in caplog.records)


def test_a_resume_after_a_rollback_keeps_the_restored_weights_and_skips_the_abandoned_checkpoints(
    start_agent, tmp_path: Path, caplog
) -> None:
    """``stabilise.init`` re-initialises at the first attach only: the resume's attach (after the Trainer
    loaded checkpoint-4) keeps its weights.  The abandoned checkpoint-6 is renamed, so the Trainer's
    ``resume_from_checkpoint=True`` (its highest ``checkpoint-N``) picks the good checkpoint-4."""
    agent = start_agent(config=nonfinite_policy("rollback", steps_back=0, skip=2))
    config = trainer_config(agent, "hf-rollback-init", checkpoint={"good_after": 2}, stabilise={"init": "small_scaled"})
    cb = SentinelCallback(config)
    out = tmp_path / "out"
    args = trainer_args(out, max_steps=10, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[cb])
    probe = Probe(cb, nan_step=7, agent=agent)
    trainer.add_callback(probe)
    trainer.train()  # stops at the rollback; resumed below as a user (or a restart) would

    assert cb.resume_from == str(out / "checkpoint-4")
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    (aside,) = out.glob("abandoned-checkpoint-6-*")
    assert (aside / "trainer_state.json").is_file()
    assert json.loads((aside / "sentinel.json").read_text())["verdict"] == "abandoned"

    with caplog.at_level(logging.WARNING, logger="sentinel"):
        train(trainer, resume_from_checkpoint=True)
    (resumed,) = probe.resumed_params
    saved = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert saved
    for name, tensor in saved.items():
        assert torch.equal(resumed[name], tensor), name
    assert any("stabilise.init='small_scaled' not applied at a resume" in r.getMessage() for r in caplog.records)
    assert cb.resume_from is None and trainer.state.global_step == 10
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-10")


def test_the_forward_loss_is_scaled_as_the_trainer_scales_it(tmp_path: Path) -> None:
    """``Trainer.compute_loss`` multiplies a loss normalised by the global token count by
    ``num_processes // tp_size`` (``n_gpu`` under DataParallel).  The factor is checked against that rule
    for several layouts with plain numbers; a multi-process run is not done here (two CPU processes
    would double the test's time), so the layouts with more than one process are only checked through
    :func:`forward_loss_scale`.  On this one process the real Trainer and its arguments give 1, and the
    scale is applied to the summed micro-batch losses only."""
    assert forward_loss_scale(True, num_processes=4, tp_size=1, n_gpu=1) == 4
    assert forward_loss_scale(True, num_processes=8, tp_size=2, n_gpu=1) == 4
    assert forward_loss_scale(True, num_processes=1, tp_size=1, n_gpu=2) == 2
    assert forward_loss_scale(False, num_processes=4, tp_size=1, n_gpu=1) == 1

    args = trainer_args(tmp_path / "out", 1)
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=token_data(8))
    assert args.average_tokens_across_devices is True
    assert trainer_loss_scale(args, model) == trainer_loss_scale(args, model, trainer) == 1

    cb = SentinelCallback({"publish": {"enabled": False}, "control": {"enabled": False}})
    cb.loss_scale = 4
    cb._losses = [(torch.tensor(0.5), True), (torch.tensor(0.25), True)]
    assert float(cb._take_loss()) == 3.0  # (0.5 + 0.25) · 4
    cb._losses = [(torch.tensor(0.5), False), (torch.tensor(0.25), False)]
    assert float(cb._take_loss()) == 0.375  # no num_items_in_batch: the Trainer does not scale


def test_a_rollback_without_a_good_checkpoint_is_acked_failed_and_training_goes_on(start_agent, tmp_path: Path) -> None:
    agent = start_agent(config=nonfinite_policy("rollback", steps_back=0, skip=2))
    cb = SentinelCallback(trainer_config(agent, "hf-no-checkpoint"))
    trainer = Trainer(
        model=tiny_gpt2(), args=trainer_args(tmp_path / "out", 8), train_dataset=token_data(), callbacks=[cb]
    )
    trainer.add_callback(Probe(cb, nan_step=3, agent=agent))
    train(trainer)

    acks = agent.wait_acked("rollback")
    assert {a["status"] for a in acks} <= {"failed", "duplicate"} and acks[0]["status"] == "failed"
    assert "no good checkpoint" in acks[0]["detail"]
    assert cb.rollbacks == [] and cb.resume_from is None
    assert trainer.state.global_step == 8


def test_a_bad_loss_source_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss='bogus'"):
        SentinelCallback(loss="bogus")
    cb = SentinelCallback({"publish": {"enabled": False}, "control": {"enabled": False}}, loss="log")
    args = trainer_args(tmp_path / "out", 2, logging_steps=5)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[cb])
    with pytest.raises(ValueError, match="logging_steps=1"):
        trainer.train()


def test_without_the_framework_the_error_names_the_extra_and_import_sentinel_needs_neither() -> None:
    code = (
        "import sys\n"
        "import sentinel\n"
        "assert not {'transformers', 'lightning'} & set(sys.modules), 'import sentinel imported a framework'\n"
        "sys.modules['transformers'] = sys.modules['lightning'] = None\n"
        "for name in ('hf', 'lightning'):\n"
        "    try:\n"
        "        __import__('sentinel.integrations.' + name)\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'llm-sentinel[hf]'" in out.stdout
    assert "pip install 'llm-sentinel[lightning]'" in out.stdout
