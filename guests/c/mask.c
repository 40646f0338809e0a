/* `mask`: masks configured columns in both the new and the old row image.
 *
 * The same guest as guests/rust/mask, in C: same settings, same messages, same
 * output. Per batch: `tables()` once; per table the masked columns are resolved once
 * and each is masked a whole column at a time: `hash` asks the host to replace the
 * column by salted SHA-256 digests (`hash-column`: the values never enter guest
 * memory), the other modes read the column as one packed buffer (`read-text-column`),
 * rewrite it in one pass and write it back (`write-text-column`).
 *
 * Invariants: `null` stays `null`, `unchanged-toast` stays `unchanged-toast`, and a
 * column is written back only when it holds a value. */
#include <stdlib.h>
#include <string.h>

#include "airlock_guest.h"
#include "transform.h"

#define MODES "hash, redact, null, keep-last-N (N a whole number, e.g. keep-last-4)"
static const char REDACTED[] = "[redacted]";

typedef enum { MODE_HASH, MODE_REDACT, MODE_NULL, MODE_KEEP_LAST } mode_kind;

typedef struct {
    mode_kind kind;
    uint32_t keep; /* N of keep-last-N: a wasm32 `usize`, as in the Rust guest */
} mode;

/* One `columns` entry: a bare column name (any table) or `schema.table.column`. */
typedef struct {
    bool qualified;
    ag_table_patterns tables;
    ag_buf column;
    mode mode;
} rule;

typedef struct {
    rule *rules;
    size_t count;
    ag_buf tag;
    ag_buf salt; /* prepended to every hashed value */
} config;

static config *CONFIG = NULL;

static bool parse_mode(ag_str text, mode *out) {
    ag_str t = ag_trim(text);
    if (ag_eq_c(t, "hash")) return out->kind = MODE_HASH, true;
    if (ag_eq_c(t, "redact")) return out->kind = MODE_REDACT, true;
    if (ag_eq_c(t, "null")) return out->kind = MODE_NULL, true;
    ag_str prefix = ag_cstr("keep-last-");
    if (!ag_starts_with(t, prefix)) return false;
    size_t i = prefix.len;
    if (i < t.len && t.ptr[i] == '+') i++;
    if (i == t.len) return false;
    uint64_t n = 0;
    for (; i < t.len; i++) {
        if (t.ptr[i] < '0' || t.ptr[i] > '9') return false;
        n = n * 10 + (t.ptr[i] - '0');
        if (n > UINT32_MAX) return false;
    }
    out->kind = MODE_KEEP_LAST;
    out->keep = (uint32_t)n;
    return true;
}

static void config_free(config *c) {
    for (size_t i = 0; i < c->count; i++) {
        ag_patterns_free(&c->rules[i].tables);
        ag_buf_free(&c->rules[i].column);
    }
    free(c->rules);
    ag_buf_free(&c->tag);
    ag_buf_free(&c->salt);
    free(c);
}

/* The configuration from the settings, or NULL with the message in `err`. */
static config *config_from_settings(const ag_settings *s, ag_buf *err) {
    static const char *const allowed[] = {"columns", "default_mode", "mode.*", "salt", "tag"};
    if (!ag_deny_unknown(s, allowed, sizeof allowed / sizeof *allowed, err)) return NULL;
    mode default_mode = {MODE_HASH, 0};
    const ag_str *dm = ag_get(s, ag_cstr("default_mode"));
    if (dm != NULL && !parse_mode(*dm, &default_mode)) {
        ag_buf_puts(err, "setting `default_mode` = ");
        ag_buf_push_debug(err, *dm);
        ag_buf_puts(err, ": unknown mode; allowed modes: " MODES);
        return NULL;
    }
    /* The `columns` entries, or `email` when the setting is absent. */
    ag_str *columns = malloc((s->len + 1) * sizeof *columns);
    size_t ncolumns = 0;
    for (size_t i = 0; i < s->len; i++) {
        if (ag_eq_c(s->pairs[i].key, "columns")) columns[ncolumns++] = s->pairs[i].value;
    }
    if (ncolumns == 0) columns[ncolumns++] = ag_cstr("email");

    config *c = calloc(1, sizeof *c);
    c->rules = calloc(ncolumns, sizeof *c->rules);
    for (size_t i = 0; i < ncolumns; i++) {
        ag_str entry = ag_trim(columns[i]);
        if (entry.len == 0) {
            ag_buf_puts(err, "setting `columns` has an empty entry; expected a column name or schema.table.column");
            goto refuse;
        }
        mode m = default_mode;
        ag_buf key = {0};
        ag_buf_puts(&key, "mode.");
        ag_buf_push_str(&key, entry);
        const ag_str *given = ag_get(s, ag_buf_str(&key));
        ag_buf_free(&key);
        if (given != NULL && !parse_mode(*given, &m)) {
            ag_buf_puts(err, "column `");
            ag_buf_push_str(err, entry);
            ag_buf_puts(err, "`: mode ");
            ag_buf_push_debug(err, *given);
            ag_buf_puts(err, " is not a mode; allowed modes: " MODES);
            goto refuse;
        }
        rule *r = &c->rules[c->count++];
        r->mode = m;
        const uint8_t *dot = NULL;
        for (size_t k = entry.len; k > 0; k--) {
            if (entry.ptr[k - 1] == '.') {
                dot = entry.ptr + k - 1;
                break;
            }
        }
        if (dot != NULL) {
            ag_str table = {entry.ptr, (size_t)(dot - entry.ptr)};
            ag_str column = {dot + 1, entry.len - table.len - 1};
            r->qualified = true;
            ag_patterns_add(&r->tables, table);
            r->column = ag_buf_copy(column);
        } else {
            r->column = ag_buf_copy(entry);
        }
    }
    /* A table-qualified entry wins over a bare column name (a stable partition). */
    rule *sorted = malloc(c->count * sizeof *sorted);
    size_t n = 0;
    for (size_t i = 0; i < c->count; i++) if (c->rules[i].qualified) sorted[n++] = c->rules[i];
    for (size_t i = 0; i < c->count; i++) if (!c->rules[i].qualified) sorted[n++] = c->rules[i];
    memcpy(c->rules, sorted, c->count * sizeof *sorted);
    free(sorted);

    ag_str mode_prefix = ag_cstr("mode.");
    for (size_t i = 0; i < s->len; i++) {
        ag_str key = s->pairs[i].key;
        if (!ag_starts_with(key, mode_prefix)) continue;
        ag_str column = {key.ptr + mode_prefix.len, key.len - mode_prefix.len};
        bool listed = false;
        for (size_t k = 0; k < ncolumns && !listed; k++) listed = ag_eq(ag_trim(columns[k]), column);
        if (!listed) {
            ag_buf_puts(err, "setting `");
            ag_buf_push_str(err, key);
            ag_buf_puts(err, "` names column `");
            ag_buf_push_str(err, column);
            ag_buf_puts(err, "`, which is not in `columns` (");
            for (size_t k = 0; k < ncolumns; k++) {
                if (k > 0) ag_buf_puts(err, ", ");
                ag_buf_push_str(err, columns[k]);
            }
            ag_buf_puts(err, "); add it there to mask it");
            goto refuse;
        }
    }
    const ag_str *tag = ag_get(s, ag_cstr("tag"));
    c->tag = ag_buf_copy(ag_trim(tag != NULL ? *tag : ag_cstr("pii")));
    const ag_str *salt = ag_get(s, ag_cstr("salt"));
    c->salt = ag_buf_copy(salt != NULL ? *salt : ag_cstr(""));
    free(columns);
    return c;

refuse:
    free(columns);
    config_free(c);
    return NULL;
}

static const mode *mode_for(const config *c, ag_str schema, ag_str table, ag_str column) {
    for (size_t i = 0; i < c->count; i++) {
        const rule *r = &c->rules[i];
        if (ag_eq(ag_buf_str(&r->column), column) &&
            (!r->qualified || ag_patterns_match(&r->tables, schema, table))) {
            return &r->mode;
        }
    }
    return NULL;
}

static ag_str str_of(const transform_string_t *s) {
    ag_str out = {s->ptr, s->len};
    return out;
}

/* Whether every byte of `s` is ASCII, eight bytes at a time. */
static bool is_ascii(ag_str s) {
    size_t i = 0;
    for (; i + 8 <= s.len; i += 8) {
        uint64_t word;
        memcpy(&word, s.ptr + i, 8);
        if (word & 0x8080808080808080ULL) return false;
    }
    for (; i < s.len; i++) {
        if ((uint8_t)s.ptr[i] & 0x80) return false;
    }
    return true;
}

/* Masks every value of a packed column with `m` (not hash, which the host does)
 * into `out`; false when the column holds no value (nothing to write back). */
static bool mask_packed(const airlock_transform_types_text_column_t *in, mode m,
                        airlock_transform_types_text_column_t *out) {
    size_t rows = in->kinds.len;
    bool any = false;
    for (size_t i = 0; i < rows && !any; i++) any = in->kinds.ptr[i] == AG_KIND_VALUE;
    if (!any) return false;
    uint8_t *kinds = malloc(rows ? rows : 1);
    uint32_t *offsets = malloc((rows + 1) * sizeof *offsets);
    if (rows > 0) memcpy(kinds, in->kinds.ptr, rows);
    ag_buf data = {0};
    ag_buf text = {0};
    if (m.kind != MODE_NULL) ag_buf_reserve(&data, m.kind == MODE_REDACT ? rows * strlen(REDACTED) : in->data.len);
    offsets[0] = 0;
    for (size_t i = 0; i < rows; i++) {
        if (kinds[i] == AG_KIND_VALUE) {
            if (m.kind == MODE_NULL) {
                kinds[i] = AG_KIND_NULL;
            } else if (m.kind == MODE_REDACT) {
                ag_buf_puts(&data, REDACTED);
            } else {
                ag_str value = {in->data.ptr + in->offsets.ptr[i],
                                in->offsets.ptr[i + 1] - in->offsets.ptr[i]};
                if (is_ascii(value)) {
                    /* One byte per character, valid as it is: no copy to check it. */
                    size_t hidden = value.len > m.keep ? value.len - m.keep : 0;
                    ag_buf_reserve(&data, value.len);
                    memset(data.ptr + data.len, '*', hidden);
                    memcpy(data.ptr + data.len + hidden, value.ptr + hidden, value.len - hidden);
                    data.len += value.len;
                    offsets[i + 1] = (uint32_t)data.len;
                    continue;
                }
                text.len = 0;
                ag_buf_push_lossy(&text, value);
                size_t count = ag_char_count(ag_buf_str(&text));
                if (count <= m.keep) {
                    ag_buf_push_str(&data, ag_buf_str(&text));
                } else {
                    /* All but the last `keep` characters become `*`. */
                    size_t hidden = count - m.keep, seen = 0, split = 0;
                    /* `split`: the byte where character number `hidden` starts. */
                    for (; split < text.len; split++) {
                        if ((text.ptr[split] & 0xC0) == 0x80) continue;
                        if (seen == hidden) break;
                        seen++;
                    }
                    for (size_t k = 0; k < hidden; k++) ag_buf_push_byte(&data, '*');
                    ag_buf_push(&data, text.ptr + split, text.len - split);
                }
            }
        }
        offsets[i + 1] = (uint32_t)data.len;
    }
    ag_buf_free(&text);
    out->kinds.ptr = kinds;
    out->kinds.len = rows;
    out->data.ptr = data.ptr;
    out->data.len = data.len;
    out->offsets.ptr = offsets;
    out->offsets.len = rows + 1;
    return true;
}

static void process(const config *c, airlock_transform_types_borrow_batch_t batch) {
    airlock_transform_types_list_table_t tables;
    airlock_transform_types_method_batch_tables(batch, &tables);
    transform_string_t tag = {c->tag.ptr, c->tag.len};
    transform_list_u8_t salt = {c->salt.ptr, c->salt.len};
    for (uint32_t ti = 0; ti < tables.len; ti++) {
        airlock_transform_types_table_t *table = &tables.ptr[ti];
        for (uint32_t ci = 0; ci < table->columns.len; ci++) {
            const mode *m = mode_for(c, str_of(&table->schema), str_of(&table->name),
                                     str_of(&table->columns.ptr[ci].name));
            if (m == NULL) continue;
            if (tag.len > 0) airlock_transform_types_method_batch_tag_column(batch, ti, ci, &tag);
            const airlock_transform_types_image_t images[] = {AIRLOCK_TRANSFORM_TYPES_IMAGE_NEW,
                                                              AIRLOCK_TRANSFORM_TYPES_IMAGE_OLD};
            for (size_t k = 0; k < 2; k++) {
                if (m->kind == MODE_HASH) {
                    airlock_transform_types_method_batch_hash_column(batch, ti, ci, images[k], &salt);
                    continue;
                }
                airlock_transform_types_text_column_t column, masked;
                airlock_transform_types_method_batch_read_text_column(batch, ti, ci, images[k], &column);
                if (mask_packed(&column, *m, &masked)) {
                    airlock_transform_types_method_batch_write_text_column(batch, ti, ci, images[k], &masked);
                    airlock_transform_types_text_column_free(&masked);
                }
                airlock_transform_types_text_column_free(&column);
            }
        }
    }
    airlock_transform_types_list_table_free(&tables);
}

static void set_error(transform_string_t *err, ag_buf *message) {
    err->ptr = message->ptr;
    err->len = message->len;
}

void exports_transform_info(transform_plugin_info_t *ret) {
    transform_string_dup(&ret->name, "mask");
    transform_string_dup(&ret->version, "0.1.0");
    transform_string_dup(&ret->description,
                         "masks configured columns (hash, redact, null, keep-last-N) in new and old images and tags them");
}

bool exports_transform_init(transform_list_tuple2_string_string_t *settings, transform_string_t *err) {
    ag_pair *pairs = malloc((settings->len + 1) * sizeof *pairs);
    for (size_t i = 0; i < settings->len; i++) {
        pairs[i].key = str_of(&settings->ptr[i].f0);
        pairs[i].value = str_of(&settings->ptr[i].f1);
    }
    ag_settings s = {pairs, settings->len};
    ag_buf message = {0};
    config *c = config_from_settings(&s, &message);
    free(pairs);
    transform_list_tuple2_string_string_free(settings);
    if (c == NULL) {
        set_error(err, &message);
        return false;
    }
    if (CONFIG != NULL) config_free(CONFIG);
    CONFIG = c;
    return true;
}

bool exports_transform_process(transform_borrow_batch_t batch, transform_string_t *err) {
    bool ok = CONFIG != NULL;
    if (ok) {
        process(CONFIG, batch);
    } else {
        transform_string_dup(err, "mask: process called before init");
    }
    /* A borrowed handle must be given back before returning, or the call traps. */
    airlock_transform_types_batch_drop_borrow(batch);
    return ok;
}
