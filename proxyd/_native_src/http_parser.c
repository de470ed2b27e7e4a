/* The twin of proxyd/parsers/http/parser.py HttpParser, for the states that carry the traffic.
 *
 * Each connection has both: this object, and the reference parser it was created with. This
 * one handles the common states itself, following the reference statement by statement:
 *   requests:  a whole origin-form head in the buffer (http_framing.c), a path normalisation
 *              would not touch, allowed by the policy (http_rules.c, or ctx.matches) without
 *              headerMatches actions: forwarded with its Content-Length or chunked body (chunk
 *              lines without extensions, an empty trailer section); draining after a request
 *              that ends the connection;
 *   responses: a whole head whose body is none, a Content-Length (passed past the buffer) or
 *              chunked (chunk lines without extensions, chunk data past the buffer, an empty
 *              trailer section).
 * Any other call (a partial head, an error, a denial, a normalised path, chunked, an upgrade,
 * an unsolicited response, 1xx, ...) is handed to the reference: its state is set to this one's
 * (HttpParser.twin_adopt) and it answers the call; after each call it answers, this object
 * takes the state back when the reference says it is one of the common states again
 * (HttpParser.twin_export). A denial or a rewrite the policy decided here is handed over with
 * the decision (HttpParser._request_head(data, judged)), so the policy is asked once. The two
 * states are the same by construction: pending requests (method, path, host), the request and
 * response states, the bytes left of a response body; everything else of the reference is at
 * its resting value in these states. */
#include "native.h"

PyObject *g_HttpRequest, *g_ET_H_REQUEST, *g_ET_H_RESPONSE;

/* parser.py's state numbers (the ones this file uses) */
enum { RS_HEAD = 0, RS_CHUNK = 1, RS_TRAILER = 2, RS_DRAIN = 5 };
enum { PS_HEAD = 0, PS_LENGTH = 1, PS_CHUNK = 2, PS_CHUNK_DATA = 3, PS_TRAILER = 4 };
#define ENTRY_COST 256

static PyObject *hs_method, *hs_path, *hs_host, *hs_version, *hs_status, *hs_twin_export, *hs_twin_adopt,
    *hs__request_head, *hs_quiet_counter, *hs_v10, *hs_v11, *hs_http10, *hs_http11, *hs_HEAD;

typedef struct {
    PyObject *method, *path, *host; /* str */
    int head;                       /* method == "HEAD" */
} HEntry;

typedef struct {
    NativeParser base;
    PyObject *ctx;
    PyObject *py;       /* the reference HttpParser of this connection (NULL: not made yet) */
    PyObject *py_make;  /* (class, *args) that makes it, until it is made */
    Py_ssize_t limit;   /* max_header_bytes */
    int log_responses;
    int normalizing;
    int delegated;      /* the reference holds the state now */
    int rs, ps;
    long long p_left;
    int p_crlf;         /* PS_CHUNK: the previous chunk's CRLF comes first */
    int r_op, r_crlf, r_next; /* a chunked request body: PASS or DROP, CRLF owed, state after it */
    HeadScan rscan, pscan;     /* a request or response head arriving in pieces: lines checked */
    Py_ssize_t r_seen, p_seen; /* a chunk line arriving in pieces: bytes searched (_chunk_line) */
    long long pending_bytes;
    long long budget;   /* parser.PENDING_BUDGET when the connection was created */
    HEntry *q;
    Py_ssize_t qhead, qlen, qcap;
    PyObject *counts, *count_key; /* ctx.quiet_counter() */
    FlatPolicy flat;
    long long handled, handed; /* calls answered here, calls handed to the reference */
} Http;

/* --- the pending queue ----------------------------------------------------------------------- */

static HEntry *q_at(Http *s, Py_ssize_t i) { return &s->q[(s->qhead + i) % s->qcap]; }

static long long entry_cost(HEntry *e) {
    return PyUnicode_GET_LENGTH(e->method) + PyUnicode_GET_LENGTH(e->path) + PyUnicode_GET_LENGTH(e->host) +
           ENTRY_COST;
}

static int q_push(Http *s, PyObject *method, PyObject *path, PyObject *host) { /* new references */
    if (s->qlen == s->qcap) {
        Py_ssize_t cap = s->qcap ? s->qcap * 2 : 8;
        HEntry *nq = PyMem_Malloc((size_t)cap * sizeof(HEntry));
        if (nq == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < s->qlen; i++) nq[i] = *q_at(s, i);
        PyMem_Free(s->q);
        s->q = nq;
        s->qhead = 0;
        s->qcap = cap;
    }
    HEntry *e = &s->q[(s->qhead + s->qlen) % s->qcap];
    Py_INCREF(method);
    Py_INCREF(path);
    Py_INCREF(host);
    e->method = method;
    e->path = path;
    e->host = host;
    e->head = PyUnicode_Compare(method, hs_HEAD) == 0;
    s->qlen++;
    s->pending_bytes += entry_cost(e);
    return 0;
}

static void q_popleft(Http *s) {
    HEntry *e = q_at(s, 0);
    s->pending_bytes -= entry_cost(e);
    Py_DECREF(e->method);
    Py_DECREF(e->path);
    Py_DECREF(e->host);
    s->qhead = (s->qhead + 1) % s->qcap;
    s->qlen--;
}

static void q_clear(Http *s) {
    while (s->qlen) q_popleft(s);
    s->pending_bytes = 0;
}

/* --- hand-over with the reference parser ------------------------------------------------------ */

/* HttpParser.twin_adopt(entries, rs, ps, p_left): the reference takes this state. */
/* The reference parser, made on the first hand-over when it was given as (class, *args): most
 * connections never hand over, and building HttpParser was a visible part of a short one. */
static int h_make_reference(Http *s) {
    PyObject *make = s->py_make;
    if (make == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Http has no reference parser");
        return -1;
    }
    PyObject *args = PyTuple_GetSlice(make, 1, PyTuple_GET_SIZE(make));
    if (args == NULL) return -1;
    PyObject *py = PyObject_Call(PyTuple_GET_ITEM(make, 0), args, NULL);
    Py_DECREF(args);
    if (py == NULL) return -1;
    s->py = py;
    Py_CLEAR(s->py_make);
    return 0;
}

static int h_adopt(Http *s) {
    PyObject *entries = PyTuple_New(s->qlen);
    if (entries == NULL) return -1;
    for (Py_ssize_t i = 0; i < s->qlen; i++) {
        HEntry *e = q_at(s, i);
        PyObject *t = PyTuple_Pack(3, e->method, e->path, e->host);
        if (t == NULL) {
            Py_DECREF(entries);
            return -1;
        }
        PyTuple_SET_ITEM(entries, i, t);
    }
    if (s->py == NULL && h_make_reference(s) < 0) {
        Py_DECREF(entries);
        return -1;
    }
    PyObject *r = PyObject_CallMethod(s->py, "twin_adopt", "NiiLiiii", entries, s->rs, s->ps, s->p_left, s->p_crlf,
                                      s->r_op, s->r_crlf, s->r_next);
    if (r == NULL) return -1;
    Py_DECREF(r);
    q_clear(s);
    s->delegated = 1;
    memset(&s->rscan, 0, sizeof(HeadScan));
    memset(&s->pscan, 0, sizeof(HeadScan));
    s->r_seen = s->p_seen = 0;
    return 0;
}

/* HttpParser.twin_export(): take the state back when it is one this file handles. */
static int h_export(Http *s) {
    PyObject *st = PyObject_CallMethodNoArgs(s->py, hs_twin_export);
    if (st == NULL) return -1;
    if (st == Py_None) {
        Py_DECREF(st);
        return 0;
    }
    PyObject *entries;
    int rs, ps, p_crlf, r_op, r_crlf, r_next;
    long long p_left;
    if (!PyArg_ParseTuple(st, "O!iiLpipi", &PyTuple_Type, &entries, &rs, &ps, &p_left, &p_crlf, &r_op, &r_crlf,
                          &r_next)) {
        Py_DECREF(st);
        return -1;
    }
    q_clear(s);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(entries); i++) {
        PyObject *e = PyTuple_GET_ITEM(entries, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(e, 0)) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(e, 1)) || !PyUnicode_Check(PyTuple_GET_ITEM(e, 2)) || q_push(s, PyTuple_GET_ITEM(e, 0),
                                                                    PyTuple_GET_ITEM(e, 1), PyTuple_GET_ITEM(e, 2)) < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "HttpParser.twin_export: bad entry");
            Py_DECREF(st);
            return -1;
        }
    }
    Py_DECREF(st);
    s->rs = rs;
    s->ps = ps;
    s->p_left = p_left;
    s->p_crlf = p_crlf;
    s->r_op = r_op;
    s->r_crlf = r_crlf;
    s->r_next = r_next;
    s->delegated = 0;
    return 0;
}

/* The reference answers this call (with the policy's answer ``judged``, if given). */
static int h_delegate(Http *s, int reply, int end_stream, PyObject *buf, long long *n, PyObject *judged) {
    s->handed++;
    if (!s->delegated && h_adopt(s) < 0) return -1;
    PyObject *res = judged != NULL
                        ? PyObject_CallMethodObjArgs(s->py, hs__request_head, buf, judged, NULL)
                        : PyObject_CallMethodObjArgs(s->py, s_on_data, BOOL(reply), BOOL(end_stream), buf, NULL);
    if (res == NULL) return -1;
    if (!PyTuple_CheckExact(res) || PyTuple_GET_SIZE(res) != 2) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "HttpParser answered a non-verdict");
        return -1;
    }
    long op = PyLong_AsLong(PyTuple_GET_ITEM(res, 0));
    long long v = op == -1 && PyErr_Occurred() ? -1 : PyLong_AsLongLong(PyTuple_GET_ITEM(res, 1));
    if (v == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            Py_DECREF(res);
            return -1;
        }
        PyErr_Clear();
        v = 1LL << 61; /* as the engine clamps a Python parser's n (docs/native.md) */
    }
    Py_DECREF(res);
    if (op < OP_MORE || op > OP_NOP) {
        PyErr_SetString(PyExc_ValueError, "HttpParser answered an unknown op");
        return -1;
    }
    *n = v;
    if (h_export(s) < 0) return -1;
    return (int)op;
}

/* --- calls into the context ------------------------------------------------------------------ */

static int ctx_log(Http *s, PyObject *entry_type, PyObject *fields) { /* steals fields */
    if (fields == NULL) return -1;
    PyObject *r = PyObject_CallMethodObjArgs(s->ctx, s_log, entry_type, fields, NULL);
    Py_DECREF(fields);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *fields4(PyObject *k1, PyObject *v1, PyObject *k2, PyObject *v2, PyObject *k3, PyObject *v3,
                         PyObject *k4, PyObject *v4) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    if (PyDict_SetItem(d, k1, v1) < 0 || PyDict_SetItem(d, k2, v2) < 0 || PyDict_SetItem(d, k3, v3) < 0 ||
        PyDict_SetItem(d, k4, v4) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

/* ctx.log(EntryType.REQUEST, {method, path, host, version}) for an allowed request; when the
 * access log writes no line for it (ctx.quiet_counter()) and the decision was not audit, count it
 * in place instead, as Context.log and AccessLog.l7 would (memcache.c does the same), without
 * building the fields. */
static int log_forwarded(Http *s, PyObject *method, PyObject *path, PyObject *host, int v11) {
    if (s->counts != NULL) {
        PyObject *last = PyObject_GetAttr(s->ctx, s_last_decision);
        if (last == NULL) return -1;
        int audit = 1;
        if (last == g_ALLOWED) {
            audit = 0;
        } else {
            PyObject *a = PyObject_GetAttr(last, s_audit);
            if (a != NULL) {
                audit = PyObject_IsTrue(a);
                Py_DECREF(a);
            }
        }
        Py_DECREF(last);
        if (audit < 0 || PyErr_Occurred()) return -1;
        if (!audit) {
            PyObject *old = PyDict_GetItemWithError(s->counts, s->count_key);
            if (old == NULL && PyErr_Occurred()) return -1;
            PyObject *one = PyLong_FromLong(1);
            if (one == NULL) return -1;
            PyObject *sum = old ? PyNumber_Add(old, one) : (Py_INCREF(one), one);
            Py_DECREF(one);
            if (sum == NULL) return -1;
            int rc = PyDict_SetItem(s->counts, s->count_key, sum);
            Py_DECREF(sum);
            if (rc < 0) return -1;
            return PyObject_SetAttr(s->ctx, s_last_decision, g_ALLOWED);
        }
    }
    return ctx_log(s, g_ET_H_REQUEST,
                   fields4(hs_method, method, hs_path, path, hs_host, host, hs_version, v11 ? hs_http11 : hs_http10));
}

/* --- requests (parser.py _request_head, _forward) --------------------------------------------- */

/* Whether normalize.normalize could change or refuse the target: a '#' anywhere, or in the path
 * (before the first '?') a '%', a '\\', "/." or "//". Where normalize.SUSPECT matches only in
 * the query, normalize returns the target unchanged (every step looks at the path alone), so such
 * a target (a percent-encoded query, say) stays here. */
static int suspect(const char *t, Py_ssize_t n) {
    if (memchr(t, '#', (size_t)n) != NULL) return 1;
    for (Py_ssize_t i = 0; i < n && t[i] != '?'; i++) {
        char c = t[i];
        if (c == '%' || c == '\\') return 1;
        if (c == '/' && i + 1 < n && (t[i + 1] == '.' || t[i + 1] == '/')) return 1;
    }
    return 0;
}

/* HttpRequest(method, path, host, version, ((lname, value), ...), []) from a validated block. */
PyObject *http_build_request(PyObject *method, PyObject *path, PyObject *host, int v11, PyObject *block) {
    const char *b = PyBytes_AS_STRING(block);
    Py_ssize_t blen = PyBytes_GET_SIZE(block), count = 0;
    for (Py_ssize_t i = 0; i + 1 < blen; i++)
        if (b[i] == '\r' && b[i + 1] == '\n') count++;
    PyObject *headers = PyTuple_New(count), *actions = PyList_New(0);
    if (headers == NULL || actions == NULL) goto fail;
    Py_ssize_t pos = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        Py_ssize_t colon = pos, eol = pos;
        while (b[colon] != ':') colon++;
        eol = colon;
        while (!(b[eol] == '\r' && b[eol + 1] == '\n')) eol++;
        Py_ssize_t vs = colon + 1, ve = eol;
        while (vs < ve && (b[vs] == ' ' || b[vs] == '\t')) vs++;
        while (ve > vs && (b[ve - 1] == ' ' || b[ve - 1] == '\t')) ve--;
        PyObject *name = PyUnicode_New(colon - pos, 127);
        if (name == NULL) goto fail;
        Py_UCS1 *w = PyUnicode_1BYTE_DATA(name);
        for (Py_ssize_t i = pos; i < colon; i++) w[i - pos] = (Py_UCS1)tolower((unsigned char)b[i]);
        PyObject *value = PyUnicode_DecodeLatin1(b + vs, ve - vs, NULL);
        PyObject *pair = value ? PyTuple_Pack(2, name, value) : NULL;
        Py_DECREF(name);
        Py_XDECREF(value);
        if (pair == NULL) goto fail;
        PyTuple_SET_ITEM(headers, k, pair);
        pos = eol + 2;
    }
    PyObject *args = PyTuple_Pack(6, method, path, host, v11 ? hs_v11 : hs_v10, headers, actions);
    Py_DECREF(headers);
    Py_DECREF(actions);
    if (args == NULL) return NULL;
    PyObject *outer = PyTuple_Pack(1, args);
    Py_DECREF(args);
    if (outer == NULL) return NULL;
    /* tuple.__new__(HttpRequest, (...)): what the NamedTuple builds */
    PyObject *req = PyTuple_Type.tp_new((PyTypeObject *)g_HttpRequest, outer, NULL);
    Py_DECREF(outer);
    return req;
fail:
    Py_XDECREF(headers);
    Py_XDECREF(actions);
    return NULL;
}

static int h_request(Http *s, int end_stream, PyObject *buf, const char *data, Py_ssize_t have, long long *n) {
    if (s->rs == RS_DRAIN) {
        *n = have;
        return OP_DROP;
    }
    if (s->rs == RS_CHUNK) { /* _request_chunk */
        long long size;
        Py_ssize_t k = http_chunk_line(data, have, s->limit, s->r_crlf, &size, &s->r_seen);
        if (k == 0) return h_delegate(s, 0, end_stream, buf, n, NULL);
        s->handled++;
        if (k < 0) {
            *n = 1;
            return OP_MORE;
        }
        if (size == 0) {
            s->rs = RS_TRAILER;
            *n = k;
            return s->r_op;
        }
        s->r_crlf = 1;
        *n = k + size;
        return s->r_op;
    }
    if (s->rs == RS_TRAILER) { /* _request_trailer: an empty trailer section is the twin's */
        if (have == 1 && data[0] == '\r') {
            s->handled++;
            *n = 1;
            return OP_MORE;
        }
        if (have < 2 || data[0] != '\r' || data[1] != '\n') return h_delegate(s, 0, end_stream, buf, n, NULL);
        s->handled++;
        s->rs = s->r_next;
        *n = 2;
        return s->r_op;
    }
    if (s->rs != RS_HEAD) return h_delegate(s, 0, end_stream, buf, n, NULL);
    /* a CR first (empty lines before a request line) or a TLS handshake: the reference */
    unsigned char c0 = (unsigned char)data[0];
    HttpHead h;
    Py_ssize_t hn = c0 == 13 || c0 == 0x16 ? 0 : http_request_head(data, have, s->limit, s->rscan.pos, &h);
    if (hn == 0) {
        if (c0 != 13 && c0 != 0x16 && http_head_more(data, have, s->limit, 1, &s->rscan)) {
            s->handled++;
            *n = 1;
            return OP_MORE; /* the head is not all in, and nothing in it is refused so far */
        }
        return h_delegate(s, 0, end_stream, buf, n, NULL);
    }
    memset(&s->rscan, 0, sizeof(HeadScan)); /* the head is all in */
    if ((s->normalizing && suspect(data + h.target_off, h.target_len)) || s->pending_bytes > s->budget)
        return h_delegate(s, 0, end_stream, buf, n, NULL);
    /* Nothing of data is read after the policy (a call back into Python): copy what it needs. */
    PyObject *method = PyUnicode_DecodeASCII(data, h.method_len, NULL);
    PyObject *path = PyUnicode_DecodeASCII(data + h.target_off, h.target_len, NULL);
    PyObject *host = h.host_off < 0 ? (Py_INCREF(s_empty_str), s_empty_str)
                                    : PyUnicode_DecodeLatin1(data + h.host_off, h.host_len, NULL);
    PyObject *block = PyBytes_FromStringAndSize(data + h.fields_off, h.fields_end - h.fields_off);
    PyObject *req = NULL, *judged = NULL;
    long long length = h.length;
    int v11 = h.v11, keep_alive = h.keep_alive, chunked = h.chunked, op = -1;
    if (method == NULL || path == NULL || host == NULL || block == NULL) goto done;
    int m = http_flat_matches(&s->flat, s->ctx, method, path, host, v11, block);
    if (m < 0) goto done;
    if (m != 1) {
        req = http_build_request(method, path, host, v11, block);
        if (req == NULL) goto done;
        if (m == 2) {
            PyObject *r = PyObject_CallMethodOneArg(s->ctx, s_matches, req);
            if (r == NULL) goto done;
            m = PyObject_IsTrue(r);
            Py_DECREF(r);
            if (m < 0) goto done;
            if (m == 1 && PyList_GET_SIZE(PyTuple_GET_ITEM(req, 5)) != 0) m = 3; /* headerMatches actions */
        }
        if (m != 1) {
            judged = PyTuple_Pack(2, req, BOOL(m));
            if (judged == NULL) goto done;
            op = h_delegate(s, 0, end_stream, buf, n, judged);
            goto done;
        }
    }
    /* _forward: the request is allowed and its head unchanged */
    s->handled++;
    if (q_push(s, method, path, host) < 0) goto done;
    if (log_forwarded(s, method, path, host, v11) < 0) goto done;
    if (chunked) { /* _start_chunked(PASS, after) */
        s->rs = RS_CHUNK;
        s->r_op = OP_PASS;
        s->r_crlf = 0;
        s->r_next = keep_alive ? RS_HEAD : RS_DRAIN;
        *n = hn;
    } else {
        s->rs = keep_alive ? RS_HEAD : RS_DRAIN;
        *n = hn + length;
    }
    op = OP_PASS;
done:
    Py_XDECREF(method);
    Py_XDECREF(path);
    Py_XDECREF(host);
    Py_XDECREF(block);
    Py_XDECREF(req);
    Py_XDECREF(judged);
    return op;
}

/* --- responses (parser.py _response, _response_head, _complete) ------------------------------- */

static int h_response(Http *s, int end_stream, PyObject *buf, const char *data, Py_ssize_t have, long long *n) {
    if ((s->ps == PS_LENGTH || s->ps == PS_CHUNK_DATA) && s->qlen > 0) {
        s->handled++;
        long long left = s->p_left;
        if (have < left) {
            s->p_left = left - have;
            *n = have;
            return OP_PASS;
        }
        s->p_left = 0;
        *n = left;
        if (s->ps == PS_CHUNK_DATA) {
            s->ps = PS_CHUNK;
            s->p_crlf = 1;
            return OP_PASS;
        }
        q_popleft(s); /* _complete: no answer waits behind it in the states this file holds */
        s->ps = PS_HEAD;
        return OP_PASS;
    }
    if (s->ps == PS_CHUNK && s->qlen > 0) {
        long long size;
        Py_ssize_t k = http_chunk_line(data, have, s->limit, s->p_crlf, &size, &s->p_seen);
        if (k == 0) return h_delegate(s, 1, end_stream, buf, n, NULL);
        s->handled++;
        if (k < 0) { /* _chunk_line's (-1, seen): MORE; where the search resumes changes nothing */
            *n = 1;
            return OP_MORE;
        }
        s->p_crlf = 0;
        s->ps = size == 0 ? PS_TRAILER : PS_CHUNK_DATA;
        s->p_left = size;
        *n = k;
        return OP_PASS;
    }
    if (s->ps == PS_TRAILER && s->qlen > 0) {
        /* an empty trailer section ends the response; any trailer field is the reference's */
        if (have == 1 && data[0] == '\r') { /* HeadReader.scan: no LF yet, nothing judged */
            s->handled++;
            *n = 1;
            return OP_MORE;
        }
        if (have < 2 || data[0] != '\r' || data[1] != '\n') return h_delegate(s, 1, end_stream, buf, n, NULL);
        s->handled++;
        q_popleft(s);
        s->ps = PS_HEAD;
        *n = 2;
        return OP_PASS;
    }
    if (s->ps != PS_HEAD) return h_delegate(s, 1, end_stream, buf, n, NULL);
    if (s->qlen == 0) return h_delegate(s, 1, end_stream, buf, n, NULL); /* unsolicited (or no entry) */
    HEntry *e = q_at(s, 0);
    HttpHead h;
    Py_ssize_t hn = http_response_head(data, have, s->limit, s->pscan.pos, e->head, &h);
    if (hn == 0) {
        if (http_head_more(data, have, s->limit, 0, &s->pscan)) {
            s->handled++;
            *n = 1;
            return OP_MORE;
        }
        return h_delegate(s, 1, end_stream, buf, n, NULL);
    }
    s->handled++;
    memset(&s->pscan, 0, sizeof(HeadScan));
    if (s->log_responses) {
        PyObject *status = PyLong_FromLong(h.status);
        if (status == NULL) return -1;
        PyObject *f = fields4(hs_method, e->method, hs_path, e->path, hs_host, e->host, hs_status, status);
        Py_DECREF(status);
        if (ctx_log(s, g_ET_H_RESPONSE, f) < 0) return -1;
    }
    if (h.chunked) {
        s->ps = PS_CHUNK;
        s->p_crlf = 0;
        *n = hn;
        return OP_PASS;
    }
    long long total = hn + h.length;
    if (h.length == 0 || total <= have) {
        q_popleft(s);
        s->ps = PS_HEAD;
        *n = total;
        return OP_PASS;
    }
    s->ps = PS_LENGTH;
    s->p_left = h.length;
    *n = hn;
    return OP_PASS;
}

static int h_on_data(NativeParser *np, int reply, int end_stream, PyObject *buf, long long *n) {
    Http *s = (Http *)np;
    if (s->delegated) return h_delegate(s, reply, end_stream, buf, n, NULL);
    const char *data;
    Py_ssize_t have;
    if (bytes_view(buf, &data, &have) < 0) {
        PyErr_SetString(PyExc_TypeError, "http parser: data must be bytes or bytearray");
        return -1;
    }
    if (have == 0) {
        *n = 0;
        return OP_NOP;
    }
    return reply ? h_response(s, end_stream, buf, data, have, n) : h_request(s, end_stream, buf, data, have, n);
}

/* --- the type -------------------------------------------------------------------------------- */

static int Http_traverse(Http *s, visitproc visit, void *arg) {
    Py_VISIT(s->ctx);
    Py_VISIT(s->py);
    Py_VISIT(s->py_make);
    Py_VISIT(s->counts);
    Py_VISIT(s->flat.policy);
    Py_VISIT(s->flat.flat);
    return 0;
}

static int Http_clear(Http *s) {
    Py_CLEAR(s->ctx);
    Py_CLEAR(s->py);
    Py_CLEAR(s->py_make);
    Py_CLEAR(s->counts);
    Py_CLEAR(s->count_key);
    return 0;
}

static void Http_dealloc(Http *s) {
    PyObject_GC_UnTrack(s);
    Http_clear(s);
    flat_clear(&s->flat);
    q_clear(s);
    PyMem_Free(s->q);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int Http_init(Http *s, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ctx", "reference", "max_header_bytes", "log_responses", "normalizing",
                             "pending_budget", NULL};
    PyObject *ctx, *py;
    Py_ssize_t limit;
    int log_responses, normalizing;
    long long budget;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOnppL", kwlist, &ctx, &py, &limit, &log_responses, &normalizing,
                                     &budget))
        return -1;
    s->budget = budget;
    if (g_HttpRequest == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxyd._native.setup_http() was not called");
        return -1;
    }
    if (s->q != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Http is initialised once");
        return -1;
    }
    Py_INCREF(ctx);
    Py_XSETREF(s->ctx, ctx);
    if (PyTuple_CheckExact(py) && PyTuple_GET_SIZE(py) >= 1) { /* (class, *args): made when needed */
        Py_INCREF(py);
        Py_XSETREF(s->py_make, py);
        Py_CLEAR(s->py);
    } else {
        Py_INCREF(py);
        Py_XSETREF(s->py, py);
    }
    s->base.on_data = h_on_data;
    s->limit = limit;
    s->log_responses = log_responses;
    s->normalizing = normalizing;
    s->delegated = 0;
    s->rs = RS_HEAD;
    s->ps = PS_HEAD;
    s->p_left = s->pending_bytes = 0;
    s->p_crlf = 0;
    s->r_op = OP_PASS;
    s->r_crlf = 0;
    s->r_next = RS_HEAD;
    s->handled = s->handed = 0;
    memset(&s->rscan, 0, sizeof(HeadScan));
    memset(&s->pscan, 0, sizeof(HeadScan));
    s->r_seen = s->p_seen = 0;
    int is_ctx = g_Context != NULL && Py_TYPE(ctx) == (PyTypeObject *)g_Context;
    flat_init(&s->flat, HTTP_FIELDS, is_ctx);
    if (is_ctx) {
        PyObject *qc = PyObject_CallMethodNoArgs(ctx, hs_quiet_counter);
        if (qc == NULL) return -1;
        if (PyTuple_Check(qc) && PyTuple_GET_SIZE(qc) == 2 && PyDict_CheckExact(PyTuple_GET_ITEM(qc, 0))) {
            s->counts = PyTuple_GET_ITEM(qc, 0);
            s->count_key = PyTuple_GET_ITEM(qc, 1);
            Py_INCREF(s->counts);
            Py_INCREF(s->count_key);
        }
        Py_DECREF(qc);
    }
    return 0;
}

static PyObject *Http_py_on_data(Http *s, PyObject *const *args, Py_ssize_t nargs) {
    return native_parser_py_on_data(&s->base, args, nargs);
}

static PyObject *Http_counts(Http *s, PyObject *unused) {
    return Py_BuildValue("LL", s->handled, s->handed);
}

/* HttpParser.pending_requests(): (method, path, host, payload) per pending entry */
static PyObject *Http_pending(Http *s, PyObject *unused) {
    if (s->delegated) return PyObject_CallMethod(s->py, "pending_requests", NULL);
    PyObject *out = PyList_New(s->qlen);
    for (Py_ssize_t i = 0; out && i < s->qlen; i++) {
        HEntry *e = q_at(s, i);
        PyObject *t = PyTuple_Pack(4, e->method, e->path, e->host, Py_None);
        if (t == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static PyMethodDef Http_methods[] = {
    {"pending_requests", (PyCFunction)Http_pending, METH_NOARGS,
     "HttpParser.pending_requests(): what awaits its response (for tests)."},
    {"on_data", (PyCFunction)(void (*)(void))Http_py_on_data, METH_FASTCALL,
     "The parser API's on_data (proxyd.parser.Parser)."},
    {"counts", (PyCFunction)Http_counts, METH_NOARGS,
     "(calls answered by the twin, calls handed to the reference parser): for tests and benchmarks."},
    {NULL},
};

static PyMemberDef Http_members[] = {
    {"ctx", T_OBJECT, offsetof(Http, ctx), READONLY, NULL},
    {"delegated", T_INT, offsetof(Http, delegated), READONLY, "1 while the reference holds the state"},
    {"r_seen", T_PYSSIZET, offsetof(Http, r_seen), READONLY, "HttpParser.r_seen (while the twin holds the state)"},
    {NULL},
};

static PyObject *Http_pending_bytes(Http *s, void *closure) {
    if (s->delegated) return PyObject_GetAttrString(s->py, "pending_bytes");
    return PyLong_FromLongLong(s->pending_bytes);
}

static PyObject *Http_reference(Http *s, void *closure) {
    if (s->py == NULL && h_make_reference(s) < 0) return NULL;
    Py_INCREF(s->py);
    return s->py;
}

static PyGetSetDef Http_getset[] = {
    {"reference", (getter)Http_reference, NULL, "the reference HttpParser it hands states to", NULL},
    {"pending_bytes", (getter)Http_pending_bytes, NULL, "HttpParser.pending_bytes", NULL},
    {NULL},
};

PyTypeObject HttpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.Http",
    .tp_doc = "The native twin of proxyd.parsers.http.HttpParser (with the reference for the rare states).",
    .tp_basicsize = sizeof(Http),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Http_init,
    .tp_dealloc = (destructor)Http_dealloc,
    .tp_traverse = (traverseproc)Http_traverse,
    .tp_clear = (inquiry)Http_clear,
    .tp_methods = Http_methods,
    .tp_members = Http_members,
    .tp_getset = Http_getset,
};

#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return -1; } while (0)

int http_parser_init(void) {
    INTERN(hs_method, "method");
    INTERN(hs_path, "path");
    INTERN(hs_host, "host");
    INTERN(hs_version, "version");
    INTERN(hs_status, "status");
    INTERN(hs_twin_export, "twin_export");
    INTERN(hs_twin_adopt, "twin_adopt");
    INTERN(hs__request_head, "_request_head");
    INTERN(hs_quiet_counter, "quiet_counter");
    INTERN(hs_v10, "1.0");
    INTERN(hs_v11, "1.1");
    INTERN(hs_http10, "HTTP/1.0");
    INTERN(hs_http11, "HTTP/1.1");
    INTERN(hs_HEAD, "HEAD");
    return 0;
}

#undef INTERN
