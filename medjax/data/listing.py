"""Datasets listed before they are read.

A `Listing` names the examples of one split (their ids, plus the facts a loader knows from the
file names alone: a class folder, a slice index, a case) and reads any subset of them on
request. Validation splits, `max_examples` caps and data shards are cut on the listing, so a
process of a multi-host run reads the files of its own examples only
(`medjax.train.task.owned_examples`), and a one-process run reads exactly what it did before.

Readers whose examples come out of one file (a MedMNIST `.npz`, slices of a volume, a DICOM
exam) list what they have already read (`Listing.of_arrays`, `Listing.of_examples`): there,
every process reads the file and keeps its part.

A listing reads in the loader's own form: a list of example dicts
(`medjax.data.sources`), or a dict of stacked arrays (`medjax.data.image_sets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def _serial(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in items]


@dataclasses.dataclass(frozen=True)
class Listing(Generic[T]):
    """The examples of one split, not yet read.

    Attributes:
      ids: one id per example, in the loader's order.
      reader: positions (increasing) -> those examples, read, in the loader's form.
      meta: per-example facts known without reading (`[N]` arrays, e.g. "label", "slice_index").
      where: the folder or file, for messages.
    """

    ids: tuple[str, ...]
    reader: Callable[[list[int]], T]
    meta: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    where: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: Sequence[int] | np.ndarray) -> Listing[T]:
        """The examples at `positions` (in that order), still unread."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"positions outside 0..{len(self) - 1} of the listing of {self.where}")
        reader = self.reader
        return Listing(
            tuple(self.ids[i] for i in pos),
            lambda sub: reader([int(pos[j]) for j in sub]),
            {k: np.asarray(v)[pos] for k, v in self.meta.items()},
            self.where,
        )

    def head(self, n: int) -> Listing[T]:
        """The first `n` examples (all of them when `n <= 0`)."""
        return self if int(n) <= 0 else self.take(np.arange(min(int(n), len(self))))

    def map(self, fn: Callable[[T], Any]) -> Listing[Any]:
        """The same examples, `fn` applied to whatever a selection reads as."""
        reader = self.reader
        return Listing(self.ids, lambda pos: fn(reader(pos)), self.meta, self.where)

    def read(self) -> T:
        """Every listed example, read."""
        if not len(self):
            raise ValueError(f"no examples to read in {self.where or 'the listing'}")
        return self.reader(list(range(len(self))))

    @classmethod
    def of_files(
        cls,
        ids: Sequence[str],
        items: Sequence[Any],
        read_one: Callable[[Any], Any],
        combine: Callable[[list[Any]], T] = list,
        *,
        meta: Mapping[str, Sequence[Any]] | None = None,
        where: str = "",
        map_fn: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]] = _serial,
    ) -> Listing[T]:
        """Example `i` is `read_one(items[i])` (through `map_fn`, e.g. a thread pool); a
        selection is `combine`d (default: the list)."""
        items = list(items)
        if len(ids) != len(items):
            raise ValueError(f"{len(ids)} ids for {len(items)} items in {where}")
        return cls(
            tuple(str(i) for i in ids),
            lambda pos: combine(map_fn(read_one, [items[i] for i in pos])),
            {k: np.asarray(v) for k, v in (meta or {}).items()},
            where,
        )

    @classmethod
    def of_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        *,
        ids: Sequence[str] | None = None,
        meta_keys: Sequence[str] = (),
        where: str = "",
    ) -> Listing[dict[str, np.ndarray]]:
        """Arrays already in memory (`{key: [N, ...]}`); a selection is their rows."""
        data = {k: np.asarray(v) for k, v in arrays.items()}
        n = len(next(iter(data.values()))) if data else 0
        names = [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)]
        return cls(
            tuple(names),
            lambda pos: {k: v[np.asarray(pos, np.int64)] for k, v in data.items()},
            {k: data[k] for k in meta_keys if k in data},
            where,
        )

    @classmethod
    def of_examples(
        cls,
        examples: Sequence[dict[str, Any]],
        *,
        meta_keys: Sequence[str] = ("slice_index", "case"),
        where: str = "",
    ) -> Listing[list[dict[str, Any]]]:
        """Example dicts already in memory; a selection is the list of them."""
        exs = list(examples)
        meta = {
            k: np.asarray([ex[k] for ex in exs])
            for k in meta_keys
            if exs and all(k in ex for ex in exs)
        }
        return cls(
            tuple(str(ex["id"]) for ex in exs), lambda pos: [exs[i] for i in pos], meta, where
        )
