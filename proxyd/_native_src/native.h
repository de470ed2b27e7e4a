/* proxyd._native: the compiled twin of proxyd.engine.PyEngine and of the memcache parser.
 *
 * One C file per Python reference module, each following its reference statement by
 * statement, in the same order, so the two can be read side by side:
 *   engine.c    proxyd/engine.py (PyEngine: the verdict engine)
 *   memcache.c  proxyd/parsers/memcache/{parser,common,text,binary}.py (framing, pending queue,
 *               denial placement, text/meta and binary dialects)
 *   policy.c    proxyd/policy/flat.py (the flattened-policy interface: a connection's rules
 *               as plain data, evaluated in C as flat.evaluate does)
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

extern PyTypeObject EngineType;     /* engine.c */
extern PyTypeObject MemcacheType;   /* memcache.c */
extern PyTypeObject LazyFieldsType; /* memcache.c */

/* memcache.c: intern the command and opcode names, ready the types. 0 or -1. */
int memcache_init(void);

/* ------------------------------------------------------------------------------------------ */
/* The flattened per-connection policy (policy.c), embedded in a native parser.                */

/* The version of the interface proxyd.policy.flat describes (docs/native.md); setup_policy()
 * refuses another. */
#define FLAT_POLICY_VERSION 2

/* The values a request has for one field of the parser's schema (borrowed; n == 0: none). */
typedef struct FlatValues {
    PyObject *const *v;
    Py_ssize_t n;
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
    struct FlatRule *rules;
    Py_ssize_t n;
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

#endif /* PROXYD_NATIVE_H */
