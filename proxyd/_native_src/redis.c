/* The redis parser: the twin of proxyd/parsers/redis/parser.py's common case, over its
 * reference (framing: redis_resp.c for resp.py; the request the policy sees: redis_rules.c for rules.py, its
 * rules evaluated by policy.c from the connection's FlatPolicy; the
 * command table: the entries parser.py native_table() hands over from table.py).
 *
 * A connection's RedisParser (the Python reference) is created with this object and holds the
 * state whenever the connection is off the common case. The common case is a connection with
 * nothing special going on (no command denied inside MULTI, no subscriptions, no CLIENT REPLY
 * OFF/SKIP, no MONITOR/SYNC, no request streamed or reply read in part, no protocol error): its
 * state is then the pending queue (ordinary replies in a row as one count, denials), the db,
 * whether a MULTI is open and the reply bytes owed, and this file owns them (``fast``). In that
 * state it frames, decides and commits:
 *
 *   requests  parser.py _on_request/_requests: whole multibulk requests with plain lengths and
 *             inline commands without quotes (resp.py), of commands the table handed over
 *             marks simple (table.py key_positions' simple index/range spec, or no keys;
 *             ALWAYS_ALLOWED's stateless ones; MULTI/EXEC/DISCARD), their policy (the
 *             connection's FlatPolicy, policy.c; ctx.matches where it does not apply), the access log, the pending queue, the hold, and denials in
 *             place (NOPERM injected at once or after the reply before it);
 *   replies   parser.py _on_reply's fast path and what the general reader does for the same
 *             top-level frames: simple strings, errors, integers, bulk strings (passed through
 *             past the buffer) and flat arrays answering ordinary commands, and the denials they
 *             release (_after_frame).
 *
 * Anything else, at the request or reply where it starts, is handed to the reference at that
 * very point: the state is written back into the RedisParser (the pending queue as the deque
 * of entries it keeps, the db, the bytes owed) and its loop is called from the same offset
 * (RedisParser._requests(data, base) / _replies(data, pos)), so what happens is what the
 * reference does by construction; the requests and frames already handled in the call are in
 * the same PASS as there. After any call the reference served, the state is taken back when it
 * is the common case again. tests/test_native_equivalence_redis.py holds the two equal. */
#include "native.h"

/* Handed over by proxyd.parsers.redis (module.c setup_redis) and proxyd.policy.flat. */
PyObject *g_RedisParser, *g_RedisRequest, *g_redis_key_text, *g_redis_table, *s_noperm;

static PyObject *s_py_requests, *s_py_replies, *s_pending, *s_db, *s_rep_owed, *s_stream_rest, *s_in_multi,
    *s_multi_dirty, *s_reply_off, *s_skip_next, *s_dead, *s_raw, *s_req_owed, *s_raw_reply, *s_close_next,
    *s_subs, *s_scanner, *s_fresh, *s_stack, *s_in_line, *s_budget, *s_max_bulk, *s_max_entries, *s_clear,
    *s_append, *s_keys_total, *s_hello, *s_reset, *s_db_key, *s_refused,
    *s_multi;

#define MAX_LOGGED_KEYS 8
#define E_REPLY 0
#define E_DENY 2

/* ========================================================================================== */
/* Lazy access-log fields: parser.py RedisParser._fields(name, keys, db), called when written. */

typedef struct {
    PyObject_HEAD
    PyObject *name, *keys, *db; /* keys: a tuple of bytes, or NULL (None) */
} RedisFields;

static void RedisFields_dealloc(RedisFields *self) {
    Py_XDECREF(self->name);
    Py_XDECREF(self->keys);
    Py_XDECREF(self->db);
    PyObject_Free(self);
}

static PyObject *redis_fields(PyObject *name, PyObject *keys, PyObject *db) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    if (PyDict_SetItem(d, s_command, name) < 0 || PyDict_SetItem(d, s_db_key, db) < 0) goto fail;
    Py_ssize_t nk = keys ? PyTuple_GET_SIZE(keys) : 0;
    if (nk) {
        Py_ssize_t shown = nk < MAX_LOGGED_KEYS ? nk : MAX_LOGGED_KEYS;
        PyObject *v = PyList_New(shown);
        if (v == NULL) goto fail;
        for (Py_ssize_t i = 0; i < shown; i++) {
            PyObject *s = PyObject_CallOneArg(g_redis_key_text, PyTuple_GET_ITEM(keys, i));
            if (s == NULL) {
                Py_DECREF(v);
                goto fail;
            }
            PyList_SET_ITEM(v, i, s);
        }
        int rc = PyDict_SetItem(d, s_keys, v);
        Py_DECREF(v);
        if (rc < 0) goto fail;
        if (nk > MAX_LOGGED_KEYS) {
            PyObject *t = PyLong_FromSsize_t(nk);
            rc = t ? PyDict_SetItem(d, s_keys_total, t) : -1;
            Py_XDECREF(t);
            if (rc < 0) goto fail;
        }
    }
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static PyObject *RedisFields_call(RedisFields *self, PyObject *args, PyObject *kw) {
    return redis_fields(self->name, self->keys, self->db);
}

PyTypeObject RedisFieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.RedisFields",
    .tp_basicsize = sizeof(RedisFields),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)RedisFields_dealloc,
    .tp_call = (ternaryfunc)RedisFields_call,
};

/* ========================================================================================== */
/* The parser object                                                                          */

/* The table entry handed over for a lower-case name: (name, base, categories, mode, first,
 * lastkey, step); mode 0 always allowed, 1 keys by a simple spec, 2 no keys. */
typedef struct {
    PyObject *name, *base, *cats;
    long mode, first, lastkey, step;
} TEntry;

typedef struct {
    long long count; /* E_REPLY: replies owed; E_DENY: 0 */
    int kind;
    PyObject *name;
} REntry;

typedef struct {
    NativeParser base;
    PyObject *py;  /* the reference RedisParser: the state while off the common case */
    PyObject *ctx;
    int fast;      /* the state is here (the common case), not in py */
    REntry *q;
    Py_ssize_t qhead, qlen, qcap;
    PyObject *db;  /* int */
    long long rep_owed;
    int in_multi;  /* MULTI read, no EXEC/DISCARD yet (no command denied in it: else the reference) */
    int tx_ok;     /* redis-server runs MULTI/EXEC/DISCARD here (not refused in RESP2 subscribe mode) */
    Py_ssize_t budget, max_bulk, max_entries;
    PyObject *counts, *count_key; /* ctx.quiet_counter() */
    long long quiet_pending;      /* forwarded requests counted, not yet added to counts */
    FlatPolicy flat;              /* the connection's flattened policy (policy.c, flat_matches) */
    struct {
        Py_ssize_t len;
        char raw[40];
        PyObject *value; /* the table's tuple (held: it keeps entry's objects) */
        TEntry entry;    /* value read once */
    } seen[4];                    /* the last command names looked up, as sent */
    int seen_next;
} Redis;

static REntry *rq_at(Redis *s, Py_ssize_t i) { return &s->q[(s->qhead + i) % s->qcap]; }

static void rq_popleft(Redis *s) {
    REntry *e = rq_at(s, 0);
    Py_CLEAR(e->name);
    s->qhead = (s->qhead + 1) % s->qcap;
    s->qlen--;
}

static void rq_clear(Redis *s) {
    while (s->qlen) rq_popleft(s);
    s->qhead = 0;
}

static int rq_append(Redis *s, int kind, long long count, PyObject *name) {
    if (s->qlen == s->qcap) {
        Py_ssize_t cap = s->qcap ? s->qcap * 2 : 8;
        REntry *nq = PyMem_Malloc((size_t)cap * sizeof(REntry));
        if (nq == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < s->qlen; i++) nq[i] = *rq_at(s, i);
        PyMem_Free(s->q);
        s->q = nq;
        s->qcap = cap;
        s->qhead = 0;
    }
    REntry *e = &s->q[(s->qhead + s->qlen) % s->qcap];
    e->kind = kind;
    e->count = count;
    e->name = name;
    Py_INCREF(name);
    s->qlen++;
    return 0;
}

static int Redis_traverse(Redis *self, visitproc visit, void *arg) {
    Py_VISIT(self->py);
    Py_VISIT(self->ctx);
    Py_VISIT(self->counts);
    Py_VISIT(self->flat.policy);
    Py_VISIT(self->flat.flat);
    return 0;
}

static int Redis_clear(Redis *self) {
    for (int i = 0; i < 4; i++) Py_CLEAR(self->seen[i].value);
    Py_CLEAR(self->py);
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->count_key);
    Py_CLEAR(self->db);
    return 0;
}

static void Redis_dealloc(Redis *self) {
    PyObject_GC_UnTrack(self);
    Redis_clear(self);
    flat_clear(&self->flat);
    if (self->q) rq_clear(self);
    PyMem_Free(self->q);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* --- the state between this object and the reference ----------------------------------------- */

/* Write the common-case state into the reference (its pending deque, db, rep_owed). */
static int rd_sync_out(Redis *self) {
    PyObject *pending = PyObject_GetAttr(self->py, s_pending);
    if (pending == NULL) return -1;
    PyObject *r = PyObject_CallMethodNoArgs(pending, s_clear);
    if (r == NULL) goto fail;
    Py_DECREF(r);
    for (Py_ssize_t i = 0; i < self->qlen; i++) {
        REntry *e = rq_at(self, i);
        PyObject *entry = Py_BuildValue("[iOLOO]", e->kind, e->name, e->count,
                                        e->kind == E_DENY ? s_noperm : s_empty_bytes, Py_False);
        if (entry == NULL) goto fail;
        r = PyObject_CallMethodOneArg(pending, s_append, entry);
        Py_DECREF(entry);
        if (r == NULL) goto fail;
        Py_DECREF(r);
    }
    Py_DECREF(pending);
    if (PyObject_SetAttr(self->py, s_in_multi, BOOL(self->in_multi)) < 0) return -1;
    PyObject *owed = PyLong_FromLongLong(self->rep_owed);
    if (owed == NULL) return -1;
    int rc = PyObject_SetAttr(self->py, s_rep_owed, owed);
    Py_DECREF(owed);
    if (rc < 0) return -1;
    return PyObject_SetAttr(self->py, s_db, self->db);
fail:
    Py_DECREF(pending);
    return -1;
}

/* The reference takes over: write the state back, off the common case. */
static int rd_demote(Redis *self) {
    if (rd_sync_out(self) < 0) return -1;
    rq_clear(self);
    self->fast = 0;
    return 0;
}

/* attribute o.name is false (0 for an int): 1, 0, -1 */
static int attr_false(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t < 0 ? -1 : !t;
}

/* Take the state back when the reference is in the common case again. 0 or -1. */
static int rd_promote(Redis *self) {
    static PyObject **flags[] = {&s_stream_rest, &s_multi_dirty, &s_reply_off, &s_skip_next,
                                 &s_dead, &s_raw, &s_req_owed, &s_raw_reply, &s_close_next, NULL};
    PyObject *py = self->py;
    for (int i = 0; flags[i]; i++) {
        int f = attr_false(py, *flags[i]);
        if (f <= 0) return f;
    }
    PyObject *subs = PyObject_GetAttr(py, s_subs);
    if (subs == NULL) return -1;
    int plain = PyList_CheckExact(subs) && PyList_GET_SIZE(subs) == 3;
    for (int i = 0; plain && i < 3; i++) {
        PyObject *v = PyList_GET_ITEM(subs, i);
        plain = PyLong_CheckExact(v) && PyLong_AsLong(v) == 0;
    }
    Py_DECREF(subs);
    if (!plain) return 0;
    PyObject *sc = PyObject_GetAttr(py, s_scanner);
    if (sc == NULL) return -1;
    int f = attr_false(sc, s_in_line);
    if (f > 0) f = attr_false(sc, s_stack);
    if (f > 0) f = !attr_false(sc, s_fresh);
    Py_DECREF(sc);
    if (f <= 0) return f;
    PyObject *pending = PyObject_GetAttr(py, s_pending);
    if (pending == NULL) return -1;
    PyObject *items = PySequence_Tuple(pending);
    if (items == NULL) {
        Py_DECREF(pending);
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n && plain; i++) {
        PyObject *e = PyTuple_GET_ITEM(items, i);
        if (!PyList_CheckExact(e) || PyList_GET_SIZE(e) != 5 || !PyLong_CheckExact(PyList_GET_ITEM(e, 0))) {
            plain = 0;
            break;
        }
        long kind = PyLong_AsLong(PyList_GET_ITEM(e, 0));
        PyObject *name = PyList_GET_ITEM(e, 1);
        if (kind == E_REPLY) {
            int st = PyUnicode_Check(name) && (str_eq(name, s_hello) == 1 || str_eq(name, s_reset) == 1);
            plain = !st && PyLong_CheckExact(PyList_GET_ITEM(e, 2));
        } else {
            plain = kind == E_DENY;
        }
    }
    int in_multi = plain ? !attr_false(py, s_in_multi) : 0;
    int refused = 0;
    if (plain && !PyErr_Occurred()) {
        PyObject *r = PyObject_CallMethodOneArg(py, s_refused, s_multi);
        refused = r ? PyObject_IsTrue(r) : -1;
        Py_XDECREF(r);
    }
    PyObject *owed = plain && !PyErr_Occurred() ? PyObject_GetAttr(py, s_rep_owed) : NULL;
    PyObject *db = owed ? PyObject_GetAttr(py, s_db) : NULL;
    long long rep_owed = owed ? PyLong_AsLongLong(owed) : 0;
    Py_XDECREF(owed);
    if (PyErr_Occurred()) {
        Py_XDECREF(db);
        Py_DECREF(items);
        Py_DECREF(pending);
        return -1;
    }
    if (plain && db != NULL) {
        rq_clear(self);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *e = PyTuple_GET_ITEM(items, i);
            long kind = PyLong_AsLong(PyList_GET_ITEM(e, 0));
            long long count = kind == E_REPLY ? PyLong_AsLongLong(PyList_GET_ITEM(e, 2)) : 0;
            if ((count == -1 && PyErr_Occurred()) || rq_append(self, (int)kind, count, PyList_GET_ITEM(e, 1)) < 0) {
                rq_clear(self);
                Py_DECREF(db);
                Py_DECREF(items);
                Py_DECREF(pending);
                return -1;
            }
        }
        PyObject *r = PyObject_CallMethodNoArgs(pending, s_clear);
        if (r == NULL) {
            rq_clear(self);
            Py_DECREF(db);
            Py_DECREF(items);
            Py_DECREF(pending);
            return -1;
        }
        Py_DECREF(r);
        Py_XSETREF(self->db, db);
        db = NULL;
        self->rep_owed = rep_owed;
        self->in_multi = in_multi;
        self->tx_ok = !refused;
        self->fast = 1;
    }
    Py_XDECREF(db);
    Py_DECREF(items);
    Py_DECREF(pending);
    return 0;
}

/* A verdict from the reference as (op code, n). */
static int rd_verdict(PyObject *res, long long *n) {
    if (res == NULL) return -1;
    if (!PyTuple_CheckExact(res) || PyTuple_GET_SIZE(res) != 2) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "RedisParser answered a verdict that is not a pair");
        return -1;
    }
    long op = PyLong_AsLong(PyTuple_GET_ITEM(res, 0));
    long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(res, 1));
    Py_DECREF(res);
    if (PyErr_Occurred()) return -1;
    *n = v;
    return (int)op;
}

/* Call the reference's method(data, pos) (or on_data) and take the state back if it can be. */
static int rd_reference(Redis *self, PyObject *res, long long *n) {
    int op = rd_verdict(res, n);
    if (op < 0) return -1;
    if (rd_promote(self) < 0) return -1;
    return op;
}

static int rd_hand_over(Redis *self, PyObject *method, PyObject *buf, Py_ssize_t pos, long long *n) {
    if (rd_demote(self) < 0) return -1;
    PyObject *p = PyLong_FromSsize_t(pos);
    if (p == NULL) return -1;
    PyObject *res = PyObject_CallMethodObjArgs(self->py, method, buf, p, NULL);
    Py_DECREF(p);
    return rd_reference(self, res, n);
}

/* --- calls into the context ----------------------------------------------------------------- */

static int rd_flush_counts(Redis *self);

static int rd_log(Redis *self, PyObject *entry_type, PyObject *fields) { /* steals fields */
    if (fields == NULL) return -1;
    if (rd_flush_counts(self) < 0) {
        Py_DECREF(fields);
        return -1;
    }
    PyObject *r = PyObject_CallMethodObjArgs(self->ctx, s_log, entry_type, fields, NULL);
    Py_DECREF(fields);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* Whether a forwarded request is only counted by the access log (ctx.quiet_counter(), as
 * memcache.c log_forwarded): an allowed, non-audit decision (`decision`, not yet set in ctx,
 * with its audit flag; or ctx.last_decision when NULL). Then it is counted here (quiet_pending, added to
 * counts[count_key] by rd_flush_counts) and last_decision left as ALLOWED, as Context.log would
 * leave it, without building the log fields: 1. 0: it is logged (the decision set); -1. */
static int rd_quiet(Redis *self, PyObject *decision, int decision_is_audit) {
    int audit = decision_is_audit;
    if (decision == NULL) {
        if (self->counts == NULL) return 0;
        PyObject *last = ctx_get_last_decision(self->ctx);
        if (last == NULL) return -1;
        audit = last == g_ALLOWED ? 0 : decision_audit(last);
        Py_DECREF(last);
        if (audit < 0) return -1;
    } else if (self->counts == NULL || audit) {
        return ctx_set_last_decision(self->ctx, decision) < 0 ? -1 : 0;
    }
    if (audit) return 0;
    self->quiet_pending++;
    return ctx_set_last_decision(self->ctx, g_ALLOWED) < 0 ? -1 : 1;
}

/* counts[count_key] += the requests counted in this call (what the log's counter would do) */
static int rd_flush_counts(Redis *self) {
    if (!self->quiet_pending) return 0;
    PyObject *old = PyDict_GetItemWithError(self->counts, self->count_key);
    if (old == NULL && PyErr_Occurred()) return -1;
    PyObject *k = PyLong_FromLongLong(self->quiet_pending);
    if (k == NULL) return -1;
    self->quiet_pending = 0;
    PyObject *sum = old ? PyNumber_Add(old, k) : (Py_INCREF(k), k);
    Py_DECREF(k);
    if (sum == NULL) return -1;
    int rc = PyDict_SetItem(self->counts, self->count_key, sum);
    Py_DECREF(sum);
    return rc;
}

static int rd_inject(Redis *self, int reply, PyObject *payload) {
    PyObject *r = PyObject_CallMethodObjArgs(self->ctx, s_inject, BOOL(reply), payload, NULL);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* One question, Context.matches(RedisRequest(name, base, categories, True, key)), through the
 * flat policy when it applies, else ctx.matches itself: 1, 0, -1. The key is raw (kp, kn, made
 * into bytes in *made only when needed), an object (key), or none. *decision: the flat
 * decision, not yet set as ctx.last_decision (borrowed: set it before anything may run
 * Python), with *audit its audit flag; or NULL when ctx.matches has set it. */
static int rd_decide(Redis *self, TEntry *t, const char *kp, Py_ssize_t kn, PyObject *key, PyObject **made,
                     PyObject **decision, int *audit) {
    int f = redis_flat_decide(&self->flat, self->ctx, t->name, t->base, t->cats, key, kp, kn, made, decision, audit);
    if (f != 2) return f;
    *decision = NULL;
    if (key == NULL && kp != NULL) {
        if (*made == NULL && (*made = PyBytes_FromStringAndSize(kp, kn)) == NULL) return -1;
        key = *made;
    }
    PyObject *req = redis_request(t->name, t->base, t->cats, key);
    if (req == NULL) return -1;
    PyObject *r = PyObject_CallMethodOneArg(self->ctx, s_matches, req);
    Py_DECREF(req);
    if (r == NULL) return -1;
    int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

/* --- requests (parser.py _on_request / _requests, _judge, _commit for plain commands) --------- */

static int table_entry(PyObject *v, TEntry *t) {
    if (!PyTuple_CheckExact(v) || PyTuple_GET_SIZE(v) != 7) return 0;
    t->name = PyTuple_GET_ITEM(v, 0);
    t->base = PyTuple_GET_ITEM(v, 1);
    t->cats = PyTuple_GET_ITEM(v, 2);
    t->mode = PyLong_AsLong(PyTuple_GET_ITEM(v, 3));
    t->first = PyLong_AsLong(PyTuple_GET_ITEM(v, 4));
    t->lastkey = PyLong_AsLong(PyTuple_GET_ITEM(v, 5));
    t->step = PyLong_AsLong(PyTuple_GET_ITEM(v, 6));
    return PyErr_Occurred() ? -1 : 1;
}

/* table.lookup for a name of the handed-over table: 1, 0 (not there: the reference decides), -1.
 * The entry's objects are borrowed from self->seen, which keeps the tuple. */
static int table_get(Redis *self, const char *p, Py_ssize_t k, TEntry *t) {
    char low[40];
    if (k <= 0 || k > (Py_ssize_t)sizeof(low)) return 0;
    for (int i = 0; i < 4; i++) {
        if (self->seen[i].value && self->seen[i].len == k && !memcmp(self->seen[i].raw, p, (size_t)k)) {
            *t = self->seen[i].entry;
            return 1;
        }
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x80) return 0;
        low[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    PyObject *key = PyBytes_FromStringAndSize(low, k);
    if (key == NULL) return -1;
    PyObject *v = PyDict_GetItemWithError(g_redis_table, key);
    Py_DECREF(key);
    if (v == NULL) return PyErr_Occurred() ? -1 : 0;
    int got = table_entry(v, t);
    if (got <= 0) return got;
    int slot = self->seen_next;
    self->seen_next = (slot + 1) % 4;
    Py_INCREF(v);
    Py_XSETREF(self->seen[slot].value, v);
    self->seen[slot].len = k;
    memcpy(self->seen[slot].raw, p, (size_t)k);
    self->seen[slot].entry = *t;
    return 1;
}

/* _push for an ordinary command: joins the last entry when it is an ordinary reply */
static int push_reply(Redis *self, PyObject *name) {
    if (self->qlen) {
        REntry *last = rq_at(self, self->qlen - 1);
        if (last->kind == E_REPLY) {
            last->count++;
            return 0;
        }
    }
    return rq_append(self, E_REPLY, 1, name);
}

/* The keys' bytes as a tuple (for the log and for a policy with Python matchers) */
static PyObject *keys_tuple(const char *d, const Py_ssize_t *kstart, const Py_ssize_t *klen, Py_ssize_t nk) {
    PyObject *keys = PyTuple_New(nk);
    if (keys == NULL) return NULL;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *k = PyBytes_FromStringAndSize(d + kstart[i], klen[i]);
        if (k == NULL) {
            Py_DECREF(keys);
            return NULL;
        }
        PyTuple_SET_ITEM(keys, i, k);
    }
    return keys;
}

static PyObject *lazy_redis_fields(PyObject *name, PyObject *keys, PyObject *db) { /* steals keys */
    RedisFields *f = PyObject_New(RedisFields, &RedisFieldsType);
    if (f == NULL) {
        Py_XDECREF(keys);
        return NULL;
    }
    f->name = name;
    Py_INCREF(name);
    f->keys = keys;
    f->db = db;
    Py_INCREF(db);
    return (PyObject *)f;
}

#define DROP_KEYS() \
    do { \
        Py_XDECREF(keys); \
        Py_XDECREF(key1); \
    } while (0)

static int rd_request_loop(Redis *self, PyObject *buf, long long *n) {
    const char *d;
    Py_ssize_t have;
    if (bytes_view(buf, &d, &have) < 0) return -1;
    Py_ssize_t base = 0;
    Py_ssize_t starts[REDIS_MAX_ARGS], lens[REDIS_MAX_ARGS], kstart[REDIS_MAX_ARGS], klen[REDIS_MAX_ARGS];
    while (base < have) {
        if (self->qlen >= self->max_entries) {
            REntry *last = rq_at(self, self->qlen - 1);
            if (self->qlen > self->max_entries || last->kind != E_REPLY) {
                *n = base;
                return base ? OP_PASS : OP_NOP;
            }
        }
        Py_ssize_t argc = 0, end = 0;
        TEntry t;
        int got = d[base] == '*' ? resp_frame_request(self->budget, self->max_bulk, d, have, base, &argc, starts, lens, &end)
                                 : resp_frame_inline(d, have, base, &argc, starts, lens, &end);
        if (got && argc == 0) { /* an empty line: nothing to answer (skip_next is already off) */
            base = end;
            continue;
        }
        if (got) got = table_get(self, d + starts[0], lens[0], &t);
        if (got < 0) return -1;
        if (!got) {
            if (rd_flush_counts(self) < 0) return -1;
            return rd_hand_over(self, s_py_requests, buf, base, n);
        }
        if (t.mode >= 3 && !self->tx_ok) {
            if (rd_flush_counts(self) < 0) return -1;
            return rd_hand_over(self, s_py_requests, buf, base, n);
        }
        /* _judge: the keys (args[first:last + 1:step]; none when they do not fit the spec) */
        Py_ssize_t nk = 0;
        if (t.mode == 1) {
            long last = t.lastkey >= 0 ? t.first + t.lastkey : (long)argc + t.lastkey;
            if (!(last >= argc || last < t.first || t.first >= argc) && t.step > 0) {
                for (long a = t.first; a <= last; a += t.step, nk++) {
                    kstart[nk] = starts[a];
                    klen[nk] = lens[a];
                }
            }
        }
        /* then one question per key (or one keyless), stopping at a refusal. One key (the
         * common case) is asked about raw, made into bytes only when a condition or the log
         * needs them (key1); more keys as a tuple, each question's decision set at once. */
        PyObject *key1 = NULL, *keys = NULL, *decision = NULL;
        int allowed = 1, audit = 0;
        if (t.mode == 1 || t.mode == 2) {
            if (nk > 1 && (keys = keys_tuple(d, kstart, klen, nk)) == NULL) return -1;
            if (nk <= 1) {
                allowed = rd_decide(self, &t, nk ? d + kstart[0] : NULL, nk ? klen[0] : 0, NULL, &key1, &decision, &audit);
            } else {
                for (Py_ssize_t i = 0; i < nk && allowed == 1; i++) {
                    allowed = rd_decide(self, &t, NULL, 0, PyTuple_GET_ITEM(keys, i), &key1, &decision, &audit);
                    if (allowed >= 0 && decision != NULL && ctx_set_last_decision(self->ctx, decision) < 0) allowed = -1;
                    decision = NULL;
                }
            }
        } /* else always allowed: no question */
        if (allowed < 0) {
            DROP_KEYS();
            return -1;
        }
        /* the single key as bytes when the request will be logged (denied, or an audit or
         * uncounted decision), read while the buffer is as it was. Still raw here means the
         * flat policy decided (decision set; ctx.matches gets the key made first), so from here
         * on a logged single key is in key1, and an unlogged one is never made. */
        if (nk == 1 && key1 == NULL && (!allowed || self->counts == NULL || audit)) {
            if ((key1 = PyBytes_FromStringAndSize(d + kstart[0], klen[0])) == NULL) return -1;
        }
        if (!allowed) {
            if (decision != NULL && ctx_set_last_decision(self->ctx, decision) < 0) {
                DROP_KEYS();
                return -1;
            }
            if (base) {
                DROP_KEYS();
                *n = base; /* the next call decides this command again, from the head */
                return OP_PASS;
            }
            if (self->in_multi) { /* the transaction is marked: the reference commits it */
                DROP_KEYS();
                if (rd_flush_counts(self) < 0) return -1;
                return rd_hand_over(self, s_py_requests, buf, base, n);
            }
            /* _commit, denied: queued in place, injected at once when nothing is owed before it */
            if (rq_append(self, E_DENY, 0, t.name) < 0) {
                DROP_KEYS();
                return -1;
            }
            while (self->qlen && rq_at(self, 0)->kind == E_DENY) {
                rq_popleft(self);
                if (rd_inject(self, 1, s_noperm) < 0) {
                    DROP_KEYS();
                    return -1;
                }
            }
            if (key1 != NULL && (keys = PyTuple_Pack(1, key1)) == NULL) {
                DROP_KEYS();
                return -1;
            }
            PyObject *fields = redis_fields(t.name, keys, self->db);
            DROP_KEYS();
            if (rd_log(self, g_ET_DENIED, fields) < 0) return -1;
            *n = end;
            return OP_DROP;
        }
        /* _commit, allowed and whole: MULTI/EXEC/DISCARD's state, the log entry (lazy), one
         * more reply owed */
        if (t.mode == 3) self->in_multi = 1;
        else if (t.mode == 4) self->in_multi = 0;
        int quiet = rd_quiet(self, decision, audit); /* the log's count, or its entry (lazy fields, steal keys) */
        if (quiet != 0) {
            DROP_KEYS();
        } else if (key1 != NULL && (keys = PyTuple_Pack(1, key1)) == NULL) {
            DROP_KEYS();
            return -1;
        } else {
            Py_XDECREF(key1);
            quiet = rd_log(self, g_ET_REQUEST, lazy_redis_fields(t.name, keys, self->db));
        }
        if (quiet < 0) return -1;
        if (push_reply(self, t.name) < 0) return -1;
        if (bytes_view(buf, &d, &have) < 0 || end > have) {
            PyErr_SetString(PyExc_RuntimeError, "redis parser: the buffer changed during a call");
            return -1;
        }
        base = end;
    }
    *n = base;
    return OP_PASS;
}

#undef DROP_KEYS

static int rd_request(Redis *self, PyObject *buf, long long *n) {
    if ((PyByteArray_CheckExact(buf) ? PyByteArray_GET_SIZE(buf) : PyBytes_GET_SIZE(buf)) == 0) {
        *n = 0;
        return OP_NOP;
    }
    int op = rd_request_loop(self, buf, n);
    if (op >= 0 && rd_flush_counts(self) < 0) return -1;
    return op;
}

/* --- replies (parser.py _on_reply's fast path, _after_frame for denials) --------------------- */

static int rd_reply(Redis *self, PyObject *buf, long long *n) {
    if (self->rep_owed) {
        *n = self->rep_owed;
        self->rep_owed = 0;
        return OP_INJECT;
    }
    const char *d;
    Py_ssize_t have;
    if (bytes_view(buf, &d, &have) < 0) return -1;
    if (have == 0) {
        *n = 0;
        return OP_NOP;
    }
    Py_ssize_t pos = 0;
    while (pos < have && self->qlen) {
        REntry *entry = rq_at(self, 0);
        if (entry->kind != E_REPLY) break;
        char t = d[pos];
        Py_ssize_t end;
        /* the fast path, and what the general reader does for the same frames at the top
         * level (resp.py ReplyScanner.scan): the line ends at the first CRLF after the type */
        Py_ssize_t eol = resp_find_crlf(d, pos + 1, have, have);
        if (eol < 0) {
            if ((t == '+' || t == '-') && have - pos > 67) break; /* a long line, streamed */
            *n = pos ? pos : 1; /* the line is not all here (PARTIAL, nothing read) */
            return pos ? OP_PASS : OP_MORE;
        }
        if (t == '+' || t == '-') {
            end = eol + 2;
        } else if (t == '$') {
            if (eol == pos + 3 && d[pos + 1] == '-' && d[pos + 2] == '1') {
                end = eol + 2; /* a null */
            } else {
                long long ln = resp_plain_len(d, pos + 1, eol);
                if (ln < 0) break; /* anything odd: the general reader decides */
                end = eol + 4 + (Py_ssize_t)ln; /* may lie past the buffer: passed through */
            }
        } else if (t == ':') {
            if (!resp_int_line(d, pos + 1, eol)) break;
            end = eol + 2;
        } else if (t == '*') {
            end = resp_flat_array(d, have, pos, eol);
            if (end < 0) break; /* nested, not all here, or odd: the general reader decides */
        } else {
            break;
        }
        pos = end;
        if (entry->count > 1) entry->count--;
        else rq_popleft(self);
        if (self->qlen && rq_at(self, 0)->kind == E_DENY) {
            /* _after_frame: the denials now at the head go out right after this frame */
            Py_ssize_t k = 0;
            while (self->qlen && rq_at(self, 0)->kind == E_DENY) {
                rq_popleft(self);
                k++;
            }
            Py_ssize_t one = PyBytes_GET_SIZE(s_noperm);
            PyObject *payload = PyBytes_FromStringAndSize(NULL, one * k);
            if (payload == NULL) return -1;
            for (Py_ssize_t i = 0; i < k; i++) memcpy(PyBytes_AS_STRING(payload) + i * one, PyBytes_AS_STRING(s_noperm), (size_t)one);
            int rc = rd_inject(self, 1, payload);
            Py_DECREF(payload);
            if (rc < 0) return -1;
            if (pos < have) self->rep_owed = one * k;
            *n = pos;
            return OP_PASS;
        }
    }
    if (pos >= have) {
        *n = pos;
        return OP_PASS;
    }
    return rd_hand_over(self, s_py_replies, buf, pos, n);
}

/* --- dispatch ---------------------------------------------------------------------------------- */

static int rd_on_data(NativeParser *np, int reply, int end_stream, PyObject *buf, long long *n) {
    Redis *self = (Redis *)np;
    if (!PyByteArray_CheckExact(buf) && !PyBytes_CheckExact(buf)) {
        PyErr_SetString(PyExc_TypeError, "redis parser: data must be bytes or bytearray");
        return -1;
    }
    if (!self->fast) {
        PyObject *res = PyObject_CallMethodObjArgs(self->py, s_on_data, BOOL(reply), BOOL(end_stream), buf, NULL);
        return rd_reference(self, res, n);
    }
    return reply ? rd_reply(self, buf, n) : rd_request(self, buf, n);
}

static int Redis_init(Redis *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ctx", "budget", "max_bulk", "max_pending", NULL};
    PyObject *ctx, *budget, *max_bulk, *max_pending;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO", kwlist, &ctx, &budget, &max_bulk, &max_pending)) return -1;
    if (g_RedisParser == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxyd._native.setup_redis() was not called");
        return -1;
    }
    PyObject *py = PyObject_CallFunctionObjArgs(g_RedisParser, ctx, budget, max_bulk, max_pending, NULL);
    if (py == NULL) return -1;
    Py_XSETREF(self->py, py);
    Py_INCREF(ctx);
    Py_XSETREF(self->ctx, ctx);
    self->base.on_data = rd_on_data;
    if (self->q) rq_clear(self);
    self->rep_owed = 0;
    self->fast = 0;
    Py_CLEAR(self->counts);
    Py_CLEAR(self->count_key);
    flat_clear(&self->flat);
    PyObject *v = PyObject_GetAttr(py, s_budget);
    self->budget = v ? PyLong_AsSsize_t(v) : -1;
    Py_XDECREF(v);
    v = PyObject_GetAttr(py, s_max_bulk);
    self->max_bulk = v ? PyLong_AsSsize_t(v) : -1;
    Py_XDECREF(v);
    v = PyObject_GetAttr(py, s_max_entries);
    self->max_entries = v ? PyLong_AsSsize_t(v) : -1;
    Py_XDECREF(v);
    if (PyErr_Occurred()) return -1;
    int is_ctx = g_Context != NULL && Py_TYPE(ctx) == (PyTypeObject *)g_Context;
    flat_init(&self->flat, REDIS_FIELDS, is_ctx);
    if (is_ctx) {
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
    return rd_promote(self);
}

static PyObject *Redis_py_on_data(Redis *self, PyObject *const *args, Py_ssize_t nargs) {
    return native_parser_py_on_data(&self->base, args, nargs);
}

/* Any other attribute is the reference's, read with the state written into it (tests look at
 * pending, db, in_multi...). */
static PyObject *Redis_getattro(Redis *self, PyObject *name) {
    PyObject *v = PyObject_GenericGetAttr((PyObject *)self, name);
    if (v != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError) || self->py == NULL) return v;
    PyErr_Clear();
    if (self->fast && rd_sync_out(self) < 0) return NULL;
    return PyObject_GetAttr(self->py, name);
}

static PyMethodDef Redis_methods[] = {
    {"on_data", (PyCFunction)(void (*)(void))Redis_py_on_data, METH_FASTCALL,
     "The parser API's on_data (proxyd.parser.Parser)."},
    {NULL},
};

static PyMemberDef Redis_members[] = {
    {"ctx", T_OBJECT, offsetof(Redis, ctx), READONLY, NULL},
    {"reference", T_OBJECT, offsetof(Redis, py), READONLY, "the RedisParser that holds the state off the common case"},
    {"native_state", T_INT, offsetof(Redis, fast), READONLY, "1 while this object holds the state (the common case)"},
    {NULL},
};

PyTypeObject RedisType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.Redis",
    .tp_doc = "The native twin of proxyd.parsers.redis.RedisParser.",
    .tp_basicsize = sizeof(Redis),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Redis_init,
    .tp_dealloc = (destructor)Redis_dealloc,
    .tp_traverse = (traverseproc)Redis_traverse,
    .tp_clear = (inquiry)Redis_clear,
    .tp_getattro = (getattrofunc)Redis_getattro,
    .tp_methods = Redis_methods,
    .tp_members = Redis_members,
};

#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return -1; } while (0)

int redis_init(void) {
    INTERN(s_py_requests, "_requests");
    INTERN(s_py_replies, "_replies");
    INTERN(s_pending, "pending");
    INTERN(s_db, "db");
    INTERN(s_db_key, "db");
    INTERN(s_rep_owed, "rep_owed");
    INTERN(s_stream_rest, "stream_rest");
    INTERN(s_in_multi, "in_multi");
    INTERN(s_multi_dirty, "multi_dirty");
    INTERN(s_reply_off, "reply_off");
    INTERN(s_skip_next, "skip_next");
    INTERN(s_dead, "dead");
    INTERN(s_raw, "raw");
    INTERN(s_req_owed, "req_owed");
    INTERN(s_raw_reply, "raw_reply");
    INTERN(s_close_next, "close_next");
    INTERN(s_subs, "subs");
    INTERN(s_scanner, "scanner");
    INTERN(s_fresh, "fresh");
    INTERN(s_stack, "stack");
    INTERN(s_in_line, "in_line");
    INTERN(s_budget, "budget");
    INTERN(s_max_bulk, "max_bulk");
    INTERN(s_max_entries, "max_entries");
    INTERN(s_clear, "clear");
    INTERN(s_append, "append");
    INTERN(s_keys_total, "keys_total");
    INTERN(s_hello, "hello");
    INTERN(s_reset, "reset");
    INTERN(s_refused, "_refused_in_subscribe_mode");
    INTERN(s_multi, "multi");
    return 0;
}

#undef INTERN
