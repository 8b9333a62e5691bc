"""Trial lists for verification: LFW protocol files and plain CSV files."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class Trial:
    """Two images to compare; label 1 = same person, 0 = different, None = unknown (to score)."""

    a: Path
    b: Path
    label: int | None = None
    fold: int | None = None


def lfw_image_path(images_root: Path, name: str, number: str) -> Path:
    return images_root / name / f"{name}_{int(number):04d}.jpg"


def read_text(path: Path) -> str:
    """A text file's content; content that is not UTF-8 is an error naming the file and line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> ValueError:
    """The error for a file that is not UTF-8 text, naming its first undecodable line."""
    with path.open("rb") as fh:
        for i, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return ValueError(f"{path}:{i}: not UTF-8 text (byte {exc.start + 1} of the line)")
    return ValueError(f"{path}: not UTF-8 text")


def read_lfw_pairs(path: str | Path, images_root: str | Path | None = None) -> list[Trial]:
    """Read LFW `pairs.txt` (View 2, 10 folds) or `pairsDevTrain/Test.txt` (View 1).

    The first line is `folds<TAB>pairs_per_class` (View 2) or just a count (View 1); each fold
    holds that many same pairs (`name n1 n2`) then as many different pairs (`n1 i1 n2 i2`).
    `images_root` defaults to `images/` beside the file.
    """
    path = Path(path)
    root = Path(images_root) if images_root is not None else path.parent / "images"
    lines = [ln.split() for ln in read_text(path).splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty pair list")
    header = lines[0]
    try:
        if len(header) == 2:
            n_folds, per_class = int(header[0]), int(header[1])
        elif len(header) == 1:
            n_folds, per_class = 1, int(header[0])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}:1: expected a header 'folds pairs' or 'pairs'") from None
    body = lines[1:]
    if n_folds * per_class == 0:
        raise ValueError(f"{path}:1: the header promises no pairs")
    if len(body) != n_folds * 2 * per_class:
        raise ValueError(
            f"{path}: header promises {n_folds * 2 * per_class} pairs, file has {len(body)}"
        )
    trials = []
    for i, fields in enumerate(body):
        fold = i // (2 * per_class)
        if len(fields) not in (3, 4):
            raise ValueError(f"{path}:{i + 2}: expected 3 or 4 tab-separated fields")
        try:
            if len(fields) == 3:
                name, n1, n2 = fields
                a, b, label = lfw_image_path(root, name, n1), lfw_image_path(root, name, n2), 1
            else:
                a = lfw_image_path(root, fields[0], fields[1])
                b = lfw_image_path(root, fields[2], fields[3])
                label = 0
        except ValueError:  # int() of an image number
            raise ValueError(f"{path}:{i + 2}: image numbers must be integers") from None
        trials.append(Trial(a, b, label, fold if n_folds > 1 else None))
    return trials


def is_header(first: list[str], second: list[str] | None) -> bool:
    """Whether a trial list's first row names its columns: image fields without a file
    suffix, and either a third field that is not a number (a label is 0 or 1) or a next row
    whose image fields have suffixes. Suffixless names above suffixless names are data: a
    header taken for a trial fails loudly (no such image), a trial taken for a header would
    vanish unnoticed."""
    if any(Path(f).suffix for f in first[:2]):
        return False
    if len(first) == 3 and not _is_number(first[2]):
        return True
    return second is not None and all(Path(f).suffix for f in second[:2])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def iter_trial_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, [img1, img2(, label)]) from a CSV or a whitespace-separated text
    file, one line at a time, so that a list of a million trials never sits in memory as a
    whole; a header row (`is_header`) is skipped."""
    path = Path(path)

    def numbered(fh: TextIO) -> Iterator[tuple[int, list[str]]]:
        comma = "," in fh.readline()
        fh.seek(0)
        rows: Iterable[list[str]] = (
            ([c.strip() for c in r if c.strip()] for r in csv.reader(fh))
            if comma
            else (ln.split() for ln in fh)  # split() drops the blanks itself
        )
        for i, row in enumerate(rows, start=1):
            if row and len(row) not in (2, 3):
                raise ValueError(f"{path}:{i}: expected img1,img2[,label], got {len(row)} fields")
            if row:
                yield i, row

    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = numbered(fh)
            head = list(itertools.islice(rows, 2))
            if head and is_header(head[0][1], head[1][1] if len(head) > 1 else None):
                head = head[1:]
            yield from head
            yield from rows
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def read_trial_csv(path: str | Path, images_root: str | Path | None = None) -> list[Trial]:
    """Read a CSV of `img1,img2[,label]` (a header row is detected and skipped) or a text file
    of whitespace-separated `img1 img2 [label]` lines. Relative paths resolve against
    `images_root` (default: the file's folder)."""
    path = Path(path)
    root = Path(images_root) if images_root is not None else path.parent
    trials = []
    for i, row in iter_trial_rows(path):
        label: int | None = None
        if len(row) == 3:
            if not (_is_number(row[2]) and float(row[2]) in (0.0, 1.0)):
                raise ValueError(f"{path}:{i}: label {row[2]!r} is not 0 or 1")
            label = int(float(row[2]))
        trials.append(Trial(root / row[0], root / row[1], label))
    if not trials:
        raise ValueError(f"{path}: no trials")
    return trials


def read_trials(path: str | Path, images_root: str | Path | None = None) -> list[Trial]:
    """Read any supported trial list, telling LFW protocol files from CSV by their content."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trial list not found")
    first = read_text(path).split("\n", 1)[0].split()
    if first and all(f.isdigit() for f in first) and len(first) <= 2:
        return read_lfw_pairs(path, images_root)
    return read_trial_csv(path, images_root)


def read_people(path: str | Path) -> list[str]:
    """Read an LFW people list (`peopleDevTrain.txt`: a count, then `name<TAB>n_images`)."""
    lines = read_text(Path(path)).split("\n")
    return [ln.split()[0] for ln in lines[1:] if ln.strip()]


def trial_people(trials: list[Trial]) -> set[str]:
    """Names of the identity folders a trial list touches (to exclude them from training)."""
    return {p.parent.name for t in trials for p in (t.a, t.b)}
