/* The twin of proxyd/relay.py's Connection on the two descriptors themselves: a connection's
 * life cycle from accept to close without asyncio transports (proxyd/nativerelay.py drives it).
 *
 * Why: a short connection through relay.py costs uvloop two transports, a protocol switch, a
 * handful of Python frames per event and a dozen Python objects; HAProxy's whole cost per
 * connection is smaller than that overhead (bench/README.md, "Connection churn"). Here:
 *
 *   Acceptor  accept4() in a loop on the listening socket (the event loop's reader calls
 *             on_readable), TCP_NODELAY as uvloop sets it, the addresses as strings, and one
 *             Python call per connection: the listener's admission (nativerelay.py).
 *   Hub       one epoll set per event loop, itself a reader of the event loop: run() takes
 *             what is ready (without blocking) and dispatches it to the pairs, in C.
 *   FdPair    the client and upstream descriptors of one connection: the non-blocking connect,
 *             reads straight to the other side (L4) or to the engine (engine.c, which writes
 *             back through fdpair_emit without a call), write buffers, and every rule of
 *             relay.py's docstring: flow control both ways (HIGH_WATER/LOW_WATER, the reply
 *             cap), the bound on bytes read while connecting, holds, half-close both ways
 *             (shutdown once flushed; the last one left to close), resets passed on as resets
 *             (SO_LINGER 0), a failed connect passed on as a reset, a linger for a closed side
 *             still flushing. It calls Python once at the end (on_end: the log line, counters).
 *
 * Lifetime: a pair with a descriptor in the epoll set is owned by the hub (one reference);
 * one that ends during run() stays alive until the batch is dispatched, so an event of the
 * same batch never reaches freed memory (hub->dead). Timers (connect_timeout, the close
 * linger) are the event loop's: nativerelay.py arms them and hands the handle over.
 */
#include "native.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define RBUF_SIZE (256 * 1024) /* one read, as uvloop's */
#define HIGH_WATER (256 * 1024) /* relay.py HIGH_WATER / LOW_WATER */
#define LOW_WATER (64 * 1024)
#define BATCH 128

/* why a side is not read (relay.py's _client_pauses and the upstream's pause_reading) */
enum { P_CONNECTING = 1, P_PEER_FULL = 2, P_REPLY_CAP = 4, P_HELD = 8 };
enum { S_CONNECTING = 0, S_OPEN = 1, S_CLOSED = 2 };

typedef struct Hub {
    PyObject_HEAD
    int epfd;
    int running;
    PyObject *dead; /* list: pairs that ended during run(), released after the batch */
    char *rbuf;
} Hub;

struct FdPair;

typedef struct Half {
    struct FdPair *pair;
    int idx;       /* 0 client, 1 upstream */
    int fd;        /* -1: none (closed, or the upstream not opened yet) */
    uint32_t ev;   /* events registered */
    int added;     /* in the hub's epoll set */
    char *out;     /* bytes waiting to be written to this side */
    size_t off, len, cap;
    int eof;       /* EOF read from this side */
    int shut;      /* our write side towards it is done (shutdown, or left to close) */
    int shut_wait; /* pass the other side's EOF on once out is flushed */
    int full;      /* out above HIGH_WATER (pause_writing) */
    int linger;    /* still flushing after the end */
    unsigned pause;
    long long rx, tx;
} Half;

typedef struct FdPair {
    PyObject_HEAD
    Hub *hub;
    Half h[2];
    int state;
    int owned;          /* the hub holds a reference (a descriptor is in its set) */
    int depth;          /* inside a dispatch of this pair: errors of writes are deferred */
    int werr, werr_idx; /* a write failed (errno), handled once the dispatch returns */
    int lingering;      /* ended: sides still flushing (CLOSE_LINGER) */
    PyObject *on_linger_closed; /* called as each of them is closed (the descriptor budget) */
    PyObject *engine;   /* Engine, or NULL: L4 */
    PyObject *on_end;
    PyObject *timer;    /* the event loop's handle: connect_timeout, then the linger */
    Py_ssize_t pending_cap; /* limits.buffer_bytes: bytes for the upstream held while it connects */
    Py_ssize_t reply_cap;   /* HIGH_WATER + buffer_bytes: answers waiting for a full client */
    long long unparsed[2];
} FdPair;

static PyObject *s_cancel, *s_feed_eof, *s_forwarded, *s_error_v;

/* ---------------------------------------------------------------------------------------- */
/* epoll registration                                                                          */

static int pair_own(FdPair *p) {
    if (!p->owned) {
        p->owned = 1;
        Py_INCREF(p);
    }
    return 0;
}

static void pair_release(FdPair *p) {
    if (!p->owned) return;
    p->owned = 0;
    Hub *hub = p->hub;
    if (hub->running && hub->dead != NULL && PyList_Append(hub->dead, (PyObject *)p) == 0) {
        Py_DECREF(p); /* the list keeps it until the batch is done */
        return;
    }
    Py_DECREF(p);
}

/* What a side should be polled for now. */
static uint32_t half_want(Half *h) {
    FdPair *p = h->pair;
    uint32_t ev = 0;
    if (h->fd < 0) return 0;
    if (p->state == S_CLOSED) return h->len ? EPOLLOUT : 0; /* lingering: flush only */
    if (h->idx == 1 && p->state == S_CONNECTING) return EPOLLOUT;
    if (!h->eof && !h->pause) ev |= EPOLLIN;
    if (h->len) ev |= EPOLLOUT;
    return ev;
}

static void half_update(Half *h) {
    uint32_t ev = half_want(h);
    if (h->fd < 0 || ev == h->ev) return;
    struct epoll_event e;
    e.events = ev;
    e.data.ptr = h;
    if (ev == 0) {
        /* out of the set, not in it for nothing: an error or hang-up is reported even for no
         * events, again and again (level-triggered), to a side that is not read now */
        epoll_ctl(h->pair->hub->epfd, EPOLL_CTL_DEL, h->fd, &e);
        h->added = 0;
    } else if (!h->added) {
        if (epoll_ctl(h->pair->hub->epfd, EPOLL_CTL_ADD, h->fd, &e) == 0) h->added = 1;
    } else {
        epoll_ctl(h->pair->hub->epfd, EPOLL_CTL_MOD, h->fd, &e);
    }
    h->ev = ev;
}

static void timer_cancel(struct FdPair *p);

static void half_close(Half *h, int rst) {
    if (h->fd < 0) return;
    if (rst) {
        struct linger lg = {1, 0};
        setsockopt(h->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(h->fd); /* leaves the epoll set with it (never duplicated) */
    h->fd = -1;
    FdPair *lp = h->pair;
    if (h->linger) { /* a side that flushed (or was cut) after the end */
        h->linger = 0;
        lp->lingering--;
        PyObject *cb = lp->on_linger_closed;
        if (cb != NULL) {
            Py_INCREF(cb);
            PyObject *r = PyObject_CallNoArgs(cb);
            if (r == NULL) PyErr_WriteUnraisable(cb);
            Py_XDECREF(r);
            Py_DECREF(cb);
        }
    }
    h->added = 0;
    h->ev = 0;
    free(h->out);
    h->out = NULL;
    h->off = h->len = h->cap = 0;
    FdPair *p = h->pair;
    if (p->h[0].fd < 0 && p->h[1].fd < 0) {
        if (p->state == S_CLOSED) timer_cancel(p); /* the linger, once both sides are flushed */
        pair_release(p);
    }
}

static void pause_side(Half *h, unsigned why) {
    if (h->pause & why) return;
    h->pause |= why;
    half_update(h);
}

static void resume_side(Half *h, unsigned why) {
    if (!(h->pause & why)) return;
    h->pause &= ~why;
    half_update(h);
}

/* ---------------------------------------------------------------------------------------- */
/* The end: relay.py's _finish                                                                 */

static void timer_cancel(struct FdPair *p) {
    PyObject *t = p->timer;
    if (t == NULL) return;
    p->timer = NULL;
    PyObject *r = PyObject_CallMethodNoArgs(t, s_cancel);
    if (r == NULL) PyErr_WriteUnraisable(t);
    Py_XDECREF(r);
    Py_DECREF(t);
}

/* reset_idx: the side that gets a reset (-1: none); abort: close both without flushing. */
static void pair_finish(FdPair *p, PyObject *verdict, PyObject *reason, int abort, int reset_idx,
                        int connect_failed) {
    if (p->state == S_CLOSED) return;
    p->state = S_CLOSED;
    timer_cancel(p);
    for (int i = 0; i < 2; i++) {
        Half *h = &p->h[i];
        if (h->fd < 0) continue;
        if (i == reset_idx || abort || !h->len) {
            half_close(h, i == reset_idx);
        } else {
            /* close() flushes first; a peer that never reads gets CLOSE_LINGER (on_end) */
            p->lingering++;
            h->linger = 1;
            h->pause = ~0u;
            half_update(h);
        }
    }
    PyObject *on_end = p->on_end;
    p->on_end = NULL;
    if (on_end != NULL) {
        PyObject *args[8];
        args[0] = verdict;
        args[1] = reason ? reason : Py_None;
        args[2] = BOOL(connect_failed);
        args[3] = PyLong_FromLongLong(p->h[0].rx);
        args[4] = PyLong_FromLongLong(p->h[0].tx);
        args[5] = PyLong_FromLongLong(p->unparsed[0]);
        args[6] = PyLong_FromLongLong(p->unparsed[1]);
        args[7] = PyLong_FromLong(p->lingering);
        PyObject *r = NULL;
        if (args[3] && args[4] && args[5] && args[6] && args[7]) r = PyObject_Vectorcall(on_end, args, 8, NULL);
        for (int i = 3; i < 8; i++) Py_XDECREF(args[i]);
        if (r == NULL) PyErr_WriteUnraisable(on_end);
        Py_XDECREF(r);
        Py_DECREF(on_end);
    }
    /* break the cycles (engine -> on_hold -> pair, on_end -> record -> pair) at once */
    Py_CLEAR(p->engine);
}

static void pair_finish_msg(FdPair *p, PyObject *verdict, int abort, int reset_idx, int connect_failed,
                            const char *fmt, ...) {
    va_list va;
    va_start(va, fmt);
    PyObject *reason = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (reason == NULL) PyErr_WriteUnraisable((PyObject *)p);
    pair_finish(p, verdict, reason, abort, reset_idx, connect_failed);
    Py_XDECREF(reason);
}

/* A side's descriptor failed (relay.py connection_lost / upstream_lost with an exception). */
static void pair_lost(FdPair *p, int idx, int err) {
    if (p->state == S_CLOSED) {
        half_close(&p->h[idx], 0); /* a lingering side: nothing more to flush */
        return;
    }
    const char *who = idx ? "upstream" : "client";
    if (err == ECONNRESET) {
        pair_finish_msg(p, s_error_v, 0, !idx, 0, "%s reset the connection", who);
    } else {
        pair_finish_msg(p, s_error_v, 0, -1, 0, "%s closed: [Errno %d] %s", who, err, strerror(err));
    }
}

static void pair_deferred(FdPair *p) {
    if (p->werr && p->depth == 0) {
        int err = p->werr, idx = p->werr_idx;
        p->werr = 0;
        pair_lost(p, idx, err);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Writing                                                                                     */

static int out_append(Half *h, const char *d, size_t n) {
    if (h->off && h->off + h->len + n > h->cap) {
        memmove(h->out, h->out + h->off, h->len);
        h->off = 0;
    }
    if (h->len + n > h->cap) {
        size_t cap = h->cap ? h->cap : 4096;
        while (cap < h->len + n) cap *= 2;
        char *o = realloc(h->out, cap);
        if (o == NULL) return -1;
        h->out = o;
        h->cap = cap;
    }
    memcpy(h->out + h->off + h->len, d, n);
    h->len += n;
    return 0;
}

static void half_check_full(Half *h) {
    FdPair *p = h->pair;
    Half *o = &p->h[!h->idx];
    if (!h->full && h->len > HIGH_WATER) {
        h->full = 1; /* pause_writing: stop reading what fills it */
        pause_side(o, P_PEER_FULL);
    }
    if (h->idx == 0 && h->full && (Py_ssize_t)h->len > p->reply_cap)
        pause_side(h, P_REPLY_CAP); /* answers proxyd writes itself to a client that does not read */
}

/* relay.py: transport.write (the upstream's _pending while it connects). Counted as written. */
static void half_write(Half *h, const char *d, size_t n) {
    FdPair *p = h->pair;
    if (p->state == S_CLOSED || n == 0) return;
    h->tx += (long long)n;
    if (h->fd < 0 || p->werr) return;
    int connecting = h->idx == 1 && p->state == S_CONNECTING;
    if (!h->len && !connecting) {
        ssize_t w = send(h->fd, d, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                p->werr = errno;
                p->werr_idx = h->idx;
                return;
            }
            w = 0;
        }
        d += w;
        n -= (size_t)w;
        if (n == 0) return;
    }
    if (out_append(h, d, n) < 0) {
        p->werr = ENOMEM;
        p->werr_idx = h->idx;
        return;
    }
    if (connecting) {
        if ((Py_ssize_t)h->len >= p->pending_cap) pause_side(&p->h[0], P_CONNECTING);
        return;
    }
    half_update(h);
    half_check_full(h);
}

static void half_maybe_shutdown(Half *t);

/* The side can take more: flush what waits (uvloop's write callback, then resume_writing). */
static void half_flush(Half *h) {
    FdPair *p = h->pair;
    while (h->len) {
        ssize_t w = send(h->fd, h->out + h->off, h->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
            pair_lost(p, h->idx, errno);
            return;
        }
        h->off += (size_t)w;
        h->len -= (size_t)w;
    }
    if (!h->len) h->off = 0;
    if (p->state == S_CLOSED) {
        if (!h->len) half_close(h, 0); /* a lingering side is flushed */
        return;
    }
    half_update(h);
    if (h->full && h->len <= LOW_WATER) {
        h->full = 0;
        Half *o = &p->h[!h->idx];
        if (h->idx == 0) resume_side(h, P_REPLY_CAP);
        resume_side(o, P_PEER_FULL);
    }
    if (!h->len && h->shut_wait) half_maybe_shutdown(h);
}

int fdpair_emit(PyObject *pair, int reply, PyObject *data) {
    FdPair *p = (FdPair *)pair;
    Half *h = &p->h[reply ? 0 : 1];
    const char *d;
    Py_ssize_t n;
    if (bytes_view(data, &d, &n) == 0) {
        half_write(h, d, (size_t)n);
        return 0;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return -1;
    half_write(h, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Half-close: relay.py's _maybe_shutdown and _maybe_done                                      */

static void pair_maybe_done(FdPair *p) {
    if (p->h[0].eof && p->h[1].eof && p->h[0].shut && p->h[1].shut)
        pair_finish(p, s_forwarded, NULL, 0, -1, 0);
}

/* Pass the other side's EOF on to t once what waits for t is written. */
static void half_maybe_shutdown(Half *t) {
    FdPair *p = t->pair;
    if (p->state == S_CLOSED || t->shut) return;
    int from = !t->idx; /* the side whose EOF this is; the engine's direction (reply) is from */
    if (p->engine != NULL && engine_relay_held(p->engine, from) && !engine_relay_failed(p->engine))
        return; /* its bytes are still held: the hold's release passes the EOF on */
    if (t->len || (t->idx == 1 && p->state == S_CONNECTING)) {
        t->shut_wait = 1;
        return;
    }
    t->shut_wait = 0;
    t->shut = 1;
    if (!p->h[!t->idx].shut) shutdown(t->fd, SHUT_WR);
    /* else the last direction: close() sends the same FIN (this peer's EOF has arrived) */
    pair_maybe_done(p);
}

static void half_eof(Half *h) {
    FdPair *p = h->pair;
    h->eof = 1; /* not read again; taken out of the set below unless the pair ends first */
    if (p->engine != NULL) {
        PyObject *eng = p->engine;
        Py_INCREF(eng);
        PyObject *r = PyObject_CallMethodOneArg(eng, s_feed_eof, BOOL(h->idx));
        Py_DECREF(eng);
        if (r == NULL) {
            PyErr_WriteUnraisable((PyObject *)p);
        } else {
            long long left = PyLong_AsLongLong(r);
            Py_DECREF(r);
            if (left == -1 && PyErr_Occurred()) PyErr_WriteUnraisable((PyObject *)p);
            else p->unparsed[h->idx] = left;
        }
    }
    half_maybe_shutdown(&p->h[!h->idx]);
    pair_maybe_done(p);
    if (p->state != S_CLOSED) half_update(h); /* else close() took it out: one epoll_ctl fewer */
}

/* ---------------------------------------------------------------------------------------- */
/* Reading                                                                                     */

/* One read; 1 when it filled the buffer (there may be more right now). */
static int half_read_once(Half *h);

/* As libuv reads a stream for uvloop: again while a read fills the buffer (up to 32 times) and
 * the side is still read. Reading less per wake-up than relay.py's transports changed when the
 * peers saw what (an EOF passed on later against the answers, say), which servers notice. */
static void half_read(Half *h) {
    for (int i = 0; i < 32; i++) {
        if (!half_read_once(h)) return;
        if (h->fd < 0 || h->pair->state == S_CLOSED || !(half_want(h) & EPOLLIN)) return;
    }
}

static int half_read_once(Half *h) {
    FdPair *p = h->pair;
    char *buf = p->hub->rbuf;
    ssize_t n = recv(h->fd, buf, RBUF_SIZE, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
        pair_lost(p, h->idx, errno);
        return 0;
    }
    if (n == 0) {
        half_eof(h);
        return 0;
    }
    h->rx += n;
    if (p->engine == NULL) {
        half_write(&p->h[!h->idx], buf, (size_t)n);
    } else {
        PyObject *eng = p->engine;
        Py_INCREF(eng);
        if (engine_relay_read(eng, h->idx, buf, n) < 0) PyErr_WriteUnraisable(eng);
        Py_DECREF(eng);
    }
    if (p->werr) return 0; /* a write failed: handled once the dispatch returns */
    return n == RBUF_SIZE;
}

/* ---------------------------------------------------------------------------------------- */
/* Connecting: relay.py's _connect_start, _connect_ready, _connect_failed, _connected         */

static void pair_connected(FdPair *p) {
    Half *u = &p->h[1];
    p->state = S_OPEN;
    timer_cancel(p);
    int one = 1;
    setsockopt(u->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* as uvloop does */
    half_update(u);
    if (u->len) half_flush(u); /* what the client sent while it connected */
    if (p->state == S_CLOSED) return;
    half_check_full(u);
    resume_side(&p->h[0], P_CONNECTING);
    if (p->h[0].eof) half_maybe_shutdown(u);
}

#define CONNECT_TIMER (-1) /* connect_timeout passed (relay.py: TimeoutError, "timeout") */

static void pair_connect_failed(FdPair *p, int err) {
    if (p->state != S_CONNECTING) return;
    const char *why = err == CONNECT_TIMER ? "timeout" : strerror(err);
    /* passed on as a reset: a clean FIN would read as "the server answered nothing" */
    pair_finish_msg(p, s_error_v, 0, 0, 1, "upstream connect failed: %s", why);
}

static void half_writable(Half *h) {
    FdPair *p = h->pair;
    if (h->idx == 1 && p->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err) pair_connect_failed(p, err);
        else pair_connected(p);
        return;
    }
    half_flush(h);
}

/* ---------------------------------------------------------------------------------------- */
/* FdPair: the Python-facing methods (nativerelay.py)                                          */

static int FdPair_traverse(FdPair *self, visitproc visit, void *arg) {
    Py_VISIT(self->hub);
    Py_VISIT(self->engine);
    Py_VISIT(self->on_end);
    Py_VISIT(self->timer);
    Py_VISIT(self->on_linger_closed);
    return 0;
}

static int FdPair_clear(FdPair *self) {
    Py_CLEAR(self->engine);
    Py_CLEAR(self->on_end);
    Py_CLEAR(self->timer);
    Py_CLEAR(self->on_linger_closed);
    return 0;
}

static void FdPair_dealloc(FdPair *self) {
    PyObject_GC_UnTrack(self);
    for (int i = 0; i < 2; i++) {
        Half *h = &self->h[i];
        if (h->fd >= 0) close(h->fd); /* not reached: the hub owns a pair with a descriptor */
        free(h->out);
    }
    FdPair_clear(self);
    Py_CLEAR(self->hub);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* FdPair(hub, client_fd, on_end, buffer_bytes): owns client_fd from now on, reads it at once. */
static PyObject *FdPair_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *hub, *on_end;
    int fd;
    Py_ssize_t cap;
    if (!PyArg_ParseTuple(args, "O!iOn", &HubType, &hub, &fd, &on_end, &cap)) return NULL;
    FdPair *self = (FdPair *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    Py_INCREF(hub);
    self->hub = (Hub *)hub;
    Py_INCREF(on_end);
    self->on_end = on_end;
    self->pending_cap = cap;
    self->reply_cap = HIGH_WATER + cap;
    for (int i = 0; i < 2; i++) {
        self->h[i].pair = self;
        self->h[i].idx = i;
        self->h[i].fd = -1;
    }
    self->h[0].fd = fd;
    self->state = S_CONNECTING;
    pair_own(self); /* until both descriptors are closed */
    half_update(&self->h[0]);
    return (PyObject *)self;
}

/* set_engine(engine): the connection's engine reads for it and writes through it. */
static PyObject *FdPair_set_engine(FdPair *self, PyObject *engine) {
    if (Py_TYPE(engine) != &EngineType) {
        PyErr_SetString(PyExc_TypeError, "set_engine() takes a proxyd._native.Engine");
        return NULL;
    }
    Py_INCREF(engine);
    Py_XSETREF(self->engine, engine);
    PyObject *r = PyObject_CallMethod(engine, "relay", "OO", self, self);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static int sockaddr_of(int family, PyObject *host, int port, struct sockaddr_storage *ss, socklen_t *len) {
    const char *ip = PyUnicode_AsUTF8(host);
    if (ip == NULL) return -1;
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, ip, &a->sin6_addr) != 1) goto bad;
        *len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, ip, &a->sin_addr) != 1) goto bad;
        *len = sizeof *a;
    }
    return 0;
bad:
    PyErr_Format(PyExc_ValueError, "not an IP address: %R", host);
    return -1;
}

static PyObject *addr_tuple(const struct sockaddr_storage *ss);

/* connect(family, ip, port, mark, want_local) -> (connected, local or None). Raises OSError
 * (socket, SO_MARK, an immediate connect failure): the caller reports it as a connect failure. */
static PyObject *FdPair_connect(FdPair *self, PyObject *args) {
    int family, port, mark, want_local;
    PyObject *host;
    if (!PyArg_ParseTuple(args, "iUiip", &family, &host, &port, &mark, &want_local)) return NULL;
    if (self->state != S_CONNECTING || self->h[1].fd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "connect() once, before the end");
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t slen;
    if (sockaddr_of(family, host, port, &ss, &slen) < 0) return NULL;
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    if (mark >= 0 && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark) < 0) goto fail;
    if (connect(fd, (struct sockaddr *)&ss, slen) < 0 && errno != EINPROGRESS) goto fail;
    PyObject *local = Py_None;
    Py_INCREF(local);
    if (want_local) {
        struct sockaddr_storage ls;
        socklen_t ll = sizeof ls;
        if (getsockname(fd, (struct sockaddr *)&ls, &ll) == 0) {
            Py_DECREF(local);
            local = addr_tuple(&ls);
            if (local == NULL) {
                close(fd);
                return NULL;
            }
        }
    }
    self->h[1].fd = fd;
    /* connected already? On loopback the handshake is over when connect() returns (relay.py) */
    struct sockaddr_storage ps;
    socklen_t pl = sizeof ps;
    int done = getpeername(fd, (struct sockaddr *)&ps, &pl) == 0;
    if (done) pair_connected(self);
    else half_update(&self->h[1]);
    return Py_BuildValue("(NN)", PyBool_FromLong(done), local);
fail:;
    int err = errno;
    close(fd);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* The connect_timeout timer fired. */
static PyObject *FdPair_connect_timeout(FdPair *self, PyObject *unused) {
    Py_CLEAR(self->timer); /* it fired: nothing to cancel */
    pair_connect_failed(self, CONNECT_TIMER);
    Py_RETURN_NONE;
}

/* connect_failed(errno): an immediate connect failure, reported from the event loop. */
static PyObject *FdPair_connect_failed(FdPair *self, PyObject *arg) {
    int err = PyLong_AsLong(arg);
    if (err == -1 && PyErr_Occurred()) return NULL;
    pair_connect_failed(self, err);
    Py_RETURN_NONE;
}

/* close(verdict, reason, abort): relay.py's close_now and timeouts (abort), policy ends. */
static PyObject *FdPair_close(FdPair *self, PyObject *args) {
    PyObject *verdict, *reason;
    int abort = 0;
    if (!PyArg_ParseTuple(args, "UO|p", &verdict, &reason, &abort)) return NULL;
    self->depth++;
    pair_finish(self, verdict, reason == Py_None ? NULL : reason, abort, -1, 0);
    self->depth--;
    Py_RETURN_NONE;
}

/* abort(): the CLOSE_LINGER timer: a side still flushing after the end is aborted. */
static PyObject *FdPair_abort(FdPair *self, PyObject *unused) {
    Py_CLEAR(self->timer);
    for (int i = 0; i < 2; i++) half_close(&self->h[i], 0);
    Py_RETURN_NONE;
}

/* _on_hold(reply, held): the engine holds (or releases) a direction (relay.py's _on_hold). */
static PyObject *FdPair_on_hold(FdPair *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_on_hold(reply, held)");
        return NULL;
    }
    int reply = PyObject_IsTrue(args[0]), held = PyObject_IsTrue(args[1]);
    if (reply < 0 || held < 0) return NULL;
    if (self->state == S_CLOSED) Py_RETURN_NONE;
    Half *h = &self->h[reply ? 1 : 0];
    if (held) {
        pause_side(h, P_HELD);
    } else {
        resume_side(h, P_HELD);
        if (h->eof) half_maybe_shutdown(&self->h[reply ? 0 : 1]);
    }
    pair_deferred(self);
    Py_RETURN_NONE;
}

/* counters() -> (read from the client, written to the client, read from the upstream) */
static PyObject *FdPair_counters(FdPair *self, PyObject *unused) {
    return Py_BuildValue("(LLL)", self->h[0].rx, self->h[0].tx, self->h[1].rx);
}

static PyObject *FdPair_get_timer(FdPair *self, void *c) {
    PyObject *t = self->timer ? self->timer : Py_None;
    Py_INCREF(t);
    return t;
}

static int FdPair_set_timer(FdPair *self, PyObject *v, void *c) {
    if (v == Py_None) v = NULL;
    Py_XINCREF(v);
    Py_XSETREF(self->timer, v);
    return 0;
}

static PyObject *FdPair_get_on_linger_closed(FdPair *self, void *c) {
    PyObject *t = self->on_linger_closed ? self->on_linger_closed : Py_None;
    Py_INCREF(t);
    return t;
}

static int FdPair_set_on_linger_closed(FdPair *self, PyObject *v, void *c) {
    if (v == Py_None) v = NULL;
    Py_XINCREF(v);
    Py_XSETREF(self->on_linger_closed, v);
    return 0;
}

static PyObject *FdPair_get_connected(FdPair *self, void *c) { return PyBool_FromLong(self->state == S_OPEN); }

static PyObject *FdPair_get_closed(FdPair *self, void *c) { return PyBool_FromLong(self->state == S_CLOSED); }

static PyObject *FdPair_get_buffered(FdPair *self, void *c) {
    return Py_BuildValue("(nn)", (Py_ssize_t)self->h[0].len, (Py_ssize_t)self->h[1].len);
}

static PyMethodDef FdPair_methods[] = {
    {"set_engine", (PyCFunction)FdPair_set_engine, METH_O, "Read and write through this engine."},
    {"connect", (PyCFunction)FdPair_connect, METH_VARARGS, "Start the upstream connect."},
    {"connect_timeout", (PyCFunction)FdPair_connect_timeout, METH_NOARGS, "connect_timeout passed."},
    {"connect_failed", (PyCFunction)FdPair_connect_failed, METH_O, "The connect failed with errno."},
    {"close", (PyCFunction)FdPair_close, METH_VARARGS, "End the connection: close(verdict, reason, abort)."},
    {"abort", (PyCFunction)FdPair_abort, METH_NOARGS, "Abort a side still flushing after the end."},
    {"_on_hold", (PyCFunction)(void (*)(void))FdPair_on_hold, METH_FASTCALL, "The engine's on_hold."},
    {"counters", (PyCFunction)FdPair_counters, METH_NOARGS, "(client rx, client tx, upstream rx)."},
    {NULL},
};

static PyGetSetDef FdPair_getset[] = {
    {"timer", (getter)FdPair_get_timer, (setter)FdPair_set_timer, "The pending timer's handle.", NULL},
    {"on_linger_closed", (getter)FdPair_get_on_linger_closed, (setter)FdPair_set_on_linger_closed,
     "Called as each side still flushing at the end is closed.", NULL},
    {"connected", (getter)FdPair_get_connected, NULL, "The upstream is connected and open.", NULL},
    {"closed", (getter)FdPair_get_closed, NULL, "The connection has ended.", NULL},
    {"buffered", (getter)FdPair_get_buffered, NULL, "Bytes waiting for (client, upstream).", NULL},
    {NULL},
};

PyTypeObject FdPairType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.FdPair",
    .tp_doc = "A relayed connection on its two descriptors (proxyd/nativerelay.py).",
    .tp_basicsize = sizeof(FdPair),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = FdPair_new,
    .tp_dealloc = (destructor)FdPair_dealloc,
    .tp_traverse = (traverseproc)FdPair_traverse,
    .tp_clear = (inquiry)FdPair_clear,
    .tp_methods = FdPair_methods,
    .tp_getset = FdPair_getset,
};

/* ---------------------------------------------------------------------------------------- */
/* Hub                                                                                         */

static PyObject *Hub_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (!PyArg_ParseTuple(args, "")) return NULL;
    Hub *self = (Hub *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->epfd = -1;
    self->rbuf = malloc(RBUF_SIZE);
    self->dead = PyList_New(0);
    if (self->rbuf == NULL || self->dead == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)self;
}

static void Hub_dealloc(Hub *self) {
    if (self->epfd >= 0) close(self->epfd);
    free(self->rbuf);
    Py_XDECREF(self->dead);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Hub_fileno(Hub *self, PyObject *unused) { return PyLong_FromLong(self->epfd); }

/* run(): the event loop's reader of the epoll set: dispatch what is ready, without blocking. */
static PyObject *Hub_run(Hub *self, PyObject *unused) {
    struct epoll_event evs[BATCH];
    int n = epoll_wait(self->epfd, evs, BATCH, 0);
    if (n <= 0) Py_RETURN_NONE;
    self->running++;
    for (int i = 0; i < n; i++) {
        Half *h = evs[i].data.ptr;
        FdPair *p = h->pair;
        uint32_t ev = evs[i].events;
        if (h->fd < 0) continue; /* closed earlier in this batch (kept alive by dead) */
        Py_INCREF(p);
        p->depth++;
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP) && (h->ev & EPOLLOUT)) half_writable(h);
        if (h->fd >= 0 && p->state != S_CLOSED && (h->ev & EPOLLIN) && (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)))
            half_read(h);
        p->depth--;
        pair_deferred(p);
        Py_DECREF(p);
    }
    self->running--;
    if (!self->running && PyList_GET_SIZE(self->dead)) {
        PyObject *dead = self->dead;
        self->dead = PyList_New(0);
        Py_DECREF(dead);
        if (self->dead == NULL) return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Hub_methods[] = {
    {"fileno", (PyCFunction)Hub_fileno, METH_NOARGS, "The epoll descriptor the event loop reads."},
    {"run", (PyCFunction)Hub_run, METH_NOARGS, "Dispatch what is ready (the event loop's reader)."},
    {NULL},
};

PyTypeObject HubType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.Hub",
    .tp_doc = "The epoll set of the native connections of one event loop.",
    .tp_basicsize = sizeof(Hub),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Hub_new,
    .tp_dealloc = (destructor)Hub_dealloc,
    .tp_methods = Hub_methods,
};

/* ---------------------------------------------------------------------------------------- */
/* Acceptor                                                                                    */

typedef struct {
    PyObject_HEAD
    int fd;
    int batch;
    PyObject *on_accept; /* (fd, peer_ip, peer_port, local_ip, local_port) -> keep accepting */
    PyObject *on_error;  /* (errno): EMFILE, ENFILE */
} Acceptor;

/* (ip, port) with an IPv4-mapped IPv6 address written as IPv4 (origdst.unmap). */
static PyObject *addr_tuple(const struct sockaddr_storage *ss) {
    char ip[INET6_ADDRSTRLEN];
    int port;
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) inet_ntop(AF_INET, &a->sin6_addr.s6_addr[12], ip, sizeof ip);
        else inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
        port = ntohs(a->sin6_port);
    } else if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
        port = ntohs(a->sin_port);
    } else {
        PyErr_SetString(PyExc_ValueError, "not an IP socket");
        return NULL;
    }
    return Py_BuildValue("(si)", ip, port);
}

static PyObject *Acceptor_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    int fd, batch;
    PyObject *on_accept, *on_error;
    if (!PyArg_ParseTuple(args, "iiOO", &fd, &batch, &on_accept, &on_error)) return NULL;
    Acceptor *self = (Acceptor *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->fd = fd;
    self->batch = batch;
    Py_INCREF(on_accept);
    self->on_accept = on_accept;
    Py_INCREF(on_error);
    self->on_error = on_error;
    return (PyObject *)self;
}

static int Acceptor_traverse(Acceptor *self, visitproc visit, void *arg) {
    Py_VISIT(self->on_accept);
    Py_VISIT(self->on_error);
    return 0;
}

static int Acceptor_clear(Acceptor *self) {
    Py_CLEAR(self->on_accept);
    Py_CLEAR(self->on_error);
    return 0;
}

static void Acceptor_dealloc(Acceptor *self) {
    PyObject_GC_UnTrack(self);
    Acceptor_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* on_readable(): accept what waits, up to batch; each accepted socket goes to on_accept, which
 * owns its descriptor from then on (and may stop the batch by returning False). */
static PyObject *Acceptor_on_readable(Acceptor *self, PyObject *unused) {
    for (int i = 0; i < self->batch && self->on_accept != NULL; i++) {
        struct sockaddr_storage peer, local;
        socklen_t pl = sizeof peer, ll = sizeof local;
        int fd = accept4(self->fd, (struct sockaddr *)&peer, &pl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            if (err == EAGAIN || err == EWOULDBLOCK) break;
            if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
                PyObject *r = PyObject_CallFunction(self->on_error, "i", err);
                if (r == NULL) PyErr_WriteUnraisable(self->on_error);
                Py_XDECREF(r);
                break;
            }
            if (err == EBADF || err == EINVAL || err == ENOTSOCK) break; /* the listener is gone */
            continue; /* ECONNABORTED and the like: the next one */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* as uvloop does */
        PyObject *pa = NULL, *la = NULL;
        if (getsockname(fd, (struct sockaddr *)&local, &ll) < 0 || (pa = addr_tuple(&peer)) == NULL ||
            (la = addr_tuple(&local)) == NULL) {
            /* reset before it was handed to us: nothing to relay or log (relay.py's accept) */
            PyErr_Clear();
            Py_XDECREF(pa);
            close(fd);
            continue;
        }
        PyObject *r = PyObject_CallFunction(self->on_accept, "iOOOO", fd, PyTuple_GET_ITEM(pa, 0),
                                            PyTuple_GET_ITEM(pa, 1), PyTuple_GET_ITEM(la, 0),
                                            PyTuple_GET_ITEM(la, 1));
        Py_DECREF(pa);
        Py_DECREF(la);
        if (r == NULL) {
            PyErr_WriteUnraisable(self->on_accept);
            continue;
        }
        int more = r != Py_False;
        Py_DECREF(r);
        if (!more) break;
    }
    Py_RETURN_NONE;
}

static PyObject *Acceptor_stop(Acceptor *self, PyObject *unused) {
    Acceptor_clear(self);
    Py_RETURN_NONE;
}

static PyMethodDef Acceptor_methods[] = {
    {"on_readable", (PyCFunction)Acceptor_on_readable, METH_NOARGS, "Accept what waits (a reader)."},
    {"stop", (PyCFunction)Acceptor_stop, METH_NOARGS, "Accept nothing more; drop the callbacks."},
    {NULL},
};

PyTypeObject AcceptorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxyd._native.Acceptor",
    .tp_doc = "accept4() in a loop on a listening socket, for the native relay.",
    .tp_basicsize = sizeof(Acceptor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Acceptor_new,
    .tp_dealloc = (destructor)Acceptor_dealloc,
    .tp_traverse = (traverseproc)Acceptor_traverse,
    .tp_clear = (inquiry)Acceptor_clear,
    .tp_methods = Acceptor_methods,
};

int relay_init(void) {
    s_cancel = PyUnicode_InternFromString("cancel");
    s_feed_eof = PyUnicode_InternFromString("feed_eof");
    s_forwarded = PyUnicode_InternFromString("forwarded");
    s_error_v = PyUnicode_InternFromString("error");
    if (!s_cancel || !s_feed_eof || !s_forwarded || !s_error_v) return -1;
    if (PyType_Ready(&FdPairType) < 0 || PyType_Ready(&HubType) < 0 || PyType_Ready(&AcceptorType) < 0)
        return -1;
    return 0;
}
