"""The relational stage of a shard build, in DuckDB: out of core, its memory capped by a setting.

The line scanners (mmscale/build/raw.py) hand over every readable item and interaction row; DuckDB finds the
unknown items and duplicates, applies the rating filter and the k-core, numbers users and items, draws the cold
items, splits each user's sequence leave-one-out by time and orders the samples. What the shard writers need
is left in the work folder as files any process (or node, on a shared file system) can open:

    items.parquet                 i, raw id, text, image path: the kept items in index order
    SPLIT.parquet                 n, user, position, target: the samples of each split in shard order
    warm_text.bin, warm_indptr.npy  each user's warm items by time (CSR), as JSON text: item k's decimal digits and
                                    ", " start at warm_digits[k] + 2k, so a sample's history is one slice of text
    warm_digits.npy                 prefix sums of the decimal digits of the warm items (where a history's text lies)

DuckDB rather than Polars: its sorts, joins and window functions spill to disk under one memory limit, it
reads and writes Parquet itself, and it needs no Arrow or pandas in the install.
"""

from __future__ import annotations

import json
import random
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

import duckdb
import numpy as np

from .raw import BadInputError, Ledger, RawFormat

CHUNK_ROWS = 1 << 22  # rows per fetch when a table is exported to numpy: bounds the memory of every export
PLAN_ROWS = 1 << 20  # samples per chunk while planning the shards (with their header sizes: ~100 MB)
TEXT_ROWS = 1 << 16  # items per string joined into the history text: a whole chunk's 4M Python strings held 600 MiB


def natural_order(column: str) -> str:
    """ORDER BY terms for ids in natural order: numbers by value (any length), then other ids by code point."""
    digits = f"regexp_full_match({column}, '[0-9]+')"
    return (f"NOT {digits}, CASE WHEN {digits} THEN length(ltrim({column}, '0')) END, "
            f"CASE WHEN {digits} THEN ltrim({column}, '0') END, {column}")


class Relations:
    """One build's DuckDB database in `work`, and the relational steps in the order the build runs them."""

    def __init__(self, work: Path, fmt: RawFormat, raw_dir: Path, ledger: Ledger, memory_limit_mb: int, threads: int):
        self.work, self.fmt, self.raw_dir, self.ledger = work, fmt, raw_dir, ledger
        self.db = duckdb.connect(str(work / "relational.duckdb"), config={
            "memory_limit": f"{memory_limit_mb}MB", "temp_directory": str(work / "spill"), "threads": threads})

    def close(self) -> None:
        self.db.close()

    def _count(self, query: str, params: list | None = None) -> int:
        return self.db.execute(f"SELECT count(*) FROM ({query})", params or []).fetchone()[0]

    def _record(self, kind: str, query: str, file: Path | str, fld: str, message, total: int | None = None) -> int:
        """Ledger entries for the rows of `query` (line first; `total` of them when known): the first few as examples,
        the rest counted. Returns how many."""
        total = self._count(query) if total is None else total
        if not total:
            return 0
        first = self.db.execute(f"SELECT * FROM ({query}) ORDER BY line LIMIT 5").fetchall()
        for row in first:
            self.ledger.record(kind, file, row[0], fld, message(*row[1:]))
        self.ledger.counts[kind] += total - len(first)
        return total

    # -- reading ---------------------------------------------------------------------------------------------------
    def load_items(self, parts: list[Path]) -> None:
        """The scanned items; a repeated id keeps its first line, and field problems count for kept lines only."""
        path = self.raw_dir / self.fmt.items_file
        self.db.execute(
            "CREATE TABLE items_read AS SELECT *, row_number() OVER (PARTITION BY id ORDER BY line) > 1 AS repeated "
            "FROM read_json($1, format='newline_delimited', columns={line: 'BIGINT', id: 'VARCHAR', text: 'VARCHAR', "
            "image: 'VARCHAR', problems: 'VARCHAR'})", [[str(p) for p in parts]])
        self._record("duplicate_item", "SELECT line, id FROM items_read WHERE repeated", path, self.fmt.item_id_field,
                     lambda raw_id: f"item {raw_id} listed again")
        problems = self.db.execute("SELECT line, problems FROM items_read WHERE NOT repeated AND problems <> '[]' ORDER BY line")
        while rows := problems.fetchmany(10_000):
            for line, found in rows:
                for kind, fld, message in json.loads(found):
                    self.ledger.record(kind, path, line, fld, message)
        self.db.execute("CREATE TABLE items AS SELECT line, id, text, image FROM items_read WHERE NOT repeated")
        self.db.execute("DROP TABLE items_read")
        if not self._count("SELECT * FROM items"):
            raise BadInputError(f"{path}: no item could be read (empty, or every line is bad input)")

    def load_interactions(self, parts: list[Path]) -> dict:
        """The scanned rows less unknown items and repeats (the first line wins); returns the raw counts."""
        fmt, path = self.fmt, self.raw_dir / self.fmt.interactions_file
        self.db.execute(
            "CREATE TABLE rows_read AS SELECT * FROM read_csv($1, header=false, delim=',', quote='\"', escape='\"', "
            "auto_detect=false, max_line_size=16777216, columns={line: 'BIGINT', user: 'VARCHAR', item: 'VARCHAR', "
            "ts: 'DOUBLE', rating: 'DOUBLE'})", [[str(p) for p in parts]])
        unknown = self._record("unknown_item", "SELECT line, item FROM rows_read ANTI JOIN items ON rows_read.item = items.id",
                               path, fmt.item_column, lambda item: f"item {item[:100]} is not in {fmt.items_file}")
        # a hash aggregate, not a window over sorted partitions: half the time at 10M rows
        self.db.execute(
            "CREATE TABLE rows AS SELECT min(line) AS line, user, item, ts, arg_min_null(rating, line) AS rating "
            "FROM rows_read SEMI JOIN items ON rows_read.item = items.id GROUP BY user, item, ts")
        users, interactions = self.db.execute("SELECT count(DISTINCT user), count(*) FROM rows").fetchone()
        self._record("duplicate_interaction", "SELECT line, user, item, ts FROM rows_read SEMI JOIN items ON rows_read.item = items.id "
                     "ANTI JOIN rows USING (line)", path, "-", lambda user, item, ts: f"user {user[:100]}, item {item[:100]} at {ts:g} again",
                     total=self._count("SELECT * FROM rows_read") - unknown - interactions)
        self.db.execute("DROP TABLE rows_read")
        if not interactions:
            raise BadInputError(f"{path}: no interaction could be read (header only, or every row is bad input)")
        return {"users": users, "items": self._count("SELECT * FROM items"), "interactions": interactions}

    # -- filtering and numbering -----------------------------------------------------------------------------------
    def filter(self, min_rating: float | None, min_user: int, min_item: int) -> None:
        """The rating filter, then the k-core: users and items under the minimum counts go until none is left."""
        rating = "rating IS NOT NULL AND rating >= $1" if min_rating is not None else "true"
        self.db.execute(f"CREATE TABLE kept AS SELECT * FROM rows WHERE {rating}", [min_rating] if min_rating is not None else [])
        # one semi join a statement, and none for a minimum every row meets: two hash joins over the catalogue in one
        # statement ran out of a 512 MB limit on 100M interactions
        minimums = [(column, int(minimum)) for column, minimum in (("user", min_user), ("item", min_item)) if minimum > 1]
        size = self._count("SELECT * FROM kept")
        while size and minimums:
            for column, minimum in minimums:
                self.db.execute(f"CREATE OR REPLACE TABLE kept AS SELECT * FROM kept SEMI JOIN (SELECT {column} FROM kept "
                                f"GROUP BY {column} HAVING count(*) >= {minimum}) USING ({column})")
            size, before = self._count("SELECT * FROM kept"), size
            if size == before or len(minimums) == 1:
                break
        if not size:
            raise BadInputError(f"{self.raw_dir}: no interaction is left after the rating filter and the k-core (at least "
                                f"{min_user} per user, {min_item} per item)")

    def kept_interactions(self) -> int:
        return self._count("SELECT * FROM kept")

    def number(self, min_item: int) -> tuple[int, int]:
        """Contiguous user and item indices in natural id order, so they do not depend on file order. Every item
        stays unless the k-core filters items. Returns (users, items)."""
        kept_items = "items" if min_item <= 0 else "items SEMI JOIN (SELECT DISTINCT item FROM kept) k ON items.id = k.item"
        self.db.execute(f"CREATE TABLE item_map AS SELECT row_number() OVER (ORDER BY {natural_order('id')}) - 1 AS i, "
                        f"id, line, text, image FROM {kept_items}")
        self.db.execute(f"CREATE TABLE user_map AS SELECT row_number() OVER (ORDER BY {natural_order('user')}) - 1 AS u, user "
                        "FROM (SELECT DISTINCT user FROM kept)")
        self.db.execute("COPY (SELECT i, id, text, image FROM item_map ORDER BY i) TO $1 (FORMAT parquet)",
                        [str(self.work / "items.parquet")])
        return self._count("SELECT * FROM user_map"), self._count("SELECT * FROM item_map")

    def ids(self, table: str) -> Iterator[list[str]]:
        """The raw ids of `user_map` or `item_map` in index order, in chunks."""
        column, index = ("user", "u") if table == "user_map" else ("id", "i")
        result = self.db.execute(f"SELECT {column} FROM {table} ORDER BY {index}")
        while rows := result.fetchmany(100_000):
            yield [r[0] for r in rows]

    def image_count(self) -> int:
        return self._count("SELECT * FROM item_map WHERE image IS NOT NULL")

    def images(self, chunk: int) -> Iterator[list[tuple[int, int, str]]]:
        """(item, items.jsonl line, image path as written) of every kept item that names an image, `chunk` at a time."""
        result = self.db.execute("SELECT i, line, image FROM item_map WHERE image IS NOT NULL ORDER BY i")
        while rows := result.fetchmany(chunk):
            yield rows

    def write_text_bytes(self, path: Path, num_items: int) -> int:
        """Each item's text length in bytes, in index order, as a .npy file; returns how many items have no text."""
        empty = 0
        with npy_writer(path, num_items) as write:
            for start in range(0, num_items, CHUNK_ROWS):
                lengths = self.db.execute("SELECT strlen(text) AS n FROM item_map WHERE i >= $1 AND i < $2 ORDER BY i",
                                          [start, start + CHUNK_ROWS]).fetchnumpy()["n"]
                write(lengths)
                empty += int((lengths == 0).sum())
        return empty

    # -- splits ----------------------------------------------------------------------------------------------------
    def split(self, cold_fraction: float, seed: int, max_history: int) -> list[int]:
        """Draws the cold items (a seeded fraction of the items with interactions, never seen in training) and
        splits every user's sequence: leave-one-out by time over the warm items (ties by file line), each
        cold-item interaction a cold sample, each sample with the JSON length of its history (its last
        `max_history` warm items, ", "-joined). Returns the cold items."""
        interacted = "SELECT DISTINCT i FROM kept JOIN item_map ON kept.item = item_map.id"
        count = self._count(interacted)
        # sampling positions in the sorted list draws what sampling the list would, without the list in memory
        drawn = random.Random(seed).sample(range(count), int(round(cold_fraction * count)))
        self.db.execute(f"CREATE TABLE cold AS SELECT i FROM (SELECT i, row_number() OVER (ORDER BY i) - 1 AS p FROM ({interacted})) "
                        "SEMI JOIN (SELECT unnest($1::BIGINT[]) AS p) USING (p) ORDER BY i", [drawn])
        cold = self.db.execute("SELECT i FROM cold ORDER BY i").fetchnumpy()["i"].tolist()
        # pos: how many warm items the user had before this interaction (a warm item's own index among them);
        # history_bytes: the JSON length of the warm items at positions pos - max_history .. pos - 1 (cold rows in
        # that range add nothing), so planning needs no per-interaction array in memory
        self.db.execute(
            "CREATE TABLE events AS SELECT *, coalesce(sum(CASE WHEN cold THEN NULL ELSE length(i::VARCHAR) + 2 END) OVER "
            f"(PARTITION BY u ORDER BY pos RANGE BETWEEN {int(max_history)} PRECEDING AND 1 PRECEDING), 2) - 2 AS history_bytes "
            "FROM (SELECT u, i, cold, coalesce(sum(CASE WHEN cold THEN 0 ELSE 1 END) OVER "
            "(PARTITION BY u ORDER BY ts, line ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)::BIGINT AS pos, ts, line FROM "
            "(SELECT u, item_map.i, ts, kept.line, cold.i IS NOT NULL AS cold FROM kept JOIN user_map USING (user) "
            "JOIN item_map ON kept.item = item_map.id LEFT JOIN cold ON cold.i = item_map.i))")
        self.db.execute("CREATE TABLE warm AS SELECT u, pos, i, history_bytes FROM events WHERE NOT cold ORDER BY u, pos")
        self.db.execute("CREATE TABLE warm_count AS SELECT u, count(*) FILTER (WHERE NOT cold) AS n FROM events GROUP BY u ORDER BY u")
        # Each split's table is created in its sample order and numbered as written: a numbering window over the
        # whole split (row_number() OVER (ORDER BY ...)) took 2.4x as long as this sort on 100M synthetic interactions.
        # The train order: by MD5 of "seed:user:position", which any other tool (or DuckDB version) computes alike;
        # the others by user (cold: then time and file line).
        sample_tables = {
            "train": ("warm JOIN warm_count USING (u) WHERE pos >= 1 AND pos <= n - 3", "md5_number(concat($1, ':', u, ':', pos)), u, pos"),
            "valid": ("warm JOIN warm_count USING (u) WHERE pos = n - 2", "u"),
            "test": ("warm JOIN warm_count USING (u) WHERE pos = n - 1", "u"),
            "cold": ("events WHERE cold", "u, ts, line"),
        }
        for split, (source, order) in sample_tables.items():
            self.db.execute(f"CREATE TABLE samples_{split} AS SELECT u, pos, i, history_bytes FROM {source} ORDER BY {order}",
                            [seed] if "$1" in order else [])
            # a table scan and an empty OVER () keep the insertion order (DuckDB's documented order preservation)
            self.db.execute(f"COPY (SELECT row_number() OVER () - 1 AS n, u, pos, i, history_bytes FROM samples_{split}) TO $1 "
                            "(FORMAT parquet, ROW_GROUP_SIZE 65536)", [str(self.work / f"{split}.parquet")])
        return cold

    def sample_count(self, split: str) -> int:
        return self._count(f"SELECT * FROM samples_{split}")

    def sample_chunks(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """The split's samples (u, i, history_bytes) in shard order, PLAN_ROWS at a time, from its Parquet file (sorted
        by n, so a range reads only its row groups rather than the whole table)."""
        for start in range(0, self.sample_count(split), PLAN_ROWS):
            chunk = self.db.execute("SELECT u, i, history_bytes FROM read_parquet($1) WHERE n >= $2 AND n < $3 ORDER BY n",
                                    [str(self.work / f"{split}.parquet"), start, start + PLAN_ROWS]).fetchnumpy()
            yield {name: np.asarray(values, np.int64) for name, values in chunk.items()}

    def write_sequences(self, num_users: int) -> None:
        """warm_text.bin / warm_indptr.npy (each user's warm items by time, as the text headers hold them) and
        warm_digits.npy (prefix sums of their decimal digits), written in chunks."""
        counts = self.db.execute("SELECT n FROM warm_count ORDER BY u").fetchnumpy()["n"].astype(np.int64)
        assert len(counts) == num_users
        indptr = np.concatenate([[0], np.cumsum(counts)])
        np.save(self.work / "warm_indptr.npy", indptr)
        with open(self.work / "warm_text.bin", "wb") as text, npy_writer(self.work / "warm_digits.npy", int(indptr[-1]) + 1) as digits:
            digits(np.zeros(1))
            total = 0  # digits of every warm item so far
            for _, _, chunk in self._user_chunks("SELECT i FROM warm WHERE u >= $1 AND u < $2 ORDER BY u, pos", indptr):
                sums = total + np.cumsum(decimal_digits(chunk["i"]))
                digits(sums)
                total = int(sums[-1]) if len(sums) else total
                for start in range(0, len(chunk["i"]), TEXT_ROWS):
                    text.write("".join(f"{i}, " for i in chunk["i"][start:start + TEXT_ROWS].tolist()).encode())

    def write_seen(self, path: Path) -> None:
        """seen.npz: each user's training items (warm items before valid and test), sorted, as CSR."""
        query = "SELECT DISTINCT u, i FROM warm JOIN warm_count USING (u) WHERE pos < n - 2"
        counts = np.zeros(self._count("SELECT * FROM user_map"), np.int64)
        per_user = self.db.execute(f"SELECT u, count(*) AS c FROM ({query}) GROUP BY u").fetchnumpy()
        counts[per_user["u"]] = per_user["c"]
        indptr = np.concatenate([[0], np.cumsum(counts)])
        # written into the archive as fetched: np.savez would need the whole array (in memory or mapped)
        with zipfile.ZipFile(path, "w") as archive:
            with archive.open(zip_member("indptr.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, indptr)
            with npy_writer(archive.open(zip_member("items.npy"), "w", force_zip64=True), int(indptr[-1])) as items:
                for _, _, chunk in self._user_chunks(f"SELECT i FROM ({query}) WHERE u >= $1 AND u < $2 ORDER BY u, i", indptr):
                    items(chunk["i"])

    def _user_chunks(self, query: str, indptr: np.ndarray) -> Iterator[tuple[int, int, dict]]:
        """Runs `query` (bound to a user range) over ranges of users holding about CHUNK_ROWS rows each."""
        users = len(indptr) - 1
        first = 0
        while first < users:
            last = max(first + 1, int(np.searchsorted(indptr, indptr[first] + CHUNK_ROWS, side="right")) - 1)
            last = min(last, users)
            yield int(indptr[first]), int(indptr[last]), self.db.execute(query, [first, last]).fetchnumpy()
            first = last


def zip_member(name: str) -> zipfile.ZipInfo:
    """An archive member with a fixed time, so the same data gives the same bytes."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


@contextmanager
def npy_writer(target: Path | IO[bytes], length: int, dtype: str = "<i8") -> Iterator[Callable[[np.ndarray], None]]:
    """Writes `length` values, passed in order in arrays, as a one-dimensional .npy file (the bytes np.save writes);
    checks the count."""
    f = open(target, "wb") if isinstance(target, Path) else target
    written = 0

    def write(values: np.ndarray) -> None:
        nonlocal written
        f.write(np.asarray(values, dtype).tobytes())
        written += len(values)

    with f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                                 "shape": (length,)})
        yield write
        if written != length:
            raise RuntimeError(f"{target}: {written} values written, {length} expected (a bug)")


def decimal_digits(values: np.ndarray) -> np.ndarray:
    """How many decimal digits each non-negative integer has (its length in JSON)."""
    values = np.asarray(values, np.int64)
    digits = np.ones(len(values), np.int64)
    power = 10
    while power <= max(int(values.max(initial=0)), 9):
        digits += values >= power
        power *= 10
    return digits
