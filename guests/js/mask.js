// `mask`: masks configured columns in both the new and the old row image.
//
// The same guest as `guests/rust/mask`, in JavaScript: same settings, same
// messages, same output. Per batch: `tables()` once; per table the masked columns
// are resolved once and each is masked a whole column at a time: `hash` asks the
// host to replace the column by salted SHA-256 digests (`hashColumn`: the values
// never enter guest memory), the other modes read the column as one packed buffer
// (`readTextColumn`), rewrite it in one pass and write it back (`writeTextColumn`).
//
// Invariants: `null` stays `null`, `unchanged-toast` stays `unchanged-toast`, and
// a column is written back only when it holds a value.

import {
  KIND_NULL,
  KIND_VALUE,
  Settings,
  TablePatterns,
  debugStr,
  rustTrim,
} from "./airlock_guest.js";

const REDACTED = new TextEncoder().encode("[redacted]");
const MODES = "hash, redact, null, keep-last-N (N a whole number, e.g. keep-last-4)";
// keep-last-N takes N up to the largest wasm32 `usize`, as the Rust guest does.
const MAX_KEEP = 4294967295;

const encoder = new TextEncoder();
// Keeps a leading byte order mark, as Rust's `from_utf8_lossy` does.
const decoder = new TextDecoder("utf-8", { ignoreBOM: true });

/** `{ kind: "hash" | "redact" | "null" }` or `{ kind: "keep", n }`; `null` when not
 * a mode. */
function parseMode(text) {
  const t = rustTrim(text);
  if (t === "hash" || t === "redact" || t === "null") return { kind: t };
  if (t.startsWith("keep-last-")) {
    const number = t.slice("keep-last-".length);
    if (/^\+?[0-9]+$/.test(number) && Number(number) <= MAX_KEEP) {
      return { kind: "keep", n: Number(number) };
    }
  }
  return null;
}

class Config {
  constructor(settings) {
    settings.denyUnknown(["columns", "default_mode", "mode.*", "salt", "tag"]);
    let defaultMode = { kind: "hash" };
    const dm = settings.get("default_mode");
    if (dm !== undefined) {
      defaultMode = parseMode(dm);
      if (defaultMode === null) {
        throw `setting \`default_mode\` = ${debugStr(dm)}: unknown mode; allowed modes: ${MODES}`;
      }
    }
    const columns = settings.getAll("columns");
    if (!settings.contains("columns")) columns.push("email");
    const rules = [];
    for (const raw of columns) {
      const entry = rustTrim(raw);
      if (entry === "") {
        throw "setting `columns` has an empty entry; expected a column name or schema.table.column";
      }
      let mode = defaultMode;
      const m = settings.get(`mode.${entry}`);
      if (m !== undefined) {
        mode = parseMode(m);
        if (mode === null) {
          throw `column \`${entry}\`: mode ${debugStr(m)} is not a mode; allowed modes: ${MODES}`;
        }
      }
      const dot = entry.lastIndexOf(".");
      rules.push(
        dot >= 0
          ? { tables: new TablePatterns([entry.slice(0, dot)]), column: entry.slice(dot + 1), mode }
          : { tables: null, column: entry, mode },
      );
    }
    // A table-qualified entry wins over a bare column name (a stable sort).
    rules.sort((a, b) => (a.tables === null) - (b.tables === null));
    for (const [key] of settings.pairs) {
      if (key.startsWith("mode.")) {
        const column = key.slice("mode.".length);
        if (!columns.some((c) => rustTrim(c) === column)) {
          throw `setting \`${key}\` names column \`${column}\`, which is not in \`columns\` (${columns.join(", ")}); add it there to mask it`;
        }
      }
    }
    this.rules = rules;
    this.tag = rustTrim(settings.getOr("tag", "pii"));
    // Prepended to every hashed value.
    this.salt = encoder.encode(settings.getOr("salt", ""));
  }

  modeFor(schema, table, column) {
    const rule = this.rules.find(
      (r) => r.column === column && (r.tables === null || r.tables.matches(schema, table)),
    );
    return rule === undefined ? null : rule.mode;
  }

  process(batch) {
    const tables = batch.tables();
    for (let ti = 0; ti < tables.length; ti++) {
      const table = tables[ti];
      for (let ci = 0; ci < table.columns.length; ci++) {
        const mode = this.modeFor(table.schema, table.name, table.columns[ci].name);
        if (mode === null) continue;
        if (this.tag !== "") batch.tagColumn(ti, ci, this.tag);
        for (const image of ["new", "old"]) {
          if (mode.kind === "hash") {
            batch.hashColumn(ti, ci, image, this.salt);
          } else {
            const masked = maskPacked(batch.readTextColumn(ti, ci, image), mode);
            if (masked !== null) batch.writeTextColumn(ti, ci, image, masked);
          }
        }
      }
    }
  }
}

/** Masks every value of a packed column with `mode` (not `hash`, which the host
 * does); `null` when the column holds no value (nothing to write back).
 *
 * The guest runs in an interpreter, so the work per value is kept to a few
 * operations and the rest is left to built-ins over whole buffers: `redact` and
 * `null` only compute offsets; `keep-last-N` on an ASCII column (checked once, by
 * the regular-expression engine) keeps kinds, offsets and lengths and only fills
 * each value's hidden bytes with stars in a copy of the data. */
export function maskPacked(column, mode) {
  const kinds = column.kinds;
  const rows = kinds.length;
  let any = false;
  for (let i = 0; i < rows && !any; i++) any = kinds[i] === KIND_VALUE;
  if (!any) return null;
  if (mode.kind === "null") {
    const nulls = new Uint8Array(rows);
    for (let i = 0; i < rows; i++) nulls[i] = kinds[i] === KIND_VALUE ? KIND_NULL : kinds[i];
    return { kinds: nulls, data: new Uint8Array(0), offsets: new Uint32Array(rows + 1) };
  }
  if (mode.kind === "redact") {
    const offsets = new Uint32Array(rows + 1);
    const size = REDACTED.length;
    let length = 0;
    for (let i = 0; i < rows; i++) {
      if (kinds[i] === KIND_VALUE) length += size;
      offsets[i + 1] = length;
    }
    const data = new Uint8Array(length);
    for (let at = 0; at < length; at += size) data.set(REDACTED, at);
    return { kinds, data, offsets };
  }
  const src = column.data;
  const starts = column.offsets;
  const n = mode.n;
  if (!NOT_ASCII.test(decoder.decode(src))) {
    // One byte per character: only the hidden bytes change. Null and
    // unchanged-toast entries span nothing and fail the length test.
    // `new Uint8Array(typedArray)` and `set` are native; `from` and `fill` are
    // self-hosted JavaScript, interpreted like the guest itself.
    const data = new Uint8Array(src);
    for (let i = 0; i < rows; i++) {
      const start = starts[i];
      const hidden = starts[i + 1] - start - n;
      if (hidden > 0) data.set(hidden <= STARS.length ? STARS.subarray(0, hidden) : stars(hidden), start);
    }
    return { kinds, data, offsets: starts };
  }
  const parts = [];
  const offsets = new Uint32Array(rows + 1);
  let length = 0;
  for (let i = 0; i < rows; i++) {
    if (kinds[i] === KIND_VALUE) {
      const text = decoder.decode(src.subarray(starts[i], starts[i + 1]));
      const bytes = encoder.encode(starAllButLast(text, n));
      parts.push(bytes);
      length += bytes.length;
    }
    offsets[i + 1] = length;
  }
  const data = new Uint8Array(length);
  let at = 0;
  for (const bytes of parts) {
    data.set(bytes, at);
    at += bytes.length;
  }
  return { kinds, data, offsets };
}

const STARS = new TextEncoder().encode("*".repeat(256));

function stars(n) {
  return new TextEncoder().encode("*".repeat(n));
}

/** Any character outside ASCII (an invalid byte decodes to U+FFFD, which is one). */
const NOT_ASCII = /[^\u0000-\u007f]/;


/** `text` with all but its last `n` characters (code points) replaced by `*`,
 * unchanged when it has no more than `n` characters. */
export function starAllButLast(text, n) {
  const chars = Array.from(text);
  const hidden = chars.length - n;
  if (hidden <= 0) return text;
  return "*".repeat(hidden) + chars.slice(hidden).join("");
}

let config = null;

export function info() {
  return {
    name: "mask",
    version: "0.1.0",
    description:
      "masks configured columns (hash, redact, null, keep-last-N) in new and old images and tags them",
  };
}

export function init(settings) {
  config = new Config(new Settings(settings));
}

export function process(batch) {
  if (config === null) throw "mask: process called before init";
  config.process(batch);
}
