/* The twin of proxyd/parsers/redis/rules.py's request side: the RedisRequest the policy is asked
 * about, and its values for the flattened-policy interface (RedisRequest.values; the fields
 * RedisRule.flat's conditions read). The rules themselves are evaluated by policy.c from the
 * connection's FlatPolicy (docs/native.md); redis.c asks once per key (or once keyless). */
#include "native.h"

/* rules.py FIELD_NAME, FIELD_BASE, FIELD_KNOWN, FIELD_KEY: the order of RdFlatRequest's values */
const char *const REDIS_FIELDS[] = {"name", "base", "known", "key", NULL};

/* One question: tuple.__new__(RedisRequest, (name, base, categories, True, key)) */
PyObject *redis_request(PyObject *name, PyObject *base, PyObject *cats, PyObject *key) {
    PyObject *inner = PyTuple_Pack(5, name, base, cats, Py_True, key ? key : Py_None);
    if (inner == NULL) return NULL;
    PyObject *args = PyTuple_Pack(1, inner);
    Py_DECREF(inner);
    if (args == NULL) return NULL;
    PyObject *req = PyTuple_Type.tp_new((PyTypeObject *)g_RedisRequest, args, NULL);
    Py_DECREF(args);
    return req;
}

typedef struct {
    FlatRequest base;
    PyObject *name, *cmd_base, *cats, *key;
} RdFlatRequest;

static PyObject *rd_flat_build(const FlatRequest *r) {
    const RdFlatRequest *q = (const RdFlatRequest *)r;
    return redis_request(q->name, q->cmd_base, q->cats, q->key);
}

int redis_flat_matches(FlatPolicy *fp, PyObject *ctx, PyObject *name, PyObject *base, PyObject *cats,
                       PyObject *key) {
    PyObject *known = Py_True; /* the twin only decides commands of the table */
    FlatValues fields[4] = {{&name, 1}, {&base, 1}, {&known, 1}, {key ? &key : NULL, key ? 1 : 0}};
    RdFlatRequest req = {{fields, rd_flat_build}, name, base, cats, key};
    return flat_matches(fp, ctx, &req.base);
}
