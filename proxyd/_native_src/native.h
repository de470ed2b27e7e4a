/* proxyd._native: the compiled twin of proxyd.engine.PyEngine and of the memcache, redis and http parsers.
 *
 * One C file per Python reference module, each following its reference statement by
 * statement, in the same order, so the two can be read side by side:
 *   engine.c    proxyd/engine.py (PyEngine: the verdict engine)
 *   memcache.c  proxyd/parsers/memcache/{parser,common,text,binary}.py (framing, pending queue,
 *               denial placement, text/meta and binary dialects)
 *   policy.c    proxyd/policy/flat.py (the flattened-policy interface: a connection's rules
 *               as plain data, evaluated in C as flat.evaluate does)
 *   redis.c     proxyd/parsers/redis/parser.py's common case (whole requests of simple commands
 *               and MULTI/EXEC/DISCARD, their policy (policy.c), top-level string, integer and
 *               flat array replies, denials in place), handing every other request or reply to
 *               the reference RedisParser at the offset where it starts
 *   redis_resp.c  proxyd/parsers/redis/resp.py: the request and reply framing redis.c reads itself
 *   redis_rules.c proxyd/parsers/redis/rules.py: RedisRequest and its flat values
 *   http_framing.c  proxyd/parsers/http/framing.py (the heads the common states read)
 *   http_rules.c    proxyd/parsers/http/rules.py: HttpRequest's flat values
 *   http_parser.c   proxyd/parsers/http/parser.py (common states; the rest handed to the reference)
 *   relay.c     proxyd/relay.py's Connection on the two descriptors (accept, connect, relay,
 *               flow control, half-close, resets, close), driven by its own epoll (nativerelay.py)
 *   module.c    PyInit, the setup functions that hand the Python pieces over, shared state
 * This header holds what more than one of them uses. tests/test_native_equivalence.py drives
 * both implementations with the same inputs and compares ops, bytes, log entries and errors.
 * Where the reference relies on a Python behaviour that is rare and subtle (unpacking a verdict
 * that is not a 2-tuple, comparing an op that is not an int, naming an op in a message), the
 * C side calls back into small helpers of engine.py, so the outcome is the reference's by
 * construction.
 *
 * Safety on untrusted bytes: every read of the input is bounded by the length snapshot taken at
 * the start of a parser call, and no pointer into a buffer is used after a call back into
 * Python (policy, log, inject), which could change that buffer. CI builds these files with
 * -fsanitize=address,undefined and runs the equivalence and fuzz properties under it.
 */
#ifndef PROXYD_NATIVE_H
#define PROXYD_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Objects handed over by proxyd.engine and proxyd.parsers.memcache (module.c, setup*()).     */

extern PyObject *g_EngineError;       /* proxyd.engine.EngineError */
extern PyObject *g_ops[7];            /* Op members by value, [0] unused */
extern PyObject *g_unpack;            /* engine._unpack(result) -> (op, n), raising like `op, n = r` */
extern PyObject *g_opcode;            /* engine._opcode(op) -> 0..6 by == comparisons */
extern PyObject *g_opname;            /* engine._name(op) -> str */
extern PyObject *g_MemcacheRequest;   /* memcache.rules.MemcacheRequest */
extern PyObject *g_ET_REQUEST, *g_ET_RESPONSE, *g_ET_DENIED;
extern PyObject *g_Context;           /* proxyd.context.Context */
extern PyObject *g_ALLOWED;           /* proxyd.context.ALLOWED */
extern PyObject *g_key_text;          /* memcache.common.key_text: how wire bytes appear in log fields */
extern PyObject *s_last_decision, *s_audit;

/* interned strings and constants (module.c) */
extern PyObject *s_write, *s_pause_reading; /* transport methods (engine.c relay) */
extern PyObject *s_on_data, *s_op, *s_passed, *s_dropped, *s_injected, *s_matches, *s_log,
    *s_inject, *s_code, *s_command, *s_keys, *s_status, *s_error, *s_opcode, *s_key,
    *s_buffer_limit, *s_exception, *s_contract, *s_parser_error, *s_empty_str;
extern PyObject *s_denied_reply;   /* bytes */
extern PyObject *s_text_barrier;   /* bytes */
extern PyObject *s_bin_barrier;    /* bytes */
extern PyObject *s_unsolicited;    /* "unsolicited" */
extern PyObject *s_empty_bytes, *s_empty_tuple;

enum { OP_MORE = 1, OP_PASS = 2, OP_DROP = 3, OP_INJECT = 4, OP_ERROR = 5, OP_NOP = 6 };

/* ------------------------------------------------------------------------------------------ */
/* Native parsers share this header so the engine can call them without a Python call.        */

struct NativeParser;
typedef int (*native_on_data_fn)(struct NativeParser *self, int reply, int end_stream,
                                 PyObject *buf, long long *n);

typedef struct NativeParser {
    PyObject_HEAD
    native_on_data_fn on_data;
} NativeParser;
/* engine.c: the parser API's on_data(reply, end_stream, data) -> (op, n) for a native parser
 * called from Python (tests, third-party engines), through its on_data function: one argument
 * check and one result shape for every twin. */
PyObject *native_parser_py_on_data(NativeParser *p, PyObject *const *args, Py_ssize_t nargs);

extern PyTypeObject EngineType;     /* engine.c */
/* engine.c, for relay.c: the engine as the reader of a native connection (read_client and
 * read_server without the pause, which relay.c enforces itself; the bytes taken where the
 * relay read them, appended to the side's buffer with no bytes object between), and two of
 * its states */
int engine_relay_read(PyObject *engine, int reply, const char *p, Py_ssize_t n);
int engine_relay_held(PyObject *engine, int reply);
int engine_relay_failed(PyObject *engine);
/* relay.c: a native connection (the twin of relay.py's Connection on descriptors) is a relay
 * target the engine writes to without a call: fdpair_emit(pair, reply, data), 0 or -1 */
extern PyTypeObject FdPairType, HubType, AcceptorType;
int fdpair_emit(PyObject *pair, int reply, PyObject *data);
int relay_init(void); /* relay.c: its names and types. 0 or -1. */
extern PyTypeObject MemcacheType;   /* memcache.c */
extern PyTypeObject LazyFieldsType; /* memcache.c */
extern PyTypeObject RedisType;      /* redis.c */
extern PyTypeObject RedisFieldsType; /* redis.c */
/* handed over by proxyd.parsers.redis (setup_redis) */
extern PyObject *g_RedisParser, *g_RedisRequest, *g_redis_key_text, *g_redis_table, *s_noperm;

/* memcache.c: intern the command and opcode names, ready the types. 0 or -1. */
int memcache_init(void);
/* redis.c: intern its attribute names. 0 or -1. */
int redis_init(void);

/* ------------------------------------------------------------------------------------------ */
/* The flattened per-connection policy (policy.c), embedded in a native parser.                */

/* The version of the interface proxyd.policy.flat describes (docs/native.md); setup_policy()
 * refuses another. */
#define FLAT_POLICY_VERSION 2

/* The values a request has for one field of the parser's schema (borrowed; n == 0: none).
 * A single bytes value may come raw instead (v NULL, n 1, raw/rawlen into the parser's
 * buffer): exact and prefix conditions on bytes compare it where it lies, and any other
 * condition makes it a bytes object in *made first (a new reference the caller then owns,
 * NULL until then). Nothing reads raw after a condition has called Python. */
typedef struct FlatValues {
    PyObject *const *v;
    Py_ssize_t n;
    const char *raw;
    Py_ssize_t rawlen;
    PyObject **made;
} FlatValues;

/* A request as flat conditions see it: its values by field (indexed like the parser's schema,
 * the NULL-terminated field names given to flat_init), and how to build the Python request
 * object a "call" condition is given (new reference). A parser embeds it first in its own
 * struct to reach its data from build. */
typedef struct FlatRequest {
    const FlatValues *fields;
    PyObject *(*build)(const struct FlatRequest *req);
} FlatRequest;

struct FlatRule;
struct FlatCond;

/* Partial evaluations of a FlatPolicy (flat_decide), kept in the parser's object: a question
 * then reads lines already in cache, not the policy's scattered tuples and rule arrays. */
#define FLAT_MEMOS 8        /* per connection: distinct commands remembered */
#define FLAT_MEMO_FIELDS 4  /* fixed fields at most */
#define FLAT_MEMO_OP 24     /* exact/prefix bytes operands up to this long are copied in */

/* A condition a memo leaves open */
typedef struct FlatMemoCond {
    struct FlatCond *cond; /* the condition, for the general test */
    int field;
    int raw_form;          /* exact or prefix with a short bytes operand (copied to op); 0: general */
    Py_ssize_t oplen;
    char op[FLAT_MEMO_OP];
} FlatMemoCond;

/* A rule a memo keeps: its decision and its open conditions (conds[first, first + ncond)) */
typedef struct FlatMemoRule {
    PyObject *decision;    /* borrowed from the FlatPolicy tuple */
    int forwards, audit;
    Py_ssize_t first, ncond;
} FlatMemoRule;

typedef struct FlatMemo {
    int nfixed;                         /* 0: an empty slot */
    PyObject *fixed[FLAT_MEMO_FIELDS];  /* strong: the value of each fixed field */
    Py_ssize_t n;                       /* the rules left, in order; the last may have no open condition */
    FlatMemoRule *rules;                /* one block: the rules, then their conditions */
    FlatMemoCond *conds;
} FlatMemo;

/* A connection's FlatPolicy tuple (ctx.policy.flat()), held and converted to C structs. */
typedef struct FlatPolicy {
    const char *const *schema; /* the field names the parser gives values for */
    int ok;                    /* the context is a Context: its policy may be flattened */
    PyObject *policy;          /* the ctx.policy the copy came from (strong), NULL: none yet */
    PyObject *flat;            /* policy.flat() (strong), NULL: the policy has no flat form */
    int usable;                /* every part of flat is a form this build reads */
    PyObject *stamp, *cell;    /* FlatPolicy.stamp and .current (borrowed from flat) */
    PyObject *always, *otherwise; /* decisions (borrowed), always NULL: none */
    int always_forwards, otherwise_forwards;
    int always_audit, otherwise_audit; /* decision.audit, read once */
    struct FlatRule *rules;
    Py_ssize_t n;
    int memoizable;            /* every condition is in, exact, prefix or regex (flat_decide) */
    FlatMemo memos[FLAT_MEMOS];
    int memo_next, memo_last;  /* the slot the next new memo takes; the last one used */
} FlatPolicy;

/* Intern policy.c's names. 0 or -1. */
int policy_init(void);
/* Start over for a connection: the parser's schema, and whether ctx is a Context. */
void flat_init(FlatPolicy *fp, const char *const *schema, int ok);
/* Release everything held (the FlatPolicy can be loaded again afterwards). */
void flat_clear(FlatPolicy *fp);
/* ctx.matches(request) through the flat policy: 1, 0, -1; or 2 when it does not apply (the
 * caller then calls ctx.matches). Sets ctx.last_decision as Context.matches does. */
int flat_matches(FlatPolicy *fp, PyObject *ctx, const FlatRequest *req);
/* The decision flat_matches would set, without setting it: 1 or 0 (forwards) with *decision
 * (borrowed from the FlatPolicy: valid until the next call that may run Python) and *audit
 * (decision.audit), -1, or 2
 * when the flat policy does not apply (nothing decided). The fields [0, nfixed) must each have
 * one object value that is a function of the parser's command alone (redis: name, base,
 * known): the conditions on them are evaluated once per connection for those objects and
 * remembered, so a request costs only its conditions on the other fields (docs/native.md). */
int flat_decide(FlatPolicy *fp, PyObject *ctx, const FlatRequest *req, int nfixed, PyObject **decision, int *audit);
/* A raw value (v NULL) as bytes, made once into *fv->made: borrowed, or NULL with an exception */
PyObject *flat_raw_bytes(const FlatValues *fv);
/* A Context's (Py_TYPE(ctx) == g_Context: fixed __slots__ layout) last_decision, read and set
 * through its slot as the member descriptor would, without the attribute lookup: new
 * reference or NULL with an exception; 0 or -1. Any other ctx goes through getattr/setattr. */
PyObject *ctx_get_last_decision(PyObject *ctx);
int ctx_set_last_decision(PyObject *ctx, PyObject *decision);
/* decision.audit's truth (an L7Decision, frozen with __slots__: read through its slot): 1, 0, -1 */
int decision_audit(PyObject *decision);

/* ------------------------------------------------------------------------------------------ */
/* The redis twin: redis.c (parser.py), redis_resp.c (resp.py), redis_rules.c (rules.py).      */

#define REDIS_MAX_ARGS 64 /* more arguments: the reference frames the request */

/* redis_resp.c: framing, each bounded by have */
Py_ssize_t resp_find_cr(const char *d, Py_ssize_t from, Py_ssize_t to, Py_ssize_t have);
Py_ssize_t resp_find_crlf(const char *d, Py_ssize_t from, Py_ssize_t to, Py_ssize_t have);
long long resp_plain_len(const char *d, Py_ssize_t a, Py_ssize_t b);
int resp_int_line(const char *d, Py_ssize_t a, Py_ssize_t eol);
int resp_frame_request(Py_ssize_t budget, Py_ssize_t max_bulk, const char *d, Py_ssize_t have, Py_ssize_t base,
                       Py_ssize_t *argc, Py_ssize_t *starts, Py_ssize_t *lens, Py_ssize_t *end);
int resp_frame_inline(const char *d, Py_ssize_t have, Py_ssize_t base, Py_ssize_t *argc, Py_ssize_t *starts,
                      Py_ssize_t *lens, Py_ssize_t *end);
Py_ssize_t resp_flat_array(const char *d, Py_ssize_t have, Py_ssize_t pos, Py_ssize_t eol);

/* redis_rules.c: the request side of rules.py */
extern const char *const REDIS_FIELDS[]; /* the flat fields of a redis request (FlatPolicy schema) */
/* ctx.matches(RedisRequest(name, base, cats, True, key)) through flat_decide (nothing set in
 * ctx): 1, 0, -1, or 2 when it does not apply (the caller calls ctx.matches). The key as an
 * object (key), raw (kp, kn; made into bytes in *made if a condition needs the object), or
 * none (both NULL: keyless) */
int redis_flat_decide(FlatPolicy *fp, PyObject *ctx, PyObject *name, PyObject *base, PyObject *cats, PyObject *key,
                      const char *kp, Py_ssize_t kn, PyObject **made, PyObject **decision, int *audit);
PyObject *redis_request(PyObject *name, PyObject *base, PyObject *cats, PyObject *key);

/* http: http_framing.c (framing.py), http_rules.c (rules.py, flattened), http_parser.c       */
/* (parser.py). The twin handles the common states and hands the rest to the reference parser. */

extern PyTypeObject HttpType;          /* http_parser.c */
extern PyObject *g_HttpRequest;        /* http.rules.HttpRequest */
extern PyObject *g_ET_H_REQUEST, *g_ET_H_RESPONSE;

/* A request or response head the fast subset of framing.py accepted (offsets into the data). */
typedef struct HttpHead {
    Py_ssize_t method_len;             /* the method is data[0:method_len] */
    Py_ssize_t target_off, target_len;
    int v11;                           /* HTTP/1.1 (else 1.0) */
    Py_ssize_t host_off, host_len;     /* the Host value, stripped; host_off < 0: no Host */
    Py_ssize_t fields_off, fields_end; /* the field lines, each with its CRLF */
    long long length;                  /* Content-Length (0: no body) */
    int keep_alive;
    int status;                        /* responses */
    int chunked;                       /* Transfer-Encoding: chunked (one field, that coding alone) */
} HttpHead;
/* A chunk-size line at the start of d (after the previous chunk's CRLF when crlf): its length
 * through the LF and the size; -1 when _chunk_line would ask for more bytes (nothing refused:
 * the line is only judged once its LF is in); 0 when parser.py's _chunk_line must decide (an
 * error, extensions, a size past 2^61). */
Py_ssize_t http_chunk_line(const char *d, Py_ssize_t have, Py_ssize_t limit, int crlf, long long *size,
                           Py_ssize_t *seen);

/* The head at the start of d: its length, or 0 when framing.py must decide (an incomplete head,
 * an error, or a case outside the subset: chunked, CONNECT, an upgrade, a non-origin target...). */
/* ``from``: where the head's end may first be (an incomplete head's lines before it were checked
 * by http_head_more: none is empty), so a head arriving in pieces is searched once. */
Py_ssize_t http_request_head(const char *d, Py_ssize_t have, Py_ssize_t limit, Py_ssize_t from, HttpHead *h);
Py_ssize_t http_response_head(const char *d, Py_ssize_t have, Py_ssize_t limit, Py_ssize_t from, int head_req,
                              HttpHead *h);
/* 1 when HeadReader.scan would answer "more bytes" (nothing refused) for the incomplete head at
 * the start of d; 0 when the reference must decide. Resumes at scan->pos (the lines before it
 * were checked by an earlier call on the same head) and leaves it at the incomplete line, so the
 * work is linear in the head as HeadReader's is. */
typedef struct HeadScan {
    Py_ssize_t pos;   /* where the first line not yet checked starts (0: none checked) */
    Py_ssize_t lines; /* field lines checked */
} HeadScan;
int http_head_more(const char *d, Py_ssize_t have, Py_ssize_t limit, int request, HeadScan *scan);

int http_parser_init(void); /* interns its names */
/* http_parser.c: HttpRequest(method, path, host, version, ((lname, value), ...), []) from a
 * validated field block (new reference) */
PyObject *http_build_request(PyObject *method, PyObject *path, PyObject *host, int v11, PyObject *block);
/* http_rules.c */
extern const char *const HTTP_FIELDS[]; /* the flat fields of an http request (FlatPolicy schema) */
/* ctx.matches(HttpRequest(...)) through the flat policy: 1, 0 (ctx.last_decision set as Context
 * does), -1; or 2 when it does not apply (nothing was set: the caller asks ctx.matches). */
int http_flat_matches(FlatPolicy *fp, PyObject *ctx, PyObject *method, PyObject *path, PyObject *host, int v11,
                      PyObject *block);

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                               */

static inline int bytes_view(PyObject *o, const char **p, Py_ssize_t *n) {
    if (PyByteArray_CheckExact(o)) {
        *p = PyByteArray_AS_STRING(o);
        *n = PyByteArray_GET_SIZE(o);
        return 0;
    }
    if (PyBytes_CheckExact(o)) {
        *p = PyBytes_AS_STRING(o);
        *n = PyBytes_GET_SIZE(o);
        return 0;
    }
    return -1;
}

static inline PyObject *BOOL(int r) { return r ? Py_True : Py_False; }

/* a == b for two str: 1, 0, -1 */
static inline int str_eq(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    int r = PyUnicode_Compare(a, b);
    if (r == -1 && PyErr_Occurred()) return -1;
    return r == 0;
}

#endif /* PROXYD_NATIVE_H */
