"""Pretraining batches from the shards: per-rank row groups, BOS-aligned best-fit packing.

Stage 3 (``scripts.base_train``) and the bits-per-byte evaluation draw their batches here:

- every stream (one per rank) reads its own row groups of the training shards (s, s+S,
  s+2S, ... over the list of all (shard, row group) pairs), so ranks never see the same
  document;
- documents are tokenized in batches with BOS prepended and kept in a buffer;
- each row of T+1 tokens is packed by best fit: the longest buffered document that still
  fits goes in next; when none fits, the shortest one is cropped to fill the row (its rest
  is dropped, so every row starts with BOS and nothing is padded);
- ``inputs = row[:-1]``, ``targets = row[1:]``.

Evaluation reads differently (``EvalRows``): the documents in shard order, BOS-prefixed and laid
end to end, cut into rows that overlap by one token, so every token of the split is a target
exactly once, in the same order on every run; a fixed number of rows caps it.

The rows come from one stream per process of the run as it started (``PackedLoader``).
``state_dict()`` captures where each stream is (epoch, the next row group, the buffered
documents), so a resumed run gets exactly the batches an uninterrupted run would have got,
on as many processes as before or (``load_shards``) on a count that divides the stream
count or is a multiple of it: the streams are dealt out again.

Damaged data stops the loader with ``shards.ShardError`` (one line naming the shard and the
fix), never a raw pyarrow/ZSTD trace: at construction every shard's size is compared with its
record (a stat each), and each shard's sha256 is checked when this process first opens it
(about 0.1 s per 100 MB shard, once per shard per process; docs/benchmarks.md).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.data import shards
from nanochat.tokenizer import Tokenizer

DEFAULT_BUFFER_DOCS = 256  # documents kept ready for best fit (more = tighter packing)
TOKENIZE_BATCH = 128  # documents per tiktoken batch call


def row_groups(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Every (shard position, row group) pair of the given shards, in order (footers only:
    the content is checked as each shard is opened for reading)."""
    pairs = []
    for i, path in enumerate(paths):
        with shards.open_shard(path, check_hash=False) as pf:
            pairs += [(i, rg) for rg in range(pf.num_row_groups)]
    return pairs


def tokenized(texts: Sequence[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Each document's tokens, BOS first, tokenized in batches of TOKENIZE_BATCH: how the
    loader, the evaluation rows and the data count read a row group."""
    for start in range(0, len(texts), TOKENIZE_BATCH):
        yield from tokenizer.encode(texts[start : start + TOKENIZE_BATCH], prepend="<|bos|>")


def count_tokens(paths: Sequence[Path], tokenizer: Tokenizer, limit: int | None = None) -> int:
    """The tokens of every document in the shards, a BOS each included: the size of the
    data, not what ``PackedLoader`` trains on in one of its epochs (it crops a document
    that fits no row and drops the rest: at the tiny preset's context of 256, 129K of the
    embedded corpus's 639K tokens). Stops once the count passes ``limit`` (the caller only
    needs to know the data is larger than that)."""
    total = 0
    for path in paths:
        with shards.open_shard(path, check_hash=False) as pf:  # the loader checks them
            for rg in range(pf.num_row_groups):
                for doc in tokenized(shards.read_texts(pf, path, rg), tokenizer):
                    total += len(doc)
                    if limit is not None and total > limit:
                        return total
    return total


@dataclass
class _Buffer:
    """Documents sorted by length, for best-fit lookups."""

    lengths: list[int] = field(default_factory=list)
    docs: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, doc: list[int]) -> None:
        at = bisect.bisect_right(self.lengths, len(doc))
        self.lengths.insert(at, len(doc))
        self.docs.insert(at, doc)

    def pop_longest_fitting(self, room: int) -> list[int] | None:
        at = bisect.bisect_right(self.lengths, room) - 1
        if at < 0:
            return None
        self.lengths.pop(at)
        return self.docs.pop(at)

    def pop_shortest(self) -> list[int]:
        self.lengths.pop(0)
        return self.docs.pop(0)


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of rows of seq_len + 1 tokens."""
    return rows[:, :-1], rows[:, 1:]


def to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows onto the device: through pinned memory, asynchronously, on CUDA."""
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


class BestFitPacker:
    """Rows of seq_len + 1 tokens packed from a buffer of BOS-started documents by best fit.

    Subclasses say where documents come from (``_refill`` keeps ``self.buffer`` full) and
    set ``batch_size``, ``seq_len`` and ``device``; the packing and batching are shared by
    pretraining (text shards) and midtraining (rendered conversations).
    """

    batch_size: int
    seq_len: int
    device: torch.device
    buffer: _Buffer

    def _refill(self) -> None:
        raise NotImplementedError

    def next_row(self) -> list[int]:
        """One row of seq_len + 1 tokens, starting with BOS, no padding."""
        size = self.seq_len + 1
        row: list[int] = []
        while len(row) < size:
            self._refill()
            doc = self.buffer.pop_longest_fitting(size - len(row))
            if doc is None:
                doc = self.buffer.pop_shortest()[: size - len(row)]
            row += doc
        return row

    def next_rows(self) -> torch.Tensor:
        """The next batch's rows, on the CPU."""
        return torch.tensor([self.next_row() for _ in range(self.batch_size)], dtype=torch.long)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return split_rows(to_device(self.next_rows(), self.device))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def buffer_state(self) -> list[list[int]]:
        return [list(doc) for doc in self.buffer.docs]

    def load_buffer(self, docs) -> None:
        self.buffer = _Buffer()
        for doc in docs:
            self.buffer.add(list(doc))


class ShardStream(BestFitPacker):
    """One stream of packed rows: its own row groups in order, epoch after epoch, and its
    own buffer. ``files`` (shared by a loader's streams) keeps each shard open once."""

    def __init__(self, loader: PackedLoader, groups: list[tuple[int, int]]):
        self.loader, self.groups = loader, groups
        self.batch_size, self.seq_len, self.device = (
            loader.batch_size,
            loader.seq_len,
            loader.device,
        )
        self.epoch = 0
        self.cursor = 0  # index into groups of the next row group to read
        self.buffer = _Buffer()

    def _read_next_group(self) -> list[str]:
        if self.cursor >= len(self.groups):
            self.epoch += 1
            self.cursor = 0
        shard, rg = self.groups[self.cursor]
        texts = self.loader.read_group(shard, rg)
        self.cursor += 1  # only past a group that was read: a resumed state stays exact
        return texts

    def _refill(self) -> None:
        while len(self.buffer) < self.loader.buffer_docs:
            for doc in tokenized(self._read_next_group(), self.loader.tokenizer):
                self.buffer.add(doc)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "buffer": self.buffer_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.load_buffer(state["buffer"])


class PackedLoader:
    """Yields (inputs, targets) of shape (batch, seq_len) for one rank, forever (epochs).

    The data is cut into ``streams`` streams, one per process of the run when it started:
    stream s reads the row groups s, s+S, s+2S, ... and gives each step ``accumulation``
    micro-batches in a row. A run resumed on another number of processes W keeps its S
    streams and deals them out again (``load_shards``), so every step trains on the rows it
    would have: with W dividing S, rank r reads streams r, r+W, ... one after another; with
    S dividing W, the W/S ranks that share a stream each read it whole and keep every
    (W/S)-th micro-batch (its tokenization done W/S times: the price of growing).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        buffer_docs: int = DEFAULT_BUFFER_DOCS,
        accumulation: int = 1,
    ):
        if not paths:
            raise ValueError("no shards to read")
        self.paths = [Path(p) for p in paths]
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.buffer_docs = buffer_docs
        self.micro_batches = world_size * accumulation  # of every process, in one step
        shards.check_sizes(self.paths)
        self.groups = row_groups(self.paths)
        self._files: dict[int, object] = {}
        self.deal(world_size)

    def deal(self, streams: int) -> None:
        """Cut the data into ``streams`` streams and give this rank its share (fresh
        positions): its own streams, or its turn on a stream it shares."""
        world = self.world_size
        if streams % world and world % streams:
            raise ValueError(
                f"the data has {streams} streams (the process count the run started with): "
                f"resume on a number of processes that divides it or is a multiple of it, "
                f"not {world}"
            )
        if self.micro_batches % streams:
            raise ValueError(
                f"{self.micro_batches} micro-batches a step cannot come from {streams} streams"
            )
        if len(self.groups) < streams:
            raise ValueError(
                f"{len(self.groups)} row group(s) cannot feed {streams} ranks: download more shards"
            )
        self.n_streams = streams
        self.per_stream = self.micro_batches // streams  # micro-batches a stream gives a step
        self.share = max(1, world // streams)  # ranks reading each stream
        self.my_streams = list(range(self.rank % streams, streams, world))
        self.streams = [ShardStream(self, self.groups[s::streams]) for s in self.my_streams]
        self.turn = 0  # micro-batches this rank has taken in the current step

    @property
    def epoch(self) -> int:
        """Full passes over its row groups of this rank's slowest stream."""
        return min(stream.epoch for stream in self.streams)

    def read_group(self, shard: int, rg: int) -> list[str]:
        path = self.paths[shard]
        if shard not in self._files:
            self._files[shard] = shards.open_shard(path)  # sha256 on first open
        return shards.read_texts(self._files[shard], path, rg)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: from its streams in turn, ``per_stream`` each a
        step; on a shared stream, the rank's own one of each ``share`` in a row."""
        mine = self.per_stream // self.share  # micro-batches a step from each of my streams
        stream = self.streams[self.turn // mine]
        self.turn = (self.turn + 1) % (mine * len(self.streams))
        if self.share == 1:
            return stream.next_batch()
        keep = self.rank // self.n_streams  # only that one goes to the device
        rows = [stream.next_rows() for _ in range(self.share)][keep]
        return split_rows(to_device(rows, self.device))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # --- resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's streams by their index (any process count can load them back)."""
        return {
            "streams": self.n_streams,
            "turn": self.turn,
            "positions": {
                s: st.state_dict() for s, st in zip(self.my_streams, self.streams, strict=True)
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Load this rank's streams from a state holding at least them: one rank's saved
        state on the same process count, or (``load_shards``) the union of every rank's."""
        state = _stream_state(state)
        if state["streams"] != self.n_streams:
            self.deal(state["streams"])
        missing = [s for s in self.my_streams if s not in state["positions"]]
        if missing:
            raise ValueError(f"the data position lacks the stream(s) {missing} of rank {self.rank}")
        for s, stream in zip(self.my_streams, self.streams, strict=True):
            stream.load_state_dict(state["positions"][s])
        self.turn = int(state["turn"])

    def load_shards(self, states: Sequence[dict]) -> None:
        """Load every rank's saved position of a run on another number of processes: the
        same streams, dealt to this run's ranks (a position saved mid-step cannot be)."""
        merged: dict = {"streams": None, "turn": 0, "positions": {}}
        for state in map(_stream_state, states):
            if merged["streams"] not in (None, state["streams"]):
                raise ValueError("the ranks' data positions disagree on the number of streams")
            if state["turn"]:
                raise ValueError("a data position saved mid-step cannot be dealt to other ranks")
            merged["streams"] = state["streams"]
            merged["positions"].update(state["positions"])
        self.load_state_dict(merged)

    def describe_sharing(self) -> str:
        """How this run reads the streams, for the resume's log line."""
        if self.share == 1:
            return f"{self.n_streams} data stream(s), {len(self.streams)} per process"
        return (
            f"{self.n_streams} data stream(s) for {self.world_size} processes: {self.share} "
            "read each one and keep their share of it"
        )


def _stream_state(state: dict) -> dict:
    """A saved loader state in the per-stream form; one from before it (rank, world_size,
    epoch, cursor, buffer: a stream per rank, as now) is its rank's stream."""
    if "positions" in state:
        return state
    stream = {k: state[k] for k in ("epoch", "cursor", "buffer")}
    return {"streams": state["world_size"], "turn": 0, "positions": {state["rank"]: stream}}


class EvalRows:
    """The rows a bits-per-byte evaluation scores, the same on every call and every run.

    The shards' documents in order, each with BOS prepended, make one token stream; row i is
    stream[i*T : i*T + T + 1], so consecutive rows overlap by one token and every token after
    the first is a target exactly once. At most ``max_rows`` rows are read (the last one
    padded: inputs 0, targets -1, which the loss ignores); only the row groups needed are
    tokenized, once. ``batches(rank, world_size)`` deals whole batches round-robin to ranks
    (a rank may get none; the loss sums are all-reduced).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        max_rows: int,
        device: str | torch.device = "cpu",
    ):
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, torch.device(device)
        need = max_rows * seq_len + 1
        stream: list[int] = []
        for path in map(Path, paths):
            pf = shards.open_shard(path)
            for rg in range(pf.num_row_groups):
                for doc in tokenized(shards.read_texts(pf, path, rg), tokenizer):
                    stream += doc
                if len(stream) >= need:
                    break
            if len(stream) >= need:
                break
        if len(stream) < 2:
            raise ValueError(f"{len(stream)} token(s) to evaluate in {[str(p) for p in paths]}")
        stream = stream[:need]
        n_rows = -(-(len(stream) - 1) // seq_len)
        rows = torch.full((n_rows, seq_len + 1), -1, dtype=torch.int32)  # half the memory
        for i in range(n_rows):
            piece = stream[i * seq_len : i * seq_len + seq_len + 1]
            rows[i, : len(piece)] = torch.tensor(piece)
        self.rows = rows
        self.tokens = len(stream) - 1  # targets scored

    def batches(
        self, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(rank * self.batch_size, len(self.rows), world_size * self.batch_size):
            rows = self.rows[start : start + self.batch_size].long()
            if len(rows) < self.batch_size:  # the same shape every batch (compiled models)
                pad = torch.full((self.batch_size - len(rows), self.seq_len + 1), -1)
                rows = torch.cat((rows, pad))
            rows = to_device(rows, self.device)
            yield rows[:, :-1].clamp(min=0), rows[:, 1:]
