"""`__NAME__`: replaces every value of the columns named in `columns` (default
`email`) with `[redacted]`, in the new and the old image. A starting point: it reads
and writes each column whole (`read_text_column`, `write_text_column`), one host call
per column and image, none per row.
"""

from itertools import accumulate

from wit_world.imports.types import Batch, Image, TextColumn

from airlock_guest import KIND_VALUE, Settings, plugin

REDACTED = b"[redacted]"


class Config:
    def __init__(self, settings: Settings):
        settings.deny_unknown(["columns"])
        self.columns = settings.get_all("columns") or ["email"]

    def process(self, batch: Batch) -> None:
        for ti, table in enumerate(batch.tables()):
            for ci, column in enumerate(table.columns):
                if column.name not in self.columns:
                    continue
                for image in (Image.NEW, Image.OLD):
                    values = batch.read_text_column(ti, ci, image)
                    if KIND_VALUE not in values.kinds:
                        continue
                    sizes = (0, 0, len(REDACTED))
                    batch.write_text_column(
                        ti,
                        ci,
                        image,
                        TextColumn(
                            kinds=values.kinds,
                            data=REDACTED * values.kinds.count(KIND_VALUE),
                            offsets=list(accumulate(map(sizes.__getitem__, values.kinds), initial=0)),
                        ),
                    )


WitWorld = plugin("__NAME__", "redacts the columns named in `columns`", Config)
