"""EMA: an exponential moving average of the weights, evaluated in place of the live weights."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from cl.models import check_device, tensor_bytes
from cl.strategy import Strategy, after_module_changes
from cl.types import Batch, Stream, Task, check_hook_arguments

log = logging.getLogger(__name__)

EVAL_WITH = ("ema", "live", "both")
LIVE_VARIANT = "live"
STATE_KEYS = ("shadow", "updates", "steps")


@dataclass(frozen=True)
class EMAConfig:
    """How the average is taken, where it is kept and which weights are evaluated."""

    decay: float = 0.999  # 0 <= decay < 1; 0 makes the shadow a plain copy of the live weights
    warmup: bool = False  # decay per update min(decay, (1 + t) / (10 + t)), t: updates done
    update_after_step: int = 0  # the first this many steps of the run copy instead of averaging
    device: str | None = None  # where the shadow lives ("cpu" beside a cuda model); None: model's
    eval_with: Literal["ema", "live", "both"] = "ema"  # both: also record the live matrix
    reset: bool = False  # restart the shadow from the live weights at the start of every task

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:  # also rejects NaN
            raise ValueError(f"decay must satisfy 0 <= decay < 1, got decay={self.decay!r}")
        if self.update_after_step < 0:
            raise ValueError("update_after_step must not be negative, "
                             f"got update_after_step={self.update_after_step!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError):
                raise ValueError(f"device must name a torch device, "
                                 f"got device={self.device!r}") from None
        if self.eval_with not in EVAL_WITH:
            raise ValueError(f"eval_with must be one of {', '.join(EVAL_WITH)}, "
                             f"got eval_with={self.eval_with!r}")


def effective_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of the averaging update that follows `updates` earlier ones.

    The warmup keeps early updates from being dominated by the (random) starting weights."""
    if not warmup:
        return decay
    return min(decay, (1 + updates) / (10 + updates))


def average_into_(shadows: list[Tensor], lives: list[Tensor], decay: float) -> None:
    """`s <- decay * s + (1 - decay) * w` for every pair, in one fused foreach call."""
    if shadows:
        torch._foreach_lerp_(shadows, lives, 1.0 - decay)


def is_averageable(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


class EMA(Strategy):
    """Exponential moving average of the trainable weights and the float buffers (timm-style).

    The shadow is keyed by the model's parameter and buffer names. Trainable float parameters and
    float buffers (BatchNorm statistics) are averaged; other buffers (`num_batches_tracked`) are
    copied. Frozen parameters are not shadowed (their average is themselves), but a parameter
    once shadowed stays shadowed and averaged. The shadowed set is resynchronised with the model
    at every `before_task`, so adapters added by an earlier strategy of a Chain are picked up
    (initialised from their live values) and names gone from the model are dropped.
    """

    name: ClassVar[str] = "ema"
    config_class: ClassVar[type] = EMAConfig

    def __init__(self, config: EMAConfig | None = None) -> None:
        self.config = config if config is not None else EMAConfig()
        self._device = torch.device(self.config.device) if self.config.device else None
        self._shadow: dict[str, Tensor] = {}
        self._updates = 0  # averaging updates done: the t of the warmup
        self._steps = 0  # optimizer steps seen this run, copies included
        self._evaluating_live = False
        self._swapped = False
        self._invalidate()

    def __repr__(self) -> str:
        settings = ", ".join(f"{field.name}={getattr(self.config, field.name)!r}"
                             for field in dataclasses.fields(self.config))
        return f"EMA({settings})"

    # --- the shadow and its cached tensor lists ------------------------------------------------

    def _invalidate(self) -> None:
        """Forget the cached tensor lists; the next hook that gets the model rebuilds them."""
        self._owner: weakref.ref | None = None
        self._averaged_shadows: list[Tensor] = []
        self._averaged_lives: list[Tensor] = []
        self._averaged_sources: list[Tensor] = []  # the lives, or staging beside the shadow
        self._copied_shadows: list[Tensor] = []
        self._copied_lives: list[Tensor] = []
        self._staging: list[Tensor] = []  # preallocated beside the shadow, when it lives apart
        self._staged_lives: list[Tensor] = []
        self._backup: list[Tensor] | None = None  # the live weights during an evaluation

    def _tracked(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's tensors the shadow covers, by name, in the model's order."""
        tracked = {name: parameter for name, parameter in model.named_parameters()
                   if is_averageable(parameter)
                   and (parameter.requires_grad or name in self._shadow)}
        tracked.update(model.named_buffers())
        return tracked

    def _synchronise(self, model: nn.Module) -> None:
        """Match the shadow to the model's current tensors and rebuild the cached lists."""
        tracked = self._tracked(model)
        shadow: dict[str, Tensor] = {}
        added = []
        for name, live in tracked.items():
            target = self._device if self._device is not None else live.device
            old = self._shadow.get(name)
            if old is None or old.shape != live.shape or old.dtype != live.dtype:
                if old is not None:
                    log.warning("ema: %s changed from %s %s to %s %s; its shadow restarts from "
                                "the live value", name, old.dtype, tuple(old.shape), live.dtype,
                                tuple(live.shape))
                shadow[name] = live.detach().to(target, copy=True)
                added.append(name)
            else:
                shadow[name] = old if old.device == target else old.to(target)
        dropped = sorted(set(self._shadow) - set(shadow))
        if self._shadow and added:
            log.info("ema: shadowing %d new tensors (%s)", len(added), ", ".join(added[:5]))
        if dropped:
            log.info("ema: dropping the shadow of %d tensors gone from the model (%s)",
                     len(dropped), ", ".join(dropped[:5]))
        self._shadow = shadow

        self._invalidate()
        for name, tensor in shadow.items():
            live = tracked[name].detach()
            if not is_averageable(tensor):
                self._copied_shadows.append(tensor)
                self._copied_lives.append(live)
                continue
            self._averaged_shadows.append(tensor)
            self._averaged_lives.append(live)
            if live.device == tensor.device:
                self._averaged_sources.append(live)
            else:  # a shadow on another device averages a staged copy of the live tensor
                staging = torch.empty_like(tensor)
                self._averaged_sources.append(staging)
                self._staging.append(staging)
                self._staged_lives.append(live)
        self._owner = weakref.ref(model)

    def _ensure_synchronised(self, model: nn.Module) -> None:
        if self._owner is None or self._owner() is not model:
            self._synchronise(model)

    def _copy_live_into_shadow(self) -> None:
        with torch.no_grad():
            if self._averaged_shadows:
                torch._foreach_copy_(self._averaged_shadows, self._averaged_lives)
            if self._copied_shadows:
                torch._foreach_copy_(self._copied_shadows, self._copied_lives)

    # --- hooks ---------------------------------------------------------------------------------

    def check_composition(self, chain: tuple[Strategy, ...]) -> None:
        after_module_changes(self, chain, "ema takes stock of the trainable weights before each "
                             "task, and would not shadow the modules added after it")

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        if self.config.device is not None:
            check_device(self.config.device, "ema device")

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("ema.before_run", model=model, stream=stream, seed=seed)
        self._shadow = {}
        self._updates = 0
        self._steps = 0
        self._synchronise(model)

    def before_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("ema.before_task", model=model, task=task)
        if self._steps == 0:
            # Nothing averaged yet, so the shadow equals the live weights: start it over from
            # what trains now that freeze and LoRA (earlier in the chain) have acted. A frozen
            # base then costs no shadow memory.
            self._shadow = {}
        self._synchronise(model)
        if self.config.reset:
            self._copy_live_into_shadow()
            self._updates = 0

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        # The average reads only the model; the other arguments are checked all the same, so a
        # hand-written loop that passes None here does not break when another strategy joins.
        check_hook_arguments("ema.after_step", model=model, batch=batch, logits=logits,
                             task=task)
        self._ensure_synchronised(model)
        if self._steps < self.config.update_after_step:
            self._copy_live_into_shadow()
            self._steps += 1
            return
        decay = effective_decay(self.config.decay, self._updates, self.config.warmup)
        with torch.no_grad():
            if self._staging:
                torch._foreach_copy_(self._staging, self._staged_lives)
            average_into_(self._averaged_shadows, self._averaged_sources, decay)
            if self._copied_shadows:
                torch._foreach_copy_(self._copied_shadows, self._copied_lives)
        self._updates += 1
        self._steps += 1

    def eval_context(self, model: nn.Module, task: Task) -> contextlib.AbstractContextManager[None]:
        check_hook_arguments("ema.eval_context", model=model, task=task)
        if self.config.eval_with == "live" or self._evaluating_live or self._swapped:
            return contextlib.nullcontext()
        return self._shadow_in_place(model)

    @contextlib.contextmanager
    def _shadow_in_place(self, model: nn.Module) -> Iterator[None]:
        """The shadow copied into the live tensors; the live values are restored bitwise after."""
        self._ensure_synchronised(model)
        lives = self._averaged_lives + self._copied_lives
        shadows = self._averaged_shadows + self._copied_shadows
        if not lives:
            yield
            return
        with torch.no_grad():
            if self._backup is None:
                self._backup = [live.clone() for live in lives]
            else:
                torch._foreach_copy_(self._backup, lives)
        self._swapped = True
        try:
            with torch.no_grad():
                torch._foreach_copy_(lives, shadows)
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(lives, self._backup)
            self._swapped = False

    def eval_variants(self) -> tuple[str, ...]:
        return (LIVE_VARIANT,) if self.config.eval_with == "both" else ()

    def eval_variant(self, variant: str) -> contextlib.AbstractContextManager[None]:
        if variant != LIVE_VARIANT:
            return contextlib.nullcontext()
        return self._live_weights()

    @contextlib.contextmanager
    def _live_weights(self) -> Iterator[None]:
        """`eval_context` leaves the live weights in place while this is open."""
        previous = self._evaluating_live
        self._evaluating_live = True
        try:
            yield
        finally:
            self._evaluating_live = previous

    # --- description and state -----------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return {
            "shadow_bytes": tensor_bytes(self._shadow.values()),
            "shadowed_tensors": len(self._shadow),
            "decay": self.config.decay,
        }

    def state_dict(self) -> dict[str, Any]:
        """The shadow tensors themselves (detached, not copies, like `nn.Module.state_dict`)."""
        return {"shadow": {name: tensor.detach() for name, tensor in self._shadow.items()},
                "updates": self._updates, "steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved shadow bitwise; it moves beside the model at the next hook."""
        missing = [key for key in STATE_KEYS if key not in state]
        unknown = sorted(set(state) - set(STATE_KEYS))
        if missing or unknown:
            raise ValueError(f"ema state: missing keys {missing}, unknown keys {unknown}")
        shadow = state["shadow"]
        if not isinstance(shadow, dict) or not all(
                isinstance(tensor, Tensor) for tensor in shadow.values()):
            raise ValueError("ema state: 'shadow' must map names to tensors")
        with torch.no_grad():
            self._shadow = {name: tensor.detach().clone() for name, tensor in shadow.items()}
        self._updates = int(state["updates"])
        self._steps = int(state["steps"])
        self._invalidate()
