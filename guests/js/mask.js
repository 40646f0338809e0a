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
 * Works on the bytes: ASCII values (the usual case) are masked in place in one
 * output buffer; only values with other characters are decoded to a string. */
export function maskPacked(column, mode) {
  if (!column.kinds.includes(KIND_VALUE)) return null;
  const kinds = Uint8Array.from(column.kinds);
  const offsets = new Uint32Array(kinds.length + 1);
  const src = column.data;
  let data = new Uint8Array(mode.kind === "redact" ? kinds.length * REDACTED.length : src.length + 16);
  let length = 0;
  const reserve = (extra) => {
    if (length + extra > data.length) {
      const grown = new Uint8Array(Math.max(data.length * 2, length + extra));
      grown.set(data.subarray(0, length));
      data = grown;
    }
  };
  const append = (bytes) => {
    reserve(bytes.length);
    data.set(bytes, length);
    length += bytes.length;
  };
  for (let i = 0; i < kinds.length; i++) {
    if (kinds[i] === KIND_VALUE) {
      if (mode.kind === "null") {
        kinds[i] = KIND_NULL;
      } else if (mode.kind === "redact") {
        append(REDACTED);
      } else {
        const start = column.offsets[i];
        const end = column.offsets[i + 1];
        let ascii = true;
        for (let k = start; k < end && ascii; k++) ascii = src[k] < 0x80;
        if (ascii) {
          const hidden = end - start - mode.n;
          if (hidden > 0) {
            reserve(hidden);
            data.fill(STAR_BYTE, length, length + hidden);
            length += hidden;
            append(src.subarray(start + hidden, end));
          } else {
            append(src.subarray(start, end));
          }
        } else {
          const text = decoder.decode(src.subarray(start, end));
          append(encoder.encode(starAllButLast(text, mode.n)));
        }
      }
    }
    offsets[i + 1] = length;
  }
  return { kinds, data: data.subarray(0, length), offsets };
}

const STAR_BYTE = 0x2a;

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
