"""Built-in models (an MLP, a small CNN), their initialisation, and the one place logits are taken.

A registered model is a function `build(input_shape, num_classes, hidden, init) -> nn.Module`;
the registry key is the `--model` word.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from cl.errors import UsageError
from cl.types import Inputs

INITS = ("default", "xavier")


def trim_padding(x: dict[str, Tensor]) -> dict[str, Tensor]:
    """A tokenized batch without its trailing all-padding columns.

    Text streams pad every row to the stream's longest (so batches and replayed rows
    concatenate); a batch of short rows need not pay for that. Padding is on the right."""
    mask = x.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return x
    used = mask.any(0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    if width == mask.shape[1]:
        return x
    return {key: value[:, :width] if value.ndim == 2 and value.shape == mask.shape else value
            for key, value in x.items()}


def model_input(x: Tensor) -> Tensor:
    """`x` as the model takes it: uint8 tensors are images in 0..255, which streams keep as they
    are (a quarter of float32's memory, in the stream and in replay buffers) and which become
    float32 in [0, 1] here, one batch at a time, by the same operation a loader would apply
    (`float32(x) / 255`, so the values are bit for bit the same)."""
    return x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x


def logits_of(model: nn.Module, x: Inputs) -> Tensor:
    """The model's logits for `x`: a transformers model takes `**x` (padding trimmed), or the
    images, and returns `.logits`; uint8 images are scaled to [0, 1] first (`model_input`)."""
    if isinstance(x, dict):
        return model(**trim_padding(x)).logits
    output = model(model_input(x))
    return output if isinstance(output, Tensor) else output.logits


def initialise(model: nn.Module, init: str) -> nn.Module:
    """Apply an initialisation scheme in place: `default` keeps PyTorch's; `xavier` gives
    Xavier-uniform weights and zero biases to every linear and conv layer (the MLP of the
    DER / Mammoth Seq-MNIST protocol)."""
    if init not in INITS:
        raise UsageError(f"unknown init {init!r} (known: {', '.join(INITS)})")
    if init == "xavier":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def _check_sizes(hidden: Sequence[int], what: str) -> tuple[int, ...]:
    sizes = tuple(int(size) for size in hidden)
    for size in sizes:
        if size <= 0:
            raise UsageError(f"{what} sizes must be positive, got {size}")
    return sizes


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks and a linear head (named `head`)."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    """Two 3x3 conv blocks (32, 64 channels, ReLU, 2x2 max-pool), a hidden linear layer, a head.

    Small enough for CPU runs on MNIST-sized images; the pooling is skipped where the feature
    map is already too small (8x8 digits)."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise UsageError(f"the cnn needs image inputs (channels, height, width), "
                             f"got input shape {tuple(input_shape)}")
        channels, height, width = input_shape
        blocks: list[nn.Module] = []
        for out_channels in (32, 64):
            blocks += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU()]
            if min(height, width) >= 4:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels = out_channels
        blocks.append(nn.Flatten())
        features = channels * height * width
        for size in hidden:
            blocks += [nn.Linear(features, size), nn.ReLU()]
            features = size
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def build_mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (100, 100),
              init: str = "default") -> nn.Module:
    """MLP: flatten, hidden ReLU layers (default 2x100, the literature's MNIST MLP), linear head."""
    mlp = MLP(math.prod(input_shape), _check_sizes(hidden, "hidden"), num_classes)
    return initialise(mlp, init)


def build_cnn(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (100,),
              init: str = "default") -> nn.Module:
    """CNN: two conv blocks (32, 64 channels), hidden linear layers (default 100), linear head."""
    return initialise(CNN(input_shape, _check_sizes(hidden, "hidden"), num_classes), init)


def build_seeded(build, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int],
                 init: str, seed: int) -> nn.Module:
    """Build a model with initial weights drawn from `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(input_shape, num_classes, hidden, init)


def check_device(name: str, what: str = "device") -> torch.device:
    """`name` as a torch device that can hold and train a model on this machine; anything else
    (a typo, `meta`, a CUDA or MPS device that is not there) is one UsageError line."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown {what} {name!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{what} {name!r} asked for but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{what} {name!r} asked for but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{what} {name!r} asked for but MPS is not available here")
    elif device.type != "cpu":
        raise UsageError(f"{what} {name!r} cannot train a model (use cpu, cuda, cuda:N or mps)")
    return device


def state_dict_mismatch(expected: dict[str, Tensor], given: dict[str, Tensor]) -> str | None:
    """What keeps `given` from loading into a model whose state dict is `expected`: the missing
    and unexpected keys, else the first shape that differs; None when it fits."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing {some(missing)}")
    if unexpected:
        problems.append(f"unexpected {some(unexpected)}")
    if problems:
        return "; ".join(problems)
    for key, tensor in expected.items():
        if given[key].shape != tensor.shape:
            return (f"{key} has shape {tuple(given[key].shape)} in the file but "
                    f"{tuple(tensor.shape)} in the model")
    return None


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes held by `tensors` (what a strategy reports of its buffers and copies)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode, then every module back in its own mode: a strategy may keep some
    in eval mode (frozen BatchNorm statistics) while the rest trains."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


HEAD_NAMES = ("head", "classifier", "score", "fc")


def find_head(model: nn.Module) -> str:
    """The name of the model's output layer: a module called `head` (the built-ins),
    `classifier` or `score` (transformers' sequence classifiers) or `fc` (torchvision), else the
    last linear layer. Freezing and per-task heads both need it."""
    modules = dict(model.named_modules())
    for name in HEAD_NAMES:
        if name in modules:
            return name
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not linear:
        raise UsageError(f"cannot tell the head of {type(model).__name__}: it has no linear layer")
    return linear[-1]


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks, input first: the children of its largest
    `nn.ModuleList` of one module type (a transformer's layers: `bert.encoder.layer.0`, ...);
    empty for a model without one (the built-in MLP and CNN)."""
    best: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if len(module) > len(best):
            best = [f"{name}.{index}" if name else str(index) for index in range(len(module))]
    return best


def under(name: str, prefix: str) -> bool:
    """Whether the parameter or module `name` lies inside the module called `prefix`."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")
