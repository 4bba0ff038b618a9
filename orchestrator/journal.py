"""The change journal of an experiment in an object-store registry, so a warm `maestro ls` costs
the runs that changed, not the runs there are.

Listing every run's mirror (``.states/``) is one request per 1,000 runs, and its XML alone costs
the client ~0.15 ms a key: at 100,000 runs, seconds of every `ls` and `watch` refresh spent on
runs that did not change. So every state write, after its mirror, also writes a record:

    <experiment>/.changes/<folder>/<ms>-<run_id>~<state>   one run's state changed (empty object)
    <experiment>/.changes/<folder>/<ms>~<tag>              a batch (a grid's submit): each run's new
                                                            state and its MD5 (older: run ids alone)

A record carries the state it records, so a reader needs no GET of the mirror: a batch in its
body, one run's record in its name (``<state>``: the mirror's bytes, deflated with a preset
dictionary and base64url-encoded, ~270 characters), since a listing returns names and not
bodies. 1,000 runners' writes are then one LIST page, not 1,000 GETs. A name that would pass
``MAX_PATH`` goes without its state (``<ms>-<run_id>``, as all did before), and readers fetch it.

Which of a run's writes is the newest is told by its state's ``seq``, not by the writers'
clocks: each write numbers its state one past the state it was based on. A reader takes the
highest only when no two writes it knows of share a number, i.e. no writer wrote from a state
another had already replaced (a lost update, whose mirror may hold the lower number); otherwise
it fetches the mirror, the one copy that is always the newest.

A writer killed between its mirror and its record would leave a change that no record names. So
before anything else a write puts an **intent**, and deletes it once its record is written (a
reader lists it only while the write is under way, or when the writer died):

    <experiment>/.changes/<folder>/<ms>-<run_id>~+   one run's write has begun (empty object)
    <experiment>/.changes/<folder>/<ms>~+<tag>       a batch's, whose record has the same tag

A reader that sees an intent and, ``MARGIN_MS`` later, no record of that run (or tag) at or
after it, knows a writer stopped part-way, and lists the whole mirror (``stalled``). Readers of
older versions take a one-run intent for a record without a state (a GET), and a batch intent's
body, ``[]``, for a batch of no run.

``ms`` is the writer's clock in milliseconds, 13 digits, so names sort by time; ``folder`` is
``ms // FOLDER_MS``, so a reader lists only the folders since it last read and old ones are
deleted whole. A reader keeps a ``Cursor`` (in the experiment's index): the newest record it
has seen, the names of those it applied within ``MARGIN_MS`` of it, and the intents still
waiting for their records. It reads records newer than the cursor minus that margin, which
covers writers' clocks that disagree and records that land late, and skips those it applied.
The full listing of the mirror, which a reader makes when a writer stalled and every
``FULL_LISTING_S`` (for what no intent shows: a record that lands more than the margin late,
runs removed by hand), also deletes folders older than ``KEEP_MS``. That listing takes a changed
state from a record carrying exactly the mirror's bytes (its MD5 is the listed ETag), from the
newest folders and, while that costs less than the GETs it spares, from older ones: the first
`ls` after a day away costs listings, not a GET per run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
import uuid
import zlib
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
# longest a record landing late, or a run removed by hand, goes unseen. A writer that stopped
# part-way is caught sooner, by its intent. A day: a 100,000-run mirror is ~40 s to list on moto.
FULL_LISTING_S = 24 * 3600.0
# Records kept: far longer than an index may go without a full listing, so none is deleted
# while a reader whose cursor predates it still relies on the journal.
KEEP_MS = 2 * 24 * 3600 * 1000
# The longest record path (with its bucket) that carries its state in its name: S3, GCS and Azure
# keys are at most 1,024 bytes.
MAX_PATH = 1024
# Cursor entries of records whose names are longer are kept as a hash: a state in a name would
# otherwise put ~300 bytes per recent record in every index.
MARK_CHARS = 128
# Deflate's preset dictionary for states in names, version "1" (the name's first character):
# the bytes a state most often repeats. Fixed for good; another would need another version.
_STATE_DICT = (b'"pretrain","linprobe","finetune","local","slurm","ray","pending","queued","running",'
               b'"cancelling","preempted","requeued","completed","failed","cancelled",{"experiment":"",'
               b'"run_id":"","swept":{},"job":"pretrain","evaluates":null,"status":"running","backend":"local",'
               b'"devices":1,"attempts":1,"attempt_started":null,"job_ids":[],"step":0,"total_steps":0,'
               b'"loss":null,"img_s":null,"last_checkpoint_step":null,"preemptions":0,"timeouts":0,'
               b'"failures":0,"message":null,"created":17,"started":null,"updated":17,"ended":null,'
               b'"host":null,"pid":null,"heartbeat":null,"hang_timeout_s":null,"flush_s":null,'
               b'"goodput":{"allocated_s":0.0,"productive_s":0.0,"lost_s":0.0,"overhead_s":0.0,'
               b'"checkpoint_s":0.0},"seq":1}')
_STATE_VERSION = "1"
# What follows ``~`` in an intent's name.
INTENT = "+"


class Cursor(BaseModel):
    ms: int = 0
    seen: list[str] = []
    listed: float = 0.0
    # Intents no record has followed yet: the ms of the oldest of each write (``_writer``).
    pending: dict[str, int] = {}


class Carried(NamedTuple):
    """A run's state as a record carries it; the MD5 of the mirror written with it, which is that
    mirror's ETag on S3 for as long as nobody rewrote it; and the state's write number."""

    state: dict[str, Any]
    md5: str
    seq: int


def _in_name(state: bytes) -> str:
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=_STATE_DICT)
    return _STATE_VERSION + base64.urlsafe_b64encode(deflate.compress(state) + deflate.flush()).decode().rstrip("=")


def _from_name(name: str) -> tuple[str, Carried | None]:
    """The run a one-run record names, and the state its name carries (None: it carries none, or
    one this reader cannot decode, which the reader then fetches)."""
    run_id, _, packed = name[14:].partition("~")
    if not packed.startswith(_STATE_VERSION):
        return run_id, None
    try:
        inflate = zlib.decompressobj(-15, zdict=_STATE_DICT)
        blob = inflate.decompress(base64.urlsafe_b64decode(packed[1:] + "=" * (-len(packed[1:]) % 4)))
        state = json.loads(blob)
    except (ValueError, zlib.error):  # binascii.Error and JSON errors are ValueErrors
        return run_id, None
    return run_id, Carried(state, hashlib.md5(blob).hexdigest(), state.get("seq", 0))


def newest(writes: list[Carried], after: int | None) -> Carried | None:
    """The newest of a run's writes that records carry, for a reader whose copy of the run has
    write number ``after`` (None: it has none): the highest numbered, unless two of these writes,
    or one of them and the reader's copy, share a number. Then some writer wrote from a state
    another had replaced already, and only the mirror tells which write landed last: None."""
    seqs = [w.seq for w in writes]
    if len(set(seqs)) < len(seqs) or (after is not None and min(seqs) <= after):
        return None
    return max(writes, key=lambda w: w.seq)


def record_files(experiment_path: str, states: dict[str, bytes], tag: str = "", carry: bool = False
                 ) -> dict[str, bytes]:
    """The record of a state write of these runs of one experiment (a path inside its filesystem),
    given each run's new state as written. A batch carries the states: a reader that meets a
    grid's runs for the first time there needs no GET for each. With ``carry``, even one run's
    record is a batch: runs written into a pack have no mirror for a reader to fetch. A batch's
    ``tag`` is its intent's (``intent_files``); a new one if none."""
    stamp = _stamp(experiment_path)
    if not _is_batch(len(states), carry):
        [(run_id, state)] = states.items()
        path = f"{stamp}-{run_id}"
        carried = f"{path}~{_in_name(state)}"
        return {carried if len(carried.encode()) <= MAX_PATH else path: b""}
    # Each state's bytes go in as they are: the MD5 is of exactly those.
    body = b",".join(json.dumps(run_id).encode() + b':{"md5":"' + hashlib.md5(state).hexdigest().encode()
                     + b'","state":' + state + b"}" for run_id, state in states.items())
    return {f"{stamp}~{tag or new_tag()}": b'{"batch":{' + body + b"}}"}


def _stamp(experiment_path: str) -> str:
    """Where a record or intent written now goes, and how its name begins: ``<folder>/<ms>``."""
    ms = int(time.time() * 1000)
    return f"{experiment_path}/{CHANGES}/{ms // FOLDER_MS}/{ms:013d}"


def _is_batch(runs: int, carry: bool) -> bool:
    """Whether a write's record and intent are a batch's (by tag) or one run's (by run id): one
    rule for both, since a reader matches an intent to its record by the same key."""
    return runs != 1 or carry


def new_tag() -> str:
    """A batch write's tag, shared by its intent and its record."""
    return uuid.uuid4().hex[:12]


def intent_files(experiment_path: str, run_ids: list[str], tag: str, carry: bool = False) -> dict[str, bytes]:
    """The intent of a write of these runs of one experiment, to put before the write and delete
    after its record (``record_files``, with the same ``tag`` and ``carry``)."""
    stamp = _stamp(experiment_path)
    if not _is_batch(len(run_ids), carry):
        return {f"{stamp}-{run_ids[0]}~{INTENT}": b""}
    # An empty list: what a reader of an older version takes for a batch naming no run.
    return {f"{stamp}~{INTENT}{tag}": b"[]"}


def end(fs: AbstractFileSystem, intents: list[str]) -> None:
    """Delete a write's intents, once its records are written. Only to keep listings short: a
    reader takes an intent that a record follows for done, so a failed delete fails no write."""
    with contextlib.suppress(OSError):
        fs.rm(intents)


def read(fs: AbstractFileSystem, paths: list[str]) -> tuple[set[str], dict[str, list[Carried]]]:
    """What records (paths, oldest first) say: the runs named without a state (by a name too long
    to carry it, or by an older batch), and each other run's writes as carried, oldest first. One
    GET per batch record; a one-run record's state is in its name. Intents say nothing here."""
    batches = [p for p in paths if (name := p.rsplit("/", 1)[-1])[13] == "~" and not _is_intent(name)]
    blobs = fs.cat(batches, on_error="omit") if batches else {}
    named: set[str] = set()
    carried: dict[str, list[Carried]] = {}
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        if _is_intent(name):
            continue
        if name[13] == "-":
            run_id, write = _from_name(name)
            if write is None:
                named.add(run_id)
            else:
                carried.setdefault(run_id, []).append(write)
        elif path in blobs:
            record = json.loads(blobs[path])
            if isinstance(record, list):
                named.update(record)
                continue
            for run_id, entry in record["batch"].items():
                carried.setdefault(run_id, []).append(Carried(entry["state"], entry["md5"],
                                                              entry["state"].get("seq", 0)))
    return named, carried


def _is_intent(name: str) -> bool:
    """Whether a journal name is an intent (``intent_files``): ``~+`` ends a one-run intent (no
    state in a name ends so: base64url has neither) and begins a batch's tag."""
    return name.endswith(f"~{INTENT}") or name[13:15] == f"~{INTENT}"


def _writer(name: str) -> str:
    """Which write a record or an intent belongs to, from its name alone: its run for one run's
    write (a later record of that run follows the intent); its tag for a batch."""
    return name[14:].partition("~")[0] if name[13] == "-" else f"~{name[14:].removeprefix(INTENT)}"


def _pending(names: list[str], pending: dict[str, int]) -> dict[str, int]:
    """``pending`` (each write's oldest intent with no record at or after it, by ``_writer``) after
    these records and intents: those the writer is still writing or stopped part-way."""
    done: dict[str, int] = {}
    intents = dict(pending)
    for name in names:
        writer, ms = _writer(name), _ms(name)
        if _is_intent(name):
            intents[writer] = min(ms, intents.get(writer, ms))
        else:
            done[writer] = max(ms, done.get(writer, ms))
    return {writer: ms for writer, ms in intents.items() if done.get(writer, -1) < ms}


def stalled(cursor: Cursor) -> bool:
    """Whether a writer stopped between its intent and its record (``MARGIN_MS`` on, no record):
    its change, if it made one, is in the mirror alone."""
    return any(ms < time.time() * 1000 - MARGIN_MS for ms in cursor.pending.values())


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


def _mark(name: str) -> str:
    """How a cursor remembers a record it applied: its name, or a hash of a long one."""
    if len(name) <= MARK_CHARS:
        return name
    return f"{name[:13]}#{hashlib.blake2b(name.encode(), digest_size=12).hexdigest()}"


def _cursor(newest: int, names: list[str], listed: float, pending: dict[str, int]) -> Cursor:
    return Cursor(ms=newest, seen=sorted(_mark(n) for n in names if _ms(n) > newest - MARGIN_MS), listed=listed,
                  pending=pending)


def start(fs: AbstractFileSystem, experiment_path: str) -> tuple[Cursor, list[str], list[str]]:
    """The cursor for a full listing of the mirror that follows this call: every record there is
    now is applied by that listing, and only intents younger than ``MARGIN_MS`` (writes that may
    still be under way) wait for their records. Also the recent records (oldest first), whose
    carried states spare that listing's reader a GET for each state they still match, the other kept
    folders (newest first), for ``read_folder`` when those leave many states to fetch. Deletes
    folders older than ``KEEP_MS``."""
    now = time.time()
    entries = fresh_listing(fs, f"{experiment_path}/{CHANGES}")
    if not any(e["name"].rsplit("/", 1)[-1] == ANCHOR for e in entries):
        fs.pipe_file(f"{experiment_path}/{CHANGES}/{ANCHOR}", b"")
    folders = _folders(entries)
    old = {f for f in folders if (f + 1) * FOLDER_MS < now * 1000 - KEEP_MS}
    if old:
        fs.rm([folders[f] for f in old], recursive=True)
    kept = sorted(folders.keys() - old, reverse=True)
    records: dict[str, str] = {}
    newest, read_count = 0, 0
    for f in kept:  # newest first, until a folder ends before the margin of the newest record
        if newest and (f + 1) * FOLDER_MS <= newest - MARGIN_MS:
            break
        found = _records(fs, [folders[f]])
        records.update(found)
        newest, read_count = max([newest, *map(_ms, found)]), read_count + 1
    pending = {writer: ms for writer, ms in _pending(sorted(records), {}).items() if ms > now * 1000 - MARGIN_MS}
    return (_cursor(newest or int(now * 1000), list(records), now, pending),
            [records[name] for name in sorted(records)], [folders[f] for f in kept[read_count:]])


def read_folder(fs: AbstractFileSystem, folder: str) -> tuple[int, dict[str, list[Carried]]]:
    """How many records one folder holds, and the writes they carry (as ``read``)."""
    records = _records(fs, [folder])
    return len(records), read(fs, [records[name] for name in sorted(records)])[1]


def changes(fs: AbstractFileSystem, experiment_path: str,
            cursor: Cursor) -> tuple[set[str], dict[str, list[Carried]], Cursor]:
    """Since ``cursor``: what the new records say (``read``), and the cursor past them, with the
    intents that still wait for their records; from a listing of the journal's folder names and of
    the folders since the cursor, plus one GET per batch."""
    since = cursor.ms - MARGIN_MS
    folders = _folders(fresh_listing(fs, f"{experiment_path}/{CHANGES}"))
    records = _records(fs, [path for f, path in sorted(folders.items()) if (f + 1) * FOLDER_MS > since])
    seen = set(cursor.seen)
    new = sorted(name for name in records if _ms(name) > since and _mark(name) not in seen)
    named, carried = read(fs, [records[name] for name in new])
    newest = max([cursor.ms, *map(_ms, records)])
    return named, carried, _cursor(newest, list(records), cursor.listed, _pending(new, cursor.pending))
