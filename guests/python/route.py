"""`route`: sends rows that carry the restricted tag to the restricted route, every
other row to the default route, and rows of spine tables also to the spine.

The same guest as `guests/rust/route`, in Python: same settings, same messages, same
output. A row is restricted when one of its row tags is `tag` or a sub-tag of it
(`pii:email` for `pii`), or, unless `by_column_tags = false`, when a column of its
table carries such a tag.
"""

from wit_world.imports.types import Batch

from airlock_guest import Settings, TablePatterns, debug_str, plugin, rust_trim


class Config:
    def __init__(self, s: Settings):
        s.deny_unknown(
            [
                "tag",
                "restricted_route",
                "default_route",
                "by_column_tags",
                "spine_tables",
                "spine_route",
                "spine_kind",
                "spine_source",
            ]
        )

        def text(key: str, default: str) -> str:
            value = rust_trim(s.get_or(key, default))
            if not value:
                raise ValueError(
                    f"setting `{key}` is empty; expected a name (default {debug_str(default)})"
                )
            return value

        self.tag = text("tag", "pii")
        self.restricted_route = text("restricted_route", "restricted")
        self.default_route = text("default_route", "default")
        self.by_column_tags = s.flag("by_column_tags", True)
        self.spine_tables = TablePatterns(s.get_all("spine_tables"))
        self.spine_route = text("spine_route", "spine")
        self.spine_kind = text("spine_kind", "other")
        self.spine_source = text("spine_source", "airlock")

    def is_restricted_tag(self, tag: str) -> bool:
        """`tag` itself or one of its sub-tags (`pii:email` for `pii`)."""
        if not tag.startswith(self.tag):
            return False
        rest = tag[len(self.tag):]
        return rest == "" or rest.startswith(":")

    def process(self, batch: Batch) -> None:
        # No host call per row: each route and annotation goes to many rows at once.
        for ti, table in enumerate(batch.tables()):
            rows = batch.rows_of(ti)
            if not rows:
                continue
            table_restricted = self.by_column_tags and any(
                any(self.is_restricted_tag(t) for t in batch.column_tags(ti, ci))
                for ci in range(len(table.columns))
            )
            if table_restricted:
                batch.add_route_rows(rows, self.restricted_route)
            else:
                tagged = batch.rows_tagged(ti, self.tag)
                if tagged:
                    batch.add_route_rows(tagged, self.restricted_route)
                    marked = set(tagged)
                    others = [row for row in rows if row not in marked]
                else:
                    others = rows
                if others:
                    batch.add_route_rows(others, self.default_route)
            if self.spine_tables.matches(table.schema, table.name):
                batch.add_route_rows(rows, self.spine_route)
                batch.annotate_rows(rows, "spine.kind", self.spine_kind)
                batch.annotate_rows(rows, "spine.source", self.spine_source)


WitWorld = plugin(
    "route",
    "routes tagged rows to the restricted route, others to the default route, spine tables to the spine",
    Config,
)
