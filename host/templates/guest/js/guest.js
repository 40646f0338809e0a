// `__NAME__`: replaces every value of the columns named in `columns` (default
// `email`) with `[redacted]`, in the new and the old image. A starting point: it
// reads and writes each column whole (`readTextColumn`, `writeTextColumn`), one host
// call per column and image, none per row.

import { KIND_VALUE, Settings } from "./airlock_guest.js";

const REDACTED = new TextEncoder().encode("[redacted]");
let columns = null;

export function info() {
  return { name: "__NAME__", version: "0.1.0", description: "redacts the columns named in `columns`" };
}

export function init(settings) {
  const s = new Settings(settings);
  s.denyUnknown(["columns"]);
  const named = s.getAll("columns");
  columns = named.length > 0 ? named : ["email"];
}

export function process(batch) {
  if (columns === null) throw "__NAME__: process called before init";
  const tables = batch.tables();
  for (let ti = 0; ti < tables.length; ti++) {
    const table = tables[ti];
    for (let ci = 0; ci < table.columns.length; ci++) {
      if (!columns.includes(table.columns[ci].name)) continue;
      for (const image of ["new", "old"]) {
        const values = batch.readTextColumn(ti, ci, image);
        const kinds = values.kinds;
        if (kinds.indexOf(KIND_VALUE) < 0) continue;
        const offsets = new Uint32Array(kinds.length + 1);
        let length = 0;
        for (let i = 0; i < kinds.length; i++) {
          if (kinds[i] === KIND_VALUE) length += REDACTED.length;
          offsets[i + 1] = length;
        }
        const data = new Uint8Array(length);
        for (let at = 0; at < length; at += REDACTED.length) data.set(REDACTED, at);
        batch.writeTextColumn(ti, ci, image, { kinds, data, offsets });
      }
    }
  }
}
