/* `route`: sends rows that carry the restricted tag to the restricted route, every
 * other row to the default route, and rows of spine tables also to the spine.
 *
 * The same guest as guests/rust/route, in C: same settings, same messages, same
 * output. A row is restricted when one of its row tags is `tag` or a sub-tag of it
 * (`pii:email` for `pii`), or, unless `by_column_tags = false`, when a column of its
 * table carries such a tag. */
#include <stdlib.h>
#include <string.h>

#include "airlock_guest.h"
#include "transform.h"

typedef struct {
    ag_buf tag;
    ag_buf restricted_route;
    ag_buf default_route;
    bool by_column_tags;
    ag_table_patterns spine_tables;
    ag_buf spine_route;
    ag_buf spine_kind;
    ag_buf spine_source;
} config;

static config *CONFIG = NULL;

static void config_free(config *c) {
    ag_buf_free(&c->tag);
    ag_buf_free(&c->restricted_route);
    ag_buf_free(&c->default_route);
    ag_patterns_free(&c->spine_tables);
    ag_buf_free(&c->spine_route);
    ag_buf_free(&c->spine_kind);
    ag_buf_free(&c->spine_source);
    free(c);
}

/* The trimmed value of `key` (or `fallback`) into `out`; false, with the message in
 * `err`, when it is empty. */
static bool text(const ag_settings *s, const char *key, const char *fallback, ag_buf *out, ag_buf *err) {
    const ag_str *value = ag_get(s, ag_cstr(key));
    ag_str v = ag_trim(value != NULL ? *value : ag_cstr(fallback));
    if (v.len == 0) {
        ag_buf_puts(err, "setting `");
        ag_buf_puts(err, key);
        ag_buf_puts(err, "` is empty; expected a name (default ");
        ag_buf_push_debug(err, ag_cstr(fallback));
        ag_buf_puts(err, ")");
        return false;
    }
    *out = ag_buf_copy(v);
    return true;
}

static config *config_from_settings(const ag_settings *s, ag_buf *err) {
    static const char *const allowed[] = {"tag",          "restricted_route", "default_route",
                                          "by_column_tags", "spine_tables",   "spine_route",
                                          "spine_kind",   "spine_source"};
    if (!ag_deny_unknown(s, allowed, sizeof allowed / sizeof *allowed, err)) return NULL;
    config *c = calloc(1, sizeof *c);
    bool ok = text(s, "tag", "pii", &c->tag, err) &&
              text(s, "restricted_route", "restricted", &c->restricted_route, err) &&
              text(s, "default_route", "default", &c->default_route, err) &&
              ag_flag(s, "by_column_tags", true, &c->by_column_tags, err);
    if (ok) {
        for (size_t i = 0; i < s->len; i++) {
            if (ag_eq_c(s->pairs[i].key, "spine_tables")) ag_patterns_add(&c->spine_tables, s->pairs[i].value);
        }
        ok = text(s, "spine_route", "spine", &c->spine_route, err) &&
             text(s, "spine_kind", "other", &c->spine_kind, err) &&
             text(s, "spine_source", "airlock", &c->spine_source, err);
    }
    if (!ok) {
        config_free(c);
        return NULL;
    }
    return c;
}

/* `tag` itself or one of its sub-tags (`pii:email` for `pii`). */
static bool is_restricted_tag(const config *c, const transform_string_t *tag) {
    ag_str t = {tag->ptr, tag->len};
    ag_str restricted = ag_buf_str(&c->tag);
    if (!ag_starts_with(t, restricted)) return false;
    return t.len == restricted.len || t.ptr[restricted.len] == ':';
}

static bool any_restricted(const config *c, const transform_list_string_t *tags) {
    for (size_t i = 0; i < tags->len; i++) {
        if (is_restricted_tag(c, &tags->ptr[i])) return true;
    }
    return false;
}

static transform_string_t borrowed(const ag_buf *buf) {
    transform_string_t s = {buf->ptr, buf->len};
    return s;
}

static void process(const config *c, airlock_transform_types_borrow_batch_t batch) {
    airlock_transform_types_list_table_t tables;
    airlock_transform_types_method_batch_tables(batch, &tables);
    transform_string_t restricted_route = borrowed(&c->restricted_route);
    transform_string_t default_route = borrowed(&c->default_route);
    transform_string_t spine_route = borrowed(&c->spine_route);
    transform_string_t spine_kind = borrowed(&c->spine_kind);
    transform_string_t spine_source = borrowed(&c->spine_source);
    transform_string_t tag = borrowed(&c->tag);
    transform_string_t kind_key, source_key;
    transform_string_set(&kind_key, "spine.kind");
    transform_string_set(&source_key, "spine.source");
    for (uint32_t ti = 0; ti < tables.len; ti++) {
        airlock_transform_types_table_t *table = &tables.ptr[ti];
        bool table_restricted = false;
        for (uint32_t ci = 0; c->by_column_tags && ci < table->columns.len && !table_restricted; ci++) {
            transform_list_string_t tags;
            airlock_transform_types_method_batch_column_tags(batch, ti, ci, &tags);
            table_restricted = any_restricted(c, &tags);
            transform_list_string_free(&tags);
        }
        ag_str schema = {table->schema.ptr, table->schema.len};
        ag_str name = {table->name.ptr, table->name.len};
        bool spine = ag_patterns_match(&c->spine_tables, schema, name);
        transform_list_u32_t rows;
        airlock_transform_types_method_batch_rows_of(batch, ti, &rows);
        if (rows.len == 0) {
            transform_list_u32_free(&rows);
            continue;
        }
        /* No host call per row: each route and annotation goes to many rows at once. */
        if (table_restricted) {
            airlock_transform_types_method_batch_add_route_rows(batch, &rows, &restricted_route);
        } else {
            transform_list_u32_t tagged;
            airlock_transform_types_method_batch_rows_tagged(batch, ti, &tag, &tagged);
            /* Both lists are in batch order: one merge splits the rows. */
            transform_list_u32_t others = {malloc(rows.len * sizeof(uint32_t)), 0};
            size_t next = 0;
            for (size_t i = 0; i < rows.len; i++) {
                if (next < tagged.len && tagged.ptr[next] == rows.ptr[i]) {
                    next++;
                } else {
                    others.ptr[others.len++] = rows.ptr[i];
                }
            }
            if (tagged.len > 0) {
                airlock_transform_types_method_batch_add_route_rows(batch, &tagged, &restricted_route);
            }
            if (others.len > 0) {
                airlock_transform_types_method_batch_add_route_rows(batch, &others, &default_route);
            }
            free(others.ptr);
            transform_list_u32_free(&tagged);
        }
        if (spine) {
            airlock_transform_types_method_batch_add_route_rows(batch, &rows, &spine_route);
            airlock_transform_types_method_batch_annotate_rows(batch, &rows, &kind_key, &spine_kind);
            airlock_transform_types_method_batch_annotate_rows(batch, &rows, &source_key, &spine_source);
        }
        transform_list_u32_free(&rows);
    }
    airlock_transform_types_list_table_free(&tables);
}

void exports_transform_info(transform_plugin_info_t *ret) {
    transform_string_dup(&ret->name, "route");
    transform_string_dup(&ret->version, "0.1.0");
    transform_string_dup(&ret->description,
                         "routes tagged rows to the restricted route, others to the default route, spine tables to the spine");
}

bool exports_transform_init(transform_list_tuple2_string_string_t *settings, transform_string_t *err) {
    ag_pair *pairs = malloc((settings->len + 1) * sizeof *pairs);
    for (size_t i = 0; i < settings->len; i++) {
        pairs[i].key.ptr = settings->ptr[i].f0.ptr;
        pairs[i].key.len = settings->ptr[i].f0.len;
        pairs[i].value.ptr = settings->ptr[i].f1.ptr;
        pairs[i].value.len = settings->ptr[i].f1.len;
    }
    ag_settings s = {pairs, settings->len};
    ag_buf message = {0};
    config *c = config_from_settings(&s, &message);
    free(pairs);
    transform_list_tuple2_string_string_free(settings);
    if (c == NULL) {
        err->ptr = message.ptr;
        err->len = message.len;
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
        transform_string_dup(err, "route: process called before init");
    }
    /* A borrowed handle must be given back before returning, or the call traps. */
    airlock_transform_types_batch_drop_borrow(batch);
    return ok;
}
