"""Distill: KL(teacher || student) at a temperature, from a frozen teacher (the previous task's
model as in LwF, the model before training, or one loaded from a file) or from logits a replay
buffer stored (DER-style); or, with `on=features`, the squared distance between the student's
and the teacher's features (the head's input): what keeps a pretrained model's representation
when its fresh head says nothing yet."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from cl.errors import UsageError, one_line
from cl.models import device_of, find_head, logits_of, state_dict_mismatch, tensor_bytes
from cl.strategy import Strategy, after_module_changes
from cl.types import Batch, Stream, Task, check_hook_arguments

log = logging.getLogger(__name__)

TEACHERS = ("previous", "initial")


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = 1.0  # weight of the distillation term
    temperature: float = 2.0  # softens both distributions; the term is scaled by its square
    # previous | initial | a path to weights (.safetensors, .pt); config.json stores it absolute
    teacher: str = field(default="previous", metadata={"path": True})
    targets: Literal["teacher", "buffer"] = "teacher"  # a teacher model, or logits replay stored
    on: Literal["logits", "features"] = "logits"  # what is matched: outputs, or head inputs
    # kl: KL of the softened outputs (T^2-scaled); mse: squared error of the raw logits (DER)
    loss: Literal["kl", "mse"] = "kl"
    # targets=buffer: all of a stored row's logits (DER), or only the classes seen when stored
    stored_classes: Literal["all", "seen"] = "all"

    def __post_init__(self) -> None:
        if self.on not in ("logits", "features"):
            raise ValueError(f"on must be logits or features, got {self.on!r}")
        if self.on == "features" and self.targets == "buffer":
            raise ValueError("on=features needs a teacher model: a buffer stores logits only")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a non-negative number, got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.targets not in ("teacher", "buffer"):
            raise ValueError(f"targets must be teacher or buffer, got {self.targets!r}")
        if self.loss not in ("kl", "mse"):
            raise ValueError(f"loss must be kl or mse, got {self.loss!r}")
        if self.stored_classes not in ("all", "seen"):
            raise ValueError(f"stored_classes must be all or seen, got {self.stored_classes!r}")
        if self.stored_classes != "all" and self.targets != "buffer":
            raise ValueError("stored_classes applies to targets=buffer only")
        if self.loss != "kl" and self.on == "features":
            raise ValueError("loss applies to on=logits; on=features is a squared distance")
        if self.teacher not in TEACHERS and not Path(self.teacher).is_file():
            raise ValueError(f"teacher {self.teacher!r} is neither previous, initial nor a file")


def masked_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor,
              temperature: float) -> Tensor:
    """Per-row KL(softmax(t/T) || softmax(s/T)) over the classes `mask` marks (bool, rows x
    classes or broadcastable). Classes outside the mask carry no probability on either side.

    Written with explicit log-sum-exps rather than -inf fills so that every intermediate value
    (and every gradient) stays finite."""
    mask = mask.expand_as(student_logits)
    teacher = teacher_logits.float() / temperature
    student = student_logits.float() / temperature
    lowest = torch.finfo(torch.float32).min
    # Zero (not -inf) at masked classes: exp and differences there stay finite, then p = 0.
    log_p = (teacher - torch.logsumexp(teacher.masked_fill(~mask, lowest), 1, keepdim=True)
             ).masked_fill(~mask, 0.0)
    log_q = (student - torch.logsumexp(student.masked_fill(~mask, lowest), 1, keepdim=True)
             ).masked_fill(~mask, 0.0)
    p = log_p.exp() * mask
    return (p * (log_p - log_q)).sum(1)


def distillation_loss(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor,
                      temperature: float, alpha: float) -> Tensor:
    """`alpha * T^2 * mean KL`: the T^2 keeps gradients on the scale of the cross-entropy's
    (Hinton et al., 2015)."""
    kl = masked_kl(teacher_logits, student_logits, mask, temperature)
    return alpha * temperature ** 2 * kl.mean()


def logit_mse(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor, alpha: float
              ) -> Tensor:
    """`alpha *` the mean squared difference of the raw logits over the rows and the classes
    `mask` marks (DER, Buzzega et al. 2020, matches all of them: `F.mse_loss`)."""
    mask = mask.expand_as(student_logits)
    squared = (student_logits.float() - teacher_logits.float()).pow(2)
    return alpha * (squared * mask).sum() / mask.sum().clamp(min=1)


def feature_distance(teacher_features: Tensor, student_features: Tensor, alpha: float
                     ) -> Tensor:
    """`alpha * mean over rows of the squared distance` between feature vectors."""
    difference = student_features.float() - teacher_features.float()
    return alpha * difference.pow(2).sum(1).mean()


class HeadInputs:
    """Keeps the input of a model's head from its latest forward pass (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = model.get_submodule(find_head(model)).register_forward_pre_hook(self.keep)

    def keep(self, module: nn.Module, inputs: tuple) -> None:
        self.value = inputs[0].flatten(1)

    def remove(self) -> None:
        self.handle.remove()


def load_weights(path: str) -> dict[str, Tensor]:
    """A state dict from a safetensors file or a torch file (a cl checkpoint's state.pt too);
    a file that cannot be read, or holds anything but tensors by name, is one UsageError."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:  # the file itself: permissions, a directory, a vanished file
        raise UsageError(f"cannot read teacher {path}: {error.strerror or one_line(error)}"
                         ) from None
    except Exception as error:  # the content: torch's, pickle's or safetensors' own errors
        raise UsageError(f"teacher file {path} is not a state dict saved by torch.save or "
                         f"safetensors ({library_reason(error)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(
            isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()):
        held = type(state).__name__ if not isinstance(state, dict) else "a dict of other values"
        raise UsageError(f"teacher {path} holds {held}, not a state dict (tensors by name)")
    return state


def library_reason(error: Exception) -> str:
    """What a loader's error says about the file, in one line. torch's weights-only unpickler
    opens with a paragraph on its PyTorch 2.6 default (and advice to load untrusted pickles)
    and names the actual problem after "WeightsUnpickler error:", whose first sentence is kept
    (the rest tells how to allow a class, which a cl user cannot); a bare KeyError says only
    a number, so its type is named too."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip()
        if detail:
            return detail.splitlines()[0].split(". ")[0].rstrip(".")
    reason = one_line(error)
    return reason if any(c.isalpha() for c in reason) else f"{type(error).__name__} {reason}"


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Distill(Strategy):
    """Learning without Forgetting and its relatives: a KL term toward a teacher's outputs.

    `teacher=previous` snapshots the model after each task (no term on the first task);
    `initial` keeps the model as it was before any training (a pretrained model's knowledge);
    a path loads weights into a copy of the model. In the class scenario only the classes the
    teacher was trained on enter the KL (all classes for `initial` and file teachers); in the
    task scenario each earlier task's classes form their own softmax, as separate heads would.
    `targets=buffer` distils replayed rows toward the logits a replay buffer stored with them.
    """

    name: ClassVar[str] = "distill"
    config_class: ClassVar[type] = DistillConfig

    def __init__(self, config: DistillConfig | None = None) -> None:
        self.config = config if config is not None else DistillConfig()
        self.teacher: nn.Module | None = None
        self.seen_tasks = 0  # tasks the teacher has been trained through
        self.pending_teacher: dict[str, Tensor] | None = None
        self.student_features: HeadInputs | None = None
        self.teacher_features: HeadInputs | None = None
        # Set by before_run from the stream: which classes each task uses, and has seen so far.
        self.scenario: str | None = None
        self.class_mask: Tensor | None = None
        self.seen_mask: Tensor | None = None
        # A teacher file's weights, by (resolved path, mtime, size): `check` (from build, then
        # from the runner) and `before_run` all need them, and one read of a large model is
        # enough; a file changed in between has another key and is read again.
        self.file_weights: tuple[tuple[str, int, int], dict[str, Tensor]] | None = None

    def __repr__(self) -> str:
        return f"Distill({self.config})"

    def check_composition(self, chain: tuple[Strategy, ...]) -> None:
        if self.config.on == "features":
            earlier = [other.name for other in chain[:chain.index(self)]
                       if getattr(other, "forwards_in_loss_terms", False)]
            if earlier:
                raise ValueError(f"distill:on=features must come before {earlier[0]}: its loss "
                                 "terms forward the model on other rows, and the features "
                                 "distill reads would be theirs")
            after_module_changes(self, chain, "distill:on=features hooks the head before each "
                                 "task, and a module added after it would replace the head")
        if self.config.targets != "buffer":
            return
        before = chain[:chain.index(self)]
        if not any(s.name == "replay" and getattr(s.config, "store_logits", False)
                   for s in before):
            raise ValueError("distill:targets=buffer needs replay:store_logits=true "
                             "earlier in the chain")

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        config = self.config
        if joint and config.targets == "teacher" and config.teacher == "previous":
            raise UsageError("distill:teacher=previous has no previous task in a --joint run "
                             "(one phase): use teacher=initial or a file, or train sequentially")
        if config.targets == "teacher" and config.teacher not in TEACHERS:
            mismatch = state_dict_mismatch(model.state_dict(), self.teacher_weights())
            if mismatch is not None:
                raise UsageError(f"teacher {config.teacher} does not fit the model "
                                 f"{type(model).__name__}: {mismatch}")

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("distill.before_run", model=model, stream=stream, seed=seed)
        self.scenario = stream.scenario
        self.class_mask = stream.class_mask().to(device_of(model))
        # Row t: the classes of tasks 0..t, what a model trained through task t has seen.
        self.seen_mask = self.class_mask.cumsum(0) > 0
        if self.config.targets == "buffer":
            return
        if self.config.teacher == "initial":
            self.new_teacher(model)
        elif self.config.teacher != "previous":
            self.new_teacher(model).load_state_dict(self.teacher_weights())
            self.file_weights = None  # the teacher holds a copy now: no need for a second one

    def teacher_weights(self) -> dict[str, Tensor]:
        """The teacher file's state dict, read once per content of the file."""
        path = Path(self.config.teacher)
        try:
            stat = path.stat()
        except OSError:  # gone since the config named it: load_weights says so in its line
            return load_weights(self.config.teacher)
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if self.file_weights is None or self.file_weights[0] != key:
            self.file_weights = (key, load_weights(self.config.teacher))
        return self.file_weights[1]

    def before_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("distill.before_task", model=model, task=task)
        if self.pending_teacher is not None:
            # A resumed run: the model is whole again, so the teacher can take its shape.
            self.new_teacher(model).load_state_dict(self.pending_teacher)
            self.pending_teacher = None
        if self.config.on == "features":
            # Hooked per task, after LoRA (earlier in the chain) has wrapped the head.
            self.unhook_student()
            self.student_features = HeadInputs(model)

    def after_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("distill.after_task", model=model, task=task)
        self.seen_tasks = task.index + 1
        if self.config.targets == "teacher" and self.config.teacher == "previous":
            self.new_teacher(model)

    def unhook_student(self) -> None:
        if self.student_features is not None:
            self.student_features.remove()
            self.student_features = None

    def new_teacher(self, model: nn.Module) -> nn.Module:
        """A frozen copy of `model` as the teacher, taken without the student's hook."""
        self.unhook_student()
        self.teacher = frozen_copy(model)
        if self.config.on == "features":
            self.teacher_features = HeadInputs(self.teacher)
        return self.teacher

    def teacher_mask(self, rows: int) -> Tensor:
        """Which classes enter the KL against the teacher, one mask per softmax block."""
        if self.config.teacher != "previous" or self.scenario == "domain":
            return torch.ones_like(self.class_mask[:1])
        if self.scenario == "task":
            return self.class_mask[:self.seen_tasks]
        return self.seen_mask[self.seen_tasks - 1:self.seen_tasks]

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        check_hook_arguments("distill.loss_terms", model=model, batch=batch, logits=logits,
                             task=task)
        if self.class_mask is None:
            raise RuntimeError("distill.loss_terms: call before_run(model, stream, seed) first; "
                               "it reads the stream's classes")
        config = self.config
        if config.targets == "buffer":
            if batch.stored_logits is None or batch.replayed is None:
                return {}
            rows = batch.replayed & ~batch.stored_logits.isnan().any(1)
            if not rows.any():
                return {}
            row_tasks = batch.task[rows]
            if config.stored_classes == "all" or self.scenario == "domain":
                # DER: the stored near-zero logits of classes not yet seen are what keeps new
                # classes from taking over old rows.
                mask = torch.ones_like(self.class_mask[:1])
            else:
                mask = self.class_mask[row_tasks] if self.scenario == "task" \
                    else self.seen_mask[row_tasks]
            return {config.loss: self.matched(batch.stored_logits[rows], logits[rows], mask)}
        if self.teacher is None:
            return {}  # LwF on its first task: nothing to preserve yet
        with torch.inference_mode():
            teacher_logits = logits_of(self.teacher, batch.x)
        if config.on == "features":
            # The student's head input is from this step's forward pass, the runner's.
            return {"features": feature_distance(self.teacher_features.value.clone(),
                                                 self.student_features.value, config.alpha)}
        # Leave inference mode's tensors behind: autograd must save these for the backward.
        teacher_logits = teacher_logits.clone()
        blocks = self.teacher_mask(len(batch))
        losses = [self.matched(teacher_logits, logits, block) for block in blocks]
        return {config.loss: torch.stack(losses).mean()}

    def matched(self, target_logits: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
        """The term pulling `logits` toward `target_logits` over the classes `mask` marks."""
        config = self.config
        if config.loss == "mse":
            return logit_mse(target_logits, logits, mask, config.alpha)
        return distillation_loss(target_logits, logits, mask, config.temperature, config.alpha)

    def report(self) -> dict[str, Any]:
        if self.teacher is None:
            return {}
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]
        return {"teacher_bytes": tensor_bytes(tensors)}

    def state_dict(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else self.pending_teacher
        return {"seen_tasks": self.seen_tasks, "teacher": teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen_tasks = int(state["seen_tasks"])
        self.teacher = None
        self.pending_teacher = state["teacher"]
