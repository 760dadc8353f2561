"""The window's per-task sums in typed arrays: under 100 bytes a task instead of a kilobyte.

At ten million rows in the window the exporter holds about 430,000 tasks. As Python objects
(a ``Task``, its id string, its sums, a dict entry, an impact) each cost about a kilobyte. Here
a task is a slot number in a few ``array``s: its id is a few bytes of one blob (a UUID its 16
bytes and a mark, not 36 characters), found through an open-addressing index of slot numbers,
its dollars are int64 (exporter/summary.py's amounts; the rare one that does not fit is kept
aside), and a task that used several provider families chains one row per family but its
first in a few more arrays (the first family's sums are the task's totals less the rows'). Rows
are folded straight into the arrays; a task is read as a ``Task`` object, made on demand.

Each task's latest row is also filed by its hour, so the tasks whose latest row is in a span
(the ones leaving the window, or crossing the grace cutoff) are found without a sorted index.
Times are integers, microseconds since the Unix epoch (``micros``): the window's SQL sends them
so, and a ``datetime`` per task cost a rebuild more than folding its sums.
An hour's list is only appended to: a task whose latest row moved keeps a stale entry, which
``within`` skips by checking the task's time.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from exporter.incremental import Count
from exporter.summary import Amount


@dataclass(slots=True)
class Share:
    """A task's sums of one provider family, once it has used several."""

    cost: Amount
    tokens: Count
    listed: Amount


@dataclass(slots=True)
class Task:
    """One task's valid spend, by provider family, and its latest valid row's labels.

    What the summary reads, made from a ``TaskStore`` on demand; held as is only for the few
    tasks with rows after the watermark. Most tasks use one provider family, so the per-family
    split is a dict only for the few that use several.
    """

    cost: Amount = 0
    tokens: Count = 0  # an int but for a numeric column's fraction
    listed: Amount = 0  # list-price value of its priced calls
    last_us: int | None = None  # the latest valid row's time (``micros``)
    quest: str | None = None
    layer: str | None = None
    family: str | None = None  # the only family so far (None: none yet, or several)
    shares: dict[str, Share] | None = None  # by family, once several

    def add(self, family: str, cost: Amount, tokens: Count, listed: Amount) -> None:
        if self.shares is None and self.family != family:
            if self.family is None:  # the first sum of this task
                self.family = family
            else:
                self.shares = {self.family: Share(self.cost, self.tokens, self.listed)}
                self.family = None
        if self.shares is not None:
            share = self.shares.get(family)
            if share is None:
                self.shares[family] = Share(cost, tokens, listed)
            else:
                share.cost += cost
                share.tokens += tokens
                share.listed += listed
        self.cost += cost
        self.tokens += tokens
        self.listed += listed

    def by_family(self) -> Iterable[tuple[str, Amount, Count, Amount]]:
        if self.shares is not None:
            return ((f, s.cost, s.tokens, s.listed) for f, s in self.shares.items())
        if self.family is None:
            return ()
        return ((self.family, self.cost, self.tokens, self.listed),)

    def label(self, last_us: int, quest: str | None, layer: str | None) -> None:
        """Take the labels of a later row; on a tie the later part (larger ids) wins."""
        if self.last_us is None or last_us >= self.last_us:
            self.last_us, self.quest, self.layer = last_us, _intern(quest), _intern(layer)

    def merged(self, tail: Task) -> Task:
        """This task with the rows of a later part added (a copy: self is kept as is)."""
        out = Task(
            self.cost, self.tokens, self.listed, self.last_us, self.quest, self.layer, self.family
        )
        if self.shares is not None:
            out.shares = {f: Share(s.cost, s.tokens, s.listed) for f, s in self.shares.items()}
        for family, cost, tokens, listed in tail.by_family():
            out.add(family, cost, tokens, listed)
        if tail.last_us is not None:
            out.label(tail.last_us, tail.quest, tail.layer)
        return out


def _intern(value: str | None) -> str | None:
    """One string object per distinct label value, however many tasks carry it."""
    return None if value is None else sys.intern(value)


class Tasks(dict[str, Task]):
    """Tasks as objects, folded into as a ``TaskStore`` is (the few with rows after the
    watermark)."""

    def _task(self, task_id: str) -> Task:
        task = self.get(task_id)
        if task is None:
            task = self[task_id] = Task()
        return task

    def add(self, task_id: str, family: str, cost: Amount, tokens: Count, listed: Amount) -> None:
        self._task(task_id).add(family, cost, tokens, listed)

    def label(self, task_id: str, last_us: int, quest: str | None, layer: str | None) -> None:
        self._task(task_id).label(last_us, quest, layer)


_EMPTY, _GONE = 0, -1  # index entries besides slot + 1
_NO_TIME = -(2**63)
_NO_FAMILY, _END = -1, -1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HOUR = 3_600_000_000  # microseconds
_UUID = 0xFF  # the first byte of a UUID's key: a byte UTF-8 never holds
_UUID_MARK = bytes([_UUID])
_UUID_KEY = 17  # a UUID's key: the mark and its 16 bytes


def _index_size(tasks: int) -> int:
    """Index entries for ``tasks`` ids: twice as many (8 at least), positions taken modulo
    the size. Rounded up to a power of two it held up to twice as many again: sized for
    420,000 tasks, 4.0 MiB against 3.2 (inserting them as fast; a lookup about 80 ns more)."""
    return max(8, 2 * tasks + 2)


def _key(task_id: str) -> bytes:
    """What the index hashes and the blob holds of an id.

    A canonical UUID (lowercase and hyphenated, as PostgreSQL prints its ``uuid`` type and
    Python's ``str(uuid)``) is ``_UUID`` and its 16 bytes: 17 bytes instead of 37, about 9 MiB
    less at 430,000 tasks (bench.store). Any other id is its UTF-8 and the NUL that ends it
    (text never holds one). UTF-8 never holds the byte ``_UUID``, so neither form begins the
    other: a match at an id's start is the whole id, and an id reads back as it was written (an
    uppercase UUID is not canonical, and is kept as text)."""
    if len(task_id) == 36 and task_id[8] == task_id[13] == task_id[18] == task_id[23] == "-":
        digits = task_id.replace("-", "")
        try:
            packed = bytes.fromhex(digits)  # skips whitespace: the round trip below does not
        except ValueError:
            packed = b""
        if len(packed) == 16 and packed.hex() == digits:
            return _UUID_MARK + packed
    return task_id.encode() + b"\0"


def _held_key(blob: bytearray, start: int) -> bytes:
    """The ``_key`` the blob holds at ``start``."""
    end = start + _UUID_KEY if blob[start] == _UUID else blob.index(0, start) + 1
    return bytes(blob[start:end])


def _uuid_text(packed: bytes | bytearray) -> str:
    """A packed UUID's canonical text."""
    h = packed.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def micros(ts: datetime) -> int:
    """An instant as the store keeps it: microseconds since the Unix epoch."""
    return (ts - _EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
    """The instant of ``micros``' integer."""
    return _EPOCH + timedelta(microseconds=us)


class _Triples:
    """(cost, tokens, listed) per row, exact: int64 arrays for the amounts and int32 for the
    tokens (a task's lifetime tokens are rarely past two billion: 2.3 MiB less of the peak
    RSS at 10 M rows in the window, 119.7 against 117.3 and 117.4 MiB), and a dict for a row
    that does not fit (a Decimal amount, or a sum past its column's integers)."""

    def __init__(self) -> None:
        self.cols = (array("q"), array("i"), array("q"))
        self.big: dict[int, tuple[Amount, Count, Amount]] = {}

    def append(self) -> int:
        cost, tokens, listed = self.cols
        cost.append(0)
        tokens.append(0)
        listed.append(0)
        return len(cost) - 1

    def get(self, row: int) -> tuple[Amount, Count, Amount]:
        big = self.big.get(row)
        if big is not None:
            return big
        cost, tokens, listed = self.cols
        return cost[row], tokens[row], listed[row]

    def set(self, row: int, values: tuple[Amount, Count, Amount]) -> None:
        self.big.pop(row, None)
        try:
            for col, value in zip(self.cols, values, strict=True):
                col[row] = value  # type: ignore[assignment]  # a Decimal raises TypeError
        except (OverflowError, TypeError):
            self.big[row] = values

    def add(self, row: int, values: tuple[Amount, Count, Amount]) -> None:
        big = self.big.get(row) if self.big else None
        if big is None:  # the usual case, in place: a value that does not fit raises
            cost, tokens, listed = self.cols
            sums = (cost[row] + values[0], tokens[row] + values[1], listed[row] + values[2])
            try:
                cost[row], tokens[row], listed[row] = sums  # type: ignore[assignment]
                return
            except (OverflowError, TypeError):  # columns set before it are hidden by big
                self.big[row] = sums
                return
        self.set(row, (big[0] + values[0], big[1] + values[1], big[2] + values[2]))


class _Codes:
    """A small integer per distinct label value (quests, layers, provider families)."""

    def __init__(self) -> None:
        self.values: list[str | None] = [None]
        self.codes: dict[str | None, int] = {None: 0}

    def code(self, value: str | None) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.values)
            self.values.append(value)
        return code


class TaskStore:
    """Tasks by id: their sums (as ``Task``), their latest impact, and an index by time."""

    def __init__(self, expected: int = 0) -> None:
        """``expected``: how many tasks it is likely to hold (a rebuild's: as many as the
        store it replaces), so that its index is not grown step by step, each step hashing
        every id again (0.65 s of a rebuild of 423,000 tasks)."""
        self._blob = bytearray()  # every id's ``_key``: a packed UUID, or UTF-8 and a NUL
        self._start = array("I")  # slot -> where its id starts in the blob (of up to 4 GiB)
        self._alive = bytearray()  # slot -> 1 while held
        # hash of an id's ``_key`` (randomized per process, as str's) -> slot + 1, _EMPTY or _GONE
        self._index = array("i", bytes(4 * _index_size(expected)))
        self._used = 0  # index entries not _EMPTY
        self._free: list[int] = []
        self._live = 0
        self._totals = _Triples()
        self._time = array("q")  # the latest row's time (``micros``, or _NO_TIME)
        # label codes: two bytes while there are fewer than 65,536 distinct values (_widen)
        self._quest = array("H")
        self._layer = array("H")
        self._family = array("i")  # a family code, _NO_FAMILY, or -2 - the first share row
        self._impact = array("d")  # NaN: none measured
        self._labels = _Codes()
        # A task that used several families: one row per family but its first, whose sums are
        # the task's totals less the rows' (a row fewer per such task: 28 bytes each).
        self._shares = _Triples()
        self._share_family = array("i")
        self._share_next = array("i")
        self._share_first = array("i")  # at a task's first row: its first family's code
        self._share_free: list[int] = []
        self._hours: dict[int, array[int]] = {}
        # The id ``_slot`` last found, and its slot: a rebuild's row adds to, labels and sets
        # the impact of one task, and each lookup hashes and compares its id.
        self._last_id: str | None = None
        self._last_slot = -1

    # -- ids --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._live

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and self._find(_key(task_id))[1] >= 0

    def __iter__(self) -> Iterator[str]:
        for slot, alive in enumerate(self._alive):
            if alive:
                yield self._id(slot)

    def _id(self, slot: int) -> str:
        blob, start = self._blob, self._start[slot]
        if blob[start] == _UUID:
            return _uuid_text(blob[start + 1 : start + _UUID_KEY])
        return blob[start : blob.index(0, start)].decode()

    def _find(self, key: bytes) -> tuple[int, int]:
        """(index position, slot): the slot holding the id of ``key`` (``_key``), or -1 and
        the position to file it at."""
        blob, start, index = self._blob, self._start, self._index
        size = len(index)
        position, reuse = hash(key) % size, -1
        while True:
            entry = index[position]
            if entry > 0:  # a slot + 1: its id is the key's if the blob holds the key there
                if blob.startswith(key, start[entry - 1]):
                    return position, entry - 1
            elif entry == _EMPTY:
                return (position if reuse < 0 else reuse), -1
            elif reuse < 0:  # _GONE: the first such entry is where a new id is filed
                reuse = position
            position = position + 1 if position + 1 < size else 0

    def _slot(self, task_id: str) -> int:
        """The slot of ``task_id``, a new one if it is not held."""
        if task_id == self._last_id:
            return self._last_slot
        key = _key(task_id)
        position, slot = self._find(key)
        if slot < 0:
            slot = self._new_slot(key, position)
        self._last_id, self._last_slot = task_id, slot
        return slot

    def _new_slot(self, key: bytes, position: int) -> int:
        if self._free:
            slot = self._free.pop()
            self._start[slot] = len(self._blob)
            self._alive[slot] = 1
            self._totals.set(slot, (0, 0, 0))
            self._time[slot], self._impact[slot] = _NO_TIME, math.nan
            self._quest[slot] = self._layer[slot] = 0
            self._family[slot] = _NO_FAMILY
        else:
            slot = len(self._start)
            self._start.append(len(self._blob))
            self._alive.append(1)
            self._totals.append()
            self._time.append(_NO_TIME)
            self._impact.append(math.nan)
            for col in (self._quest, self._layer):
                col.append(0)
            self._family.append(_NO_FAMILY)
        self._blob += key
        if self._index[position] == _EMPTY:
            self._used += 1
        self._index[position] = slot + 1
        self._live += 1
        if self._used * 10 >= len(self._index) * 7:
            self._reindex()
        return slot

    def _reindex(self) -> None:
        """Twice as many index entries as tasks (at least), and no _GONE ones; or twice as
        many as before if the tasks grew past 60 % of it (not tasks coming and going), so
        that a store growing from empty hashes its ids about twice over, not once per 40 %
        more tasks: inserting 430,000 ids 1.43 s against 1.82 (a first rebuild, not sized
        for its tasks). Every id held is distinct, so each takes the first empty entry from
        its hash (of its ``_key``, read from the blob as they are)."""
        size = _index_size(self._live)
        if self._live * 10 >= len(self._index) * 6:
            size = max(size, 2 * len(self._index))
        index = array("i", bytes(4 * size))
        blob, start = self._blob, self._start
        for slot, alive in enumerate(self._alive):
            if alive:
                position = hash(_held_key(blob, start[slot])) % size
                while index[position] != _EMPTY:
                    position = position + 1 if position + 1 < size else 0
                index[position] = slot + 1
        self._index, self._used = index, self._live

    def pop(self, task_id: str) -> None:
        """Forget a task, if held."""
        position, slot = self._find(_key(task_id))
        if slot < 0:
            return
        if task_id == self._last_id:
            self._last_id = None
        self._index[position] = _GONE
        self._drop_shares(slot)
        self._totals.set(slot, (0, 0, 0))
        self._alive[slot] = 0
        self._time[slot] = _NO_TIME
        self._free.append(slot)
        self._live -= 1

    # -- sums -------------------------------------------------------------------------------

    def ensure(self, task_id: str) -> None:
        """Hold ``task_id`` (with no sums if it was not held)."""
        self._slot(task_id)

    def add(self, task_id: str, family: str, cost: Amount, tokens: Count, listed: Amount) -> None:
        """Fold one row's sums into a task, as ``Task.add`` does."""
        slot, code, values = self._slot(task_id), self._labels.code(family), (cost, tokens, listed)
        held = self._family[slot]
        if held == _NO_FAMILY:
            self._family[slot] = code
        elif held >= 0:
            if held != code:  # a second family: a row of its own, the first's code with it
                row = self._new_share(code, values, _END)
                self._share_first[row] = held
                self._family[slot] = -2 - row
        elif self._share_first[-2 - held] != code:  # several already; not the first family
            row = -2 - held
            while self._share_family[row] != code and self._share_next[row] != _END:
                row = self._share_next[row]
            if self._share_family[row] == code:
                self._shares.add(row, values)
            else:
                self._share_next[row] = self._new_share(code, values, _END)
        self._totals.add(slot, values)

    def label(self, task_id: str, last_us: int, quest: str | None, layer: str | None) -> None:
        """Take the labels of a later row, as ``Task.label`` does."""
        slot = self._slot(task_id)
        held = self._time[slot]
        if held == _NO_TIME or last_us >= held:
            quest_code, layer_code = self._labels.code(quest), self._labels.code(layer)
            try:
                self._quest[slot], self._layer[slot] = quest_code, layer_code
            except OverflowError:
                self._widen()
                self._quest[slot], self._layer[slot] = quest_code, layer_code
            self._time[slot] = last_us
            if held == _NO_TIME or held // _HOUR != last_us // _HOUR:
                self._hours.setdefault(last_us // _HOUR, array("i")).append(slot)

    def _widen(self) -> None:
        """Four-byte label codes, once the distinct labels outnumber two bytes' codes."""
        self._quest, self._layer = array("i", self._quest), array("i", self._layer)

    def _new_share(self, family: int, values: tuple[Amount, Count, Amount], after: int) -> int:
        if self._share_free:
            row = self._share_free.pop()
            self._share_family[row], self._share_next[row] = family, after
        else:
            row = self._shares.append()
            self._share_family.append(family)
            self._share_next.append(after)
            self._share_first.append(_NO_FAMILY)
        self._shares.set(row, values)
        return row

    def _drop_shares(self, slot: int) -> None:
        held = self._family[slot]
        row = -2 - held if held < _NO_FAMILY else _END
        while row != _END:
            self._shares.set(row, (0, 0, 0))
            self._share_free.append(row)
            row = self._share_next[row]
        self._family[slot] = _NO_FAMILY

    def get(self, task_id: str) -> Task | None:
        """A copy of a held task's sums and labels (changing it changes nothing held)."""
        slot = self._find(_key(task_id))[1]
        return None if slot < 0 else self._task(slot)

    def items(self) -> Iterator[tuple[str, Task, float | None]]:
        """Every held task: its id, a copy of its sums and labels, and its impact."""
        for slot, alive in enumerate(self._alive):
            if alive:
                yield self._id(slot), self._task(slot), self._impact_at(slot)

    def _task(self, slot: int) -> Task:
        cost, tokens, listed = self._totals.get(slot)
        values = self._labels.values
        micros = self._time[slot]
        task = Task(
            cost,
            tokens,
            listed,
            None if micros == _NO_TIME else micros,
            values[self._quest[slot]],
            values[self._layer[slot]],
        )
        held = self._family[slot]
        if held >= 0:
            task.family = values[held]
        elif held != _NO_FAMILY:  # several: the first family's sums are what the rows leave
            row = -2 - held
            first = values[self._share_first[row]]
            others: dict[str, Share] = {}
            left = Share(cost, tokens, listed)
            while row != _END:
                share = Share(*self._shares.get(row))
                others[values[self._share_family[row]]] = share  # type: ignore[index]
                left = Share(
                    left.cost - share.cost, left.tokens - share.tokens, left.listed - share.listed
                )
                row = self._share_next[row]
            task.shares = {first: left, **others}  # type: ignore[dict-item]
        return task

    # -- impacts and time -------------------------------------------------------------------

    def impact(self, task_id: str) -> float | None:
        slot = self._find(_key(task_id))[1]
        return None if slot < 0 else self._impact_at(slot)

    def _impact_at(self, slot: int) -> float | None:
        impact = self._impact[slot]
        return None if math.isnan(impact) else impact

    def set_impact(self, task_id: str, impact: float | None) -> None:
        """Record a task's latest impact (``None``: none measured), holding it if it was not."""
        self._impact[self._slot(task_id)] = math.nan if impact is None else impact

    def within(self, low: int | None, high: int) -> Iterator[str]:
        """The held tasks whose latest row is at ``low`` or later and before ``high`` (each at
        most once; ``micros``)."""
        start = _NO_TIME + 1 if low is None else low  # a task with no time is in none
        end = high
        first = None if low is None else start // _HOUR
        seen = set()
        for hour in sorted(h for h in self._hours if (first is None or h >= first)):
            if hour > end // _HOUR:
                break
            for slot in self._hours[hour]:
                if self._alive[slot] and start <= self._time[slot] < end and slot not in seen:
                    seen.add(slot)
                    yield self._id(slot)

    def forget_before(self, us: int) -> None:
        """Drop the hours wholly before ``us`` (``micros``): no task held should be filed
        there any more."""
        last = us // _HOUR
        for hour in [h for h in self._hours if h < last]:
            del self._hours[hour]
