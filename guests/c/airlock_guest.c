/* Helpers for airlock transform guests written in C: see airlock_guest.h. */
#include "airlock_guest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ag_str ag_cstr(const char *text) {
    ag_str s = {(const uint8_t *)text, strlen(text)};
    return s;
}

ag_str ag_buf_str(const ag_buf *buf) {
    ag_str s = {buf->ptr, buf->len};
    return s;
}

bool ag_eq(ag_str a, ag_str b) {
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

bool ag_eq_c(ag_str a, const char *b) { return ag_eq(a, ag_cstr(b)); }

bool ag_starts_with(ag_str text, ag_str prefix) {
    return text.len >= prefix.len && (prefix.len == 0 || memcmp(text.ptr, prefix.ptr, prefix.len) == 0);
}

/* Decodes one UTF-8 scalar at `p` (of `len` bytes); returns its length, 0 when the
 * bytes there are not a valid sequence. */
static size_t utf8_decode(const uint8_t *p, size_t len, uint32_t *out) {
    uint8_t b = p[0];
    if (b < 0x80) {
        *out = b;
        return 1;
    }
    size_t n;
    uint32_t c, min;
    if (b >= 0xC2 && b <= 0xDF) {
        n = 2, c = b & 0x1F, min = 0x80;
    } else if (b >= 0xE0 && b <= 0xEF) {
        n = 3, c = b & 0x0F, min = 0x800;
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4, c = b & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (len < n) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        c = (c << 6) | (p[i] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
    *out = c;
    return n;
}

/* Length of the longest prefix of `p` that starts a valid sequence (at least 1): the
 * "maximal subpart" that one U+FFFD replaces. */
static size_t utf8_invalid_len(const uint8_t *p, size_t len) {
    uint8_t b = p[0];
    size_t n;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
        n = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        n = 3;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
    } else {
        return 1;
    }
    size_t i = 1;
    if (i < len && i < n && p[i] >= lo && p[i] <= hi) {
        i++;
        while (i < len && i < n && (p[i] & 0xC0) == 0x80) i++;
    }
    return i;
}

static bool is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

ag_str ag_trim(ag_str text) {
    size_t start = 0, end = text.len;
    while (start < end) {
        uint32_t c;
        size_t n = utf8_decode(text.ptr + start, end - start, &c);
        if (n == 0 || !is_white_space(c)) break;
        start += n;
    }
    while (end > start) {
        /* Step back to the start of the last scalar. */
        size_t at = end - 1;
        while (at > start && (text.ptr[at] & 0xC0) == 0x80) at--;
        uint32_t c;
        size_t n = utf8_decode(text.ptr + at, end - at, &c);
        if (n != end - at || !is_white_space(c)) break;
        end = at;
    }
    ag_str s = {text.ptr + start, end - start};
    return s;
}

size_t ag_char_count(ag_str text) {
    size_t count = 0;
    for (size_t i = 0; i < text.len; i++) {
        if ((text.ptr[i] & 0xC0) != 0x80) count++;
    }
    return count;
}

void ag_buf_reserve(ag_buf *buf, size_t extra) {
    if (buf->len + extra <= buf->cap) return;
    size_t cap = buf->cap ? buf->cap * 2 : 64;
    while (cap < buf->len + extra) cap *= 2;
    uint8_t *grown = realloc(buf->ptr, cap);
    if (grown == NULL) abort();
    buf->ptr = grown;
    buf->cap = cap;
}

void ag_buf_push(ag_buf *buf, const void *bytes, size_t len) {
    if (len == 0) return;
    ag_buf_reserve(buf, len);
    memcpy(buf->ptr + buf->len, bytes, len);
    buf->len += len;
}

void ag_buf_push_str(ag_buf *buf, ag_str text) { ag_buf_push(buf, text.ptr, text.len); }

void ag_buf_puts(ag_buf *buf, const char *text) { ag_buf_push(buf, text, strlen(text)); }

void ag_buf_push_byte(ag_buf *buf, uint8_t byte) { ag_buf_push(buf, &byte, 1); }

void ag_buf_push_debug(ag_buf *buf, ag_str text) {
    ag_buf_push_byte(buf, '"');
    for (size_t i = 0; i < text.len; i++) {
        uint8_t b = text.ptr[i];
        switch (b) {
        case '"': ag_buf_puts(buf, "\\\""); break;
        case '\\': ag_buf_puts(buf, "\\\\"); break;
        case '\n': ag_buf_puts(buf, "\\n"); break;
        case '\r': ag_buf_puts(buf, "\\r"); break;
        case '\t': ag_buf_puts(buf, "\\t"); break;
        case 0: ag_buf_puts(buf, "\\0"); break;
        default:
            if (b < 0x20 || b == 0x7F) {
                char escaped[16];
                snprintf(escaped, sizeof escaped, "\\u{%x}", b);
                ag_buf_puts(buf, escaped);
            } else {
                ag_buf_push_byte(buf, b);
            }
        }
    }
    ag_buf_push_byte(buf, '"');
}

void ag_buf_push_lossy(ag_buf *buf, ag_str bytes) {
    static const uint8_t replacement[] = {0xEF, 0xBF, 0xBD};
    size_t i = 0;
    while (i < bytes.len) {
        uint32_t c;
        size_t n = utf8_decode(bytes.ptr + i, bytes.len - i, &c);
        if (n > 0) {
            ag_buf_push(buf, bytes.ptr + i, n);
            i += n;
        } else {
            ag_buf_push(buf, replacement, sizeof replacement);
            i += utf8_invalid_len(bytes.ptr + i, bytes.len - i);
        }
    }
}

void ag_buf_free(ag_buf *buf) {
    free(buf->ptr);
    buf->ptr = NULL;
    buf->len = buf->cap = 0;
}

ag_buf ag_buf_copy(ag_str text) {
    ag_buf buf = {0};
    ag_buf_reserve(&buf, text.len + 1);
    ag_buf_push_str(&buf, text);
    return buf;
}

const ag_str *ag_get(const ag_settings *s, ag_str key) {
    for (size_t i = 0; i < s->len; i++) {
        if (ag_eq(s->pairs[i].key, key)) return &s->pairs[i].value;
    }
    return NULL;
}

bool ag_contains(const ag_settings *s, ag_str key) { return ag_get(s, key) != NULL; }

static bool accepts(const char *allowed, ag_str key) {
    size_t n = strlen(allowed);
    if (n > 0 && allowed[n - 1] == '*') {
        ag_str prefix = {(const uint8_t *)allowed, n - 1};
        return ag_starts_with(key, prefix) && key.len > prefix.len;
    }
    return ag_eq_c(key, allowed);
}

bool ag_deny_unknown(const ag_settings *s, const char *const *allowed, size_t count, ag_buf *err) {
    size_t unknown = 0;
    ag_buf list = {0};
    for (size_t i = 0; i < s->len; i++) {
        ag_str key = s->pairs[i].key;
        bool known = false;
        for (size_t a = 0; a < count && !known; a++) known = accepts(allowed[a], key);
        bool repeated = false;
        for (size_t j = 0; j < i && !repeated; j++) repeated = ag_eq(s->pairs[j].key, key);
        if (!known && !repeated) {
            if (unknown++ > 0) ag_buf_puts(&list, ", ");
            ag_buf_puts(&list, "`");
            ag_buf_push_str(&list, key);
            ag_buf_puts(&list, "`");
        }
    }
    if (unknown == 0) return true;
    ag_buf_puts(err, unknown > 1 ? "unknown settings " : "unknown setting ");
    ag_buf_push_str(err, ag_buf_str(&list));
    ag_buf_puts(err, "; known settings: ");
    for (size_t a = 0; a < count; a++) {
        if (a > 0) ag_buf_puts(err, ", ");
        ag_buf_puts(err, allowed[a]);
    }
    ag_buf_free(&list);
    return false;
}

bool ag_flag(const ag_settings *s, const char *key, bool fallback, bool *out, ag_buf *err) {
    const ag_str *value = ag_get(s, ag_cstr(key));
    if (value == NULL) {
        *out = fallback;
        return true;
    }
    ag_buf lower = ag_buf_copy(ag_trim(*value));
    for (size_t i = 0; i < lower.len; i++) {
        if (lower.ptr[i] >= 'A' && lower.ptr[i] <= 'Z') lower.ptr[i] += 'a' - 'A';
    }
    ag_str v = ag_buf_str(&lower);
    bool ok = true;
    if (ag_eq_c(v, "true") || ag_eq_c(v, "yes") || ag_eq_c(v, "on") || ag_eq_c(v, "1")) {
        *out = true;
    } else if (ag_eq_c(v, "false") || ag_eq_c(v, "no") || ag_eq_c(v, "off") || ag_eq_c(v, "0")) {
        *out = false;
    } else {
        ag_buf_puts(err, "setting `");
        ag_buf_puts(err, key);
        ag_buf_puts(err, "` = ");
        ag_buf_push_debug(err, v);
        ag_buf_puts(err, ": expected a boolean (true or false)");
        ok = false;
    }
    ag_buf_free(&lower);
    return ok;
}

/* The Unicode scalars of `text` (invalid bytes each count as one). */
static uint32_t *scalars(ag_str text, size_t *count) {
    uint32_t *out = malloc((text.len + 1) * sizeof *out);
    if (out == NULL) abort();
    size_t n = 0;
    for (size_t i = 0; i < text.len;) {
        uint32_t c;
        size_t len = utf8_decode(text.ptr + i, text.len - i, &c);
        if (len == 0) {
            c = 0xFFFD;
            len = 1;
        }
        out[n++] = c;
        i += len;
    }
    *count = n;
    return out;
}

bool ag_glob_match(ag_str pattern, ag_str text) {
    size_t np, nt;
    uint32_t *p = scalars(pattern, &np);
    uint32_t *t = scalars(text, &nt);
    size_t pi = 0, ti = 0, star_p = 0, star_t = 0;
    bool star = false, matched = true;
    while (ti < nt) {
        if (pi < np && (p[pi] == '?' || p[pi] == t[ti])) {
            pi++;
            ti++;
        } else if (pi < np && p[pi] == '*') {
            star = true;
            star_p = pi;
            star_t = ti;
            pi++;
        } else if (star) {
            pi = star_p + 1;
            star_t++;
            ti = star_t;
        } else {
            matched = false;
            break;
        }
    }
    for (; matched && pi < np; pi++) matched = p[pi] == '*';
    free(p);
    free(t);
    return matched;
}

void ag_patterns_add(ag_table_patterns *set, ag_str pattern) {
    ag_str p = ag_trim(pattern);
    ag_buf copy = {0};
    if (memchr(p.ptr, '.', p.len) == NULL) ag_buf_puts(&copy, "*.");
    ag_buf_push_str(&copy, p);
    ag_buf *grown = realloc(set->patterns, (set->len + 1) * sizeof *grown);
    if (grown == NULL) abort();
    set->patterns = grown;
    set->patterns[set->len++] = copy;
}

bool ag_patterns_match(const ag_table_patterns *set, ag_str schema, ag_str table) {
    if (set->len == 0) return false;
    ag_buf qualified = {0};
    ag_buf_push_str(&qualified, schema);
    ag_buf_push_byte(&qualified, '.');
    ag_buf_push_str(&qualified, table);
    bool hit = false;
    for (size_t i = 0; i < set->len && !hit; i++) {
        hit = ag_glob_match(ag_buf_str(&set->patterns[i]), ag_buf_str(&qualified));
    }
    ag_buf_free(&qualified);
    return hit;
}

void ag_patterns_free(ag_table_patterns *set) {
    for (size_t i = 0; i < set->len; i++) ag_buf_free(&set->patterns[i]);
    free(set->patterns);
    set->patterns = NULL;
    set->len = 0;
}
