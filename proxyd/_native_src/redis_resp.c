/* RESP framing for the redis twin: the parts of proxyd/parsers/redis/resp.py that redis.c
 * reads itself, each bounded by the length it is given. Requests as resp.py parse_request reads
 * them (_multibulk's fast path: plain lengths; _inline/split_args without quotes); top-level
 * replies as ReplyScanner.scan reads them (lines, integers, bulk strings, flat arrays). Anything
 * else answers "not mine" (0 or -1) and redis.c hands the bytes to the reference. */
#include "native.h"

/* "\r" in [from, to) (to clamped to have), or -1 */
Py_ssize_t resp_find_cr(const char *d, Py_ssize_t from, Py_ssize_t to, Py_ssize_t have) {
    if (to > have) to = have;
    for (Py_ssize_t i = from; i < to; i++)
        if (d[i] == '\r') return i;
    return -1;
}

/* plain digits [a, b): the value, or -1 (not digits, a leading zero, more than 18 digits) */
long long resp_plain_len(const char *d, Py_ssize_t a, Py_ssize_t b) {
    if (b <= a || b - a > 18 || (d[a] == '0' && b - a > 1)) return -1;
    long long v = 0;
    for (Py_ssize_t i = a; i < b; i++) {
        if (d[i] < '0' || d[i] > '9') return -1;
        v = v * 10 + (d[i] - '0');
    }
    return v;
}

/* resp_find_cr(d, a - 1, to, have) then resp_plain_len up to it, in one pass (d[a - 1] is a
 * type byte, not "\r"): the value with *cr at the "\r", or -1 */
static inline long long digits_cr(const char *d, Py_ssize_t a, Py_ssize_t to, Py_ssize_t have, Py_ssize_t *cr) {
    if (to > have) to = have;
    /* one or two digits and "\r" (an argument count, a short argument's length): no loop */
    if (a + 1 < to && d[a + 1] == '\r' && d[a] >= '0' && d[a] <= '9') {
        *cr = a + 1;
        return d[a] - '0';
    }
    if (a + 2 < to && d[a + 2] == '\r' && d[a] >= '1' && d[a] <= '9' && d[a + 1] >= '0' && d[a + 1] <= '9') {
        *cr = a + 2;
        return (d[a] - '0') * 10 + (d[a + 1] - '0');
    }
    unsigned long long v = 0; /* unsigned: a 19th digit wraps harmlessly, and is refused */
    Py_ssize_t i = a;
    for (; i < to && d[i] >= '0' && d[i] <= '9'; i++) v = v * 10 + (unsigned)(d[i] - '0');
    if (i >= to || d[i] != '\r' || i == a || i - a > 18 || (d[a] == '0' && i - a > 1)) return -1;
    *cr = i;
    return (long long)v;
}

/* A whole multibulk request at base with plain lengths, within the budget: 1 with the argument
 * offsets and *end; 0 when it is anything else (the reference reads it). */
int resp_frame_request(Py_ssize_t budget, Py_ssize_t max_bulk, const char *d, Py_ssize_t have, Py_ssize_t base, Py_ssize_t *argc,
                         Py_ssize_t *starts, Py_ssize_t *lens, Py_ssize_t *end) {
    /* _multibulk: the count line, as its fast path reads it */
    Py_ssize_t cr;
    long long count = digits_cr(d, base + 1, base + 12, have, &cr);
    if (count <= 0 || count > REDIS_MAX_ARGS || cr > have - 2) return 0;
    Py_ssize_t pos = cr + 2, limit = base + budget;
    for (long long i = 0; i < count; i++) {
        /* "$<plain digits>\r" found within 20 bytes, its CRLF buffered */
        Py_ssize_t c;
        if (pos >= have || d[pos] != '$') return 0;
        long long ln = digits_cr(d, pos + 1, pos + 20, have, &c);
        if (ln < 0 || c > have - 2 || ln > max_bulk) return 0;
        Py_ssize_t start = c + 2, e = start + (Py_ssize_t)ln + 2;
        if (e > limit || e > have) return 0;
        starts[i] = start;
        lens[i] = (Py_ssize_t)ln;
        pos = e;
    }
    *argc = (Py_ssize_t)count;
    *end = pos;
    return 1;
}

/* An inline request at base (resp.py _inline, split_args without quotes: bytes.split()), its
 * line all buffered: 1 with the argument offsets and *end (argc 0: an empty line); 0 when it is
 * anything else (no newline yet, a NUL before it, quotes, \v or \f, more than REDIS_MAX_ARGS
 * arguments: the reference reads it). */
int resp_frame_inline(const char *d, Py_ssize_t have, Py_ssize_t base, Py_ssize_t *argc, Py_ssize_t *starts,
                        Py_ssize_t *lens, Py_ssize_t *end) {
    Py_ssize_t nl = -1;
    for (Py_ssize_t i = base; i < have; i++) {
        char c = d[i];
        if (c == '\n') {
            nl = i;
            break;
        }
        if (c == '\0' || c == '"' || c == '\'' || c == '\v' || c == '\f') return 0;
    }
    if (nl < 0) return 0;
    Py_ssize_t stop = nl > base && d[nl - 1] == '\r' ? nl - 1 : nl, k = 0;
    for (Py_ssize_t i = base; i < stop;) {
        while (i < stop && (d[i] == ' ' || d[i] == '\t' || d[i] == '\r')) i++;
        if (i >= stop) break;
        if (k == REDIS_MAX_ARGS) return 0;
        starts[k] = i;
        while (i < stop && d[i] != ' ' && d[i] != '\t' && d[i] != '\r') i++;
        lens[k] = i - starts[k];
        k++;
    }
    *argc = k;
    *end = nl + 1;
    return 1;
}

/* data.find(b"\r\n", from, to), to clamped to have */
Py_ssize_t resp_find_crlf(const char *d, Py_ssize_t from, Py_ssize_t to, Py_ssize_t have) {
    if (to > have) to = have;
    for (Py_ssize_t i = from; i + 1 < to; i++) {
        const char *c = memchr(d + i, '\r', (size_t)(to - 1 - i));
        if (c == NULL) return -1;
        i = c - d;
        if (d[i + 1] == '\n') return i;
    }
    return -1;
}

/* A ':' line [a, eol) as resp.py _int accepts it */
int resp_int_line(const char *d, Py_ssize_t a, Py_ssize_t eol) {
    if (a < eol && (d[a] == '-' || d[a] == '+')) a++;
    if (a == eol || eol - a > 20) return 0;
    for (; a < eol; a++)
        if (d[a] < '0' || d[a] > '9') return 0;
    return 1;
}

/* A whole top-level array of simple strings, errors, integers and bulk strings, all buffered,
 * whose '*' line ends at eol: where it ends, or -1 (anything else). What the general reader
 * reads of it: the count as string2ll (a null or empty array ends at its line), each element
 * as ReplyScanner.scan checks it. */
Py_ssize_t resp_flat_array(const char *d, Py_ssize_t have, Py_ssize_t pos, Py_ssize_t eol) {
    long long cnt;
    if (eol == pos + 3 && d[pos + 1] == '-' && d[pos + 2] == '1') cnt = 0;
    else if ((cnt = resp_plain_len(d, pos + 1, eol)) < 0) return -1;
    Py_ssize_t p = eol + 2;
    for (long long i = 0; i < cnt; i++) {
        if (p >= have) return -1;
        char t = d[p];
        Py_ssize_t e = resp_find_crlf(d, p + 1, have, have);
        if (e < 0) return -1;
        if (t == '+' || t == '-') {
            p = e + 2;
        } else if (t == ':') {
            if (!resp_int_line(d, p + 1, e)) return -1;
            p = e + 2;
        } else if (t == '$') {
            if (e == p + 3 && d[p + 1] == '-' && d[p + 2] == '1') {
                p = e + 2;
            } else {
                long long ln = resp_plain_len(d, p + 1, e);
                if (ln < 0 || ln > have) return -1;
                p = e + 4 + (Py_ssize_t)ln;
                if (p > have) return -1;
            }
        } else {
            return -1;
        }
    }
    return p;
}

