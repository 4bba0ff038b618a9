"""``python -m mae_core.data shard SRC DEST`` packs an image folder into tar shards;
``python -m mae_core.data demo DEST`` builds the offline real-photo demo dataset."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mae_core.data.demo import build_demo, parse_image_size
from mae_core.data.shard import Progress as OnSample
from mae_core.data.shard import parse_size, shard_folder

T = TypeVar("T")


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """argparse shows the parser's own message instead of a generic 'invalid value'."""

    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return wrapped


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mae_core.data",
                                     description="Build training data: tar shards from an image folder, "
                                     "or the offline real-photo demo dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    shard = sub.add_parser("shard", help="pack an image folder (any fsspec URL) into WebDataset tar shards")
    shard.add_argument("src", help="image folder: class sub-folders become .cls labels, or flat")
    shard.add_argument("dest", help="folder URL for the shards and their manifest.json")
    shard.add_argument("--shard-size", type=_arg(parse_size), default="256MB", help="bytes per shard, e.g. 256MB")
    shard.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ...")
    shard.add_argument("--seed", type=int, default=0, help="seed of the one-off shuffle across shards")
    shard.add_argument("--jobs", type=int, default=8, help="parallel uploads (each holds one shard in memory)")
    demo = sub.add_parser("demo", help="build the real-photo demo dataset offline from scikit-image's photos")
    demo.add_argument("dest", help="folder URL to write to")
    demo.add_argument("--images", type=int, default=2000, help="number of samples")
    demo.add_argument("--size", type=_arg(parse_image_size), default="64", help="side, or WIDTHxHEIGHT")
    demo.add_argument("--format", choices=("shards", "folder"), default="shards",
                      help="tar shards with a manifest, or an image folder with class sub-folders")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shard-size", type=_arg(parse_size), default="64MB", help="bytes per shard")
    demo.add_argument("--jobs", type=int, default=8, help="parallel uploads")
    return parser


@contextmanager
def _progress(console: Console, label: str) -> Iterator[OnSample]:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[mib]:.1f} MiB"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=None, mib=0.0)
        written = 0

        def update(done: int, total: int, nbytes: int) -> None:
            nonlocal written
            written += nbytes
            bar.update(task, completed=done, total=total, mib=written / 2**20)

        yield update


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command == "shard":
            with _progress(console, "shard") as update:
                manifest = shard_folder(args.src, args.dest, args.shard_size, args.prefix, args.seed, args.jobs,
                                        update)
            console.print(f"{manifest['samples']} samples, {len(manifest['shards'])} shards, "
                          f"{manifest['bytes'] / 2**20:.1f} MiB -> {args.dest}")
        else:
            with _progress(console, "demo") as update:
                written = build_demo(args.dest, args.images, args.size, args.format, args.seed, args.shard_size,
                                     args.jobs, update)
            console.print(f"{args.images} images ({args.format}), {written / 2**20:.1f} MiB -> {args.dest}")
    except (OSError, ValueError, RuntimeError) as e:
        console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
