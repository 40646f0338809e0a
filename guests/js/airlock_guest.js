// Helpers for airlock transform guests written in JavaScript, with the same
// behaviour and messages as the Rust SDK (`guests/rust/sdk`): `Settings` for the
// flattened `NAME.toml`, `globMatch` and `TablePatterns` for `schema.table`
// patterns, `debugStr` to quote a value in an error message.
//
// componentize-js generates the bindings from `wit/transform.wit` when the guest is
// built: the guest module exports `info`, `init` and `process`, and imports the
// host's `log` with `import log from "log"`. WIT names become camelCase
// (`rowsOf`, `readTextColumn`), enums are strings (`"new"`, `"old"`), variants are
// `{ tag, val }`, `s64`/`u64` are BigInt, `list<u8>` a Uint8Array and `list<u32>` a
// Uint32Array. Throwing a string from `init` or `process` returns it as the error.

// Packed column kinds (see the WIT `text-column` record).
export const KIND_NULL = 0;
export const KIND_UNCHANGED = 1;
export const KIND_VALUE = 2;

// Unicode `White_Space`, which Rust's `trim` removes (JavaScript's `trim` differs:
// it also removes U+FEFF and keeps U+0085).
const WHITE = "\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
const TRIM = new RegExp(`^[${WHITE}]+|[${WHITE}]+$`, "g");

/** `text` without leading and trailing Unicode white space (Rust's `str::trim`). */
export function rustTrim(text) {
  return text.replace(TRIM, "");
}

/** `text` in double quotes with quotes, backslashes and control characters escaped,
 * as the Rust guests quote values in their messages. */
export function debugStr(text) {
  let out = '"';
  for (const ch of text) {
    const code = ch.codePointAt(0);
    if (ch === '"') out += '\\"';
    else if (ch === "\\") out += "\\\\";
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (code === 0) out += "\\0";
    else if (code < 0x20 || code === 0x7f) out += `\\u{${code.toString(16)}}`;
    else out += ch;
  }
  return out + '"';
}

/** A guest's settings: the host's flattening of `NAME.toml` into `[key, value]`
 * pairs (dotted keys for nested tables, one pair per array element). */
export class Settings {
  constructor(pairs) {
    this.pairs = pairs;
  }

  /** The first value of `key`, or `undefined`. */
  get(key) {
    const pair = this.pairs.find(([k]) => k === key);
    return pair === undefined ? undefined : pair[1];
  }

  /** Every value of `key`, in order (an array setting). */
  getAll(key) {
    return this.pairs.filter(([k]) => k === key).map(([, v]) => v);
  }

  /** The first value of `key`, or `fallback`. */
  getOr(key, fallback) {
    const value = this.get(key);
    return value === undefined ? fallback : value;
  }

  /** Whether `key` is present at all. */
  contains(key) {
    return this.pairs.some(([k]) => k === key);
  }

  /** `key` as a boolean (`true`/`false`/`yes`/`no`/`on`/`off`/`1`/`0`), or
   * `fallback`; throws the message for the host otherwise. */
  flag(key, fallback) {
    const value = this.get(key);
    if (value === undefined) return fallback;
    const v = rustTrim(value).replace(/[A-Z]/g, (c) => c.toLowerCase());
    if (["true", "yes", "on", "1"].includes(v)) return true;
    if (["false", "no", "off", "0"].includes(v)) return false;
    throw `setting \`${key}\` = ${debugStr(v)}: expected a boolean (true or false)`;
  }

  /** Refuses keys that no `allowed` entry accepts (`"name"`, or `"prefix.*"` for
   * every key under `prefix.`): throws one message listing every unknown key. */
  denyUnknown(allowed) {
    const unknown = [];
    for (const [key] of this.pairs) {
      const known = allowed.some((a) =>
        a.endsWith("*")
          ? key.startsWith(a.slice(0, -1)) && key.length > a.length - 1
          : key === a,
      );
      if (!known && !unknown.includes(key)) unknown.push(key);
    }
    if (unknown.length > 0) {
      throw `unknown setting${unknown.length > 1 ? "s" : ""} ${unknown
        .map((k) => `\`${k}\``)
        .join(", ")}; known settings: ${allowed.join(", ")}`;
    }
  }
}

/** Whether `text` matches the glob `pattern`: `*` matches any run of characters
 * (dots included), `?` exactly one character, everything else itself. */
export function globMatch(pattern, text) {
  const p = Array.from(pattern);
  const t = Array.from(text);
  let pi = 0;
  let ti = 0;
  let starP = -1;
  let starT = -1;
  while (ti < t.length) {
    if (pi < p.length && (p[pi] === "?" || p[pi] === t[ti])) {
      pi++;
      ti++;
    } else if (pi < p.length && p[pi] === "*") {
      starP = pi;
      starT = ti;
      pi++;
    } else if (starP >= 0) {
      pi = starP + 1;
      starT++;
      ti = starT;
    } else {
      return false;
    }
  }
  return p.slice(pi).every((c) => c === "*");
}

/** A set of `schema.table` globs; a pattern without a dot is a table name in any
 * schema (`users` is `*.users`). */
export class TablePatterns {
  constructor(patterns) {
    this.patterns = patterns.map((p) => {
      const trimmed = rustTrim(p);
      return trimmed.includes(".") ? trimmed : `*.${trimmed}`;
    });
  }

  matches(schema, table) {
    const qualified = `${schema}.${table}`;
    return this.patterns.some((p) => globMatch(p, qualified));
  }
}
