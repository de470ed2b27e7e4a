/* The verdict engine: the twin of proxyd/engine.py's PyEngine, statement by statement. It calls
 * native parsers (NativeParser, native.h) directly and any other parser through on_data. */
#include "native.h"

static PyObject *make_error(PyObject *kind, PyObject *msg, PyObject *code) {
    if (msg == NULL) return NULL;
    PyObject *args = PyTuple_Pack(2, kind, msg);
    Py_DECREF(msg);
    if (args == NULL) return NULL;
    PyObject *kw = NULL;
    if (code != NULL) {
        kw = PyDict_New();
        if (kw == NULL || PyDict_SetItem(kw, s_code, code) < 0) {
            Py_XDECREF(kw);
            Py_DECREF(args);
            return NULL;
        }
    }
    PyObject *err = PyObject_Call(g_EngineError, args, kw);
    Py_DECREF(args);
    Py_XDECREF(kw);
    return err;
}

/* ========================================================================================== */
/* Engine                                                                                       */

typedef struct {
    PyObject *buf;       /* bytearray */
    long long want;
    long long skip;
    int skip_drop;
    PyObject *inject_q;  /* bytearray */
    int ended;
    long long dropped_bytes;
    int held;            /* the last round ended with NOP and bytes still buffered */
} Side;

typedef struct {
    PyObject_HEAD
    PyObject *parser;
    PyObject *send;
    PyObject *observer;
    PyObject *on_error;
    PyObject *on_hold;
    PyObject *error;
    Py_ssize_t limit;
    int in_round;
    Side sides[2];
    PyObject *relay[2];       /* PyEngine._relay: the transport each direction is written to, or NULL: send */
    long long received[2];    /* PyEngine._received: bytes read by read_client / read_server */
    long long sent[2];        /* PyEngine._sent: bytes written to a relay transport */
    PyObject *weakreflist;
} Engine;

static int side_init(Side *s) {
    s->buf = PyByteArray_FromStringAndSize(NULL, 0);
    s->inject_q = PyByteArray_FromStringAndSize(NULL, 0);
    s->want = s->skip = s->dropped_bytes = 0;
    s->skip_drop = s->ended = s->held = 0;
    return (s->buf && s->inject_q) ? 0 : -1;
}

static int Engine_traverse(Engine *self, visitproc visit, void *arg) {
    Py_VISIT(self->parser);
    Py_VISIT(self->send);
    Py_VISIT(self->observer);
    Py_VISIT(self->on_error);
    Py_VISIT(self->on_hold);
    Py_VISIT(self->error);
    Py_VISIT(self->relay[0]);
    Py_VISIT(self->relay[1]);
    return 0;
}

static int Engine_clear(Engine *self) {
    Py_CLEAR(self->parser);
    Py_CLEAR(self->send);
    Py_CLEAR(self->observer);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->on_hold);
    Py_CLEAR(self->error);
    Py_CLEAR(self->relay[0]);
    Py_CLEAR(self->relay[1]);
    return 0;
}

static void Engine_dealloc(Engine *self) {
    PyObject_GC_UnTrack(self);
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    Engine_clear(self);
    for (int i = 0; i < 2; i++) {
        Py_CLEAR(self->sides[i].buf);
        Py_CLEAR(self->sides[i].inject_q);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Engine_init(Engine *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"parser", "send", "buffer_limit", "observer", "on_error", "on_hold", NULL};
    PyObject *parser, *send, *observer = Py_None, *on_error = Py_None, *on_hold = Py_None;
    Py_ssize_t limit = 1 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$nOOO", kwlist, &parser, &send, &limit, &observer,
                                     &on_error, &on_hold))
        return -1;
    if (g_EngineError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxyd._native.setup() was not called");
        return -1;
    }
    Py_INCREF(parser);
    Py_XSETREF(self->parser, parser);
    Py_INCREF(send);
    Py_XSETREF(self->send, send);
    Py_XSETREF(self->observer, observer == Py_None ? NULL : (Py_INCREF(observer), observer));
    Py_XSETREF(self->on_error, on_error == Py_None ? NULL : (Py_INCREF(on_error), on_error));
    Py_XSETREF(self->on_hold, on_hold == Py_None ? NULL : (Py_INCREF(on_hold), on_hold));
    Py_CLEAR(self->error);
    Py_CLEAR(self->relay[0]);
    Py_CLEAR(self->relay[1]);
    self->received[0] = self->received[1] = self->sent[0] = self->sent[1] = 0;
    self->limit = limit;
    self->in_round = 0;
    for (int i = 0; i < 2; i++) {
        Py_CLEAR(self->sides[i].buf);
        Py_CLEAR(self->sides[i].inject_q);
        if (side_init(&self->sides[i]) < 0) return -1;
    }
    return 0;
}


static Py_ssize_t obj_len(PyObject *data);

/* PyEngine._emit: to the direction's relay transport (counted), else through send. */
static int call_send(Engine *self, int reply, PyObject *data) {
    PyObject *t = self->relay[reply];
    PyObject *r;
    if (t != NULL) {
        Py_ssize_t n = obj_len(data);
        if (n < 0) return -1;
        self->sent[reply] += n;
        if (Py_TYPE(t) == &FdPairType) return fdpair_emit(t, reply, data); /* relay.c: no call */
        Py_INCREF(t); /* write() may call pause_writing, which may take the transport off */
        r = PyObject_CallMethodOneArg(t, s_write, data);
        Py_DECREF(t);
    } else {
        r = PyObject_CallFunctionObjArgs(self->send, BOOL(reply), data, NULL);
    }
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* observer.<meth>(reply, bytes(data[a:a+k])) */
static int observe_bytes(Engine *self, PyObject *meth, int reply, const char *p, Py_ssize_t k) {
    PyObject *b = PyBytes_FromStringAndSize(p, k);
    if (b == NULL) return -1;
    PyObject *r = PyObject_CallMethodObjArgs(self->observer, meth, BOOL(reply), b, NULL);
    Py_DECREF(b);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int observe_obj(Engine *self, PyObject *meth, int reply, PyObject *data) {
    /* bytes(data) for any buffer */
    PyObject *b = PyBytes_CheckExact(data) ? (Py_INCREF(data), data) : PyBytes_FromObject(data);
    if (b == NULL) return -1;
    PyObject *r = PyObject_CallMethodObjArgs(self->observer, meth, BOOL(reply), b, NULL);
    Py_DECREF(b);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int bytearray_del_head(PyObject *ba, Py_ssize_t k) {
    if (k <= 0) return 0;
    if (k >= PyByteArray_GET_SIZE(ba)) return PyByteArray_Resize(ba, 0);
    return PySequence_DelSlice(ba, 0, k);
}

static int bytearray_append(PyObject *ba, const char *p, Py_ssize_t n) {
    Py_ssize_t old = PyByteArray_GET_SIZE(ba);
    if (n == 0) return 0;
    if (PyByteArray_Resize(ba, old + n) < 0) return -1;
    memcpy(PyByteArray_AS_STRING(ba) + old, p, (size_t)n);
    return 0;
}

/* Engine._fail: takes a new reference to err (NULL: an exception is set). */
static int engine_fail(Engine *self, PyObject *err) {
    if (err == NULL) return -1;
    if (self->error == NULL) {
        self->error = err;
        for (int i = 0; i < 2; i++) {
            if (PyByteArray_Resize(self->sides[i].buf, 0) < 0) return -1;
            if (PyByteArray_Resize(self->sides[i].inject_q, 0) < 0) return -1;
        }
        if (self->on_error != NULL) {
            PyObject *r = PyObject_CallOneArg(self->on_error, err);
            if (r == NULL) return -1;
            Py_DECREF(r);
        }
    } else {
        Py_DECREF(err);
    }
    return 0;
}

static int engine_flush_injections(Engine *self) {
    if (!(PyByteArray_GET_SIZE(self->sides[0].inject_q) || PyByteArray_GET_SIZE(self->sides[1].inject_q)))
        return 0;
    if (self->error != NULL) return 0;
    for (int r = 0; r < 2; r++) {
        Side *side = &self->sides[r];
        if (PyByteArray_GET_SIZE(side->inject_q) && !(side->skip && !side->skip_drop)) {
            PyObject *chunk = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(side->inject_q),
                                                        PyByteArray_GET_SIZE(side->inject_q));
            if (chunk == NULL) return -1;
            if (PyByteArray_Resize(side->inject_q, 0) < 0 ||
                (self->observer && observe_obj(self, s_injected, r, chunk) < 0) ||
                call_send(self, r, chunk) < 0) {
                Py_DECREF(chunk);
                return -1;
            }
            Py_DECREF(chunk);
        }
    }
    return 0;
}

/* The round's output: pieces to send, joined at flush. */
typedef struct {
    PyObject *small[8];
    PyObject **items;
    Py_ssize_t n, cap;
} Out;

static void out_init(Out *o) {
    o->items = o->small;
    o->n = 0;
    o->cap = 8;
}

static int out_append(Out *o, PyObject *x) { /* steals x */
    if (o->n == o->cap) {
        Py_ssize_t cap = o->cap * 2;
        PyObject **items = PyMem_Malloc(sizeof(PyObject *) * (size_t)cap);
        if (items == NULL) {
            Py_DECREF(x);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(items, o->items, sizeof(PyObject *) * (size_t)o->n);
        if (o->items != o->small) PyMem_Free(o->items);
        o->items = items;
        o->cap = cap;
    }
    o->items[o->n++] = x;
    return 0;
}

static void out_clear(Out *o) {
    for (Py_ssize_t i = 0; i < o->n; i++) Py_DECREF(o->items[i]);
    o->n = 0;
}

static void out_free(Out *o) {
    out_clear(o);
    if (o->items != o->small) PyMem_Free(o->items);
    o->items = o->small;
    o->cap = 8;
}

static int engine_flush(Engine *self, int reply, Out *o) {
    if (o->n == 0) return 0;
    PyObject *data;
    if (o->n == 1) {
        data = o->items[0];
        Py_INCREF(data);
    } else {
        Py_ssize_t total = 0;
        for (Py_ssize_t i = 0; i < o->n; i++) total += Py_SIZE(o->items[i]);
        data = PyBytes_FromStringAndSize(NULL, total);
        if (data == NULL) return -1;
        char *w = PyBytes_AS_STRING(data);
        for (Py_ssize_t i = 0; i < o->n; i++) {
            const char *p = NULL;
            Py_ssize_t k = 0;
            bytes_view(o->items[i], &p, &k);
            memcpy(w, p, (size_t)k);
            w += k;
        }
    }
    out_clear(o);
    int rc = call_send(self, reply, data);
    Py_DECREF(data);
    return rc;
}

static int engine_round(Engine *self, int reply, int end_stream);

/* Engine._set_held */
static int engine_set_held(Engine *self, int reply, int held) {
    Side *side = &self->sides[reply];
    if (held == side->held) return 0;
    side->held = held;
    if (self->on_hold == NULL) return 0;
    PyObject *r = PyObject_CallFunctionObjArgs(self->on_hold, BOOL(reply), BOOL(held), NULL);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* Engine._wake: the other direction progressed or ended; run held rounds while they progress. */
static int engine_wake(Engine *self, int reply) {
    while (self->error == NULL) {
        Side *side = &self->sides[reply];
        if (!side->held) return 0;
        Py_ssize_t before = PyByteArray_GET_SIZE(side->buf);
        if (engine_round(self, reply, side->ended) < 0) return -1;
        if (self->error == NULL && side->ended && !side->held && PyByteArray_Resize(side->buf, 0) < 0)
            return -1;
        if (side->held && PyByteArray_GET_SIZE(side->buf) == before) {
            if (self->sides[!reply].ended) {
                if (engine_set_held(self, reply, 0) < 0) return -1;
                if (side->ended && PyByteArray_Resize(side->buf, 0) < 0) return -1;
            }
            return 0;
        }
        reply = !reply;
    }
    return 0;
}

/* Engine._consume_skip: returns the rest of data (new ref), or NULL on error. */
static PyObject *engine_consume_skip(Engine *self, int reply, Side *side, PyObject *data,
                                     Py_ssize_t n) {
    long long k = side->skip < n ? side->skip : n;
    PyObject *head;
    if (k == n) {
        head = data;
        Py_INCREF(head);
    } else {
        head = PySequence_GetSlice(data, 0, (Py_ssize_t)k);
        if (head == NULL) return NULL;
    }
    side->skip -= k;
    int rc = 0;
    if (side->skip_drop) {
        side->dropped_bytes += k;
        if (self->observer) rc = observe_obj(self, s_dropped, reply, head);
    } else {
        if (self->observer) rc = observe_obj(self, s_passed, reply, head);
        if (rc == 0) rc = call_send(self, reply, head);
    }
    Py_DECREF(head);
    if (rc < 0) return NULL;
    if (side->skip == 0 && engine_flush_injections(self) < 0) return NULL;
    if (k == n) {
        Py_INCREF(s_empty_bytes);
        return s_empty_bytes;
    }
    return PySequence_GetSlice(data, (Py_ssize_t)k, n);
}

static Py_ssize_t obj_len(PyObject *data) {
    if (PyBytes_CheckExact(data)) return PyBytes_GET_SIZE(data);
    if (PyByteArray_CheckExact(data)) return PyByteArray_GET_SIZE(data);
    return PyObject_Length(data);
}

static PyObject *engine_feed(Engine *self, int reply, PyObject *data);
static int engine_buffered(Engine *self, int reply);

static PyObject *Engine_feed(Engine *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "feed(reply, data)");
        return NULL;
    }
    int reply = PyObject_IsTrue(args[0]);
    if (reply < 0) return NULL;
    return engine_feed(self, reply, args[1]);
}

/* PyEngine.read_client: a client transport's data_received. */
static PyObject *Engine_read_client(Engine *self, PyObject *data) {
    Py_ssize_t n = obj_len(data);
    if (n < 0) return NULL;
    self->received[0] += n;
    return engine_feed(self, 0, data);
}

/* PyEngine.read_server: an upstream transport's data_received. */
static PyObject *Engine_read_server(Engine *self, PyObject *data) {
    Py_ssize_t n = obj_len(data);
    if (n < 0) return NULL;
    self->received[1] += n;
    PyObject *up = self->relay[0];
    if (self->sides[1].held && up != NULL) {
        /* a pause is enforced, not assumed (relay.py): the upstream started reading held */
        Py_INCREF(up);
        PyObject *r = PyObject_CallMethodNoArgs(up, s_pause_reading);
        Py_DECREF(up);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    return engine_feed(self, 1, data);
}

static PyObject *Engine_relay(Engine *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "relay(to_server, to_client)");
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        PyObject *t = args[i] == Py_None ? NULL : args[i];
        Py_XINCREF(t);
        Py_XSETREF(self->relay[i], t);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_received(Engine *self, PyObject *arg) {
    int r = PyObject_IsTrue(arg);
    if (r < 0) return NULL;
    return PyLong_FromLongLong(self->received[r]);
}

static PyObject *Engine_sent(Engine *self, PyObject *arg) {
    int r = PyObject_IsTrue(arg);
    if (r < 0) return NULL;
    return PyLong_FromLongLong(self->sent[r]);
}

static PyObject *engine_feed(Engine *self, int reply, PyObject *data) {
    Py_ssize_t n = obj_len(data);
    if (n < 0) return NULL;
    if (self->error != NULL || n == 0) Py_RETURN_NONE;
    Side *side = &self->sides[reply];
    Py_INCREF(data);
    if (side->skip) {
        PyObject *rest = engine_consume_skip(self, reply, side, data, n);
        Py_DECREF(data);
        if (rest == NULL) return NULL;
        data = rest;
        n = obj_len(data);
        if (n <= 0) {
            Py_DECREF(data);
            if (n < 0) return NULL;
            Py_RETURN_NONE;
        }
    }
    if (self->parser == Py_None || self->parser == NULL) {
        int rc = 0;
        if (self->observer) rc = observe_obj(self, s_passed, reply, data);
        if (rc == 0) rc = call_send(self, reply, data);
        Py_DECREF(data);
        if (rc < 0) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *buf = side->buf;
    int rc;
    if (PyBytes_CheckExact(data)) {
        rc = bytearray_append(buf, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
    } else {
        Py_buffer view;
        rc = PyObject_GetBuffer(data, &view, PyBUF_SIMPLE);
        if (rc == 0) {
            rc = bytearray_append(buf, view.buf, view.len);
            PyBuffer_Release(&view);
        }
    }
    Py_DECREF(data);
    if (rc < 0 || engine_buffered(self, reply) < 0) return NULL;
    Py_RETURN_NONE;
}

/* What feed does once the bytes are in the side's buffer: a round when the parser's want is
 * reached, then the other side's held rounds, then the buffer limit. 0 or -1. */
static int engine_buffered(Engine *self, int reply) {
    Side *side = &self->sides[reply];
    if (PyByteArray_GET_SIZE(side->buf) >= side->want) {
        if (engine_round(self, reply, 0) < 0) return -1;
        if (engine_wake(self, !reply) < 0) return -1;
    }
    if (self->error == NULL && PyByteArray_GET_SIZE(side->buf) > self->limit && !side->held) {
        if (engine_fail(self, make_error(s_buffer_limit,
                                         PyUnicode_FromFormat("more than %zd unparsed bytes buffered",
                                                              self->limit),
                                         NULL)) < 0)
            return -1;
    }
    return 0;
}

static PyObject *Engine_feed_eof(Engine *self, PyObject *arg) {
    int reply = PyObject_IsTrue(arg);
    if (reply < 0) return NULL;
    Side *side = &self->sides[reply];
    if (side->ended) return PyLong_FromLong(0);
    side->ended = 1;
    if (self->error != NULL || self->parser == Py_None || self->parser == NULL) return PyLong_FromLong(0);
    if (!side->skip) {
        if (engine_round(self, reply, 1) < 0) return NULL;
    }
    if (engine_wake(self, !reply) < 0) return NULL;
    if (side->held && self->error == NULL) {
        if (!self->sides[!reply].ended) return PyLong_FromLong(0);
        if (engine_set_held(self, reply, 0) < 0) return NULL;
    }
    Py_ssize_t left = PyByteArray_GET_SIZE(side->buf);
    if (PyByteArray_Resize(side->buf, 0) < 0) return NULL;
    return PyLong_FromSsize_t(left);
}

static int engine_queue_inject(Engine *self, int reply, const char *p, Py_ssize_t n) {
    if (self->error != NULL || n == 0) return 0;
    Side *side = &self->sides[reply];
    if (bytearray_append(side->inject_q, p, n) < 0) return -1;
    if (PyByteArray_GET_SIZE(side->inject_q) > self->limit) {
        return engine_fail(self, make_error(s_buffer_limit,
                                            PyUnicode_FromFormat("more than %zd injected bytes queued",
                                                                 self->limit),
                                            NULL));
    } else if (!self->in_round) {
        return engine_flush_injections(self);
    }
    return 0;
}

static PyObject *Engine_queue_inject(Engine *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "queue_inject(reply, data)");
        return NULL;
    }
    int reply = PyObject_IsTrue(args[0]);
    if (reply < 0) return NULL;
    Py_ssize_t n = obj_len(args[1]);
    if (n < 0) return NULL;
    if (self->error != NULL || n == 0) Py_RETURN_NONE;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) return NULL;
    /* copy first: the buffer may be the engine's own */
    PyObject *copy = PyBytes_FromStringAndSize(view.buf, view.len);
    PyBuffer_Release(&view);
    if (copy == NULL) return NULL;
    int rc = engine_queue_inject(self, reply, PyBytes_AS_STRING(copy), PyBytes_GET_SIZE(copy));
    Py_DECREF(copy);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_buffered(Engine *self, PyObject *arg) {
    int reply = PyObject_IsTrue(arg);
    if (reply < 0) return NULL;
    return PyLong_FromSsize_t(PyByteArray_GET_SIZE(self->sides[reply].buf));
}

static PyObject *Engine_dropped(Engine *self, PyObject *arg) {
    int reply = PyObject_IsTrue(arg);
    if (reply < 0) return NULL;
    return PyLong_FromLongLong(self->sides[reply].dropped_bytes);
}

static PyObject *Engine_held(Engine *self, PyObject *arg) {
    int reply = PyObject_IsTrue(arg);
    if (reply < 0) return NULL;
    return PyBool_FromLong(self->sides[reply].held);
}

/* The sandbox message: f"{type(exc).__name__}: {exc}" for the exception being handled. */
static PyObject *exception_message(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *msg = NULL;
    PyObject *name = PyObject_GetAttrString(type, "__name__");
    if (name != NULL) msg = PyUnicode_FromFormat("%S: %S", name, value ? value : Py_None);
    Py_XDECREF(name);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return msg;
}

/* Stop the round on a failure: flush what was decided, send injections, record the error. */
static int round_fail(Engine *self, int reply, Out *out, PyObject *err_kind, PyObject *msg,
                      PyObject *code) {
    if (msg == NULL) return -1;
    if (engine_flush(self, reply, out) < 0 || engine_flush_injections(self) < 0) {
        Py_DECREF(msg);
        return -1;
    }
    return engine_fail(self, make_error(err_kind, msg, code));
}

/* Engine._round. Returns 0, or -1 with an exception set (which the reference also raises). */
static int engine_round(Engine *self, int reply, int end_stream) {
    Side *side = &self->sides[reply];
    PyObject *buf = side->buf;
    Py_INCREF(buf);
    Out out;
    out_init(&out);
    long long injected = 0;
    int nop = 0;
    int rc = 0;
    int done = 0; /* returned from inside the loop: skip the final flush_injections */
    self->in_round = 1;
    PyObject *parser = self->parser;
    Py_INCREF(parser);
    while (PyByteArray_GET_SIZE(buf) || end_stream) {
        PyObject *op_obj = NULL, *n_obj = NULL;
        int op;
        long long n;
        int n_ok; /* n is an exact int > 0 that fits in long long */
        int n_big = 0;
        if (Py_TYPE(parser) == &MemcacheType || Py_TYPE(parser) == &RedisType || Py_TYPE(parser) == &HttpType) {
            NativeParser *np = (NativeParser *)parser;
            op = np->on_data(np, reply, end_stream, buf, &n);
            if (op < 0) {
                if (!PyErr_ExceptionMatches(PyExc_Exception)) { rc = -1; break; }
                rc = round_fail(self, reply, &out, s_exception, exception_message(), NULL);
                done = 1;
                break;
            }
            op_obj = g_ops[op];
            Py_INCREF(op_obj);
            n_obj = PyLong_FromLongLong(n);
            if (n_obj == NULL) { rc = -1; Py_DECREF(op_obj); break; }
            n_ok = n > 0;
        } else {
            PyObject *meth = PyObject_GetAttr(parser, s_on_data);
            PyObject *res = NULL;
            if (meth != NULL) {
                res = PyObject_CallFunctionObjArgs(meth, BOOL(reply), BOOL(end_stream), buf, NULL);
                Py_DECREF(meth);
            }
            if (res != NULL) {
                if (PyTuple_CheckExact(res) && PyTuple_GET_SIZE(res) == 2) {
                    op_obj = PyTuple_GET_ITEM(res, 0);
                    n_obj = PyTuple_GET_ITEM(res, 1);
                    Py_INCREF(op_obj);
                    Py_INCREF(n_obj);
                    Py_DECREF(res);
                } else {
                    PyObject *pair = PyObject_CallOneArg(g_unpack, res);
                    Py_DECREF(res);
                    if (pair != NULL) {
                        op_obj = PyTuple_GET_ITEM(pair, 0);
                        n_obj = PyTuple_GET_ITEM(pair, 1);
                        Py_INCREF(op_obj);
                        Py_INCREF(n_obj);
                        Py_DECREF(pair);
                    }
                }
            }
            if (op_obj == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_Exception)) { rc = -1; break; }
                rc = round_fail(self, reply, &out, s_exception, exception_message(), NULL);
                done = 1;
                break;
            }
            n_ok = 0;
            n = 0;
            if (PyLong_CheckExact(n_obj)) {
                int overflow = 0;
                n = PyLong_AsLongLongAndOverflow(n_obj, &overflow);
                if (overflow > 0) { n_big = 1; n = LLONG_MAX / 4; n_ok = 1; }
                else if (overflow == 0 && n > 0) n_ok = 1;
            }
            /* the op's code, by the reference's == comparisons */
            if (PyLong_Check(op_obj)) {
                int overflow = 0;
                long v = PyLong_AsLongAndOverflow(op_obj, &overflow);
                op = (!overflow && v >= 1 && v <= 6) ? (int)v : 0;
            } else {
                PyObject *c = PyObject_CallOneArg(g_opcode, op_obj);
                if (c == NULL) { rc = -1; Py_DECREF(op_obj); Py_DECREF(n_obj); break; }
                op = (int)PyLong_AsLong(c);
                Py_DECREF(c);
            }
        }
        if (self->observer) {
            PyObject *r = PyObject_CallMethodObjArgs(self->observer, s_op, BOOL(reply), op_obj, n_obj, NULL);
            if (r == NULL) { rc = -1; Py_DECREF(op_obj); Py_DECREF(n_obj); break; }
            Py_DECREF(r);
        }
        if (!n_ok) {
            if (op == OP_NOP) { nop = 1; Py_DECREF(op_obj); Py_DECREF(n_obj); break; }
            PyObject *name = PyObject_CallOneArg(g_opname, op_obj);
            PyObject *msg = name ? PyUnicode_FromFormat("%S with n=%R", name, n_obj) : NULL;
            Py_XDECREF(name);
            rc = round_fail(self, reply, &out, s_contract, msg, NULL);
            Py_DECREF(op_obj);
            Py_DECREF(n_obj);
            done = 1;
            break;
        }
        if (op == OP_PASS || op == OP_DROP) {
            Py_ssize_t have = PyByteArray_GET_SIZE(buf);
            Py_ssize_t k = n < have ? (Py_ssize_t)n : have;
            if (op == OP_PASS) {
                if (self->observer && observe_bytes(self, s_passed, reply, PyByteArray_AS_STRING(buf), k) < 0) {
                    rc = -1;
                } else if (k == have) {
                    /* hand the buffer over instead of copying it out */
                    PyObject *fresh = PyByteArray_FromStringAndSize(NULL, 0);
                    if (fresh == NULL) rc = -1;
                    else {
                        rc = out_append(&out, buf); /* steals our ref to buf */
                        buf = fresh;
                        Py_INCREF(fresh);
                        Py_SETREF(side->buf, fresh);
                    }
                } else {
                    PyObject *piece = PyByteArray_FromStringAndSize(PyByteArray_AS_STRING(buf), k);
                    if (piece == NULL || out_append(&out, piece) < 0 || bytearray_del_head(buf, k) < 0) rc = -1;
                }
            } else {
                side->dropped_bytes += k;
                if (self->observer && observe_bytes(self, s_dropped, reply, PyByteArray_AS_STRING(buf), k) < 0)
                    rc = -1;
                else if (bytearray_del_head(buf, k) < 0)
                    rc = -1;
            }
            Py_DECREF(op_obj);
            Py_DECREF(n_obj);
            if (rc < 0) break;
            side->want = 0;
            if (n > have) {
                side->skip = n_big ? LLONG_MAX / 4 : n - have;
                side->skip_drop = op == OP_DROP;
                break;
            }
        } else if (op == OP_MORE) {
            Py_ssize_t have = PyByteArray_GET_SIZE(buf);
            if (n_big || n > (long long)self->limit) {
                side->want = LLONG_MAX / 4;
                PyObject *lenobj = PyLong_FromSsize_t(have);
                PyObject *want = lenobj ? PyNumber_Add(lenobj, n_obj) : NULL;
                Py_XDECREF(lenobj);
                PyObject *msg = want ? PyUnicode_FromFormat("parser asked for %S bytes, over the %zd byte limit",
                                                            want, self->limit) : NULL;
                Py_XDECREF(want);
                rc = round_fail(self, reply, &out, s_buffer_limit, msg, NULL);
                Py_DECREF(op_obj);
                Py_DECREF(n_obj);
                done = 1;
                break;
            }
            side->want = have + n;
            if (side->want > self->limit) {
                PyObject *msg = PyUnicode_FromFormat("parser asked for %lld bytes, over the %zd byte limit",
                                                     side->want, self->limit);
                rc = round_fail(self, reply, &out, s_buffer_limit, msg, NULL);
                Py_DECREF(op_obj);
                Py_DECREF(n_obj);
                done = 1;
                break;
            }
            Py_DECREF(op_obj);
            Py_DECREF(n_obj);
            break;
        } else if (op == OP_INJECT) {
            PyObject *q = side->inject_q;
            Py_ssize_t qlen = PyByteArray_GET_SIZE(q);
            if (n_big || n > qlen) {
                /* the reference formats the message after flushing: len(q) may have changed */
                if (engine_flush(self, reply, &out) < 0 || engine_flush_injections(self) < 0) {
                    rc = -1;
                } else {
                    PyObject *msg = PyUnicode_FromFormat("INJECT %S with %zd bytes queued", n_obj,
                                                         PyByteArray_GET_SIZE(side->inject_q));
                    rc = msg ? engine_fail(self, make_error(s_contract, msg, NULL)) : -1;
                }
                Py_DECREF(op_obj);
                Py_DECREF(n_obj);
                done = 1;
                break;
            }
            injected += n;
            if (injected > self->limit) {
                PyObject *msg = PyUnicode_FromFormat("more than %zd bytes injected in one round", self->limit);
                rc = round_fail(self, reply, &out, s_buffer_limit, msg, NULL);
                Py_DECREF(op_obj);
                Py_DECREF(n_obj);
                done = 1;
                break;
            }
            PyObject *chunk = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(q), (Py_ssize_t)n);
            Py_DECREF(op_obj);
            Py_DECREF(n_obj);
            if (chunk == NULL || bytearray_del_head(q, (Py_ssize_t)n) < 0) { Py_XDECREF(chunk); rc = -1; break; }
            Py_INCREF(chunk);
            if (out_append(&out, chunk) < 0) { Py_DECREF(chunk); rc = -1; break; }
            if (self->observer && observe_obj(self, s_injected, reply, chunk) < 0) { Py_DECREF(chunk); rc = -1; break; }
            Py_DECREF(chunk);
        } else if (op == OP_ERROR) {
            PyObject *msg = PyUnicode_FromFormat("parser error %S", n_obj);
            rc = round_fail(self, reply, &out, s_parser_error, msg, n_obj);
            Py_DECREF(op_obj);
            Py_DECREF(n_obj);
            done = 1;
            break;
        } else if (op == OP_NOP) {
            nop = 1;
            Py_DECREF(op_obj);
            Py_DECREF(n_obj);
            break;
        } else {
            PyObject *msg = PyUnicode_FromFormat("unknown op %R", op_obj);
            rc = round_fail(self, reply, &out, s_contract, msg, NULL);
            Py_DECREF(op_obj);
            Py_DECREF(n_obj);
            done = 1;
            break;
        }
        end_stream = end_stream && PyByteArray_GET_SIZE(buf);
    }
    if (rc == 0 && !done) rc = engine_flush(self, reply, &out);
    self->in_round = 0;
    out_free(&out);
    Py_DECREF(buf);
    Py_DECREF(parser);
    if (rc == 0 && !done) rc = engine_flush_injections(self);
    if (rc == 0 && !done && self->error == NULL)
        rc = engine_set_held(self, reply, nop && PyByteArray_GET_SIZE(side->buf) > 0);
    return rc;
}

static PyObject *Engine_get_parser(Engine *self, void *c) {
    PyObject *p = self->parser ? self->parser : Py_None;
    Py_INCREF(p);
    return p;
}
static int Engine_set_parser(Engine *self, PyObject *v, void *c) {
    if (v == NULL) v = Py_None;
    Py_INCREF(v);
    Py_XSETREF(self->parser, v);
    return 0;
}
static PyObject *Engine_get_error(Engine *self, void *c) {
    PyObject *p = self->error ? self->error : Py_None;
    Py_INCREF(p);
    return p;
}
static int Engine_set_error(Engine *self, PyObject *v, void *c) {
    if (v == Py_None) v = NULL;
    Py_XINCREF(v);
    Py_XSETREF(self->error, v);
    return 0;
}

static PyGetSetDef Engine_getset[] = {
    {"parser", (getter)Engine_get_parser, (setter)Engine_set_parser, NULL, NULL},
    {"error", (getter)Engine_get_error, (setter)Engine_set_error, NULL, NULL},
    {NULL},
};

static PyMemberDef Engine_members[] = {
    {"limit", T_PYSSIZET, offsetof(Engine, limit), 0, NULL},
    {NULL},
};

static PyMethodDef Engine_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))Engine_feed, METH_FASTCALL, "Take bytes of one direction."},
    {"feed_eof", (PyCFunction)Engine_feed_eof, METH_O, "End one direction's stream."},
    {"queue_inject", (PyCFunction)(void (*)(void))Engine_queue_inject, METH_FASTCALL, "Queue bytes."},
    {"buffered", (PyCFunction)Engine_buffered, METH_O, "Bytes held for the parser."},
    {"dropped", (PyCFunction)Engine_dropped, METH_O, "Bytes dropped so far."},
    {"held", (PyCFunction)Engine_held, METH_O, "Whether a direction is held (waits on the other)."},
    {"relay", (PyCFunction)(void (*)(void))Engine_relay, METH_FASTCALL,
     "Write each direction to a transport (None: through send)."},
    {"read_client", (PyCFunction)Engine_read_client, METH_O, "A client transport's data_received."},
    {"read_server", (PyCFunction)Engine_read_server, METH_O, "An upstream transport's data_received."},
    {"received", (PyCFunction)Engine_received, METH_O, "Bytes read by read_client / read_server."},
    {"sent", (PyCFunction)Engine_sent, METH_O, "Bytes written to a relay transport."},
    {NULL},
};

/* For relay.c, which owns the descriptors of a native connection and reads for the engine. */
int engine_relay_read(PyObject *engine, int reply, const char *p, Py_ssize_t n) {
    Engine *self = (Engine *)engine;
    self->received[reply] += n;
    if (self->error != NULL || n == 0) return 0;
    Side *side = &self->sides[reply];
    if (!side->skip && self->parser != Py_None && self->parser != NULL) {
        /* the common case: the relay's bytes go straight into the side's buffer */
        if (bytearray_append(side->buf, p, n) < 0) return -1;
        return engine_buffered(self, reply);
    }
    PyObject *data = PyBytes_FromStringAndSize(p, n);
    if (data == NULL) return -1;
    PyObject *r = engine_feed(self, reply, data);
    Py_DECREF(data);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

int engine_relay_held(PyObject *engine, int reply) { return ((Engine *)engine)->sides[reply].held; }

int engine_relay_failed(PyObject *engine) { return ((Engine *)engine)->error != NULL; }

PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.Engine",
    .tp_doc = "The native twin of proxyd.engine.PyEngine (same constructor, methods, attributes).",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_methods = Engine_methods,
    .tp_members = Engine_members,
    .tp_getset = Engine_getset,
    .tp_weaklistoffset = offsetof(Engine, weakreflist),
};

PyObject *native_parser_py_on_data(NativeParser *p, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "on_data(reply, end_stream, data)");
        return NULL;
    }
    int reply = PyObject_IsTrue(args[0]);
    int end_stream = PyObject_IsTrue(args[1]);
    if (reply < 0 || end_stream < 0) return NULL;
    PyObject *data = args[2];
    long long n = 0;
    int op;
    if (PyBytes_CheckExact(data) || PyByteArray_CheckExact(data)) {
        op = p->on_data(p, reply, end_stream, data, &n);
    } else {
        PyObject *copy = PyBytes_FromObject(data);
        if (copy == NULL) return NULL;
        op = p->on_data(p, reply, end_stream, copy, &n);
        Py_DECREF(copy);
    }
    if (op < 0) return NULL;
    if (op < OP_MORE || op > OP_NOP) {
        PyErr_Format(PyExc_ValueError, "%s: op %d", Py_TYPE(p)->tp_name, op);
        return NULL;
    }
    PyObject *nobj = PyLong_FromLongLong(n);
    if (nobj == NULL) return NULL;
    PyObject *t = PyTuple_Pack(2, g_ops[op], nobj);
    Py_DECREF(nobj);
    return t;
}
