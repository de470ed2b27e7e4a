/* The memcache parser: the twin of proxyd/parsers/memcache/ (parser.py: protocol detection;
 * common.py: the pending-reply queue and denial placement; text.py: classic and meta text;
 * binary.py: the binary protocol), in that order. Policy decisions go through policy.c's flat
 * evaluation when it applies, else through ctx.matches; the access log stays in Python. */
#include "native.h"

/* ========================================================================================== */
/* Lazy access-log fields: the zero-argument callable that proxyd.parser.Fields allows.        */

typedef struct {
    PyObject_HEAD
    int kind;        /* 0: {"command": a, "keys": [decoded b...]}; 1: {"command": a, "status": b} */
    PyObject *a, *b; /* 2: {"opcode": a, "key": decoded b} */
} LazyFields;

static void LazyFields_dealloc(LazyFields *self) {
    Py_XDECREF(self->a);
    Py_XDECREF(self->b);
    PyObject_Free(self);
}


static PyObject *decode_key(PyObject *k) { return PyObject_CallOneArg(g_key_text, k); }

static PyObject *fields_dict(int kind, PyObject *a, PyObject *b) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    PyObject *v = NULL;
    if (kind == 0) {
        Py_ssize_t nk = PyTuple_GET_SIZE(b);
        v = PyList_New(nk);
        for (Py_ssize_t i = 0; v && i < nk; i++) {
            PyObject *s = decode_key(PyTuple_GET_ITEM(b, i));
            if (s == NULL) Py_CLEAR(v);
            else PyList_SET_ITEM(v, i, s);
        }
        if (v == NULL || PyDict_SetItem(d, s_command, a) < 0 || PyDict_SetItem(d, s_keys, v) < 0) goto fail;
    } else if (kind == 1) {
        if (PyDict_SetItem(d, s_command, a) < 0 || PyDict_SetItem(d, s_status, b) < 0) goto fail;
    } else {
        v = decode_key(b);
        if (v == NULL || PyDict_SetItem(d, s_opcode, a) < 0 || PyDict_SetItem(d, s_key, v) < 0) goto fail;
    }
    Py_XDECREF(v);
    return d;
fail:
    Py_XDECREF(v);
    Py_DECREF(d);
    return NULL;
}

static PyObject *LazyFields_call(LazyFields *self, PyObject *args, PyObject *kw) {
    return fields_dict(self->kind, self->a, self->b);
}

PyTypeObject LazyFieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.LazyFields",
    .tp_basicsize = sizeof(LazyFields),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)LazyFields_dealloc,
    .tp_call = (ternaryfunc)LazyFields_call,
};

static PyObject *lazy_fields(int kind, PyObject *a, PyObject *b) {
    LazyFields *f = PyObject_New(LazyFields, &LazyFieldsType);
    if (f == NULL) return NULL;
    f->kind = kind;
    Py_INCREF(a);
    Py_INCREF(b);
    f->a = a;
    f->b = b;
    return (PyObject *)f;
}

/* ========================================================================================== */
/* memcache: the pending queue (memcache/common.py)                                            */

#define MAX_KEY 250
#define MAX_LINE 2048
#define MAX_REPLY_LINE 8192
#define MAX_PENDING 10000

enum { K_NONE = -1, K_UNIT = 0, K_RETR, K_STATS, K_DUMP, K_WATCH, K_DENY, K_BARRIER };
enum { M_ALWAYS = 0, M_TEXT = 1, M_BIN = 2 };

/* text reply codes a quiet meta request may accept */
enum { C_VA = 1, C_HD = 2, C_SERVER_ERROR = 4, C_NS = 8, C_EX = 16, C_NF = 32, C_CLIENT_ERROR = 64 };

typedef struct {
    int kind;
    int mtype;
    unsigned mask;       /* M_TEXT: accepted codes */
    unsigned opcode;     /* M_BIN */
    uint32_t opaque;     /* M_BIN */
    PyObject *name;      /* str */
    PyObject *payload;   /* bytes or NULL (b"") */
    int opq_len;         /* M_TEXT: the " O..." token the reply must echo, if any */
    char opq[40];
} Entry;

typedef struct {
    Entry *e;
    Py_ssize_t head, len, cap;
} Queue;

static void entry_clear(Entry *e) {
    Py_CLEAR(e->name);
    Py_CLEAR(e->payload);
}

static Entry *q_at(Queue *q, Py_ssize_t i) { return &q->e[(q->head + i) % q->cap]; }

static void q_popleft(Queue *q) {
    entry_clear(&q->e[q->head]);
    q->head = (q->head + 1) % q->cap;
    q->len--;
}

static int q_append_raw(Queue *q, Entry *src) { /* steals src's references */
    if (q->len == q->cap) {
        Py_ssize_t cap = q->cap ? q->cap * 2 : 16;
        Entry *e = PyMem_Calloc((size_t)cap, sizeof(Entry));
        if (e == NULL) {
            entry_clear(src);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < q->len; i++) e[i] = *q_at(q, i);
        PyMem_Free(q->e);
        q->e = e;
        q->head = 0;
        q->cap = cap;
    }
    q->e[(q->head + q->len) % q->cap] = *src;
    q->len++;
    return 0;
}

static void q_free(Queue *q) {
    while (q->len) q_popleft(q);
    PyMem_Free(q->e);
    q->e = NULL;
    q->cap = q->head = 0;
}

/* PendingQueue.push: 1 pushed, 0 full of always-answered entries (src released), -1 error */
static int q_push(Queue *q, Entry *src) {
    while (q->len >= MAX_PENDING) {
        if (q_at(q, 0)->mtype == M_ALWAYS) {
            entry_clear(src);
            return 0;
        }
        q_popleft(q);
    }
    return q_append_raw(q, src) < 0 ? -1 : 1;
}

/* ========================================================================================== */
/* memcache parser object: protocol detection, text/meta dialect, binary dialect              */

typedef struct {
    NativeParser base;
    PyObject *ctx;
    int log_responses;
    int dialect;            /* 0 undecided, 1 text, 2 binary */
    Py_ssize_t scan, rscan;
    int stream;
    Queue q;
    long long req_owed, rep_owed;
    int held;                     /* PendingQueue.held: the last reply's last byte to pass (1) or drop (2) */
    PyObject *after;              /* PendingQueue.after: bytes or NULL (b"") */
    long long closing;            /* PendingQueue.closing: the error code of a close decided */
    PyObject *reason;             /* PendingQueue.reason: str or NULL */
    PyObject *final;              /* PendingQueue.final: bytes or NULL */
    PyObject *counts, *count_key; /* ctx.quiet_counter(): count forwarded requests without a log call */
    FlatPolicy flat;              /* the connection's flattened policy (policy.c, flat_matches) */
} Memcache;

static int Memcache_traverse(Memcache *self, visitproc visit, void *arg) {
    Py_VISIT(self->ctx);
    Py_VISIT(self->counts);
    Py_VISIT(self->flat.policy);
    Py_VISIT(self->flat.flat);
    return 0;
}

static int Memcache_clear(Memcache *self) {
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->count_key);
    Py_CLEAR(self->after);
    Py_CLEAR(self->reason);
    Py_CLEAR(self->final);
    flat_clear(&self->flat);
    return 0;
}

static void Memcache_dealloc(Memcache *self) {
    PyObject_GC_UnTrack(self);
    Memcache_clear(self);
    flat_clear(&self->flat);
    q_free(&self->q);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The flat-policy fields of a memcache request (rules.py FIELD_COMMAND, FIELD_KEY,
 * MemcacheRequest.values): the command name; every key, none when a key could not be decoded. */
static const char *const MC_FIELDS[] = {"command", "key", NULL};

static int mc_on_data(NativeParser *np, int reply, int end_stream, PyObject *buf, long long *n);
static int ctx_log(Memcache *self, PyObject *entry_type, PyObject *fields);

static int Memcache_init(Memcache *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ctx", "log_responses", NULL};
    PyObject *ctx;
    int log_responses = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p", kwlist, &ctx, &log_responses)) return -1;
    if (g_MemcacheRequest == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxyd._native.setup_memcache() was not called");
        return -1;
    }
    Py_INCREF(ctx);
    Py_XSETREF(self->ctx, ctx);
    self->log_responses = log_responses;
    self->base.on_data = mc_on_data;
    self->dialect = 0;
    self->scan = self->rscan = 0;
    self->stream = 0;
    self->req_owed = self->rep_owed = 0;
    self->held = 0;
    self->closing = 0;
    Py_CLEAR(self->after);
    Py_CLEAR(self->reason);
    Py_CLEAR(self->final);
    q_free(&self->q);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->count_key);
    flat_init(&self->flat, MC_FIELDS, g_Context != NULL && Py_TYPE(ctx) == (PyTypeObject *)g_Context);
    if (g_Context != NULL && Py_TYPE(ctx) == (PyTypeObject *)g_Context) {
        PyObject *qc = PyObject_CallMethod(ctx, "quiet_counter", NULL);
        if (qc == NULL) return -1;
        if (PyTuple_Check(qc) && PyTuple_GET_SIZE(qc) == 2 && PyDict_CheckExact(PyTuple_GET_ITEM(qc, 0))) {
            self->counts = PyTuple_GET_ITEM(qc, 0);
            self->count_key = PyTuple_GET_ITEM(qc, 1);
            Py_INCREF(self->counts);
            Py_INCREF(self->count_key);
        }
        Py_DECREF(qc);
    }
    return 0;
}

/* ctx.log(EntryType.REQUEST, fields) for an allowed request; when the access log writes no
 * line for it (ctx.quiet_counter()) and the decision was not audit, count it in place instead:
 * what Context.log and AccessLog.l7 would do. Steals fields. */
static int log_forwarded(Memcache *self, PyObject *fields) {
    if (fields == NULL) return -1;
    if (self->counts != NULL) {
        PyObject *last = PyObject_GetAttr(self->ctx, s_last_decision);
        if (last == NULL) {
            Py_DECREF(fields);
            return -1;
        }
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
        if (audit < 0 || PyErr_Occurred()) {
            Py_DECREF(fields);
            return -1;
        }
        if (!audit) {
            Py_DECREF(fields);
            PyObject *old = PyDict_GetItemWithError(self->counts, self->count_key);
            if (old == NULL && PyErr_Occurred()) return -1;
            PyObject *one = PyLong_FromLong(1);
            PyObject *sum = old ? PyNumber_Add(old, one) : (Py_INCREF(one), one);
            Py_DECREF(one);
            if (sum == NULL) return -1;
            int rc = PyDict_SetItem(self->counts, self->count_key, sum);
            Py_DECREF(sum);
            if (rc < 0) return -1;
            return PyObject_SetAttr(self->ctx, s_last_decision, g_ALLOWED);
        }
    }
    return ctx_log(self, g_ET_REQUEST, fields);
}

/* --- calls into the context ----------------------------------------------------------------- */

static int ctx_log(Memcache *self, PyObject *entry_type, PyObject *fields) { /* steals fields */
    if (fields == NULL) return -1;
    PyObject *r = PyObject_CallMethodObjArgs(self->ctx, s_log, entry_type, fields, NULL);
    Py_DECREF(fields);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int ctx_inject(Memcache *self, int reply, PyObject *payload) {
    PyObject *r = PyObject_CallMethodObjArgs(self->ctx, s_inject, BOOL(reply), payload, NULL);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* MemcacheRequest(name, keys, key_error): tuple.__new__, what the NamedTuple builds */
static PyObject *mc_request(PyObject *name, PyObject *keys, int key_error) {
    PyObject *inner = PyTuple_Pack(3, name, keys, BOOL(key_error));
    if (inner == NULL) return NULL;
    PyObject *args = PyTuple_Pack(1, inner);
    Py_DECREF(inner);
    if (args == NULL) return NULL;
    PyObject *req = PyTuple_Type.tp_new((PyTypeObject *)g_MemcacheRequest, args, NULL);
    Py_DECREF(args);
    return req;
}

typedef struct {
    FlatRequest base;
    PyObject *name, *keys;
    int key_error;
} McFlatRequest;

static PyObject *mc_flat_build(const FlatRequest *r) {
    const McFlatRequest *m = (const McFlatRequest *)r;
    return mc_request(m->name, m->keys, m->key_error);
}

/* ctx.matches(MemcacheRequest(name, keys, key_error)): 1, 0, or -1 */
static int ctx_matches(Memcache *self, PyObject *name, PyObject *keys, int key_error) {
    if (PyTuple_CheckExact(keys)) {
        Py_ssize_t nk = key_error ? 0 : PyTuple_GET_SIZE(keys);
        FlatValues fields[2] = {{&name, 1}, {((PyTupleObject *)keys)->ob_item, nk}};
        McFlatRequest req = {{fields, mc_flat_build}, name, keys, key_error};
        int f = flat_matches(&self->flat, self->ctx, &req.base);
        if (f != 2) return f;
    }
    PyObject *req = mc_request(name, keys, key_error);
    if (req == NULL) return -1;
    PyObject *r = PyObject_CallMethodOneArg(self->ctx, s_matches, req);
    Py_DECREF(req);
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* unsolicited: a reply with no request pending; log it and PASS it */
static int mc_unsolicited(Memcache *self, PyObject *status, long long nrep, long long *n) { /* steals status */
    if (status == NULL) return -1;
    PyObject *d = PyDict_New();
    if (d == NULL || PyDict_SetItem(d, s_status, status) < 0 || PyDict_SetItem(d, s_unsolicited, Py_True) < 0) {
        Py_XDECREF(d);
        Py_DECREF(status);
        return -1;
    }
    Py_DECREF(status);
    if (ctx_log(self, g_ET_RESPONSE, d) < 0) return -1;
    *n = nrep;
    return OP_PASS;
}

static PyObject *latin1_status(const char *p, Py_ssize_t k) {
    return PyUnicode_DecodeLatin1(p, k > 64 ? 64 : k, NULL);
}

/* *acc += b (bytes; NULL stands for b"") */
static int bytes_add(PyObject **acc, PyObject *b) {
    if (b == NULL || PyBytes_GET_SIZE(b) == 0) return 0;
    if (*acc == NULL) {
        Py_INCREF(b);
        *acc = b;
        return 0;
    }
    PyBytes_Concat(acc, b);
    return *acc == NULL ? -1 : 0;
}

/* PendingQueue.finish: inject answer (stolen, may be NULL) + final, log the reason, ERROR */
static int mc_finish(Memcache *self, PyObject *answer, long long *n) {
    PyObject *out = answer;
    if (bytes_add(&out, self->final) < 0) return -1;
    Py_CLEAR(self->final);
    int rc = 0;
    if (out != NULL && PyBytes_GET_SIZE(out)) rc = ctx_inject(self, 1, out);
    Py_XDECREF(out);
    if (rc < 0) return -1;
    PyObject *d = PyDict_New();
    if (d == NULL || PyDict_SetItem(d, s_error, self->reason ? self->reason : s_empty_str) < 0) {
        Py_XDECREF(d);
        return -1;
    }
    if (ctx_log(self, g_ET_RESPONSE, d) < 0) return -1;
    *n = self->closing;
    return OP_ERROR;
}

/* PendingQueue.close: reason (stolen), answer (borrowed, may be NULL) */
static int mc_close(Memcache *self, long long code, PyObject *reason, PyObject *answer, Py_ssize_t have,
                    long long *n) {
    if (reason == NULL) return -1;
    self->closing = code;
    Py_XSETREF(self->reason, reason);
    Py_XINCREF(answer);
    Py_XSETREF(self->final, answer);
    Queue *q = &self->q;
    if (q->len == 0 && !self->held) return mc_finish(self, NULL, n);
    if (q->len && q_at(q, q->len - 1)->mtype != M_ALWAYS) {
        /* the last request may stay silent: a barrier's answer tells when all are done */
        Entry e = {0};
        e.kind = K_BARRIER;
        e.name = s_empty_str;
        Py_INCREF(e.name);
        if (q_append_raw(q, &e) < 0) return -1;
        if (ctx_inject(self, 0, self->dialect == 2 ? s_bin_barrier : s_text_barrier) < 0) return -1;
    }
    *n = have;
    return OP_DROP;
}

/* PendingQueue.drain_then_close (reason stolen) */
static int mc_drain_then_close(Memcache *self, long long code, PyObject *reason) {
    if (reason == NULL) return -1;
    self->closing = code;
    Py_XSETREF(self->reason, reason);
    return 0;
}

/* PendingQueue.closed_request */
static int mc_closed_request(Memcache *self, Py_ssize_t have, long long *n) {
    if (self->q.len == 0 && !self->held) return mc_finish(self, NULL, n);
    *n = have;
    return OP_DROP;
}

/* PendingQueue.release: the held last byte of the last reply is data[0] */
static int mc_release(Memcache *self, const char *data, Py_ssize_t have, long long *n) {
    int held = self->held;
    self->held = 0;
    PyObject *after = self->after; /* owned */
    self->after = NULL;
    if (self->closing && self->q.len == 0) {
        PyObject *head = NULL;
        if (held == 1) {
            head = PyBytes_FromStringAndSize(data, 1);
            if (head == NULL) {
                Py_XDECREF(after);
                return -1;
            }
        }
        int rc = bytes_add(&head, after);
        Py_XDECREF(after);
        if (rc < 0) return -1;
        return mc_finish(self, head, n);
    }
    if (after != NULL && PyBytes_GET_SIZE(after)) {
        int rc = ctx_inject(self, 1, after);
        if (rc == 0 && have > 1) self->rep_owed = PyBytes_GET_SIZE(after);
        Py_DECREF(after);
        if (rc < 0) return -1;
    } else {
        Py_XDECREF(after);
    }
    *n = 1;
    return held == 1 ? OP_PASS : OP_DROP;
}

#define QUEUE_FULL "more than 10000 replies pending"

/* PendingQueue.deny: DROP n, or the close when the queue is full */
static int mc_deny(Memcache *self, PyObject *name, PyObject *payload, PyObject *barrier, long long nreq,
                   Py_ssize_t have, long long *n) {
    Queue *q = &self->q;
    if (q->len == 0) {
        if (self->held) {
            if (bytes_add(&self->after, payload) < 0) return -1;
        } else if (ctx_inject(self, 1, payload) < 0) {
            return -1;
        }
    } else if (q_at(q, q->len - 1)->mtype == M_ALWAYS) {
        Entry e = {0};
        e.kind = K_DENY;
        e.name = name;
        Py_INCREF(name);
        e.payload = payload;
        Py_INCREF(payload);
        int r = q_push(q, &e);
        if (r < 0) return -1;
        if (r == 0) return mc_close(self, 4, PyUnicode_FromString(QUEUE_FULL), NULL, have, n);
    } else {
        Entry e = {0};
        e.kind = K_BARRIER;
        e.name = name;
        Py_INCREF(name);
        e.payload = payload;
        Py_INCREF(payload);
        int r = q_push(q, &e);
        if (r < 0) return -1;
        if (r == 0) return mc_close(self, 4, PyUnicode_FromString(QUEUE_FULL), NULL, have, n);
        if (ctx_inject(self, 0, barrier) < 0) return -1;
        if (nreq < have) self->req_owed = PyBytes_GET_SIZE(barrier);
    }
    *n = nreq;
    return OP_DROP;
}

/* PendingQueue.complete: the head entry's reply ends with the next nrep bytes.
 * status: a str (binary) or NULL with code/codelen (text); first: the reply's first byte. */
static int mc_complete(Memcache *self, long long nrep, Py_ssize_t have, PyObject *status_str,
                       const char *code, Py_ssize_t codelen, char first, long long *n) {
    Queue *q = &self->q;
    Entry head = *q_at(q, 0);
    /* take the references out of the slot, then pop it */
    q_at(q, 0)->name = NULL;
    q_at(q, 0)->payload = NULL;
    q_popleft(q);
    int drop = head.kind == K_BARRIER;
    int rc = 0;
    PyObject *answers = NULL;
    if (drop) {
        answers = head.payload;
        Py_XINCREF(answers);
    } else if (self->log_responses) {
        PyObject *status = status_str ? (Py_INCREF(status_str), status_str) : latin1_status(code, codelen);
        if (status == NULL) rc = -1;
        else {
            rc = ctx_log(self, g_ET_RESPONSE, lazy_fields(1, head.name, status));
            Py_DECREF(status);
        }
    }
    entry_clear(&head);
    if (rc < 0) {
        Py_XDECREF(answers);
        return -1;
    }
    while (q->len && q_at(q, 0)->kind == K_DENY) {
        PyObject *payload = q_at(q, 0)->payload;
        Py_XINCREF(payload);
        q_popleft(q);
        rc = bytes_add(&answers, payload);
        Py_XDECREF(payload);
        if (rc < 0) {
            Py_XDECREF(answers);
            return -1;
        }
    }
    if (q->len == 0 && (nrep > have || self->closing)) {
        if (nrep > 1) {
            self->held = drop ? 2 : 1;
            Py_XSETREF(self->after, answers);
            *n = nrep - 1;
            return drop ? OP_DROP : OP_PASS;
        }
        if (self->closing) {
            PyObject *hb = NULL;
            if (!drop) {
                hb = PyBytes_FromStringAndSize(&first, 1);
                if (hb == NULL) {
                    Py_XDECREF(answers);
                    return -1;
                }
            }
            rc = bytes_add(&hb, answers);
            Py_XDECREF(answers);
            if (rc < 0) return -1;
            return mc_finish(self, hb, n);
        }
    }
    if (answers != NULL && PyBytes_GET_SIZE(answers)) {
        rc = ctx_inject(self, 1, answers);
        if (rc == 0 && nrep < have) self->rep_owed = PyBytes_GET_SIZE(answers);
    }
    Py_XDECREF(answers);
    if (rc < 0) return -1;
    *n = nrep;
    return drop ? OP_DROP : OP_PASS;
}

/* unsolicited_line: a text line where no text reply can be (no dialect yet, or binary) */
static int mc_unsolicited_line(Memcache *self, const char *data, Py_ssize_t have, long long *n) {
    const char *nl = memchr(data, '\n', (size_t)have);
    if (nl == NULL) {
        if (have > MAX_REPLY_LINE) {
            *n = 2;
            return OP_ERROR;
        }
        *n = 1;
        return OP_MORE;
    }
    Py_ssize_t end = nl - data;
    Py_ssize_t stop = (end > 0 && data[end - 1] == '\r') ? end - 1 : end;
    const char *sp = memchr(data, ' ', (size_t)stop);
    return mc_unsolicited(self, latin1_status(data, sp ? sp - data : stop), end + 1, n);
}

/* --- text dialect (memcache/text.py) ---------------------------------------------------------- */

enum {
    F_GET = 0, F_GAT, F_STORE, F_CAS, F_KEYED, F_NOREPLY, F_ADMIN, F_STATS, F_CRAWLER, F_WATCH,
    F_QUIT, F_MG, F_MS, F_MD, F_MA, F_ME, F_MN
};

typedef struct {
    const char *tok;
    int family;
    const char *name;
    int lo, hi;
    PyObject *pyname;
} Command;

#define BIG (1 << 30)
static Command COMMANDS[] = {
    {"get", F_GET, "get", 0, 0}, {"gets", F_GET, "gets", 0, 0}, {"bget", F_GET, "get", 0, 0},
    {"gat", F_GAT, "gat", 0, 0}, {"gats", F_GAT, "gats", 0, 0},
    {"set", F_STORE, "set", 4, 5}, {"add", F_STORE, "add", 4, 5}, {"replace", F_STORE, "replace", 4, 5},
    {"append", F_STORE, "append", 4, 5}, {"prepend", F_STORE, "prepend", 4, 5},
    {"cas", F_CAS, "cas", 5, 6},
    {"delete", F_KEYED, "delete", 1, 3}, {"incr", F_KEYED, "incr", 2, 3}, {"decr", F_KEYED, "decr", 2, 3},
    {"touch", F_KEYED, "touch", 2, 3},
    {"flush_all", F_NOREPLY, "flush_all", 0, 2}, {"verbosity", F_NOREPLY, "verbosity", 1, 2},
    {"cache_memlimit", F_NOREPLY, "cache_memlimit", 1, 2},
    {"version", F_ADMIN, "version", 0, BIG}, {"shutdown", F_ADMIN, "shutdown", 0, BIG},
    {"slabs", F_ADMIN, "slabs", 0, BIG}, {"lru", F_ADMIN, "lru", 0, BIG},
    {"misbehave", F_ADMIN, "misbehave", 0, BIG}, {"debugtime", F_ADMIN, "debugtime", 0, BIG},
    {"extstore", F_ADMIN, "extstore", 0, BIG}, {"refresh_certs", F_ADMIN, "refresh_certs", 0, BIG},
    {"stats", F_STATS, "stats", 0, BIG}, {"lru_crawler", F_CRAWLER, "lru_crawler", 0, BIG},
    {"watch", F_WATCH, "watch", 0, BIG}, {"quit", F_QUIT, "quit", 0, BIG},
    {"mg", F_MG, "mg", 0, 0}, {"ms", F_MS, "ms", 0, 0}, {"md", F_MD, "md", 0, 0},
    {"ma", F_MA, "ma", 0, 0}, {"me", F_ME, "me", 0, 0}, {"mn", F_MN, "mn", 0, 0},
    {NULL, 0, NULL, 0, 0},
};

static Command *find_command(const char *p, Py_ssize_t k) {
    for (Command *c = COMMANDS; c->tok; c++) {
        if ((Py_ssize_t)strlen(c->tok) == k && memcmp(c->tok, p, (size_t)k) == 0) return c;
    }
    return NULL;
}


typedef struct {
    const char *p;
    Py_ssize_t len;
} Tok;

static int tok_is(Tok t, const char *s) {
    Py_ssize_t k = (Py_ssize_t)strlen(s);
    return t.len == k && memcmp(t.p, s, (size_t)k) == 0;
}

/* _digits(tok, most): 1..most ASCII digits */
static int digits(const char *p, Py_ssize_t k, Py_ssize_t most) {
    if (k <= 0 || k > most) return 0;
    for (Py_ssize_t i = 0; i < k; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

static long long to_int(const char *p, Py_ssize_t k) {
    long long v = 0;
    for (Py_ssize_t i = 0; i < k; i++) v = v * 10 + (p[i] - '0');
    return v;
}

/* text._strto: C strtol/strtoull of a whole token as memcached's safe_strto* check it */
static int is_cspace(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

static int c_strto(const char *p, Py_ssize_t k, uint64_t *mag, int *neg) {
    Py_ssize_t i = 0;
    while (i < k && is_cspace(p[i])) i++;
    *neg = 0;
    if (i < k && (p[i] == '+' || p[i] == '-')) {
        *neg = p[i] == '-';
        i++;
    }
    Py_ssize_t j = i;
    while (j < k && p[j] >= '0' && p[j] <= '9') j++;
    if (j == i || (j < k && !is_cspace(p[j]))) return 0;
    Py_ssize_t s = i;
    while (s < j && p[s] == '0') s++;
    if (j - s > 20) return 0;
    uint64_t v = 0;
    for (Py_ssize_t x = s; x < j; x++) {
        unsigned d = (unsigned)(p[x] - '0');
        if (v > (UINT64_MAX - d) / 10) return 0;
        v = v * 10 + d;
    }
    *mag = v;
    return 1;
}

/* text._strtol32: safe_strtol (64-bit long stored into an int32_t); 1 valid, 0 rejected */
static int strtol32(const char *p, Py_ssize_t k, int32_t *out) {
    uint64_t mag;
    int neg;
    if (!c_strto(p, k, &mag, &neg)) return 0;
    if (neg ? mag > ((uint64_t)1 << 63) : mag > (uint64_t)INT64_MAX) return 0;
    uint32_t u = (uint32_t)(neg ? (uint64_t)0 - mag : mag);
    *out = u >= 0x80000000u ? (int32_t)((int64_t)u - 0x100000000LL) : (int32_t)u;
    return 1;
}

/* text._strtoul_ok: safe_strtoul/safe_strtoull accept the token */
static int strtoul_ok(const char *p, Py_ssize_t k) {
    uint64_t mag;
    int neg;
    if (!c_strto(p, k, &mag, &neg)) return 0;
    uint64_t v = neg ? (uint64_t)0 - mag : mag;
    return !(v >= ((uint64_t)1 << 63) && memchr(p, '-', (size_t)k) != NULL);
}

/* text._size: a data block size as memcached reads it, or -1 */
static long long block_size(Tok t) {
    int32_t v;
    if (!strtol32(t.p, t.len, &v) || v < 0 || v > INT32_MAX - 2) return -1;
    return v;
}

static int is_retrieval(const char *p, Py_ssize_t have) {
    Py_ssize_t lim = have < 200 ? have : 200, i = 0;
    while (i < lim && p[i] == ' ') i++;
    static const char *pre[] = {"get ", "gets ", "gat ", "gats ", "bget ", NULL};
    for (int j = 0; pre[j]; j++) {
        Py_ssize_t k = (Py_ssize_t)strlen(pre[j]);
        if (lim - i >= k && memcmp(p + i, pre[j], (size_t)k) == 0) return 1;
    }
    return 0;
}

static const signed char B64[256] = {
    ['A'] = 1, ['B'] = 2, ['C'] = 3, ['D'] = 4, ['E'] = 5, ['F'] = 6, ['G'] = 7, ['H'] = 8, ['I'] = 9,
    ['J'] = 10, ['K'] = 11, ['L'] = 12, ['M'] = 13, ['N'] = 14, ['O'] = 15, ['P'] = 16, ['Q'] = 17,
    ['R'] = 18, ['S'] = 19, ['T'] = 20, ['U'] = 21, ['V'] = 22, ['W'] = 23, ['X'] = 24, ['Y'] = 25,
    ['Z'] = 26, ['a'] = 27, ['b'] = 28, ['c'] = 29, ['d'] = 30, ['e'] = 31, ['f'] = 32, ['g'] = 33,
    ['h'] = 34, ['i'] = 35, ['j'] = 36, ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40, ['o'] = 41,
    ['p'] = 42, ['q'] = 43, ['r'] = 44, ['s'] = 45, ['t'] = 46, ['u'] = 47, ['v'] = 48, ['w'] = 49,
    ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54, ['2'] = 55, ['3'] = 56, ['4'] = 57,
    ['5'] = 58, ['6'] = 59, ['7'] = 60, ['8'] = 61, ['9'] = 62, ['+'] = 63, ['/'] = 64,
};

/* _decode_b64_key: canonical-shaped base64 (groups of 4, '=' only as the last group's
 * padding) decoded into out (which has room for len bytes); returns the length or -1. */
static Py_ssize_t b64_decode(const char *p, Py_ssize_t len, char *out) {
    if (len == 0 || len % 4) return -1;
    Py_ssize_t o = 0;
    for (Py_ssize_t i = 0; i < len; i += 4) {
        int last = i + 4 == len;
        int v[4], pad = 0;
        for (int j = 0; j < 4; j++) {
            unsigned char c = (unsigned char)p[i + j];
            if (c == '=' && last && j >= 2) {
                if (j == 2 && p[i + 3] != '=') return -1;
                pad = 4 - j;
                break;
            }
            if (!B64[c]) return -1;
            v[j] = B64[c] - 1;
        }
        if (pad == 0) {
            out[o++] = (char)((v[0] << 2) | (v[1] >> 4));
            out[o++] = (char)(((v[1] & 15) << 4) | (v[2] >> 2));
            out[o++] = (char)(((v[2] & 3) << 6) | v[3]);
        } else if (pad == 1) {
            out[o++] = (char)((v[0] << 2) | (v[1] >> 4));
            out[o++] = (char)(((v[1] & 15) << 4) | (v[2] >> 2));
        } else {
            out[o++] = (char)((v[0] << 2) | (v[1] >> 4));
        }
    }
    return o;
}

/* rules.CONTROL_COMMANDS: noop quit mn (always allowed) */
static int is_control(PyObject *name) {
    return PyUnicode_CompareWithASCIIString(name, "noop") == 0 || PyUnicode_CompareWithASCIIString(name, "quit") == 0 ||
           PyUnicode_CompareWithASCIIString(name, "mn") == 0;
}

/* TextProtocol._decide. keys: a tuple of bytes (new refs owned by the caller). */
static int text_decide(Memcache *self, PyObject *name, PyObject *keys, int key_error, int kind,
                       unsigned accept, int has_accept, int silent, long long nreq, Py_ssize_t have,
                       const char *opq, int opq_len, long long *n) {
    int allowed;
    /* CONTROL_COMMANDS: noop quit mn */
    if (is_control(name)) {
        allowed = 1;
    } else if (PyTuple_GET_SIZE(keys) <= 1) {
        allowed = ctx_matches(self, name, keys, key_error);
        if (allowed < 0) return -1;
    } else {
        allowed = 1;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) {
            PyObject *one = PyTuple_Pack(1, PyTuple_GET_ITEM(keys, i));
            if (one == NULL) return -1;
            int m = ctx_matches(self, name, one, 0);
            Py_DECREF(one);
            if (m < 0) return -1;
            if (!m) {
                allowed = 0;
                break;
            }
        }
    }
    if (allowed) {
        if (log_forwarded(self, lazy_fields(0, name, keys)) < 0) return -1;
        if (kind >= 0) {
            Entry e = {0};
            e.kind = kind;
            e.mtype = has_accept ? M_TEXT : M_ALWAYS;
            e.mask = accept;
            e.name = name;
            Py_INCREF(name);
            if (has_accept && opq_len > 0) {
                memcpy(e.opq, opq, (size_t)opq_len);
                e.opq_len = opq_len;
            }
            int r = q_push(&self->q, &e);
            if (r < 0) return -1;
            if (r == 0) return mc_close(self, 4, PyUnicode_FromString(QUEUE_FULL), NULL, have, n);
        }
        *n = nreq;
        return OP_PASS;
    }
    if (ctx_log(self, g_ET_DENIED, fields_dict(0, name, keys)) < 0) return -1;
    if (silent) {
        *n = nreq;
        return OP_DROP;
    }
    return mc_deny(self, name, s_denied_reply, s_text_barrier, nreq, have, n);
}

static PyObject *keys_from(Tok *toks, Py_ssize_t a, Py_ssize_t b) {
    if (b < a) b = a;
    PyObject *t = PyTuple_New(b - a);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = a; i < b; i++) {
        PyObject *k = PyBytes_FromStringAndSize(toks[i].p, toks[i].len);
        if (k == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i - a, k);
    }
    return t;
}

/* decide with keys built from tokens [a, b) and a static name */
static int text_decide_toks(Memcache *self, PyObject *name, Tok *toks, Py_ssize_t a, Py_ssize_t b,
                            int kind, int silent, long long nreq, Py_ssize_t have, long long *n) {
    PyObject *keys = keys_from(toks, a, b);
    if (keys == NULL) return -1;
    int r = text_decide(self, name, keys, 0, kind, 0, 0, silent, nreq, have, NULL, 0, n);
    Py_DECREF(keys);
    return r;
}

static int text_meta(Memcache *self, Command *cmd, Tok *toks, Py_ssize_t ntoks, long long nreq,
                     Py_ssize_t have, long long *n) {
    int family = cmd->family;
    PyObject *name = cmd->pyname;
    if (family == F_MN || ntoks < 2)
        return text_decide(self, name, s_empty_tuple, 0, K_UNIT, 0, 0, 0, nreq, have, NULL, 0, n);
    /* the key may be replaced by its base64 decoding (up to its own length) */
    char keybuf[MAX_LINE > 256 ? 256 : MAX_LINE];
    char *kbuf = NULL;
    const char *key = toks[1].p;
    Py_ssize_t keylen = toks[1].len;
    Py_ssize_t first_flag = 2;
    if (family == F_MS) {
        if (keylen > MAX_KEY || ntoks < 3 || ntoks >= 20)
            return text_decide_toks(self, name, toks, 1, 2, K_UNIT, 0, nreq, have, n);
        long long size = block_size(toks[2]);
        if (size < 0) /* memcached: CLIENT_ERROR before reading the block; it is read as commands */
            return text_decide_toks(self, name, toks, 1, 2, K_UNIT, 0, nreq, have, n);
        nreq += size + 2;
        first_flag = 3;
    }
    int quiet = 0, key_error = 0;
    const char *opq = NULL;
    int opq_len = 0;
    int valid = ntoks < 20 && keylen <= MAX_KEY;
    int seen[256] = {0};
    for (Py_ssize_t i = first_flag; i < ntoks; i++) {
        Tok flag = toks[i];
        unsigned char c = (unsigned char)flag.p[0];
        if (seen[c]) valid = 0;
        seen[c] = 1;
        if (c == 'q') {
            quiet = 1;
        } else if (c == 'b') {
            if (kbuf == NULL) kbuf = keylen <= (Py_ssize_t)sizeof(keybuf) ? keybuf : PyMem_Malloc((size_t)keylen + 1);
            if (kbuf == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            /* decode in place is safe: output is never longer than the input read so far */
            char tmp[256];
            char *src = keylen <= (Py_ssize_t)sizeof(tmp) ? tmp : PyMem_Malloc((size_t)keylen + 1);
            if (src == NULL) {
                if (kbuf != keybuf) PyMem_Free(kbuf);
                PyErr_NoMemory();
                return -1;
            }
            memcpy(src, key, (size_t)keylen);
            Py_ssize_t d = b64_decode(src, keylen, kbuf);
            if (src != tmp) PyMem_Free(src);
            if (d < 0) {
                key_error = 1;
                valid = 0;
            } else {
                key = kbuf;
                keylen = d;
            }
        } else if (strchr("bklstcfvhuqIPLO", c) && c) {
            if (c == 'O') {
                valid = valid && flag.len <= 33;
                opq = flag.p;
                opq_len = (int)(flag.len > 38 ? 38 : flag.len); /* only used when valid (<= 33) */
            }
        } else if (c && strchr("NTR", c)) {
            int32_t v;
            valid = valid && strtol32(flag.p + 1, flag.len - 1, &v);
        } else if (c && strchr("FCJD", c)) {
            valid = valid && strtoul_ok(flag.p + 1, flag.len - 1);
        } else if (c != 'M' || flag.len != 2) {
            valid = 0;
        } else if (family == F_MS) {
            valid = valid && flag.p[1] && strchr("EAPRS", flag.p[1]);
        } else if (family == F_MA) {
            valid = valid && flag.p[1] && strchr("I+D-", flag.p[1]);
        }
    }
    unsigned accept = 0;
    int has_accept = 0;
    if (quiet && valid) {
        has_accept = 1;
        switch (family) {
        case F_MG: accept = C_VA | C_HD | C_SERVER_ERROR; break;
        case F_MS: accept = C_NS | C_EX | C_NF | C_SERVER_ERROR | C_CLIENT_ERROR; break;
        case F_MD: accept = C_NF | C_EX | C_SERVER_ERROR; break;
        case F_MA: accept = C_NF | C_NS | C_EX | C_SERVER_ERROR | C_CLIENT_ERROR; break;
        default: has_accept = 0;
        }
    }
    char opqbuf[40];
    if (opq_len) {
        opqbuf[0] = ' ';
        memcpy(opqbuf + 1, opq, (size_t)opq_len);
        opq_len += 1;
    }
    PyObject *k = PyBytes_FromStringAndSize(key, keylen);
    if (kbuf != NULL && kbuf != keybuf) PyMem_Free(kbuf);
    if (k == NULL) return -1;
    PyObject *keys = PyTuple_Pack(1, k);
    Py_DECREF(k);
    if (keys == NULL) return -1;
    int r = text_decide(self, name, keys, key_error, K_UNIT, accept, has_accept, 0, nreq, have, opqbuf,
                        opq_len, n);
    Py_DECREF(keys);
    return r;
}

#define TOO_LONG "request line over 2048 bytes that is not a multi-key get"

static int text_request(Memcache *self, const char *data, Py_ssize_t have, long long *n) {
    if (self->req_owed) {
        *n = self->req_owed;
        self->req_owed = 0;
        return OP_INJECT;
    }
    if (self->closing) return mc_closed_request(self, have, n);
    Py_ssize_t from = self->scan < have ? self->scan : have;
    const char *nl = memchr(data + from, '\n', (size_t)(have - from));
    if (nl == NULL) {
        if (have > MAX_LINE && !is_retrieval(data, have)) {
            self->scan = 0;
            return mc_close(self, 2, PyUnicode_FromString(TOO_LONG), NULL, have, n);
        }
        self->scan = have;
        *n = 1;
        return OP_MORE;
    }
    Py_ssize_t end = nl - data;
    self->scan = 0;
    if (end > MAX_LINE && !is_retrieval(data, have))
        return mc_close(self, 2, PyUnicode_FromString(TOO_LONG), NULL, have, n);
    Py_ssize_t linelen = (end > 1 && data[end - 1] == '\r') ? end - 1 : end;
    const char *nul = memchr(data, '\0', (size_t)linelen);
    if (nul) linelen = nul - data;
    /* split on single spaces, empty tokens skipped */
    Tok small[64];
    Tok *toks = small;
    Py_ssize_t ntoks = 0, cap = 64;
    for (Py_ssize_t i = 0; i < linelen;) {
        while (i < linelen && data[i] == ' ') i++;
        if (i >= linelen) break;
        Py_ssize_t j = i;
        while (j < linelen && data[j] != ' ') j++;
        if (ntoks == cap) {
            Tok *t = PyMem_Malloc(sizeof(Tok) * (size_t)cap * 2);
            if (t == NULL) {
                if (toks != small) PyMem_Free(toks);
                PyErr_NoMemory();
                return -1;
            }
            memcpy(t, toks, sizeof(Tok) * (size_t)ntoks);
            if (toks != small) PyMem_Free(toks);
            toks = t;
            cap *= 2;
        }
        toks[ntoks].p = data + i;
        toks[ntoks].len = j - i;
        ntoks++;
        i = j;
    }
    long long nreq = end + 1;
    int r;
    Command *cmd = ntoks ? find_command(toks[0].p, toks[0].len) : NULL;
    if (cmd == NULL) {
        PyObject *name;
        if (ntoks) {
            PyObject *tok = PyBytes_FromStringAndSize(toks[0].p, toks[0].len > 64 ? 64 : toks[0].len);
            name = tok ? decode_key(tok) : NULL;
            Py_XDECREF(tok);
            if (name != NULL && !PyUnicode_Check(name)) {
                Py_SETREF(name, NULL);
                PyErr_SetString(PyExc_TypeError, "key_text() must return str");
            }
        } else {
            name = s_empty_str;
            Py_INCREF(name);
        }
        if (name == NULL) {
            r = -1;
        } else {
            r = text_decide(self, name, s_empty_tuple, 0, K_UNIT, 0, 0, 0, nreq, have, NULL, 0, n);
            Py_DECREF(name);
        }
        goto out;
    }
    int family = cmd->family;
    PyObject *name = cmd->pyname;
    Py_ssize_t nargs = ntoks - 1;
    if (family == F_GET) {
        r = text_decide_toks(self, name, toks, 1, ntoks, K_RETR, 0, nreq, have, n);
    } else if (family == F_STORE || family == F_CAS) {
        if (nargs < cmd->lo || nargs > cmd->hi) {
            /* toks[1:2] as the reference slices it: a bare "set" has no key token */
            r = text_decide_toks(self, name, toks, 1, ntoks < 2 ? ntoks : 2, K_UNIT, 0, nreq, have, n);
            goto out;
        }
        int noreply = tok_is(toks[ntoks - 1], "noreply");
        int kind = noreply ? K_NONE : K_UNIT;
        Tok key = toks[1];
        if (key.len > MAX_KEY) {
            r = text_decide_toks(self, name, toks, 1, 2, kind, noreply, nreq, have, n);
            goto out;
        }
        long long size = block_size(toks[4]);
        int32_t exptime;
        if (size >= 0 && strtoul_ok(toks[2].p, toks[2].len) && strtol32(toks[3].p, toks[3].len, &exptime) &&
            (family == F_STORE || strtoul_ok(toks[5].p, toks[5].len)))
            nreq += size + 2;
        /* else memcached answers CLIENT_ERROR, and the data block is read as commands */
        r = text_decide_toks(self, name, toks, 1, 2, kind, noreply, nreq, have, n);
    } else if (family == F_KEYED || family == F_NOREPLY) {
        Py_ssize_t b = family == F_KEYED ? (ntoks < 2 ? ntoks : 2) : 1;
        if (nargs < cmd->lo || nargs > cmd->hi) {
            r = text_decide_toks(self, name, toks, 1, b, K_UNIT, 0, nreq, have, n);
            goto out;
        }
        int noreply = tok_is(toks[ntoks - 1], "noreply");
        r = text_decide_toks(self, name, toks, 1, b, noreply ? K_NONE : K_UNIT, noreply, nreq, have, n);
    } else if (family >= F_MG) {
        r = text_meta(self, cmd, toks, ntoks, nreq, have, n);
    } else if (family == F_GAT) {
        r = text_decide_toks(self, name, toks, 2, ntoks, K_RETR, 0, nreq, have, n);
    } else if (family == F_ADMIN) {
        int noreply = nargs > 0 && tok_is(toks[ntoks - 1], "noreply") &&
                      (strcmp(cmd->name, "lru") == 0 || strcmp(cmd->name, "extstore") == 0 ||
                       strcmp(cmd->name, "refresh_certs") == 0 ||
                       (strcmp(cmd->name, "slabs") == 0 && tok_is(toks[1], "automove")));
        r = text_decide(self, name, s_empty_tuple, 0, noreply ? K_NONE : K_UNIT, 0, 0, noreply, nreq, have,
                        NULL, 0, n);
    } else if (family == F_STATS) {
        r = text_decide(self, name, s_empty_tuple, 0, K_STATS, 0, 0, 0, nreq, have, NULL, 0, n);
    } else if (family == F_CRAWLER) {
        int kind = (nargs > 0 && (tok_is(toks[1], "metadump") || tok_is(toks[1], "mgdump"))) ? K_DUMP : K_UNIT;
        r = text_decide(self, name, s_empty_tuple, 0, kind, 0, 0, 0, nreq, have, NULL, 0, n);
    } else if (family == F_WATCH) {
        r = text_decide(self, name, s_empty_tuple, 0, K_WATCH, 0, 0, 0, nreq, have, NULL, 0, n);
    } else {
        r = text_decide(self, name, s_empty_tuple, 0, K_NONE, 0, 0, 0, nreq, have, NULL, 0, n);
    }
out:
    if (toks != small) PyMem_Free(toks);
    return r;
}

static unsigned code_bit(const char *p, Py_ssize_t k) {
    if (k == 2) {
        if (memcmp(p, "VA", 2) == 0) return C_VA;
        if (memcmp(p, "HD", 2) == 0) return C_HD;
        if (memcmp(p, "NS", 2) == 0) return C_NS;
        if (memcmp(p, "EX", 2) == 0) return C_EX;
        if (memcmp(p, "NF", 2) == 0) return C_NF;
    } else if (k == 12 && memcmp(p, "SERVER_ERROR", 12) == 0) {
        return C_SERVER_ERROR;
    } else if (k == 12 && memcmp(p, "CLIENT_ERROR", 12) == 0) {
        return C_CLIENT_ERROR;
    }
    return 0;
}

/* _echoes: the reply line data[:stop] carries the token opq (" O...") followed by end or space */
static int echoes(const char *data, Py_ssize_t stop, const char *opq, Py_ssize_t k) {
    if (k == 0) return 1;
    for (Py_ssize_t at = 0; at + k <= stop; at++) {
        if (memcmp(data + at, opq, (size_t)k) == 0) {
            Py_ssize_t end = at + k;
            if (end == stop || data[end] == ' ') return 1;
            at = end - 1; /* the reference searches again from end */
        }
    }
    return 0;
}

static int starts(const char *p, Py_ssize_t have, const char *s) {
    Py_ssize_t k = (Py_ssize_t)strlen(s);
    return have >= k && memcmp(p, s, (size_t)k) == 0;
}

static int text_reply(Memcache *self, const char *data, Py_ssize_t have, long long *n) {
    if (self->rep_owed) {
        *n = self->rep_owed;
        self->rep_owed = 0;
        return OP_INJECT;
    }
    if (self->held) return mc_release(self, data, have, n);
    if (self->stream) {
        *n = have;
        return OP_PASS;
    }
    Py_ssize_t from = self->rscan < have ? self->rscan : have;
    const char *nl = memchr(data + from, '\n', (size_t)(have - from));
    if (nl == NULL) {
        if (have > MAX_REPLY_LINE) {
            *n = 2;
            return OP_ERROR;
        }
        self->rscan = have;
        *n = 1;
        return OP_MORE;
    }
    Py_ssize_t end = nl - data;
    self->rscan = 0;
    if (end > MAX_REPLY_LINE) {
        *n = 2;
        return OP_ERROR;
    }
    Py_ssize_t stop = (end > 0 && data[end - 1] == '\r') ? end - 1 : end;
    const char *sp = memchr(data, ' ', (size_t)stop);
    Py_ssize_t codelen = sp ? sp - data : stop;
    const char *code = data;
    long long nrep = end + 1;
    int unit = 0;
    int is_value = codelen == 5 && memcmp(code, "VALUE", 5) == 0;
    if (is_value || (codelen == 2 && memcmp(code, "VA", 2) == 0)) {
        /* toks = data[:stop].split(b" ") (no empty-token filtering) */
        Py_ssize_t starts_at[5];
        Py_ssize_t lens[5];
        int nt = 0;
        Py_ssize_t i = 0;
        while (nt < 5) {
            const char *s = memchr(data + i, ' ', (size_t)(stop - i));
            Py_ssize_t j = s ? s - data : stop;
            starts_at[nt] = i;
            lens[nt] = j - i;
            nt++;
            if (!s) break;
            i = j + 1;
        }
        const char *sz = "";
        Py_ssize_t szlen = 0;
        if (is_value && nt > 3) {
            sz = data + starts_at[3];
            szlen = lens[3];
        } else if (nt > 1) {
            sz = data + starts_at[1];
            szlen = lens[1];
        }
        if (!digits(sz, szlen, 10)) {
            *n = 4;
            return OP_ERROR;
        }
        nrep += to_int(sz, szlen) + 2;
        unit = 1;
    }
    Queue *q = &self->q;
    Entry *head;
    for (;;) {
        if (q->len == 0) return mc_unsolicited(self, latin1_status(code, codelen), nrep, n);
        head = q_at(q, 0);
        if (head->mtype == M_ALWAYS) break;
        if (head->mtype == M_TEXT) {
            unsigned bit = code_bit(code, codelen);
            if ((head->mask & bit) && (head->opq_len == 0 || echoes(data, stop, head->opq, head->opq_len)))
                break;
        }
        /* M_BIN entries never accept a text code (cannot happen in one dialect) */
        q_popleft(q);
    }
    int kind = head->kind;
    if (kind == K_RETR) {
        if (unit) {
            *n = nrep;
            return OP_PASS;
        }
    } else if (kind == K_STATS) {
        if ((codelen == 4 && (memcmp(code, "STAT", 4) == 0 || memcmp(code, "ITEM", 4) == 0)) ||
            (codelen == 6 && memcmp(code, "PREFIX", 6) == 0)) {
            *n = nrep;
            return OP_PASS;
        }
    } else if (kind == K_DUMP) {
        if (starts(data, have, "key=") || starts(data, have, "mg ")) {
            *n = nrep;
            return OP_PASS;
        }
    } else if (kind == K_WATCH && codelen == 2 && memcmp(code, "OK", 2) == 0) {
        self->stream = 1;
    }
    /* copy the code: mc_complete calls back into Python */
    char codebuf[64];
    Py_ssize_t cl = codelen > 64 ? 64 : codelen;
    memcpy(codebuf, code, (size_t)cl);
    return mc_complete(self, nrep, have, NULL, codebuf, cl, data[0], n);
}

/* --- binary dialect (memcache/binary.py) ------------------------------------------------------ */

#define HEADER 24
enum { Q_DEFINITE = 0, Q_QUIET = 1, Q_SILENT = 2 };

typedef struct {
    const char *opname, *command;
    int quiet, keyed;
    PyObject *py_opname, *py_command;
} OpInfo;

static OpInfo OPCODES[0x48];

static void op_set(int code, const char *opname, const char *command, int quiet, int keyed) {
    OPCODES[code].opname = opname;
    OPCODES[code].command = command;
    OPCODES[code].quiet = quiet;
    OPCODES[code].keyed = keyed;
}

/* binary.OPCODES: opcode -> (name for the log, policy command, quietness, keyed) */
static void opcodes_init(void) {
    op_set(0x00, "get", "get", Q_DEFINITE, 1); op_set(0x01, "set", "set", Q_DEFINITE, 1);
    op_set(0x02, "add", "add", Q_DEFINITE, 1); op_set(0x03, "replace", "replace", Q_DEFINITE, 1);
    op_set(0x04, "delete", "delete", Q_DEFINITE, 1); op_set(0x05, "increment", "incr", Q_DEFINITE, 1);
    op_set(0x06, "decrement", "decr", Q_DEFINITE, 1); op_set(0x07, "quit", "quit", Q_DEFINITE, 0);
    op_set(0x08, "flush", "flush_all", Q_DEFINITE, 0); op_set(0x09, "getq", "get", Q_QUIET, 1);
    op_set(0x0A, "noop", "noop", Q_DEFINITE, 0); op_set(0x0B, "version", "version", Q_DEFINITE, 0);
    op_set(0x0C, "getk", "get", Q_DEFINITE, 1); op_set(0x0D, "getkq", "get", Q_QUIET, 1);
    op_set(0x0E, "append", "append", Q_DEFINITE, 1); op_set(0x0F, "prepend", "prepend", Q_DEFINITE, 1);
    op_set(0x10, "stat", "stats", Q_DEFINITE, 0); op_set(0x11, "setq", "set", Q_QUIET, 1);
    op_set(0x12, "addq", "add", Q_QUIET, 1); op_set(0x13, "replaceq", "replace", Q_QUIET, 1);
    op_set(0x14, "deleteq", "delete", Q_QUIET, 1); op_set(0x15, "incrementq", "incr", Q_QUIET, 1);
    op_set(0x16, "decrementq", "decr", Q_QUIET, 1); op_set(0x17, "quitq", "quit", Q_SILENT, 0);
    op_set(0x18, "flushq", "flush_all", Q_QUIET, 0); op_set(0x19, "appendq", "append", Q_QUIET, 1);
    op_set(0x1A, "prependq", "prepend", Q_QUIET, 1); op_set(0x1B, "verbosity", "verbosity", Q_DEFINITE, 0);
    op_set(0x1C, "touch", "touch", Q_DEFINITE, 1); op_set(0x1D, "gat", "gat", Q_DEFINITE, 1);
    op_set(0x1E, "gatq", "gat", Q_QUIET, 1);
    op_set(0x20, "sasl-list-mechs", "sasl-list-mechs", Q_DEFINITE, 0);
    op_set(0x21, "sasl-auth", "sasl-auth", Q_DEFINITE, 0); op_set(0x22, "sasl-step", "sasl-step", Q_DEFINITE, 0);
    op_set(0x23, "gatk", "gat", Q_DEFINITE, 1); op_set(0x24, "gatkq", "gat", Q_QUIET, 1);
    op_set(0x30, "rget", "rget", Q_DEFINITE, 1); op_set(0x31, "rset", "rset", Q_DEFINITE, 1);
    op_set(0x32, "rsetq", "rsetq", Q_QUIET, 1); op_set(0x33, "rappend", "rappend", Q_DEFINITE, 1);
    op_set(0x34, "rappendq", "rappendq", Q_QUIET, 1); op_set(0x35, "rprepend", "rprepend", Q_DEFINITE, 1);
    op_set(0x36, "rprependq", "rprependq", Q_QUIET, 1); op_set(0x37, "rdelete", "rdelete", Q_DEFINITE, 1);
    op_set(0x38, "rdeleteq", "rdeleteq", Q_QUIET, 1); op_set(0x39, "rincr", "rincr", Q_DEFINITE, 1);
    op_set(0x3A, "rincrq", "rincrq", Q_QUIET, 1); op_set(0x3B, "rdecr", "rdecr", Q_DEFINITE, 1);
    op_set(0x3C, "rdecrq", "rdecrq", Q_QUIET, 1);
    op_set(0x3D, "set-vbucket", "set-vbucket", Q_DEFINITE, 0);
    op_set(0x3E, "get-vbucket", "get-vbucket", Q_DEFINITE, 0);
    op_set(0x3F, "del-vbucket", "del-vbucket", Q_DEFINITE, 0);
    op_set(0x40, "tap-connect", "tap-connect", Q_DEFINITE, 0);
    op_set(0x41, "tap-mutation", "tap-mutation", Q_DEFINITE, 0);
    op_set(0x42, "tap-delete", "tap-delete", Q_DEFINITE, 0);
    op_set(0x43, "tap-flush", "tap-flush", Q_DEFINITE, 0);
    op_set(0x44, "tap-opaque", "tap-opaque", Q_DEFINITE, 0);
    op_set(0x45, "tap-vbucket-set", "tap-vbucket-set", Q_DEFINITE, 0);
    op_set(0x46, "tap-checkpoint-start", "tap-checkpoint-start", Q_DEFINITE, 0);
    op_set(0x47, "tap-checkpoint-end", "tap-checkpoint-end", Q_DEFINITE, 0);
}

/* binary.STATUS_NAMES */
static const char *status_name(unsigned st) {
    switch (st) {
    case 0x00: return "ok";
    case 0x01: return "key_not_found";
    case 0x02: return "key_exists";
    case 0x03: return "value_too_large";
    case 0x04: return "invalid_arguments";
    case 0x05: return "item_not_stored";
    case 0x06: return "non_numeric_value";
    case 0x07: return "vbucket_elsewhere";
    case 0x08: case 0x20: return "auth_error";
    case 0x09: case 0x21: return "auth_continue";
    case 0x81: return "unknown_command";
    case 0x82: return "out_of_memory";
    case 0x83: return "not_supported";
    case 0x84: return "internal_error";
    case 0x85: return "busy";
    case 0x86: return "temporary_failure";
    }
    return NULL;
}

static unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }
static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* denied_response(opcode, opaque) */
static PyObject *bin_denied(unsigned opcode, uint32_t opaque) {
    static const char body[] = "access denied";
    unsigned char pkt[HEADER + sizeof(body) - 1];
    memset(pkt, 0, HEADER);
    pkt[0] = 0x81;
    pkt[1] = (unsigned char)opcode;
    pkt[7] = 0x08; /* status 0x0008 */
    pkt[11] = (unsigned char)(sizeof(body) - 1);
    pkt[12] = (unsigned char)(opaque >> 24);
    pkt[13] = (unsigned char)(opaque >> 16);
    pkt[14] = (unsigned char)(opaque >> 8);
    pkt[15] = (unsigned char)opaque;
    memcpy(pkt + HEADER, body, sizeof(body) - 1);
    return PyBytes_FromStringAndSize((const char *)pkt, sizeof(pkt));
}

/* BinaryProtocol._request */
static int bin_request(Memcache *self, const char *cdata, Py_ssize_t have, long long *n) {
    const unsigned char *data = (const unsigned char *)cdata;
    if (self->req_owed) {
        *n = self->req_owed;
        self->req_owed = 0;
        return OP_INJECT;
    }
    if (self->closing) return mc_closed_request(self, have, n);
    if (have < HEADER) {
        *n = HEADER - have;
        return OP_MORE;
    }
    unsigned magic = data[0], opcode = data[1], keylen = be16(data + 2), extlen = data[4];
    uint32_t bodylen = be32(data + 8), opaque = be32(data + 12);
    if (magic != 0x80)
        return mc_close(self, 1, PyUnicode_FromFormat("binary request magic 0x%02x", magic), NULL, have, n);
    Py_ssize_t head = HEADER + extlen + keylen;
    if (have < head) {
        *n = head - have;
        return OP_MORE;
    }
    /* everything read from data is copied before the first call back into Python */
    PyObject *key = PyBytes_FromStringAndSize(cdata + HEADER + extlen, keylen);
    if (key == NULL) return -1;
    PyObject *opname, *command;
    int quiet, keyed;
    if (opcode < 0x48 && OPCODES[opcode].opname) {
        opname = OPCODES[opcode].py_opname;
        command = OPCODES[opcode].py_command;
        Py_INCREF(opname);
        Py_INCREF(command);
        quiet = OPCODES[opcode].quiet;
        keyed = OPCODES[opcode].keyed;
    } else {
        opname = PyUnicode_FromFormat("0x%02x", opcode);
        if (opname == NULL) {
            Py_DECREF(key);
            return -1;
        }
        command = opname;
        Py_INCREF(command);
        quiet = Q_DEFINITE;
        keyed = keylen > 0;
    }
    /* memcached answers these two with an error after reading header, extras and key, then
     * closes the connection */
    const char *bad = NULL;
    if ((uint32_t)(keylen + extlen) > bodylen) bad = "binary request extras and key longer than its body";
    else if (keylen > MAX_KEY) bad = "binary request key over 250 bytes";
    long long nreq = bad ? (long long)head : HEADER + (long long)bodylen;
    /* binary.MEMCACHED_OPCODES: for any other opcode memcached skips bodylen bytes after the
     * extras and key it has read */
    int known = opcode <= 0x1A || opcode == 0x1C || opcode == 0x1D || opcode == 0x1E || (opcode >= 0x20 && opcode <= 0x24);
    if (!bad && !known) nreq += (long long)extlen + keylen;
    int r;
    int allowed;
    if (is_control(command)) {
        allowed = 1;
    } else {
        PyObject *keys = keyed ? PyTuple_Pack(1, key) : (Py_INCREF(s_empty_tuple), s_empty_tuple);
        allowed = keys ? ctx_matches(self, command, keys, 0) : -1;
        Py_XDECREF(keys);
    }
    if (allowed < 0) {
        r = -1;
    } else if (allowed) {
        r = log_forwarded(self, lazy_fields(2, opname, key));
        if (r == 0 && (quiet != Q_SILENT || bad)) {
            Entry e = {0};
            e.kind = opcode == 0x10 && !bad ? K_STATS : K_UNIT;
            e.mtype = quiet == Q_QUIET && !bad ? M_BIN : M_ALWAYS;
            e.opcode = opcode;
            e.opaque = opaque;
            e.name = opname;
            Py_INCREF(opname);
            int p = q_push(&self->q, &e);
            if (p < 0) r = -1;
            else if (p == 0) r = mc_close(self, 4, PyUnicode_FromString(QUEUE_FULL), NULL, have, n);
        }
        if (r == 0 && bad) r = mc_drain_then_close(self, 2, PyUnicode_FromString(bad));
        if (r == 0) {
            *n = nreq;
            r = OP_PASS;
        }
    } else {
        r = ctx_log(self, g_ET_DENIED, fields_dict(2, opname, key));
        if (r == 0) {
            PyObject *payload = bin_denied(opcode, opaque);
            if (payload == NULL) r = -1;
            else if (bad) r = mc_close(self, 2, PyUnicode_FromString(bad), payload, have, n);
            else r = mc_deny(self, opname, payload, s_bin_barrier, nreq, have, n);
            Py_XDECREF(payload);
        }
    }
    Py_DECREF(key);
    Py_DECREF(opname);
    Py_DECREF(command);
    return r;
}

/* BinaryProtocol._reply */
static int bin_reply(Memcache *self, const char *cdata, Py_ssize_t have, long long *n) {
    const unsigned char *data = (const unsigned char *)cdata;
    if (self->rep_owed) {
        *n = self->rep_owed;
        self->rep_owed = 0;
        return OP_INJECT;
    }
    if (self->held) return mc_release(self, cdata, have, n);
    /* not a response: a text line such as memcached's "ERROR Too many open connections" */
    if (data[0] != 0x81) return mc_unsolicited_line(self, cdata, have, n);
    if (have < HEADER) {
        *n = HEADER - have;
        return OP_MORE;
    }
    unsigned opcode = data[1], keylen = be16(data + 2), extlen = data[4];
    unsigned status = be16(data + 6);
    uint32_t bodylen = be32(data + 8), opaque = be32(data + 12);
    if ((uint32_t)(keylen + extlen) > bodylen) {
        *n = 2;
        return OP_ERROR;
    }
    long long nrep = HEADER + (long long)bodylen;
    Queue *q = &self->q;
    Entry *head;
    for (;;) {
        if (q->len == 0) {
            const char *sn = status_name(status);
            return mc_unsolicited(self, sn ? PyUnicode_FromString(sn) : PyUnicode_FromFormat("0x%04x", status), nrep,
                                  n);
        }
        head = q_at(q, 0);
        if (head->mtype == M_ALWAYS) break;
        if (head->mtype == M_BIN && head->opcode == opcode && head->opaque == opaque) break;
        q_popleft(q); /* a quiet request that was answered with silence */
    }
    if (head->kind == K_STATS && status == 0 && bodylen) {
        *n = nrep;
        return OP_PASS; /* one stat; the group ends with an empty response */
    }
    const char *sn = status_name(status);
    PyObject *st = sn ? PyUnicode_FromString(sn) : PyUnicode_FromFormat("0x%04x", status);
    if (st == NULL) return -1;
    int r = mc_complete(self, nrep, have, st, NULL, 0, cdata[0], n);
    Py_DECREF(st);
    return r;
}

/* --- dispatch (memcache/parser.py) ------------------------------------------------------------ */

static int mc_on_data(NativeParser *np, int reply, int end_stream, PyObject *buf, long long *n) {
    Memcache *self = (Memcache *)np;
    const char *data;
    Py_ssize_t have;
    if (bytes_view(buf, &data, &have) < 0) {
        PyErr_SetString(PyExc_TypeError, "memcache parser: data must be bytes or bytearray");
        return -1;
    }
    if (have == 0) {
        *n = 0;
        return OP_NOP;
    }
    if (self->dialect == 1) return reply ? text_reply(self, data, have, n) : text_request(self, data, have, n);
    if (self->dialect == 2) return reply ? bin_reply(self, data, have, n) : bin_request(self, data, have, n);
    /* before the client's first byte only an unsolicited line can come: forwarded */
    if (reply) return mc_unsolicited_line(self, data, have, n);
    if ((unsigned char)data[0] >= 0x80) {
        self->dialect = 2;
        return bin_request(self, data, have, n);
    }
    self->dialect = 1;
    return text_request(self, data, have, n);
}

static PyObject *Memcache_py_on_data(Memcache *self, PyObject *const *args, Py_ssize_t nargs) {
    return native_parser_py_on_data(&self->base, args, nargs);
}

/* MemcacheParser.pending(): for each queued entry, whether it is a maybe entry */
static PyObject *Memcache_pending(Memcache *self, PyObject *unused) {
    PyObject *out = PyList_New(self->q.len);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->q.len; i++) {
        PyObject *b = BOOL(q_at(&self->q, i)->mtype != M_ALWAYS);
        Py_INCREF(b);
        PyList_SET_ITEM(out, i, b);
    }
    return out;
}

static PyMethodDef Memcache_methods[] = {
    {"on_data", (PyCFunction)(void (*)(void))Memcache_py_on_data, METH_FASTCALL,
     "The parser API's on_data (proxyd.parser.Parser)."},
    {"pending", (PyCFunction)Memcache_pending, METH_NOARGS, "For each pending-reply entry, whether it is a maybe entry (quiet/noreply)."},
    {NULL},
};

static PyMemberDef Memcache_members[] = {
    {"ctx", T_OBJECT, offsetof(Memcache, ctx), READONLY, NULL},
    {"dialect", T_INT, offsetof(Memcache, dialect), READONLY, "0 undecided, 1 text, 2 binary"},
    {NULL},
};

PyTypeObject MemcacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.Memcache",
    .tp_doc = "The native twin of proxyd.parsers.memcache.MemcacheParser.",
    .tp_basicsize = sizeof(Memcache),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Memcache_init,
    .tp_dealloc = (destructor)Memcache_dealloc,
    .tp_traverse = (traverseproc)Memcache_traverse,
    .tp_clear = (inquiry)Memcache_clear,
    .tp_methods = Memcache_methods,
    .tp_members = Memcache_members,
};

#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return -1; } while (0)

int memcache_init(void) {
    for (Command *c = COMMANDS; c->tok; c++) INTERN(c->pyname, c->name);
    opcodes_init();
    for (int i = 0; i < 0x48; i++) {
        if (OPCODES[i].opname) {
            INTERN(OPCODES[i].py_opname, OPCODES[i].opname);
            INTERN(OPCODES[i].py_command, OPCODES[i].command);
        }
    }
    return 0;
}

#undef INTERN
