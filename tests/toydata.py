"""Small on-disk corpora and recipes, so training tests run in seconds on 2 CPU cores, and
sampling canvases with fixed tokens."""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the river", "a bird"]
VERBS = ["likes", "sees", "plays with", "walks to", "follows", "paints", "finds"]
OBJECTS = ["the ball", "a garden", "the old house", "an apple", "the bright sun", "a song", "the city"]


def write_toy_corpus(folder: Path, *, train_lines: int = 600, seed: int = 0, paragraph: int | None = None) -> Path:
    """train.txt / valid.txt / test.txt of simple generated sentences (a few KB each); with
    `paragraph`, a blank line after every that many sentences (documents for data.documents =
    'blank-lines')."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train_lines), ("valid", 80), ("test", 80)):
        text = "".join(
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} .\n"
            + ("\n" if paragraph and (i + 1) % paragraph == 0 else "")
            for i in range(lines)
        )
        (folder / f"{split}.txt").write_text(text)
    return folder


def toy_recipe(path: Path, corpus: Path, out_dir: Path, *, objective: str = "diffusion", extra: str = "") -> Path:
    """A recipe for a tiny model on the toy corpus; `extra` is appended TOML."""
    path.write_text(f"""
[run]
seed = 7
out_dir = "{out_dir}"

[data]
dataset = "text"
path = "{corpus}"
tokenizer = "bpe"
bpe_vocab_size = 300
seq_len = 32

[model]
n_layers = 1
d_model = 32
n_heads = 2

[objective]
name = "{objective}"

[training]
batch_size = 8
max_steps = 8
lr = 3e-3
eval_every = 4
eval_sequences = 8
log_every = 2

[eval]
t_samples = 2
batch_size = 16
sample_num = 1

[logging]
progress = false
{extra}
""")
    return path


def template_canvas(mask_id: int, vocab_size: int, length: int, batch: int):
    """A [batch, length] canvas: a prompt at the start (positions 0-2), fixed tokens in the middle
    (7, 8) and at the end (length - 1), masks elsewhere; and the [length] mask of fixed positions."""
    import torch

    canvas = torch.full((batch, length), mask_id)
    fixed = torch.zeros(length, dtype=torch.bool)
    fixed[[0, 1, 2, 7, 8, length - 1]] = True
    canvas[:, fixed] = torch.randint(0, vocab_size, (batch, int(fixed.sum())), generator=torch.Generator().manual_seed(9))
    return canvas, fixed
