"""From a token stream to training batches: fixed-length sequences, then stateless shuffled batches."""

from __future__ import annotations

import numpy as np
import torch

from tdlm.errors import DataError

EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with s * stride + e: distinct for e < stride


def pack(tokens: np.ndarray, seq_len: int) -> tuple[torch.LongTensor, torch.LongTensor | None]:
    """Cut the contiguous stream into [n, seq_len] sequences (no padding: a sequence may span
    line and document boundaries) and return the leftover tail (1-D, shorter than seq_len),
    or None when the stream divides exactly."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"pack expects a 1-D token stream, got shape {tokens.shape}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = len(tokens) // seq_len
    sequences = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
    tail = tokens[n * seq_len :]
    return sequences, (torch.from_numpy(tail.astype(np.int64)) if len(tail) else None)


class GlobalBatches:
    """Where global batch s and this rank's rows of it lie in an epoch's order of `num_sequences`
    sequences: what every train stream shares. Epoch e = s // batches_per_epoch; global batch s
    is the G = global_batch consecutive rows at position s % batches_per_epoch of the epoch's
    order, and rank r of W takes rows [r*G/W, (r+1)*G/W) of it. The last partial batch of an
    epoch is dropped. Subclasses say what the order is and read the rows.
    """

    def __init__(self, num_sequences: int, global_batch: int, seed: int, *, rank: int, world_size: int,
                 too_few: str):
        """`too_few`: what to tell a user whose data holds less than one global batch."""
        if global_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need global_batch >= 1 and 0 <= rank < world_size, got {global_batch=}, {rank=}, {world_size=}"
            )
        if global_batch % world_size != 0:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        self.batches_per_epoch = num_sequences // global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"only {num_sequences} {too_few}")
        self.num_sequences, self.global_batch, self.seed = num_sequences, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size

    def epoch_of(self, step: int) -> float:
        """Epochs completed before `step`, fractional: step 0 is 0.0, step batches_per_epoch is 1.0."""
        return step / self.batches_per_epoch

    def local_rows(self, step: int) -> tuple[int, int]:
        """(epoch, position in that epoch's order of this rank's first row) for global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.batches_per_epoch)
        return epoch, index * self.global_batch + self.rank * self.local_batch


class BatchStream(GlobalBatches):
    """Deterministic, stateless batches: the batch for global step s is a pure function of
    (seed, s), so resuming at step s needs no saved iterator state, and the data order does not
    depend on how many processes there are.

    Epoch e visits the sequences in the order torch.randperm(n, generator seeded with
    seed * 1_000_003 + e); batches and ranks take their rows of it as GlobalBatches says.
    (randperm's order is fixed for a given torch version; another version may shuffle differently.)
    """

    def __init__(
        self, sequences: torch.LongTensor, global_batch: int, seed: int, *, rank: int = 0, world_size: int = 1
    ):
        if sequences.ndim != 2:
            raise ValueError(f"sequences must be [n, seq_len], got shape {tuple(sequences.shape)}")
        super().__init__(
            sequences.shape[0], global_batch, seed, rank=rank, world_size=world_size,
            too_few=f"sequences of length {sequences.shape[1]}, fewer than one global batch of {global_batch}: "
                    "lower the batch size or seq_len, or use more train tokens",
        )
        self.sequences = sequences
        self._epoch, self._order = None, None  # the current epoch's permutation, memoised

    def get(self, step: int) -> torch.LongTensor:
        """This rank's rows [global_batch // world_size, seq_len] of global batch `step`."""
        epoch, start = self.local_rows(step)
        return self.sequences[self._permutation(epoch)[start : start + self.local_batch]]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.sequences), generator=generator)
        return self._order
