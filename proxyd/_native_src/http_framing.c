/* The twin of proxyd/parsers/http/framing.py, for the heads its fast path reads.
 *
 * HeadReader.scan takes a head in one step when the whole head (through its empty line) is
 * within the limit and every field line is valid (_FIELD_LINES); parse_request_line,
 * parse_request, parse_status_line and response_body then frame it. This file does the same for
 * the common subset: an origin-form request with no body or a Content-Length body, a response
 * with a Content-Length or no body. Everything else (an incomplete head, any error, chunked,
 * CONNECT, an absolute or asterisk target, an upgrade, 1xx, a body read until close) answers 0,
 * and the parser hands that call to the reference, which reads the same bytes. So this code
 * never has to say an error the way framing.py does: it only has to accept exactly what
 * framing.py accepts, and frame it the same. */
#include "native.h"
#include <ctype.h>

/* token chars (RFC 9110 5.6.2): _TOKEN */
static int tchar(unsigned char c) {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return 1;
    switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+': case '-':
    case '.': case '^': case '_': case '`': case '|': case '~':
        return 1;
    default:
        return 0;
    }
}

/* [\t\x20-\x7e\x80-\xff]: _FIELD_VALUE */
static int vchar(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

static int lower_is(const char *p, Py_ssize_t n, const char *lname) {
    Py_ssize_t k = (Py_ssize_t)strlen(lname);
    if (n != k) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 'A' && c <= 'Z') c += 32;
        if (c != (unsigned char)lname[i]) return 0;
    }
    return 1;
}

/* find "\r\n\r\n" in d[from:stop) (bytearray.find(sub, 0, stop) when nothing before from can hold it) */
static Py_ssize_t find_end(const char *d, Py_ssize_t from, Py_ssize_t stop) {
    for (Py_ssize_t i = from; i + 4 <= stop; i++) {
        const char *r = memchr(d + i, '\r', (size_t)(stop - 3 - i));
        if (r == NULL) return -1;
        i = r - d;
        if (d[i + 1] == '\n' && d[i + 2] == '\r' && d[i + 3] == '\n') return i;
    }
    return -1;
}

/* One field line of a block: name [s, colon), value (stripped) [vs, ve); returns the next
 * line's start, or -1 when the line is not `token ":" value CRLF` (_FIELD_LINES). */
static Py_ssize_t field_line(const char *d, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t *colon, Py_ssize_t *vs,
                             Py_ssize_t *ve) {
    Py_ssize_t i = pos;
    while (i < end && tchar((unsigned char)d[i])) i++;
    if (i == pos || i >= end || d[i] != ':') return -1;
    *colon = i;
    i++;
    Py_ssize_t v = i;
    while (i < end && vchar((unsigned char)d[i])) i++;
    if (i + 1 >= end || d[i] != '\r' || d[i + 1] != '\n') return -1;
    Py_ssize_t e = i;
    while (v < e && (d[v] == ' ' || d[v] == '\t')) v++;
    while (e > v && (d[e - 1] == ' ' || d[e - 1] == '\t')) e--;
    *vs = v;
    *ve = e;
    return i + 2;
}

/* The head's end and its start line; 0 when HeadReader's fast path would not take it. */
static Py_ssize_t head_bounds(const char *d, Py_ssize_t have, Py_ssize_t limit, Py_ssize_t from,
                              Py_ssize_t *first) {
    Py_ssize_t stop = have < limit ? have : limit;
    Py_ssize_t end = find_end(d, from >= 2 ? from - 2 : 0, stop);
    if (end < 0) return 0;
    const char *f = memchr(d, '\r', (size_t)(end + 1)); /* the first "\r\n" is at or before end */
    while (f != NULL && f[1] != '\n') f = memchr(f + 1, '\r', (size_t)(d + end + 1 - (f + 1)));
    if (f == NULL || f == d) return 0;
    *first = f - d;
    for (Py_ssize_t i = 0; i < *first; i++)
        if (d[i] == '\r' || d[i] == '\n') return 0;
    return end + 4;
}

/* _HOST: (?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)? */
static int host_ok(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t i = 0;
    if (n > 0 && p[0] == '[') {
        i = 1;
        while (i < n && (isxdigit(p[i]) || p[i] == ':' || p[i] == '.')) i++;
        if (i == 1 || i >= n || p[i] != ']') return 0;
        i++;
    } else {
        while (i < n && (isalnum(p[i]) || strchr("-._~!$&'()*+,;=%", p[i]) != NULL) && p[i]) i++;
    }
    if (i < n && p[i] == ':') {
        i++;
        while (i < n && p[i] >= '0' && p[i] <= '9') i++;
    }
    return i == n;
}

/* _CONTENT_LENGTH: 1 to 18 ASCII digits; -1 otherwise */
static long long content_length(const char *p, Py_ssize_t n) {
    if (n < 1 || n > 18) return -1;
    long long v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

Py_ssize_t http_request_head(const char *d, Py_ssize_t have, Py_ssize_t limit, Py_ssize_t from, HttpHead *h) {
    Py_ssize_t first, n = head_bounds(d, have, limit, from, &first);
    if (n == 0) return 0;
    /* parse_request_line: (token) SP ([\x21-\x7e]+) SP HTTP/d.d, only 1.0 and 1.1 */
    Py_ssize_t i = 0;
    while (i < first && tchar((unsigned char)d[i])) i++;
    if (i == 0 || i >= first || d[i] != ' ') return 0;
    h->method_len = i;
    Py_ssize_t t = ++i;
    while (i < first && (unsigned char)d[i] >= 0x21 && (unsigned char)d[i] <= 0x7e) i++;
    if (i == t || first - i != 9 || memcmp(d + i, " HTTP/1.", 8) != 0) return 0;
    if (d[first - 1] != '0' && d[first - 1] != '1') return 0;
    h->v11 = d[first - 1] == '1';
    h->target_off = t;
    h->target_len = i - t;
    /* origin-form only: CONNECT, "*" and absolute-form go to the reference */
    if (d[t] != '/' || (h->method_len == 7 && memcmp(d, "CONNECT", 7) == 0)) return 0;
    /* the fields framing looks at (_index) */
    int hosts = 0, cls = 0, conn_close = 0, conn_keep = 0, conn_upgrade = 0, upgrade = 0, tes = 0, te_chunked = 0;
    Py_ssize_t cl_off = 0, cl_len = 0;
    h->host_off = -1;
    h->host_len = 0;
    h->fields_off = first + 2;
    h->fields_end = n - 2;
    for (Py_ssize_t pos = first + 2; pos < n - 2;) {
        Py_ssize_t colon, vs, ve;
        Py_ssize_t next = field_line(d, pos, n - 2, &colon, &vs, &ve);
        if (next < 0) return 0;
        Py_ssize_t nl = colon - pos;
        const char *name = d + pos;
        if (lower_is(name, nl, "host")) {
            hosts++;
            h->host_off = vs;
            h->host_len = ve - vs;
        } else if (lower_is(name, nl, "content-length")) {
            cls++;
            cl_off = vs;
            cl_len = ve - vs;
        } else if (lower_is(name, nl, "transfer-encoding")) {
            tes++;
            te_chunked = lower_is(d + vs, ve - vs, "chunked");
        } else if (lower_is(name, nl, "upgrade")) {
            upgrade = 1;
        } else if (lower_is(name, nl, "connection")) {
            /* _tokens: comma-separated elements, stripped, lower-cased */
            Py_ssize_t a = vs;
            while (a <= ve) {
                Py_ssize_t b = a;
                while (b < ve && d[b] != ',') b++;
                Py_ssize_t s = a, e = b;
                while (s < e && (d[s] == ' ' || d[s] == '\t')) s++;
                while (e > s && (d[e - 1] == ' ' || d[e - 1] == '\t')) e--;
                if (lower_is(d + s, e - s, "close")) conn_close = 1;
                else if (lower_is(d + s, e - s, "keep-alive")) conn_keep = 1;
                else if (lower_is(d + s, e - s, "upgrade")) conn_upgrade = 1;
                a = b + 1;
            }
        }
        pos = next;
    }
    if (hosts > 1 || (hosts == 0 && h->v11)) return 0;
    if (hosts && !host_ok((const unsigned char *)d + h->host_off, h->host_len)) return 0;
    if (cls > 1) return 0;
    h->length = 0;
    if (cls) {
        h->length = content_length(d + cl_off, cl_len);
        if (h->length < 0) return 0;
    }
    /* Transfer-Encoding: one field naming chunked alone, in HTTP/1.1, without Content-Length;
     * anything else (the smuggling refusals included) is the reference's */
    h->chunked = 0;
    if (tes) {
        if (tes != 1 || !te_chunked || cls || !h->v11) return 0;
        h->chunked = 1;
    }
    h->keep_alive = h->v11 ? !conn_close : (conn_keep && !conn_close);
    if (h->v11 && conn_upgrade && upgrade) return 0; /* an upgrade: the reference waits for its answer */
    return n;
}

Py_ssize_t http_response_head(const char *d, Py_ssize_t have, Py_ssize_t limit, Py_ssize_t from, int head_req,
                              HttpHead *h) {
    Py_ssize_t first, n = head_bounds(d, have, limit, from, &first);
    if (n == 0) return 0;
    /* parse_status_line: HTTP/1.x SP 3DIGIT [SP reason], x in 0 1, status >= 100 */
    if (first < 12 || memcmp(d, "HTTP/1.", 7) != 0 || (d[7] != '0' && d[7] != '1') || d[8] != ' ') return 0;
    for (int k = 9; k < 12; k++)
        if (d[k] < '0' || d[k] > '9') return 0;
    if (first > 12) {
        if (d[12] != ' ') return 0;
        for (Py_ssize_t k = 13; k < first; k++)
            if (!vchar((unsigned char)d[k])) return 0;
    }
    int status = (d[9] - '0') * 100 + (d[10] - '0') * 10 + (d[11] - '0');
    if (status < 200) return 0; /* 1xx (and < 100, an error) go to the reference */
    h->status = status;
    h->chunked = 0;
    int cls = 0, tes = 0, te_chunked = 0;
    Py_ssize_t cl_off = 0, cl_len = 0;
    for (Py_ssize_t pos = first + 2; pos < n - 2;) {
        Py_ssize_t colon, vs, ve;
        Py_ssize_t next = field_line(d, pos, n - 2, &colon, &vs, &ve);
        if (next < 0) return 0;
        if (lower_is(d + pos, colon - pos, "content-length")) {
            cls++;
            cl_off = vs;
            cl_len = ve - vs;
        } else if (lower_is(d + pos, colon - pos, "transfer-encoding")) {
            tes++;
            te_chunked = lower_is(d + vs, ve - vs, "chunked");
        }
        pos = next;
    }
    /* response_body: lengths are checked even where there is no body */
    if (cls > 1 || (cls && tes)) return 0;
    h->length = 0;
    long long cl = -1;
    if (cls) {
        cl = content_length(d + cl_off, cl_len);
        if (cl < 0) return 0;
    }
    if (head_req || status == 204 || status == 304) return n;
    if (tes) {
        if (tes != 1 || !te_chunked) return 0; /* other codings (_chunked_last): the reference */
        h->chunked = 1;
        return n;
    }
    if (cl < 0) return 0; /* read until close: the reference */
    h->length = cl;
    return n;
}

/* HeadReader.scan on an incomplete head (no "\r\n\r\n" in d), from its start: 1 when it would
 * answer -1 (more bytes needed) having raised nothing, so the parser answers MORE itself; 0 when
 * the reference must decide (a line it refuses, the limit, the field count). Every complete line
 * is checked as the reference checks it when its LF arrives: CRLF only, the start line
 * (parse_request_line or parse_status_line), then field lines (parse_field_line). */
int http_head_more(const char *d, Py_ssize_t have, Py_ssize_t limit, int request, HeadScan *scan) {
    if (have >= limit) return 0;
    Py_ssize_t pos = scan->pos, lines = scan->lines;
    for (;;) {
        const char *lf = memchr(d + pos, '\n', (size_t)(have - pos));
        if (lf == NULL) {
            scan->pos = pos;
            scan->lines = lines;
            return 1;
        }
        Py_ssize_t nl = lf - d;
        if (nl == pos || d[nl - 1] != '\r' || nl == pos + 1) return 0;
        Py_ssize_t end = nl - 1; /* the line is d[pos:end] */
        if (memchr(d + pos, '\r', (size_t)(end - pos)) != NULL) return 0;
        if (pos == 0) {
            if (request) {
                Py_ssize_t i = 0;
                while (i < end && tchar((unsigned char)d[i])) i++;
                if (i == 0 || i >= end || d[i] != ' ') return 0;
                Py_ssize_t t = ++i;
                while (i < end && (unsigned char)d[i] >= 0x21 && (unsigned char)d[i] <= 0x7e) i++;
                if (i == t || end - i != 9 || memcmp(d + i, " HTTP/1.", 8) != 0) return 0;
                if (d[end - 1] != '0' && d[end - 1] != '1') return 0;
            } else {
                if (end < 12 || memcmp(d, "HTTP/1.", 7) != 0 || (d[7] != '0' && d[7] != '1') || d[8] != ' ')
                    return 0;
                for (int k = 9; k < 12; k++)
                    if (d[k] < '0' || d[k] > '9') return 0;
                if (d[9] == '0') return 0; /* status < 100 */
                if (end > 12) {
                    if (d[12] != ' ') return 0;
                    for (Py_ssize_t k = 13; k < end; k++)
                        if (!vchar((unsigned char)d[k])) return 0;
                }
            }
        } else {
            Py_ssize_t colon, vs, ve;
            if (field_line(d, pos, nl + 1, &colon, &vs, &ve) != nl + 1) return 0;
            if (++lines >= 9999) return 0;
        }
        pos = nl + 1;
    }
}

Py_ssize_t http_chunk_line(const char *d, Py_ssize_t have, Py_ssize_t limit, int crlf, long long *size,
                           Py_ssize_t *seen) {
    Py_ssize_t pos = 0;
    if (crlf) {
        if (have < 2 && (have == 0 || d[0] == '\r')) return -1;
        if (have < 2 || d[0] != '\r' || d[1] != '\n') return 0;
        pos = 2;
    }
    Py_ssize_t stop = pos + limit < have ? pos + limit : have;
    Py_ssize_t from = *seen > pos ? *seen : pos; /* _chunk_line's ``seen``: searched already */
    const char *lf = from < stop ? memchr(d + from, '\n', (size_t)(stop - from)) : NULL;
    if (lf == NULL) {
        if (have - pos >= limit) return 0; /* over the limit: the reference refuses */
        *seen = have;
        return -1;
    }
    *seen = 0;
    Py_ssize_t nl = lf - d;
    /* chunk-size only (1 to 16 hex digits), then CRLF; extensions go to the reference */
    Py_ssize_t k = nl - 1 - pos;
    if (nl == pos || d[nl - 1] != '\r' || k < 1 || k > 16) return 0;
    unsigned long long v = 0;
    for (Py_ssize_t i = pos; i < nl - 1; i++) {
        int c = (unsigned char)d[i], x;
        if (c >= '0' && c <= '9') x = c - '0';
        else if (c >= 'a' && c <= 'f') x = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') x = c - 'A' + 10;
        else return 0;
        v = v * 16 + (unsigned)x;
    }
    if (v > (1ULL << 61)) return 0; /* beyond what the engine counts exactly: the reference */
    *size = (long long)v;
    return nl + 1;
}
