"""Archive files of cleanup's ``archive`` mode: where they go (``OUTBOX_ARCHIVE_URL``), what one
line holds, and writing them durably before the rows they hold are deleted (DESIGN 5).

A file is ``outbox-<published_at UTC>-<seq>-<random>.jsonl.gz``: gzip, one JSON object per line,
one line per outbox row with every column (docs/cleanup.md shows how to restore one with psql).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import env_var
from outbox_tasks.store.cleanup import OutboxRecord

ARCHIVE_SUFFIX = ".jsonl.gz"
# Every column of the outbox table, in table order: one key per column in each archive line.
ARCHIVE_COLUMNS: tuple[str, ...] = OutboxRecord._fields
# jsonb columns are read as PostgreSQL's own text and written verbatim (exact numbers).
_RAW_JSON_COLUMNS = frozenset({"payload", "headers"})


@dataclass(frozen=True, slots=True)
class ArchivedRow:
    """One outbox row as written to an archive file."""

    id: uuid.UUID
    published_at: datetime
    seq: int
    line: str


def archive_directory(archive_url: str) -> Path:
    """The directory named by ``OUTBOX_ARCHIVE_URL``: a path or a ``file://`` URL of an existing
    directory. Anything else raises ConfigurationError naming the variable."""
    var = env_var("archive_url")
    raw = archive_url.strip()
    if not raw:
        raise ConfigurationError(
            f"{var} is empty: expected a directory (a path or a file:// URL) when "
            f"{env_var('cleanup_mode')}=archive"
        )
    parts = urlsplit(raw)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigurationError(
                f"{var}={archive_url!r} is not valid: expected file:///absolute/path "
                "(a local directory; file:// URLs with a host are not supported)"
            )
        path = Path(unquote(parts.path))
    elif "://" in raw or parts.scheme:
        raise ConfigurationError(
            f"{var}={archive_url!r} is not valid: expected a directory path or a file:// URL; "
            f"{parts.scheme}:// is not supported (mount or sync the storage to a local directory)"
        )
    else:
        path = Path(raw)
    if not path.is_dir():
        raise ConfigurationError(
            f"{var}={archive_url!r} is not valid: {path} is not an existing directory"
        )
    return path


def _json_value(column: str, value: Any) -> str:
    if value is None:
        return "null"
    if column in _RAW_JSON_COLUMNS:
        return str(value)  # PostgreSQL's jsonb text: valid JSON on one line, numbers exact
    if isinstance(value, datetime):
        return json.dumps(value.astimezone(UTC).isoformat())
    if isinstance(value, uuid.UUID):
        return json.dumps(str(value))
    if column == "txid":
        return str(int(value))
    return json.dumps(value, ensure_ascii=False)


def archive_line(row: Mapping[str, Any]) -> str:
    """One outbox row as one JSON object: every column, in table order; uuids and timestamps
    (UTC, ISO 8601) as strings, txid as an integer, payload and headers as JSON."""
    return "{" + ",".join(f'"{c}":{_json_value(c, row[c])}' for c in ARCHIVE_COLUMNS) + "}"


def archive_batch(
    records: Iterable[OutboxRecord], *, limit: int, max_bytes: int
) -> tuple[list[ArchivedRow], bool]:
    """Archive lines of up to ``limit`` records, stopping early once ``max_bytes`` of lines are
    made (the memory bound of one batch; the caller closes ``records``).

    Returns (rows, True when stopped by the byte bound).
    """
    rows: list[ArchivedRow] = []
    size = 0
    for record in records:
        line = archive_line(record._asdict())
        rows.append(
            ArchivedRow(id=record.id, published_at=record.published_at, seq=record.seq, line=line)
        )
        size += len(line) + 1
        if size >= max_bytes and len(rows) < limit:
            return rows, True
    return rows, False


def archive_file_name(first: ArchivedRow) -> str:
    """``outbox-<published_at UTC>-<seq>-<random>.jsonl.gz``: names sort by the time of their
    first row, and two files never collide (even for the same rows archived twice)."""
    stamp = first.published_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"outbox-{stamp}-{first.seq:019d}-{uuid.uuid4().hex[:8]}{ARCHIVE_SUFFIX}"


def write_archive_file(directory: Path, rows: Sequence[ArchivedRow]) -> Path:
    """Write rows durably: temp name, flush, fsync, rename, fsync of the directory. When this
    returns, the file survives a crash; before, no file with the final name exists. Raises
    ValueError for no rows, OSError when the disk refuses (the temp file is removed)."""
    if not rows:
        raise ValueError("an archive file needs at least one row")
    final = directory / archive_file_name(rows[0])
    temp = directory / f".{final.name}.tmp"
    try:
        with open(temp, "xb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                for row in rows:
                    gz.write(row.line.encode())
                    gz.write(b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def read_archive_file(path: Path | str) -> Iterator[dict[str, Any]]:
    """The rows of one archive file, as dicts (for restores and checks)."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
