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
    const FlatValues *raw; /* the key, when it came raw (key NULL) */
} RdFlatRequest;

static PyObject *rd_flat_build(const FlatRequest *r) {
    const RdFlatRequest *q = (const RdFlatRequest *)r;
    PyObject *key = q->key;
    if (key == NULL && q->raw != NULL && (key = flat_raw_bytes(q->raw)) == NULL) return NULL;
    return redis_request(q->name, q->cmd_base, q->cats, key);
}

/* The command's fields (name, base, known) are fixed by its table entry: flat_decide remembers
 * the rules they leave, per connection, and only the key is compared per request. */
int redis_flat_decide(FlatPolicy *fp, PyObject *ctx, PyObject *name, PyObject *base, PyObject *cats, PyObject *key,
                      const char *kp, Py_ssize_t kn, PyObject **made, PyObject **decision, int *audit) {
    PyObject *known = Py_True;
    /* set member by member: an initializer would zero the whole of both structs first (a rep
     * stos as long as the rest of the question); raw, rawlen and made are read only when v is
     * NULL */
    FlatValues fields[4];
    fields[0].v = &name;
    fields[1].v = &base;
    fields[2].v = &known;
    fields[0].n = fields[1].n = fields[2].n = 1;
    fields[3].v = key != NULL ? &key : NULL;
    fields[3].n = key != NULL || kp != NULL;
    fields[3].raw = kp;
    fields[3].rawlen = kn;
    fields[3].made = made;
    RdFlatRequest req;
    req.base.fields = fields;
    req.base.build = rd_flat_build;
    req.name = name;
    req.cmd_base = base;
    req.cats = cats;
    req.key = key;
    req.raw = key == NULL && kp != NULL ? &fields[3] : NULL;
    return flat_decide(fp, ctx, &req.base, 3, decision, audit);
}
