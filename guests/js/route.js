// `route`: sends rows that carry the restricted tag to the restricted route, every
// other row to the default route, and rows of spine tables also to the spine.
//
// The same guest as `guests/rust/route`, in JavaScript: same settings, same
// messages, same output. A row is restricted when one of its row tags is `tag` or a
// sub-tag of it (`pii:email` for `pii`), or, unless `by_column_tags = false`, when a
// column of its table carries such a tag.

import { Settings, TablePatterns, debugStr, rustTrim } from "./airlock_guest.js";

class Config {
  constructor(s) {
    s.denyUnknown([
      "tag",
      "restricted_route",
      "default_route",
      "by_column_tags",
      "spine_tables",
      "spine_route",
      "spine_kind",
      "spine_source",
    ]);
    const text = (key, fallback) => {
      const value = rustTrim(s.getOr(key, fallback));
      if (value === "") {
        throw `setting \`${key}\` is empty; expected a name (default ${debugStr(fallback)})`;
      }
      return value;
    };
    this.tag = text("tag", "pii");
    this.restrictedRoute = text("restricted_route", "restricted");
    this.defaultRoute = text("default_route", "default");
    this.byColumnTags = s.flag("by_column_tags", true);
    this.spineTables = new TablePatterns(s.getAll("spine_tables"));
    this.spineRoute = text("spine_route", "spine");
    this.spineKind = text("spine_kind", "other");
    this.spineSource = text("spine_source", "airlock");
  }

  /** `tag` itself or one of its sub-tags (`pii:email` for `pii`). */
  isRestrictedTag(tag) {
    if (!tag.startsWith(this.tag)) return false;
    const rest = tag.slice(this.tag.length);
    return rest === "" || rest.startsWith(":");
  }

  process(batch) {
    // No host call per row: each route and annotation goes to many rows at once.
    const tables = batch.tables();
    for (let ti = 0; ti < tables.length; ti++) {
      const table = tables[ti];
      const rows = batch.rowsOf(ti);
      if (rows.length === 0) continue;
      let tableRestricted = false;
      if (this.byColumnTags) {
        for (let ci = 0; ci < table.columns.length && !tableRestricted; ci++) {
          tableRestricted = batch.columnTags(ti, ci).some((t) => this.isRestrictedTag(t));
        }
      }
      if (tableRestricted) {
        batch.addRouteRows(rows, this.restrictedRoute);
      } else {
        const tagged = batch.rowsTagged(ti, this.tag);
        let others = rows;
        if (tagged.length > 0) {
          batch.addRouteRows(tagged, this.restrictedRoute);
          const marked = new Set(tagged);
          others = rows.filter((row) => !marked.has(row));
        }
        if (others.length > 0) batch.addRouteRows(others, this.defaultRoute);
      }
      if (this.spineTables.matches(table.schema, table.name)) {
        batch.addRouteRows(rows, this.spineRoute);
        batch.annotateRows(rows, "spine.kind", this.spineKind);
        batch.annotateRows(rows, "spine.source", this.spineSource);
      }
    }
  }
}

let config = null;

export function info() {
  return {
    name: "route",
    version: "0.1.0",
    description:
      "routes tagged rows to the restricted route, others to the default route, spine tables to the spine",
  };
}

export function init(settings) {
  config = new Config(new Settings(settings));
}

export function process(batch) {
  if (config === null) throw "route: process called before init";
  config.process(batch);
}
