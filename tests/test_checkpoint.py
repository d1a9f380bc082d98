"""Checkpoints and resume: every strategy's state survives a weights_only round trip, a resumed
run equals an uninterrupted one bit for bit, also after a real SIGKILL mid-task; and Chain
equals its strategies applied by hand."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import blob_stream

from cl.models import build_mlp
from cl.runner import TrainConfig, run
from cl.strategy import Chain, Strategy
from strategies import (
    AGEM,
    DER,
    DERPP,
    EMA,
    ERACE,
    EWC,
    NCM,
    SI,
    AGEMConfig,
    DERConfig,
    DERPPConfig,
    Distill,
    DistillConfig,
    EMAConfig,
    ERACEConfig,
    EWCConfig,
    Freeze,
    FreezeConfig,
    LoRA,
    LoRAConfig,
    NCMConfig,
    RanPAC,
    RanPACConfig,
    Replay,
    ReplayConfig,
    SIConfig,
    TrainMask,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CL = str(Path(sys.executable).with_name("cl"))

CASES = {
    "ema": ("class", lambda: [EMA(EMAConfig(decay=0.9, warmup=True, eval_with="both"))]),
    "freeze": ("class", lambda: [Freeze(FreezeConfig(patterns=("body.1.*",), after_task=1,
                                                     lr_mult=("head.*=10",)))]),
    "replay": ("class", lambda: [Replay(ReplayConfig(capacity=12, policy="class_balanced",
                                                     store_logits=True))]),
    "distill": ("class", lambda: [Distill(DistillConfig(alpha=0.5))]),
    "lora": ("task", lambda: [LoRA(LoRAConfig(rank=2, alpha=2.0))]),
    "all": ("task", lambda: [
        Freeze(FreezeConfig(lr_mult=("head.*=2",))), LoRA(LoRAConfig(rank=2, alpha=2.0)),
        Replay(ReplayConfig(capacity=10, store_logits=True)),
        Distill(DistillConfig(targets="buffer")), EMA(EMAConfig(decay=0.8))]),
    "der": ("class", lambda: [DER(DERConfig(capacity=12, alpha=0.5))]),
    "ewc": ("task", lambda: [EWC(EWCConfig(strength=5.0, gamma=0.9))]),
    "derpp": ("task", lambda: [DERPP(DERPPConfig(capacity=12, alpha=0.5, beta=0.5,
                                                 batch_size=3))]),
    "er_ace": ("class", lambda: [ERACE(ERACEConfig(capacity=12, alpha=0.5, batch_size=3))]),
    "agem": ("task", lambda: [AGEM(AGEMConfig(capacity=12, batch_size=3))]),
    "agem reservoir": ("class", lambda: [AGEM(AGEMConfig(capacity=12, memory="reservoir"))]),
    "si": ("class", lambda: [SI(SIConfig(strength=2.0, damping=0.5, clip_value=0.5))]),
    "ncm": ("class", lambda: [NCM(NCMConfig(metric="euclidean"))]),
    "lora routed": ("class", lambda: [LoRA(LoRAConfig(rank=2, alpha=2.0, route="prototype"))]),
    "o-lora": ("class", lambda: [LoRA(LoRAConfig(rank=2, alpha=2.0, route="sum", lambda_orth=0.5,
                                                 lambda_l2=0.01)), TrainMask()]),
    "ranpac adapt": ("class", lambda: [Freeze(FreezeConfig(patterns=("body.1.*",))),
                                       RanPAC(RanPACConfig(projection=24, adapt="first"))]),
    "replay+distill+ema": ("class", lambda: [
        Replay(ReplayConfig(capacity=10)), Distill(DistillConfig()), EMA(EMAConfig(decay=0.8))]),
}


def fresh(case):
    scenario, make = CASES[case]
    stream = blob_stream(num_tasks=3, scenario=scenario)
    torch.manual_seed(0)
    model = build_mlp(stream.input_shape, stream.num_classes, (8, 8))
    return stream, model, Chain(*make())


def weights_only_round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_from_any_task_equals_the_uninterrupted_run(case):
    config = TrainConfig(batch_size=4, epochs=2, lr=0.05, eval_every=3, seed=3)
    stream, model, strategy = fresh(case)
    saved = []
    whole = run(model, stream, strategy, config,
                checkpoint=lambda state: saved.append(weights_only_round_trip(state)))
    assert len(saved) == 3
    whole_weights = {k: v.clone() for k, v in model.state_dict().items()}
    for done in (1, 2):
        stream, model, strategy = fresh(case)
        resumed = run(model, stream, strategy, config, resume=saved[done - 1])
        assert resumed.resumed_from == done
        assert resumed.trained_parameters == whole.trained_parameters
        assert np.array_equal(resumed.accuracy, whole.accuracy)
        assert np.array_equal(resumed.curve_accuracy, whole.curve_accuracy, equal_nan=True)
        for name, variant in whole.variants.items():
            assert np.array_equal(resumed.variants[name]["accuracy"], variant["accuracy"])
        assert all(torch.equal(whole_weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case, kept", [
    ("lora", lambda key: ".task" in key),  # the adapters and their head copies
    ("o-lora", lambda key: ".task" in key or key.startswith("head.")),  # and the shared head
    ("ncm", lambda key: False),  # a model that never trains: nothing
    ("ranpac adapt", lambda key: True),  # adapted on the first task: all of it
])
def test_checkpoints_leave_out_the_weights_kept_as_built(case, kept):
    stream, model, strategy = fresh(case)
    saved = []
    run(model, stream, strategy, TrainConfig(batch_size=4, epochs=1, lr=0.05),
        checkpoint=lambda state: saved.append((state["model"], list(model.state_dict()))))
    assert len(saved) == 3
    for weights, keys in saved:
        assert sorted(weights) == sorted(k for k in keys if kept(k))


@pytest.mark.parametrize("case, trained", [
    ("ema", lambda name: True),  # plain fine-tuning: every parameter
    ("ncm", lambda name: False),  # no gradient step at all
    ("ranpac adapt", lambda name: not name.startswith("body.1.")),  # task 0, as Freeze left it
    ("lora", lambda name: ".task" in name),  # every task's adapter and head copy, once each
])
def test_trained_parameters_count_what_any_task_trained(case, trained):
    stream, model, strategy = fresh(case)
    result = run(model, stream, strategy, TrainConfig(batch_size=4, epochs=1, lr=0.05))
    assert result.trained_parameters == sum(
        parameter.numel() for name, parameter in model.named_parameters() if trained(name))
    assert result.trained_parameters > 0 or case == "ncm"


def test_a_strategy_that_trains_what_it_calls_unchanged_is_caught():
    class Liar(Strategy):
        name = "liar"

        def unchanged_keys(self, model):
            return frozenset(model.state_dict())

    stream, model, _ = fresh("ema")
    with pytest.raises(RuntimeError, match="stays as built, but it trains"):
        run(model, stream, Liar(), TrainConfig(batch_size=4, epochs=1, lr=0.05),
            checkpoint=lambda state: None)


@pytest.mark.parametrize("case", ["ema", "replay", "distill", "lora", "freeze"])
def test_strategy_state_round_trips(case):
    stream, model, strategy = fresh(case)
    saved = []
    run(model, stream, strategy, TrainConfig(batch_size=4, epochs=1),
        checkpoint=lambda state: saved.append(state["strategy"]))
    state = weights_only_round_trip(saved[-1])
    stream, model, again = fresh(case)
    again.before_run(model, stream, 0)
    again.load_state_dict(state)

    def flatten(value):
        if isinstance(value, dict):
            return {k: flatten(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [flatten(v) for v in value]
        return value.tolist() if isinstance(value, torch.Tensor) else value

    assert flatten(again.state_dict()) == flatten(state)


def read_matrix(path):
    with open(path) as file:
        return [row[1:] for row in csv.reader(file)][1:]


def test_a_run_killed_mid_task_and_resumed_ends_with_the_same_matrix(tmp_path):
    args = ["run", "--tasks", "split-digits", "--epochs", "6", "--seed", "4", "--batch-size", "16",
            "--strategy", "replay:capacity=50", "--strategy", "ema:decay=0.95",
            "--strategy", "distill:alpha=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run([CL, *args, "--out", str(whole)], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen([CL, *args, "--out", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint" / "state.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.2)  # into the next task's training
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()

    resumed = subprocess.run([CL, "run", "--resume", str(killed)], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert read_matrix(killed / "matrix.csv") == read_matrix(whole / "matrix.csv")
    import json
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["resumed_from"] >= 1
    assert metrics["accuracy_matrix"] == json.loads((whole / "metrics.json").read_text())[
        "accuracy_matrix"]


def test_resume_refuses_extra_flags_and_finished_runs(tmp_path):
    done = tmp_path / "done"
    subprocess.run([CL, "run", "--epochs", "1", "--out", str(done)], check=True,
                   capture_output=True)
    again = subprocess.run([CL, "run", "--resume", str(done)], capture_output=True, text=True)
    assert again.returncode == 2 and "finished" in again.stderr
    flags = subprocess.run([CL, "run", "--resume", str(done), "--lr", "0.5"],
                           capture_output=True, text=True)
    assert flags.returncode == 2 and "--lr" in flags.stderr
    nowhere = subprocess.run([CL, "run", "--resume", str(tmp_path / "nowhere")],
                             capture_output=True, text=True)
    assert nowhere.returncode == 2 and "nowhere" in nowhere.stderr


class ByHand(Strategy):
    """Replay then distill then EMA, each hook written out instead of through Chain."""

    name = "by-hand"

    def __init__(self, replay, distill, ema):
        self.replay, self.distill, self.ema = replay, distill, ema

    def before_run(self, model, stream, seed):
        self.replay.before_run(model, stream, seed)
        self.distill.before_run(model, stream, seed)
        self.ema.before_run(model, stream, seed)

    def before_task(self, model, task):
        self.replay.before_task(model, task)
        self.distill.before_task(model, task)
        self.ema.before_task(model, task)

    def transform_batch(self, batch, task):
        return self.replay.transform_batch(batch, task)

    def loss_terms(self, model, batch, logits, task):
        return self.distill.loss_terms(model, batch, logits, task)

    def after_step(self, model, batch, logits, task):
        self.replay.after_step(model, batch, logits, task)
        self.ema.after_step(model, batch, logits, task)

    def after_task(self, model, task):
        self.replay.after_task(model, task)
        self.distill.after_task(model, task)
        self.ema.after_task(model, task)

    def eval_context(self, model, task):
        return self.ema.eval_context(model, task)


def test_chain_equals_the_strategies_applied_by_hand():
    def parts():
        return (Replay(ReplayConfig(capacity=10)), Distill(DistillConfig()),
                EMA(EMAConfig(decay=0.8)))

    results = []
    for make in (lambda: Chain(*parts()), lambda: ByHand(*parts())):
        stream = blob_stream(num_tasks=3)
        torch.manual_seed(0)
        model = build_mlp(stream.input_shape, stream.num_classes, (8, 8))
        results.append((run(model, stream, make(), TrainConfig(batch_size=4, epochs=2)), model))
    (chained, model_a), (by_hand, model_b) = results
    assert np.array_equal(chained.accuracy, by_hand.accuracy)
    pairs = zip(model_a.parameters(), model_b.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
