"""Batches of conversations for the chat stages.

- ``PackedConversations`` (midtraining): every conversation rendered with
  ``Tokenizer.render_conversation`` (it starts with BOS) and packed into rows of seq_len + 1
  tokens by the same best fit as pretraining (``nanochat.data.dataloader.BestFitPacker``): the
  longest buffered conversation that still fits goes in next, and when none fits the
  shortest is cropped to fill the row. Every token is trained on (``targets = row[1:]``).
- ``PaddedConversations`` (SFT): one conversation per row (cropped to seq_len + 1 tokens),
  rows padded to the batch's longest; targets are -1 where the mask is 0 (user turns, tool
  output, BOS, ``assistant_start``) and on padding, so the loss is on assistant tokens only.

Both walk the items ``rank, rank + W, ...`` of a task (a ``Mixture``), wrap around for more
epochs, and have ``state_dict``/``load_state_dict`` so a resumed run gets exactly the batches
an uninterrupted one would have got.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nanochat.data.dataloader import BestFitPacker, _Buffer, to_device

DEFAULT_BUFFER_CONVERSATIONS = 64


class _Walker:
    """The rank's share of a task's items, in order, epoch after epoch."""

    def __init__(self, task, rank: int, world_size: int):
        self.task = task
        self.rank, self.world_size = rank, world_size
        self.indices = range(len(task))[rank::world_size]
        if not self.indices:
            raise ValueError(f"{len(task)} conversation(s) cannot feed {world_size} ranks")
        self.epoch = 0
        self.cursor = 0

    def next_item(self) -> dict:
        if self.cursor >= len(self.indices):
            self.epoch += 1
            self.cursor = 0
        item = self.task[self.indices[self.cursor]]
        self.cursor += 1
        return item

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"loader state is for rank {state['rank']} of {state['world_size']}, "
                f"this is rank {self.rank} of {self.world_size}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class PackedConversations(BestFitPacker):
    """(inputs, targets) of shape (batch, seq_len), BOS-aligned best-fit packing, forever."""

    def __init__(
        self,
        task,
        tokenizer,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        buffer_size: int = DEFAULT_BUFFER_CONVERSATIONS,
    ):
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.walker = _Walker(task, rank, world_size)
        self.buffer = _Buffer()

    @property
    def epoch(self) -> int:
        return self.walker.epoch

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            ids, _ = self.tokenizer.render_conversation(
                self.walker.next_item(), max_tokens=self.seq_len + 1
            )
            self.buffer.add(ids)

    def state_dict(self) -> dict:
        return {**self.walker.state(), "buffer": self.buffer_state()}

    def load_state_dict(self, state: dict) -> None:
        self.walker.load(state)
        self.load_buffer(state["buffer"])


class PaddedConversations:
    """(inputs, targets), one conversation per row, padded to the batch's longest row."""

    def __init__(
        self,
        task,
        tokenizer,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        self.pad_id = tokenizer.bos_id  # any id: its targets are -1
        self.walker = _Walker(task, rank, world_size)

    @property
    def epoch(self) -> int:
        return self.walker.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rendered = [
            self.tokenizer.render_conversation(self.walker.next_item(), self.seq_len + 1)
            for _ in range(self.batch_size)
        ]
        width = max(len(ids) for ids, _ in rendered) - 1
        inputs = torch.full((self.batch_size, width), self.pad_id, dtype=torch.long)
        targets = torch.full((self.batch_size, width), -1, dtype=torch.long)
        for r, (ids, mask) in enumerate(rendered):
            n = len(ids) - 1
            if n < 1:
                continue
            inputs[r, :n] = torch.tensor(ids[:-1])
            row_targets = torch.tensor(ids[1:])
            row_targets[torch.tensor(mask[1:]) == 0] = -1
            targets[r, :n] = row_targets
        return to_device(inputs, self.device), to_device(targets, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return self.walker.state()

    def load_state_dict(self, state: dict) -> None:
        self.walker.load(state)
