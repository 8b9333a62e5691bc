"""dlib's primitive serialisation (dlib/serialize.h), shared by facelab's readers of dlib files.

Integers are a control byte (bit 7 sign, bits 0-3 byte count n in 1..8, bits 4-6 zero) and
then n little-endian magnitude bytes; floats are two integers, mantissa then exponent; strings
a length and raw bytes; bools one ASCII '0'/'1'. The byte-level details, checked against real
files, are in shared/notes/dlib-resnet-format.md section 1.

`DlibStream` reads one value at a time. Files that are nothing but integers and floats (dlib's
shape predictors: about three million of them) are decoded at once by `integer_tokens`, which
finds the token boundaries without a per-token Python loop.
"""

from __future__ import annotations

import math

import numpy as np

# Float exponents dlib uses for non-finite values.
SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}

# integer_tokens: each walker starts this many bytes after the previous one and walks this many
# bytes past the next one's start, where their paths normally meet.
_WALK_SPAN = 2048
_WALK_OVERLAP = 256


class DlibStream:
    """Cursor over a dlib file's bytes; every failure names the file and the byte offset."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = memoryview(data)
        self.name = name
        self.pos = 0

    def error(self, message: str, offset: int | None = None) -> ValueError:
        at = self.pos if offset is None else offset
        return ValueError(f"{self.name}: {message} at byte offset {at}")

    def take(self, count: int, what: str) -> memoryview:
        if count > len(self.data) - self.pos:
            raise self.error(
                f"file ends inside {what} (needs {count} bytes, "
                f"{len(self.data) - self.pos} left; truncated?)"
            )
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def integer(self, what: str) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or not 1 <= size <= 8:
            raise self.error(f"bad integer control byte 0x{control:02x} for {what}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def unsigned(self, what: str) -> int:
        start = self.pos
        value = self.integer(what)
        if value < 0:
            raise self.error(f"negative value {value} for unsigned {what}", start)
        return value

    def boolean(self, what: str) -> bool:
        start = self.pos
        byte = self.take(1, what)[0]
        if byte not in (0x30, 0x31):
            raise self.error(f"bad bool byte 0x{byte:02x} for {what}", start)
        return byte == 0x31

    def real(self, what: str) -> float:
        start = self.pos
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.error(f"{what} uses dlib's legacy text float format (unsupported)")
        mantissa = self.integer(what)
        exponent = self.integer(what)
        if exponent in SPECIAL_EXPONENTS:
            return SPECIAL_EXPONENTS[exponent]
        try:
            return math.ldexp(mantissa, exponent)
        except OverflowError:
            raise self.error(f"{what} overflows ({mantissa} * 2^{exponent})", start) from None

    def doubles(self, count: int, what: str) -> None:
        """Skip `count` floats."""
        for _ in range(count):
            self.real(what)

    def string(self, what: str) -> str:
        start = self.pos
        length = self.unsigned(f"length of {what}")
        raw = bytes(self.take(length, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not an ASCII string", start) from None

    def version(self, accepted: tuple[str, ...], what: str) -> str:
        start = self.pos
        found = self.string(f"version string of {what}")
        if found not in accepted:
            raise self.error(
                f"expected {what} version string {' or '.join(map(repr, accepted))}, "
                f"found {found[:40]!r}",
                start,
            )
        return found

    def integer_tokens(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Decode everything from here to the end of the file as dlib integers.

        Only for formats made solely of integers and floats (no strings or bools); a float
        is two consecutive integers, see `reals`. Returns the int64 values and their byte
        offsets, plus one more offset: where decoding stopped, the end of the file or an
        integer it cuts short (left for the caller to report with what it was reading).
        """
        raw = np.frombuffer(self.data, np.uint8)
        starts = _token_starts(raw, self.pos)
        control = raw[starts]
        size = control & 0x0F
        bad = np.flatnonzero((control & 0x70 != 0) | (size == 0) | (size > 8))
        if len(bad):
            at = int(starts[bad[0]])
            raise self.error(f"bad integer control byte 0x{raw[at]:02x} in {what}", at)
        stop = len(raw)
        if len(starts) and starts[-1] + 1 + int(size[-1]) > len(raw):
            stop, starts, control, size = int(starts[-1]), starts[:-1], control[:-1], size[:-1]
        # Magnitude: the `size` little-endian bytes after the control byte, read as the low
        # bytes of an 8-byte word (a view with one word at every byte offset).
        padded = np.concatenate([raw, np.zeros(8, np.uint8)])
        words = np.ndarray((len(raw),), "<u8", padded, strides=(1,))
        masks = np.array([(1 << 8 * n) - 1 for n in range(9)], np.uint64)
        values = (words[starts + 1] & masks[size]).view(np.int64)
        if np.any(values < 0):  # magnitudes of 2^63 and up do not fit an int64
            at = int(starts[np.argmax(values < 0)])
            raise self.error(f"integer of {what} out of range", at)
        self.pos = stop
        return np.append(starts, stop), np.where(control & 0x80, -values, values)


def reals(mantissas: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """dlib floats from their two integers, as float64 (mantissa * 2^exponent)."""
    with np.errstate(over="ignore"):
        values = np.ldexp(mantissas.astype(np.float64), np.clip(exponents, -2000, 2000))
    for code, special in SPECIAL_EXPONENTS.items():
        values[exponents == code] = special
    return values


def _token_starts(raw: np.ndarray, start: int) -> np.ndarray:
    """Byte offsets of the consecutive integers from `start` to the end of `raw`.

    Each integer's length follows from its control byte, so the offsets form a chain that a
    plain loop would walk token by token (seconds for a shape predictor). Instead, walkers
    start every _WALK_SPAN bytes, most of them inside a token, and all step at once; a walker
    started at a wrong offset falls into the true chain within a few tokens, and since the
    chain is deterministic, two walkers that share an offset agree from there on. The true
    chain is the first walker up to where the second meets it, then the second, and so on.
    A successor not met within its first _WALK_OVERLAP bytes (rare) restarts from an offset
    its predecessor visits.
    """
    end = len(raw)
    padded = np.concatenate([raw, np.zeros(1, np.uint8)])  # the walk may stand at `end`
    seeds = np.arange(start, end, _WALK_SPAN, dtype=np.int64)
    while True:
        windows = np.minimum(seeds + _WALK_OVERLAP, end)  # where each walker meets the previous
        limits = np.append(windows[1:], end)  # each walker walks through its successor's window
        paths = _walk(padded, seeds, limits)  # (steps, walkers), increasing down a column
        in_window = (paths >= seeds) & (paths < windows)
        marked = np.zeros(end + 1, bool)
        marked[paths[in_window]] = True
        meets = marked[paths[:, :-1]] & (paths[:, :-1] >= seeds[1:]) & (paths[:, :-1] < windows[1:])
        lost = np.flatnonzero(~meets.any(axis=0))
        if len(lost) == 0:
            break
        # Restart each walker its predecessor missed from the first offset the predecessor
        # visits at or after its seed. For the first such walker that offset is true (its
        # predecessor is true from its own meeting point on), so every round fixes one.
        walked = paths[:, lost]
        seeds[lost + 1] = walked[np.argmax(walked >= seeds[lost + 1], axis=0), np.arange(len(lost))]
    meet_at = paths[np.argmax(meets, axis=0), np.arange(len(seeds) - 1)]
    first = np.concatenate([[start], meet_at])
    stop = np.append(meet_at, end)
    keep = (paths >= first) & (paths < stop)
    return paths.T[keep.T]


def _walk(padded: np.ndarray, seeds: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Every offset each walker visits from its seed until it reaches its limit."""
    end = len(padded) - 1
    steps = [seeds]
    position = seeds
    while np.any(position < limits):
        step = np.minimum(position + 1 + (padded[position] & 0x0F), end)
        position = np.where(position < limits, step, position)
        steps.append(position)
    return np.stack(steps)
