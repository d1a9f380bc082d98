"""Experience replay: a fixed-size buffer (reservoir or class-balanced) and its strategy."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from cl.errors import ClError, out_of_memory
from cl.models import device_of, eval_mode, logits_of, tensor_bytes
from cl.strategy import Strategy
from cl.types import Batch, Inputs, Stream, Task, check_hook_arguments, num_rows, take

Policy = Literal["reservoir", "class_balanced"]
Insert = Literal["online", "task_end"]
POLICIES: tuple[str, ...] = typing.get_args(Policy)
INSERTS: tuple[str, ...] = typing.get_args(Insert)

# Random integers are drawn below this bound and reduced modulo the range they are needed in:
# exact integer arithmetic, with a modulo bias below 2**-40 for any buffer or stream length.
DRAW_BOUND = 2**62
# Rows per forward pass when a finished task is inserted with its logits.
TASK_END_CHUNK = 256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_buffer_settings(capacity: Any, policy: Any, batch_size: Any) -> None:
    """A ValueError naming the first bad setting of a buffer (replay's, DER's)."""
    if not _is_int(capacity) or capacity <= 0:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def fresh_rows(batch: Batch, logits: Tensor, known_fresh: int | None = None
               ) -> tuple[Inputs, Tensor, Tensor, Tensor]:
    """The rows of `batch` that are new data (not replayed), with their logits: what enters a
    buffer. `known_fresh`: the caller appended the replayed rows after that many fresh ones, so
    the mask need not be read (on an accelerator, a wait for the device)."""
    if batch.replayed is None:
        return batch.x, batch.y, batch.task, logits
    index = slice(0, known_fresh) if known_fresh is not None \
        else batch.fresh().nonzero().squeeze(1)
    return take(batch.x, index), batch.y[index], batch.task[index], logits[index]


def check_started(buffer: Buffer | None, where: str) -> None:
    """The RuntimeError of a buffer strategy's hook `where` called before `before_run`."""
    if buffer is None:
        raise RuntimeError(f"{where}: call before_run(model, stream, seed) first; it creates "
                           "the buffer")


def buffer_report(buffer: Buffer | None) -> dict[str, Any]:
    """A buffer's figures for metrics.json (none before `before_run`)."""
    if buffer is None:
        return {}
    return {"buffer_bytes": int(buffer.nbytes), "buffer_rows": len(buffer),
            "seen": int(buffer.seen)}


def buffer_state(buffer: Buffer | None) -> dict[str, Any]:
    """A buffer strategy's checkpoint state: its buffer's (none before `before_run`)."""
    return {} if buffer is None else {"buffer": buffer.state_dict()}


def load_buffer_state(buffer: Buffer | None, state: dict[str, Any]) -> None:
    """Load what `buffer_state` saved (an empty state: a strategy that had nothing yet)."""
    if buffer is None:
        raise ValueError("load_state_dict needs before_run to have created the buffer")
    if state:
        buffer.load_state_dict(state["buffer"])


@dataclass(frozen=True)
class ReplayConfig:
    """Settings of `replay:key=value,...`.

    `batch_size` is the number of replayed rows appended to each training batch (None: as many
    as the fresh batch has). `insert` is when training rows enter the buffer: after every step
    (`online`) or all of a task's rows once it is finished (`task_end`). `store_logits` keeps
    the logits of every inserted row, handed back as `Batch.stored_logits` (DER's targets).
    """

    capacity: int = 200  # rows the buffer holds at most
    policy: Policy = "reservoir"  # which rows stay: reservoir sampling, or equal shares per class
    batch_size: int | None = None
    insert: Insert = "online"
    store_logits: bool = False

    def __post_init__(self) -> None:
        check_buffer_settings(self.capacity, self.policy, self.batch_size)
        if self.insert not in INSERTS:
            raise ValueError(f"insert must be one of {', '.join(INSERTS)}, got {self.insert!r}")
        if not isinstance(self.store_logits, bool):
            raise ValueError(f"store_logits must be true or false, got {self.store_logits!r}")


def _alloc(like: Tensor, capacity: int, device: torch.device) -> Tensor:
    return torch.zeros((capacity, *like.shape[1:]), dtype=like.dtype, device=device)


def _row_bytes(x: Inputs, logits: Tensor | None, scratch: bool) -> int:
    """Bytes a buffer preallocates per row: the inputs and logits as given, the label and task
    id (int64), and with `scratch` reservoir sampling's per-slot int64."""
    stored = list(x.values()) if isinstance(x, dict) else [x]
    if logits is not None:
        stored.append(logits)
    return (sum(math.prod(t.shape[1:]) * t.element_size() for t in stored)
            + 8 * (2 + int(scratch)))


def _swap_remove(items: list[int], position: dict[int, int] | list[int], item: int) -> None:
    """Remove `item` from `items` in O(1) by moving the last element into its place;
    `position[element]` is every element's index in `items` and is kept up to date."""
    index = position[item]
    last = items.pop()
    if last != item:
        items[index] = last
        position[last] = index


class Buffer:
    """A fixed number of training rows (inputs, label, task id, optionally logits).

    Storage is preallocated for `capacity` rows on the first insertion, with the shapes, dtypes
    and device of that batch (or on `device` when given), and rows are overwritten in place.
    Slots are chosen by `policy`:

    - `reservoir`: algorithm R over every row ever inserted, so each one is kept with
      probability capacity / seen;
    - `class_balanced`: class-balanced reservoir sampling (CBRS, Chrysakis & Moens 2020): a row
      of a class that is not among the largest in the buffer replaces a random row of a largest
      class; a row of a largest class replaces a random row of its own class with probability
      stored / seen of that class. Classes end up with equal shares, give or take one.

    Insertion and `sample` cost O(rows asked for), whatever the capacity or the stream length.
    All randomness comes from `generator`, whose state is part of `state_dict`.
    """

    def __init__(self, capacity: int, policy: str = "reservoir",
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        if not _is_int(capacity) or capacity <= 0:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.generator = generator if generator is not None else torch.Generator()
        self.device = torch.device(device) if device is not None else None
        self.seen = 0
        self._size = 0
        self.x: Inputs | None = None
        self.y: Tensor | None = None
        self.task: Tensor | None = None
        self.logits: Tensor | None = None
        # reservoir: per slot, the last batch row that picked it (resolves in-batch collisions)
        self._last_writer: Tensor | None = None
        # class_balanced: slots of every class, each slot's class and index in that list, and
        # classes grouped by their number of slots, so each step of CBRS is O(1).
        self._class_slots: dict[int, list[int]] = {}
        self._class_seen: dict[int, int] = {}
        self._slot_class: list[int] = []
        self._slot_position: list[int] = []
        self._by_size: dict[int, list[int]] = {}
        self._size_position: dict[int, int] = {}
        self._max_size = 0

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (f"Buffer(capacity={self.capacity}, policy={self.policy!r}, rows={self._size}, "
                f"seen={self.seen})")

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated row storage (inputs, labels, task ids, logits)."""
        tensors = [self.y, self.task, self.logits]
        tensors += list(self.x.values()) if isinstance(self.x, dict) else [self.x]
        return tensor_bytes(t for t in tensors if t is not None)

    def class_counts(self) -> dict[int, int]:
        """Rows held per class, classes in increasing order."""
        if not self._size:
            return {}
        classes, counts = torch.unique(self.y[:self._size], return_counts=True)
        return dict(zip(classes.tolist(), counts.tolist(), strict=True))

    # -- insertion ------------------------------------------------------------------------------

    def insert(self, x: Inputs, y: Tensor, task: Tensor | int, logits: Tensor | None = None
               ) -> None:
        """Offer rows to the buffer; each is kept or dropped as the policy decides."""
        count = len(y)
        if num_rows(x) != count:
            raise ValueError(f"x has {num_rows(x)} rows but y has {count}")
        if not isinstance(task, Tensor):
            task = torch.full((count,), int(task), dtype=torch.int64, device=y.device)
        if len(task) != count or (logits is not None and len(logits) != count):
            raise ValueError("x, y, task and logits must have the same number of rows")
        if count == 0:
            return
        if self.y is None:
            self._allocate(x, y, logits)
        self._check_like(x, logits)
        if self.policy == "reservoir":
            rows, slots = self._reservoir_slots(count)
        else:
            rows, slots = self._class_balanced_slots(y.tolist())
        self.seen += count
        if not len(rows):
            return
        # Index tensors drawn on the host go up without waiting for the device's queue.
        source = rows.to(y.device, non_blocking=True)
        target = slots.to(self.device, non_blocking=True)
        if isinstance(self.x, dict):
            for key, stored in self.x.items():
                stored[target] = x[key][source].to(self.device)
        else:
            self.x[target] = x[source].to(self.device)
        self.y[target] = y[source].to(self.device, torch.int64)
        self.task[target] = task[source].to(self.device, torch.int64)
        if self.logits is not None:
            self.logits[target] = logits[source].detach().to(self.device, self.logits.dtype)

    def _allocate(self, x: Inputs, y: Tensor, logits: Tensor | None) -> None:
        """Storage for `capacity` rows shaped like this batch's; a capacity the machine cannot
        hold is one ClError line with the size asked for, not the allocator's traceback."""
        if self.device is None:
            self.device = y.device
        if logits is not None and (logits.dim() != 2 or not logits.is_floating_point()):
            raise ValueError(f"logits must be a float (rows, classes) tensor, "
                             f"got {logits.dtype} of shape {tuple(logits.shape)}")
        try:
            self._allocate_rows(x, logits)
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if out_of_memory(error) is None:
                raise
            self.x = self.y = self.task = self.logits = self._last_writer = None
            self._slot_class, self._slot_position = [], []
            asked = self.capacity * _row_bytes(x, logits, self.policy == "reservoir")
            raise ClError(f"replay buffer of {self.capacity} rows does not fit in memory "
                          f"({asked / 1e9:,.1f} GB asked for)") from None

    def _allocate_rows(self, x: Inputs, logits: Tensor | None) -> None:
        if isinstance(x, dict):
            self.x = {key: _alloc(value, self.capacity, self.device) for key, value in x.items()}
        else:
            self.x = _alloc(x, self.capacity, self.device)
        self.y = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)
        self.task = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)
        if logits is not None:
            # Targets at least float32: logits from a bf16 autocast forward would otherwise
            # keep three significant digits in the buffer.
            self.logits = torch.zeros((self.capacity, *logits.shape[1:]), device=self.device,
                                      dtype=torch.promote_types(logits.dtype, torch.float32))
        if self.policy == "reservoir":
            self._last_writer = torch.zeros(self.capacity, dtype=torch.int64)
        else:
            self._slot_class = [0] * self.capacity
            self._slot_position = [0] * self.capacity

    def _check_like(self, x: Inputs, logits: Tensor | None) -> None:
        """Every batch must fit the storage the first one shaped (same keys and row shapes)."""
        if isinstance(self.x, dict) != isinstance(x, dict):
            raise ValueError("the buffer holds " + ("dict" if isinstance(self.x, dict) else
                             "tensor") + " inputs; got the other kind")
        pairs = ([(self.x.get(key), value, key) for key, value in x.items()]
                 if isinstance(x, dict) else [(self.x, x, "x")])
        if isinstance(x, dict) and set(x) != set(self.x):
            raise ValueError(f"input keys {sorted(x)} differ from the buffer's {sorted(self.x)}")
        if logits is not None or self.logits is not None:
            if (logits is None) != (self.logits is None):
                raise ValueError("the buffer " + ("stores" if self.logits is not None else
                                 "does not store") + " logits; every insertion must agree")
            pairs.append((self.logits, logits, "logits"))
        for stored, value, key in pairs:
            if stored.shape[1:] != value.shape[1:]:
                raise ValueError(f"{key} rows have shape {tuple(value.shape[1:])}, the buffer's "
                                 f"have {tuple(stored.shape[1:])}")

    def _draws(self, shape: tuple[int, ...]) -> list:
        """Random integers in [0, DRAW_BOUND), all of a batch's in one generator call."""
        return torch.randint(0, DRAW_BOUND, shape, generator=self.generator).tolist()

    def _reservoir_slots(self, count: int) -> tuple[Tensor, Tensor]:
        """Algorithm R for `count` rows at once: (batch rows kept, their slots)."""
        position = self.seen + torch.arange(count)
        slots = position.clone()
        full = position >= self.capacity
        overflow = int(full.sum())
        if overflow:
            draws = torch.randint(0, DRAW_BOUND, (overflow,), generator=self.generator)
            slots[full] = draws % (position[full] + 1)
        kept = slots < self.capacity
        rows, slots = torch.arange(count)[kept], slots[kept]
        # Two rows may pick one slot; the later one wins, as if inserted one at a time. The
        # persistent per-slot scratch keeps this O(rows) (no sort, no capacity-sized buffer).
        self._last_writer.scatter_reduce_(0, slots, rows, reduce="amax", include_self=False)
        winner = self._last_writer[slots] == rows
        self._size = min(self.capacity, self.seen + count)
        return rows[winner], slots[winner]

    def _class_balanced_slots(self, labels: list[int]) -> tuple[Tensor, Tensor]:
        """CBRS for a batch of labels, one O(1) step per row: (batch rows kept, their slots)."""
        filling = max(0, min(len(labels), self.capacity - self._size))
        draws = self._draws((len(labels) - filling, 2)) if len(labels) > filling else []
        writes: dict[int, int] = {}  # slot -> batch row; a later row overwrites an earlier one
        for row, label in enumerate(labels):
            seen = self._class_seen.get(label, 0) + 1
            self._class_seen[label] = seen
            if row < filling:
                slot = self._size
                self._size += 1
                self._add_slot(label, slot)
            else:
                pick_class, pick_slot = draws[row - filling]
                own = self._class_slots.get(label, [])
                if len(own) < self._max_size:
                    largest = self._by_size[self._max_size]
                    victim = self._class_slots[largest[pick_class % len(largest)]]
                    slot = victim[pick_slot % len(victim)]
                    self._remove_slot(slot)
                    self._add_slot(label, slot)
                elif pick_class % seen < len(own):
                    slot = own[pick_slot % len(own)]
                else:
                    continue
            writes[slot] = row
        return torch.tensor(list(writes.values()), dtype=torch.int64), \
            torch.tensor(list(writes.keys()), dtype=torch.int64)

    def _add_slot(self, label: int, slot: int) -> None:
        slots = self._class_slots.setdefault(label, [])
        self._slot_class[slot] = label
        self._slot_position[slot] = len(slots)
        slots.append(slot)
        self._resize(label, len(slots) - 1, len(slots))

    def _remove_slot(self, slot: int) -> None:
        label = self._slot_class[slot]
        slots = self._class_slots[label]
        _swap_remove(slots, self._slot_position, slot)
        if not slots:
            del self._class_slots[label]
        self._resize(label, len(slots) + 1, len(slots))

    def _resize(self, label: int, old: int, new: int) -> None:
        """Move `label` from the group of classes with `old` slots to the one with `new`."""
        if old:
            group = self._by_size[old]
            _swap_remove(group, self._size_position, label)
            if not group:
                del self._by_size[old]
        if new:
            group = self._by_size.setdefault(new, [])
            self._size_position[label] = len(group)
            group.append(label)
        else:
            del self._size_position[label]
        if new > self._max_size:
            self._max_size = new
        elif old == self._max_size and old not in self._by_size:
            self._max_size = old - 1

    # -- sampling -------------------------------------------------------------------------------

    def sample_index(self, count: int) -> Tensor:
        """`min(count, len)` distinct slots, uniformly without replacement (Robert Floyd's
        algorithm: O(count) draws and set operations, nothing the size of the buffer)."""
        count = max(0, min(count, self._size))
        chosen: dict[int, None] = {}  # an ordered set
        draws = self._draws((count,)) if count else []
        for draw, top in zip(draws, range(self._size - count, self._size), strict=True):
            pick = draw % (top + 1)
            chosen[top if pick in chosen else pick] = None
        return torch.tensor(list(chosen), dtype=torch.int64)

    def sample(self, count: int) -> tuple[Inputs, Tensor, Tensor, Tensor | None]:
        """`min(count, len)` distinct rows drawn uniformly: (x, y, task, logits or None)."""
        if not self._size:
            raise ValueError("cannot sample from an empty buffer")
        index = self.sample_index(count).to(self.device, non_blocking=True)
        logits = self.logits[index] if self.logits is not None else None
        return take(self.x, index), self.y[index], self.task[index], logits

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The filled rows, the counts, the CBRS bookkeeping and the generator's state."""
        state: dict[str, Any] = {"capacity": self.capacity, "policy": self.policy,
                                 "seen": self.seen, "size": self._size,
                                 "generator": self.generator.get_state()}
        if self.y is not None:
            rows = slice(0, self._size)
            state["x"] = ({key: value[rows].clone() for key, value in self.x.items()}
                          if isinstance(self.x, dict) else self.x[rows].clone())
            state["y"] = self.y[rows].clone()
            state["task"] = self.task[rows].clone()
            if self.logits is not None:
                state["logits"] = self.logits[rows].clone()
        if self.policy == "class_balanced":
            # Lists keep their order: random picks index into them.
            state["class_slots"] = {label: list(s) for label, s in self._class_slots.items()}
            state["class_seen"] = dict(self._class_seen)
            state["by_size"] = {size: list(group) for size, group in self._by_size.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("capacity", "policy"):
            if state[key] != getattr(self, key):
                raise ValueError(f"buffer state has {key} {state[key]!r}, this buffer "
                                 f"{getattr(self, key)!r}")
        self.generator.set_state(state["generator"])
        self.seen = int(state["seen"])
        size = int(state["size"])
        self._size = 0
        self.x = self.y = self.task = self.logits = None
        if "y" in state:
            self._allocate(state["x"], state["y"], state.get("logits"))
            target = torch.arange(size, device=self.device)
            for stored, saved in self._stored_pairs(state):
                stored[target] = saved.to(self.device)
        self._size = size
        if self.policy == "class_balanced":
            self._class_slots = {int(k): list(v) for k, v in state["class_slots"].items()}
            self._class_seen = {int(k): int(v) for k, v in state["class_seen"].items()}
            self._by_size = {int(k): list(v) for k, v in state["by_size"].items()}
            for label, slots in self._class_slots.items():
                for position, slot in enumerate(slots):
                    self._slot_class[slot] = label
                    self._slot_position[slot] = position
            self._size_position = {label: position for group in self._by_size.values()
                                   for position, label in enumerate(group)}
            self._max_size = max(self._by_size, default=0)

    def _stored_pairs(self, state: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
        pairs = ([(self.x[key], state["x"][key]) for key in self.x]
                 if isinstance(self.x, dict) else [(self.x, state["x"])])
        pairs += [(self.y, state["y"]), (self.task, state["task"])]
        if self.logits is not None:
            pairs.append((self.logits, state["logits"]))
        return pairs


class Replay(Strategy):
    """Experience replay: every training batch gets rows drawn from a buffer of past rows.

    Replayed rows are appended after the fresh ones and marked in `Batch.replayed`; only fresh
    rows enter the buffer, so a row is never re-inserted by being replayed.
    """

    name: ClassVar[str] = "replay"
    config_class: ClassVar[type] = ReplayConfig

    def __init__(self, config: ReplayConfig | None = None) -> None:
        self.config = config if config is not None else ReplayConfig()
        self.generator: torch.Generator | None = None
        self.buffer: Buffer | None = None
        self._fresh_rows: tuple[Batch, int] | None = None  # transform_batch's last batch

    def __repr__(self) -> str:
        settings = ", ".join(f"{field.name}={getattr(self.config, field.name)!r}"
                             for field in dataclasses.fields(self.config))
        return f"Replay({settings})"

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("replay.before_run", model=model, stream=stream, seed=seed)
        # An own generator: replay draws never shift the global RNG (dropout, data order).
        self.generator = torch.Generator().manual_seed(seed + 1_000_003)
        self.buffer = Buffer(self.config.capacity, self.config.policy, self.generator,
                             device_of(model))

    def transform_batch(self, batch: Batch, task: Task) -> Batch:
        check_hook_arguments("replay.transform_batch", batch=batch, task=task)
        self._check_started("transform_batch")
        if not len(self.buffer):
            return batch
        x, y, task_ids, logits = self.buffer.sample(self.config.batch_size or len(batch))
        replayed = Batch(x, y, task_ids, torch.ones(len(y), dtype=torch.bool, device=y.device),
                         logits)
        # Rows an earlier strategy already marked as replayed stay marked; the rest are fresh.
        joined = Batch.cat([batch, replayed])
        # When every incoming row is fresh, after_step can take them as the first rows of this
        # batch: no look at the mask, which on an accelerator would wait for the device.
        self._fresh_rows = (joined, len(batch)) if batch.replayed is None else None
        return joined

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        check_hook_arguments("replay.after_step", model=model, batch=batch, logits=logits,
                             task=task)
        self._check_started("after_step")
        if self.config.insert != "online":
            return
        # A batch another strategy made has its mask read.
        known = self._fresh_rows[1] if self._fresh_rows is not None \
            and self._fresh_rows[0] is batch else None
        self._fresh_rows = None  # do not keep the batch alive until the next step
        x, y, task_ids, logits = fresh_rows(batch, logits, known)
        self.buffer.insert(x, y, task_ids, logits.detach() if self.config.store_logits else None)

    def after_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("replay.after_task", model=model, task=task)
        self._check_started("after_task")
        if self.config.insert != "task_end":
            return
        train = task.train
        # A seeded random order, so which rows survive does not depend on how data is sorted.
        order = torch.randperm(len(train), generator=self.generator).to(train.y.device)
        with eval_mode(model):
            for start in range(0, len(train), TASK_END_CHUNK):
                index = order[start:start + TASK_END_CHUNK]
                x = train.rows(index)
                logits = None
                if self.config.store_logits:
                    with torch.no_grad():
                        logits = logits_of(model, x)
                self.buffer.insert(x, train.y[index], task.index, logits)

    def _check_started(self, hook: str) -> None:
        check_started(self.buffer, f"replay.{hook}")

    def report(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {**buffer_report(self.buffer), "class_counts": self.buffer.class_counts()}

    def state_dict(self) -> dict[str, Any]:
        return buffer_state(self.buffer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_buffer_state(self.buffer, state)
