"""Offline text fixtures: a tiny BERT and a word-level fast tokenizer saved as an `hf:` directory,
and small text classification datasets on disk (jsonl with label names, csv with ids)."""

from __future__ import annotations

import json
import random
from pathlib import Path

# Each class has its own cue word; the rest of a sentence is filler drawn from a shared pool.
FILLER = "the a of to and in is it that was for on with as by at from this be or".split()
CUES = {
    "news": ["world", "sports", "business"],
    "reviews": ["awful", "fine", "great"],
    "topics": ["animal", "plant"],
}


def sentences(cues: list[str], rows_per_class: int, seed: int) -> list[tuple[str, int]]:
    """`rows_per_class` sentences per cue word, lengths 3..12 words, in a seeded order."""
    generator = random.Random(seed)
    rows = []
    for label, cue in enumerate(cues):
        for _ in range(rows_per_class):
            words = generator.choices(FILLER, k=generator.randint(2, 11))
            words.insert(generator.randrange(len(words) + 1), cue)
            rows.append((" ".join(words), label))
    generator.shuffle(rows)
    return rows


def write_jsonl_dataset(directory: Path, cues: list[str], train_per_class: int = 12,
                        test_per_class: int = 6, names: list[str] | None = None,
                        seed: int = 0) -> Path:
    """DIR/{train,test}.jsonl with fields text and label (a name), plus DIR/labels.json."""
    names = names or cues
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "labels.json").write_text(json.dumps(names))
    for split, rows, offset in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        lines = [json.dumps({"text": text, "label": names[label]})
                 for text, label in sentences(cues, rows, seed + offset)]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def write_csv_dataset(directory: Path, cues: list[str], train_per_class: int = 12,
                      test_per_class: int = 6, seed: int = 5) -> Path:
    """DIR/{train,test}.csv with columns `sentence` and `category` (integer ids), no names."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows, offset in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        lines = ["sentence,category"] + [f"{text},{label}" for text, label in
                                         sentences(cues, rows, seed + offset)]
        (directory / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return directory


def write_tiny_backbone(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) and a word-level fast tokenizer over the fixtures'
    words, saved with save_pretrained: what `--model hf:<directory>` loads, offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted(set(FILLER) | {cue for cues in CUES.values() for cue in cues})
    vocab = {token: index for index, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                        model_max_length=64)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory
