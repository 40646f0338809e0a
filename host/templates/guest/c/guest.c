/* `__NAME__`: replaces every value of the columns named in `columns` (default
 * `email`) with `[redacted]`, in the new and the old image. A starting point: it
 * reads and writes each column whole (read-text-column, write-text-column), one
 * host call per column and image, none per row. */

#include <stdlib.h>
#include <string.h>

#include "airlock_guest.h"
#include "transform.h"

static const char REDACTED[] = "[redacted]";

/* The column names to redact, owned. */
static ag_buf *COLUMNS = NULL;
static size_t NCOLUMNS = 0;

static bool wanted(const transform_string_t *name) {
    for (size_t i = 0; i < NCOLUMNS; i++) {
        if (COLUMNS[i].len == name->len && memcmp(COLUMNS[i].ptr, name->ptr, name->len) == 0) return true;
    }
    return false;
}

void exports_transform_info(transform_plugin_info_t *ret) {
    transform_string_dup(&ret->name, "__NAME__");
    transform_string_dup(&ret->version, "0.1.0");
    transform_string_dup(&ret->description, "redacts the columns named in `columns`");
}

bool exports_transform_init(transform_list_tuple2_string_string_t *settings, transform_string_t *err) {
    for (size_t i = 0; i < NCOLUMNS; i++) ag_buf_free(&COLUMNS[i]);
    free(COLUMNS);
    COLUMNS = calloc(settings->len + 1, sizeof *COLUMNS);
    NCOLUMNS = 0;
    bool ok = true;
    for (size_t i = 0; i < settings->len && ok; i++) {
        ag_str key = {settings->ptr[i].f0.ptr, settings->ptr[i].f0.len};
        ag_str value = {settings->ptr[i].f1.ptr, settings->ptr[i].f1.len};
        if (key.len == 7 && memcmp(key.ptr, "columns", 7) == 0) {
            COLUMNS[NCOLUMNS++] = ag_buf_copy(value);
        } else {
            ag_buf message = {0};
            ag_buf_puts(&message, "unknown setting `");
            ag_buf_push_str(&message, key);
            ag_buf_puts(&message, "`; expected `columns`");
            err->ptr = message.ptr;
            err->len = message.len;
            ok = false;
        }
    }
    if (ok && NCOLUMNS == 0) COLUMNS[NCOLUMNS++] = ag_buf_copy(ag_cstr("email"));
    transform_list_tuple2_string_string_free(settings);
    return ok;
}

bool exports_transform_process(transform_borrow_batch_t batch, transform_string_t *err) {
    airlock_transform_types_list_table_t tables;
    airlock_transform_types_method_batch_tables(batch, &tables);
    for (uint32_t ti = 0; ti < tables.len; ti++) {
        airlock_transform_types_table_t *table = &tables.ptr[ti];
        for (uint32_t ci = 0; ci < table->columns.len; ci++) {
            if (!wanted(&table->columns.ptr[ci].name)) continue;
            for (int image = 0; image < 2; image++) {
                airlock_transform_types_image_t which =
                    image == 0 ? AIRLOCK_TRANSFORM_TYPES_IMAGE_NEW : AIRLOCK_TRANSFORM_TYPES_IMAGE_OLD;
                airlock_transform_types_text_column_t in;
                airlock_transform_types_method_batch_read_text_column(batch, ti, ci, which, &in);
                size_t rows = in.kinds.len, values = 0;
                for (size_t i = 0; i < rows; i++) values += in.kinds.ptr[i] == AG_KIND_VALUE;
                if (values > 0) {
                    size_t size = strlen(REDACTED);
                    airlock_transform_types_text_column_t out;
                    out.kinds = in.kinds;
                    out.data.len = values * size;
                    out.data.ptr = malloc(out.data.len ? out.data.len : 1);
                    out.offsets.len = rows + 1;
                    out.offsets.ptr = malloc((rows + 1) * sizeof(uint32_t));
                    size_t length = 0;
                    out.offsets.ptr[0] = 0;
                    for (size_t i = 0; i < rows; i++) {
                        if (in.kinds.ptr[i] == AG_KIND_VALUE) {
                            memcpy(out.data.ptr + length, REDACTED, size);
                            length += size;
                        }
                        out.offsets.ptr[i + 1] = (uint32_t)length;
                    }
                    airlock_transform_types_method_batch_write_text_column(batch, ti, ci, which, &out);
                    free(out.data.ptr);
                    free(out.offsets.ptr);
                }
                airlock_transform_types_text_column_free(&in);
            }
        }
    }
    airlock_transform_types_list_table_free(&tables);
    /* A borrowed handle must be given back before returning, or the call traps. */
    airlock_transform_types_batch_drop_borrow(batch);
    (void)err;
    return true;
}
