"""`mask`: masks configured columns in both the new and the old row image.

The same guest as `guests/rust/mask`, in Python: same settings, same messages, same
output. Per batch: `tables()` once; per table the masked columns are resolved once and
each is masked a whole column at a time: `hash` asks the host to replace the column
by salted SHA-256 digests (`hash-column`: the values never enter guest memory), the
other modes read the column as one packed buffer (`read-text-column`), rewrite it in
one pass and write it back (`write-text-column`).

Invariants: `null` stays `null`, `unchanged-toast` stays `unchanged-toast`, and a
column is written back only when it holds a value.
"""

import re
from itertools import accumulate, islice
from typing import List, Optional

from wit_world.imports.types import Batch, Image, TextColumn

from airlock_guest import (
    KIND_NULL,
    KIND_VALUE,
    Settings,
    TablePatterns,
    debug_str,
    plugin,
    rust_trim,
)

REDACTED = b"[redacted]"
MODES = "hash, redact, null, keep-last-N (N a whole number, e.g. keep-last-4)"
# keep-last-N takes N up to the largest wasm32 `usize`, as the Rust guest does.
MAX_KEEP = 2**32 - 1
_DIGITS = re.compile(r"\+?[0-9]+")


def parse_mode(text: str):
    """`"hash"`, `"redact"`, `"null"` or `("keep", N)`; `None` when not a mode."""
    text = rust_trim(text)
    if text in ("hash", "redact", "null"):
        return text
    if text.startswith("keep-last-"):
        number = text[len("keep-last-"):]
        if _DIGITS.fullmatch(number) and int(number) <= MAX_KEEP:
            return ("keep", int(number))
    return None


class Rule:
    """One `columns` entry: a bare column name (any table) or `schema.table.column`."""

    def __init__(self, tables: Optional[TablePatterns], column: str, mode):
        self.tables = tables
        self.column = column
        self.mode = mode


class Config:
    def __init__(self, settings: Settings):
        settings.deny_unknown(["columns", "default_mode", "mode.*", "salt", "tag"])
        m = settings.get("default_mode")
        if m is None:
            default_mode = "hash"
        else:
            default_mode = parse_mode(m)
            if default_mode is None:
                raise ValueError(
                    f"setting `default_mode` = {debug_str(m)}: unknown mode; allowed modes: {MODES}"
                )
        columns = settings.get_all("columns")
        if not settings.contains("columns"):
            columns.append("email")
        rules: List[Rule] = []
        for entry in columns:
            entry = rust_trim(entry)
            if not entry:
                raise ValueError(
                    "setting `columns` has an empty entry; expected a column name or schema.table.column"
                )
            m = settings.get(f"mode.{entry}")
            if m is None:
                mode = default_mode
            else:
                mode = parse_mode(m)
                if mode is None:
                    raise ValueError(
                        f"column `{entry}`: mode {debug_str(m)} is not a mode; allowed modes: {MODES}"
                    )
            table, dot, column = entry.rpartition(".")
            tables = TablePatterns([table]) if dot else None
            rules.append(Rule(tables, column, mode))
        # A table-qualified entry wins over a bare column name (a stable sort).
        rules.sort(key=lambda r: r.tables is None)
        for key, _ in settings.pairs():
            if key.startswith("mode."):
                column = key[len("mode."):]
                if not any(rust_trim(c) == column for c in columns):
                    raise ValueError(
                        f"setting `{key}` names column `{column}`, which is not in `columns` ({', '.join(columns)}); add it there to mask it"
                    )
        self.rules = rules
        self.tag = rust_trim(settings.get_or("tag", "pii"))
        # Prepended to every hashed value.
        self.salt = settings.get_or("salt", "").encode()

    def mode_for(self, schema: str, table: str, column: str):
        for r in self.rules:
            if r.column == column and (r.tables is None or r.tables.matches(schema, table)):
                return r.mode
        return None

    def process(self, batch: Batch) -> None:
        for ti, table in enumerate(batch.tables()):
            for ci, column in enumerate(table.columns):
                mode = self.mode_for(table.schema, table.name, column.name)
                if mode is None:
                    continue
                if self.tag:
                    batch.tag_column(ti, ci, self.tag)
                for image in (Image.NEW, Image.OLD):
                    if mode == "hash":
                        batch.hash_column(ti, ci, image, self.salt)
                    else:
                        packed = batch.read_text_column(ti, ci, image)
                        masked = mask_packed(packed, mode)
                        if masked is not None:
                            batch.write_text_column(ti, ci, image, masked)


def mask_packed(column: TextColumn, mode) -> Optional[TextColumn]:
    """Masks every value of a packed column with `mode` (not `hash`, which the host
    does); `None` when the column holds no value (nothing to write back).

    Each mode is a few whole-buffer operations (`bytes.replace`, `accumulate` over
    `map`, slice assignment), not Python code per value: in a guest the interpreter,
    not the data, is what costs."""
    kinds = column.kinds
    if KIND_VALUE not in kinds:
        return None
    if mode == "null":
        return TextColumn(
            kinds=bytes(kinds).replace(_VALUE_BYTE, _NULL_BYTE),
            data=b"",
            offsets=[0] * (len(kinds) + 1),
        )
    if mode == "redact":
        sizes = (0, 0, len(REDACTED))
        return TextColumn(
            kinds=kinds,
            data=REDACTED * kinds.count(KIND_VALUE),
            offsets=list(accumulate(map(sizes.__getitem__, kinds), initial=0)),
        )
    keep = mode[1]
    src, starts = column.data, column.offsets
    if src.isascii():
        # One byte per character: lengths stay, so kinds and offsets stay; only
        # the hidden bytes of each value turn into stars. Null and unchanged-toast
        # entries span nothing and are skipped by the length test.
        data = bytearray(src)
        for start, end in zip(starts, islice(starts, 1, None)):
            hidden = end - start - keep
            if hidden > 0:
                data[start:start + hidden] = _STARS[:hidden] if hidden <= len(_STARS) else b"*" * hidden
        return TextColumn(kinds=kinds, data=bytes(data), offsets=starts)
    data = bytearray()
    offsets = [0]
    for i, kind in enumerate(kinds):
        if kind == KIND_VALUE:
            text = src[starts[i]:starts[i + 1]].decode("utf-8", "replace")
            data += star_all_but_last(text, keep).encode()
        offsets.append(len(data))
    return TextColumn(kinds=kinds, data=bytes(data), offsets=offsets)


_VALUE_BYTE = bytes([KIND_VALUE])
_NULL_BYTE = bytes([KIND_NULL])
_STARS = b"*" * 256


def star_all_but_last(text: str, n: int) -> str:
    """`text` with all but its last `n` characters replaced by `*` (unchanged when it
    has no more than `n` characters)."""
    hidden = len(text) - n
    if hidden <= 0:
        return text
    return "*" * hidden + text[hidden:]


WitWorld = plugin(
    "mask",
    "masks configured columns (hash, redact, null, keep-last-N) in new and old images and tags them",
    Config,
)
