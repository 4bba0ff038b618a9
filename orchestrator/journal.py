"""The change journal of an experiment in an object-store registry, so a warm `maestro ls` costs
the runs that changed, not the runs there are.

Listing every run's mirror (``.states/``) is one request per 1,000 runs, and its XML alone costs
the client ~0.15 ms a key: at 100,000 runs, seconds of every `ls` and `watch` refresh spent on
runs that did not change. So every state write, after its mirror, also writes a record:

    <experiment>/.changes/<folder>/<ms>-<run_id>    one run's state changed (empty object)
    <experiment>/.changes/<folder>/<ms>~<tag>       a batch (a grid's submit): each run's new state
                                                     and its MD5 (older batches: a list of run ids)

``ms`` is the writer's clock in milliseconds, 13 digits, so names sort by time; ``folder`` is
``ms // FOLDER_MS``, so a reader lists only the few newest folders and old ones are deleted whole.
A reader keeps a ``Cursor`` (in the experiment's index): the newest record it has seen and the
names of those it applied within ``MARGIN_MS`` of it. It reads records newer than the cursor
minus that margin, which covers writers' clocks that disagree and records that land late, and
skips those it applied. A record that is never written (a writer killed between its mirror and
its record) or that lands more than the margin late is found by the full listing of the mirror
that readers make every ``FULL_LISTING_S``, which also deletes folders older than ``KEEP_MS``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any, NamedTuple

from fsspec import AbstractFileSystem
from pydantic import BaseModel

from mae_core.storage import fresh_listing

CHANGES = ".changes"
# Kept in the journal's folder so that listing it never comes back empty: s3fs answers an empty
# listing by listing the parent, which here is every run's folder of the experiment.
ANCHOR = "anchor"
FOLDER_MS = 600_000
MARGIN_MS = 300_000
# A reader lists the whole mirror when its index's last full listing is older than this: the
# longest a lost record can hide a change.
FULL_LISTING_S = 3600.0
# Records kept: far longer than an index may go without a full listing, so none is deleted
# while a reader whose cursor predates it still relies on the journal.
KEEP_MS = 6 * 3600 * 1000


class Cursor(BaseModel):
    ms: int = 0
    seen: list[str] = []
    listed: float = 0.0


class Carried(NamedTuple):
    """A run's state as a batch record carries it, and the MD5 of the mirror written with it,
    which is that mirror's ETag on S3 for as long as nobody rewrote it."""

    state: dict[str, Any]
    md5: str


def record_files(experiment_path: str, states: dict[str, bytes], carry: bool = False) -> dict[str, bytes]:
    """The record of a state write of these runs of one experiment (a path inside its filesystem),
    given each run's new state as written. A batch carries the states: a reader that meets a
    grid's runs for the first time there needs no GET for each. With ``carry``, even one run's
    record is a batch: runs written into a pack have no mirror for a reader to fetch."""
    ms = int(time.time() * 1000)
    folder = f"{experiment_path}/{CHANGES}/{ms // FOLDER_MS}"
    if len(states) == 1 and not carry:
        return {f"{folder}/{ms:013d}-{next(iter(states))}": b""}
    # Each state's bytes go in as they are: the MD5 is of exactly those.
    body = b",".join(json.dumps(run_id).encode() + b':{"md5":"' + hashlib.md5(state).hexdigest().encode()
                     + b'","state":' + state + b"}" for run_id, state in states.items())
    return {f"{folder}/{ms:013d}~{uuid.uuid4().hex[:12]}": b'{"batch":{' + body + b"}}"}


def read_batches(fs: AbstractFileSystem, paths: list[str]) -> tuple[set[str], dict[str, Carried]]:
    """What batch records (oldest first) say: the runs that older ones name, and the states that
    newer ones carry, a later record's over an earlier one's. One GET each."""
    blobs = fs.cat(paths, on_error="omit") if paths else {}
    named: set[str] = set()
    carried: dict[str, Carried] = {}
    for path in paths:
        if path not in blobs:
            continue
        record = json.loads(blobs[path])
        if isinstance(record, list):
            named.update(record)
        else:
            carried.update({run_id: Carried(**entry) for run_id, entry in record["batch"].items()})
    return named, carried


def _ms(name: str) -> int:
    return int(name[:13])


def _folders(entries: list[dict[str, Any]]) -> dict[int, str]:
    """The journal's folders by number, from a listing of the journal."""
    return {int(name): e["name"] for e in entries
            if e["type"] == "directory" and (name := e["name"].rstrip("/").rsplit("/", 1)[-1]).isdigit()}


def _records(fs: AbstractFileSystem, folders: list[str]) -> dict[str, str]:
    """Record name -> path, in the given folders."""
    return {name: e["name"] for folder in folders for e in fresh_listing(fs, folder)
            if e["type"] == "file" and len(name := e["name"].rsplit("/", 1)[-1]) > 14 and name[:13].isdigit()}


def _cursor(newest: int, names: list[str], listed: float) -> Cursor:
    return Cursor(ms=newest, seen=sorted(n for n in names if _ms(n) > newest - MARGIN_MS), listed=listed)


def start(fs: AbstractFileSystem, experiment_path: str) -> tuple[Cursor, list[str]]:
    """The cursor for a full listing of the mirror that follows this call: every record there is
    now is applied by that listing. Also the recent batch records (oldest first), whose carried
    states spare that listing's reader a GET for each state they still match. Deletes folders
    older than ``KEEP_MS``."""
    now = time.time()
    entries = fresh_listing(fs, f"{experiment_path}/{CHANGES}")
    if not any(e["name"].rsplit("/", 1)[-1] == ANCHOR for e in entries):
        fs.pipe_file(f"{experiment_path}/{CHANGES}/{ANCHOR}", b"")
    folders = _folders(entries)
    old = {f for f in folders if (f + 1) * FOLDER_MS < now * 1000 - KEEP_MS}
    if old:
        fs.rm([folders[f] for f in old], recursive=True)
    recent = sorted(folders.keys() - old, reverse=True)
    records: dict[str, str] = {}
    newest = 0
    for f in recent:  # newest first, until a folder ends before the margin of the newest record
        if newest and (f + 1) * FOLDER_MS <= newest - MARGIN_MS:
            break
        found = _records(fs, [folders[f]])
        records.update(found)
        newest = max([newest, *map(_ms, found)])
    batches = [records[name] for name in sorted(records) if name[13] == "~"]
    return _cursor(newest or int(now * 1000), list(records), now), batches


def changes(fs: AbstractFileSystem, experiment_path: str,
            cursor: Cursor) -> tuple[set[str], dict[str, Carried], Cursor]:
    """Since ``cursor``: the runs named alone (or by older batch records), the states that batches
    carry, and the cursor past them; from a listing of the journal's folder names and of the
    newest folders, plus one GET per batch record."""
    since = cursor.ms - MARGIN_MS
    folders = _folders(fresh_listing(fs, f"{experiment_path}/{CHANGES}"))
    records = _records(fs, [path for f, path in sorted(folders.items()) if (f + 1) * FOLDER_MS > since])
    seen = set(cursor.seen)
    new = sorted(name for name in records if _ms(name) > since and name not in seen)
    named, carried = read_batches(fs, [records[name] for name in new if name[13] == "~"])
    named.update(name[14:] for name in new if name[13] == "-")
    newest = max([cursor.ms, *map(_ms, records)])
    return named, carried, _cursor(newest, list(records), cursor.listed)
