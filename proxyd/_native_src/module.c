/* The module proxyd._native: the shared state native.h declares, the setup functions through
 * which proxyd.engine and proxyd.parsers.memcache hand their Python pieces over, and PyInit. */
#include "native.h"

PyObject *g_EngineError;
PyObject *g_ops[7];
PyObject *g_unpack;
PyObject *g_opcode;
PyObject *g_opname;
PyObject *g_MemcacheRequest;
PyObject *g_ET_REQUEST, *g_ET_RESPONSE, *g_ET_DENIED;
PyObject *g_Context;
PyObject *g_ALLOWED;
PyObject *g_key_text;
PyObject *s_last_decision, *s_audit;

PyObject *s_write, *s_pause_reading;
PyObject *s_on_data, *s_op, *s_passed, *s_dropped, *s_injected, *s_matches, *s_log,
    *s_inject, *s_code, *s_command, *s_keys, *s_status, *s_error, *s_opcode, *s_key,
    *s_buffer_limit, *s_exception, *s_contract, *s_parser_error, *s_empty_str;
PyObject *s_denied_reply;
PyObject *s_text_barrier;
PyObject *s_bin_barrier;
PyObject *s_unsolicited;
PyObject *s_empty_bytes, *s_empty_tuple;

static PyObject *mod_setup(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"EngineError", "ops", "unpack", "opcode", "opname", NULL};
    PyObject *err, *ops, *unpack, *opcode, *opname;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOO", kwlist, &err, &ops, &unpack, &opcode, &opname))
        return NULL;
    if (!PySequence_Check(ops) || PySequence_Length(ops) != 6) {
        PyErr_SetString(PyExc_ValueError, "ops: the six Op members in value order");
        return NULL;
    }
    for (int i = 0; i < 6; i++) {
        PyObject *o = PySequence_GetItem(ops, i);
        if (o == NULL) return NULL;
        Py_XSETREF(g_ops[i + 1], o);
    }
    Py_INCREF(err);
    Py_XSETREF(g_EngineError, err);
    Py_INCREF(unpack);
    Py_XSETREF(g_unpack, unpack);
    Py_INCREF(opcode);
    Py_XSETREF(g_opcode, opcode);
    Py_INCREF(opname);
    Py_XSETREF(g_opname, opname);
    Py_RETURN_NONE;
}

static PyObject *mod_setup_memcache(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"MemcacheRequest", "REQUEST", "RESPONSE", "DENIED", "denied_reply",
                             "text_barrier", "binary_barrier", "key_text", NULL};
    PyObject *req, *rq, *rs, *dn, *dr, *tb, *bb, *kt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOSSSO", kwlist, &req, &rq, &rs, &dn, &dr, &tb, &bb, &kt))
        return NULL;
    if (!PyType_Check(req) || !PyType_IsSubtype((PyTypeObject *)req, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "MemcacheRequest must be a tuple subclass");
        return NULL;
    }
#define KEEP(g, v) do { Py_INCREF(v); Py_XSETREF(g, v); } while (0)
    KEEP(g_MemcacheRequest, req);
    KEEP(g_ET_REQUEST, rq);
    KEEP(g_ET_RESPONSE, rs);
    KEEP(g_ET_DENIED, dn);
    KEEP(s_denied_reply, dr);
    KEEP(s_text_barrier, tb);
    KEEP(s_bin_barrier, bb);
    KEEP(g_key_text, kt);
#undef KEEP
    Py_RETURN_NONE;
}

static PyObject *mod_setup_redis(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"RedisParser", "RedisRequest", "key_text", "table", "noperm", "REQUEST", "DENIED",
                             NULL};
    PyObject *rp, *rq, *kt, *tb, *np, *et_rq, *et_dn;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOO!SOO", kwlist, &rp, &rq, &kt, &PyDict_Type, &tb, &np,
                                     &et_rq, &et_dn))
        return NULL;
    if (!PyType_Check(rq) || !PyType_IsSubtype((PyTypeObject *)rq, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "RedisRequest must be a tuple subclass");
        return NULL;
    }
#define KEEP(g, v) do { Py_INCREF(v); Py_XSETREF(g, v); } while (0)
    KEEP(g_RedisParser, rp);
    KEEP(g_RedisRequest, rq);
    KEEP(g_redis_key_text, kt);
    KEEP(g_redis_table, tb);
    KEEP(s_noperm, np);
    KEEP(g_ET_REQUEST, et_rq);
    KEEP(g_ET_DENIED, et_dn);
#undef KEEP
    Py_RETURN_NONE;
}

static PyObject *mod_setup_policy(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"version", "Context", "ALLOWED", NULL};
    int version;
    PyObject *cx, *al;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$iOO", kwlist, &version, &cx, &al))
        return NULL;
    if (version != FLAT_POLICY_VERSION) {
        PyErr_Format(PyExc_ValueError, "flattened-policy interface version %d, this build reads version %d",
                     version, FLAT_POLICY_VERSION);
        return NULL;
    }
#define KEEP(g, v) do { Py_INCREF(v); Py_XSETREF(g, v); } while (0)
    KEEP(g_Context, cx);
    KEEP(g_ALLOWED, al);
#undef KEEP
    Py_RETURN_NONE;
}

static PyObject *mod_setup_http(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"HttpRequest", "REQUEST", "RESPONSE", NULL};
    PyObject *req, *rq, *rs;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOO", kwlist, &req, &rq, &rs)) return NULL;
    if (!PyType_Check(req) || !PyType_IsSubtype((PyTypeObject *)req, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "HttpRequest must be a tuple subclass");
        return NULL;
    }
#define KEEP(g, v) do { Py_INCREF(v); Py_XSETREF(g, v); } while (0)
    KEEP(g_HttpRequest, req);
    KEEP(g_ET_H_REQUEST, rq);
    KEEP(g_ET_H_RESPONSE, rs);
#undef KEEP
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"setup_http", (PyCFunction)(void (*)(void))mod_setup_http, METH_VARARGS | METH_KEYWORDS,
     "Hand the http parser's Python pieces over (called once by proxyd.parsers.http)."},
    {"setup_policy", (PyCFunction)(void (*)(void))mod_setup_policy, METH_VARARGS | METH_KEYWORDS,
     "Hand over the flattened-policy interface (called by proxyd.policy.flat; docs/native.md)."},
    {"setup", (PyCFunction)(void (*)(void))mod_setup, METH_VARARGS | METH_KEYWORDS,
     "Hand the engine's Python pieces over (called once by proxyd.engine)."},
    {"setup_redis", (PyCFunction)(void (*)(void))mod_setup_redis, METH_VARARGS | METH_KEYWORDS,
     "Hand the redis parser's Python pieces over (called once by proxyd.parsers.redis)."},
    {"setup_memcache", (PyCFunction)(void (*)(void))mod_setup_memcache, METH_VARARGS | METH_KEYWORDS,
     "Hand the memcache parser's Python pieces over (called once by proxyd.parsers.memcache)."},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "proxyd._native",
    "Compiled twins of proxyd.engine, the memcache and the http parsers (see proxyd/_native_src/).", -1, module_methods,
};

#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return NULL; } while (0)

PyMODINIT_FUNC PyInit__native(void) {
    INTERN(s_write, "write");
    INTERN(s_pause_reading, "pause_reading");
    INTERN(s_on_data, "on_data");
    INTERN(s_op, "op");
    INTERN(s_passed, "passed");
    INTERN(s_dropped, "dropped");
    INTERN(s_injected, "injected");
    INTERN(s_matches, "matches");
    INTERN(s_log, "log");
    INTERN(s_inject, "inject");
    INTERN(s_code, "code");
    INTERN(s_command, "command");
    INTERN(s_keys, "keys");
    INTERN(s_status, "status");
    INTERN(s_error, "error");
    INTERN(s_opcode, "opcode");
    INTERN(s_key, "key");
    INTERN(s_buffer_limit, "buffer_limit");
    INTERN(s_exception, "exception");
    INTERN(s_contract, "contract");
    INTERN(s_parser_error, "parser_error");
    INTERN(s_empty_str, "");
    INTERN(s_last_decision, "last_decision");
    INTERN(s_audit, "audit");
    INTERN(s_unsolicited, "unsolicited");
    s_empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    s_empty_tuple = PyTuple_New(0);
    if (!s_empty_bytes || !s_empty_tuple) return NULL;
    if (policy_init() < 0 || memcache_init() < 0 || redis_init() < 0 ||
        http_parser_init() < 0 || relay_init() < 0)
        return NULL;
    if (PyType_Ready(&HttpType) < 0) return NULL;
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&MemcacheType) < 0 || PyType_Ready(&LazyFieldsType) < 0 ||
        PyType_Ready(&RedisType) < 0 || PyType_Ready(&RedisFieldsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&EngineType);
    Py_INCREF(&MemcacheType);
    Py_INCREF(&RedisType);
    Py_INCREF(&HttpType);
    if (PyModule_AddObject(m, "Http", (PyObject *)&HttpType) < 0) return NULL;
    Py_INCREF(&FdPairType);
    Py_INCREF(&HubType);
    Py_INCREF(&AcceptorType);
    if (PyModule_AddObject(m, "FdPair", (PyObject *)&FdPairType) < 0 ||
        PyModule_AddObject(m, "Hub", (PyObject *)&HubType) < 0 ||
        PyModule_AddObject(m, "Acceptor", (PyObject *)&AcceptorType) < 0)
        return NULL;
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "Memcache", (PyObject *)&MemcacheType) < 0 ||
        PyModule_AddObject(m, "Redis", (PyObject *)&RedisType) < 0)
        return NULL;
    return m;
}
