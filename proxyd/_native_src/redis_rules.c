/* The redis rules of a connection's policy, flattened: the twin of
 * proxyd/parsers/redis/rules.py (RedisRule.matches, RedisRequest) over the ConnectionPolicy that
 * LiveConnectionPolicy.l4() gives, read only through the interface proxyd.policy.flat hands over
 * (docs/native.md): the rules in policy order, first match decides, as ConnectionPolicy.decide
 * and Context.matches do. redis.c asks it once per key (or once keyless). */
#include "native.h"

PyObject *g_LivePolicy, *g_RuleRegex, *g_ALLOW_ALL; /* see native.h: NULL until the port */

static PyObject *s_rd_allowed, *s_rd_always, *s_rd_denied, *s_rd_matchers, *s_base, *s_name, *s_category, *s_exact,
    *s_prefix, *s_regex, *s_keyed, *s_search, *s_all;

/* decision.allowed or decision.audit, and decision.audit (Context.matches): 0 or -1 */
static int decision_flags(PyObject *d, int *pass, int *audit) {
    PyObject *a = PyObject_GetAttr(d, s_rd_allowed);
    int al = a ? PyObject_IsTrue(a) : -1;
    Py_XDECREF(a);
    if (al < 0) return -1;
    a = PyObject_GetAttr(d, s_audit);
    int au = a ? PyObject_IsTrue(a) : -1;
    Py_XDECREF(a);
    if (au < 0) return -1;
    *pass = al || au;
    *audit = au;
    return 0;
}

void rflat_clear(RFlat *fp) {
    for (Py_ssize_t i = 0; i < fp->n; i++) {
        RRule *r = &fp->rules[i];
        Py_XDECREF(r->matcher);
        Py_XDECREF(r->decision);
        Py_XDECREF(r->base);
        Py_XDECREF(r->name);
        Py_XDECREF(r->category);
        Py_XDECREF(r->exact);
        Py_XDECREF(r->prefix);
        Py_XDECREF(r->regex);
    }
    PyMem_Free(fp->rules);
    fp->rules = NULL;
    fp->n = 0;
    Py_CLEAR(fp->cp);
    Py_CLEAR(fp->always);
    Py_CLEAR(fp->denied);
}

static PyObject *attr_none_null(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == Py_None) Py_CLEAR(v);
    return v;
}

int rflat_build(RFlat *fp, PyObject *cp) {
    rflat_clear(fp);
    PyObject *always = PyObject_GetAttr(cp, s_rd_always);
    if (always == NULL) return -1;
    PyObject *denied = PyObject_GetAttr(cp, s_rd_denied);
    PyObject *matchers = denied ? PyObject_GetAttr(cp, s_rd_matchers) : NULL;
    if (matchers == NULL || !PyTuple_Check(matchers)) {
        Py_DECREF(always);
        Py_XDECREF(denied);
        Py_XDECREF(matchers);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "ConnectionPolicy.matchers is not a tuple");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(matchers);
    fp->rules = PyMem_Calloc((size_t)(n ? n : 1), sizeof(RRule));
    if (fp->rules == NULL) {
        Py_DECREF(always);
        Py_DECREF(denied);
        Py_DECREF(matchers);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(matchers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "ConnectionPolicy.matchers: not (matcher, decision) pairs");
            Py_DECREF(matchers);
            Py_DECREF(always);
            Py_DECREF(denied);
            return -1;
        }
        RRule *r = &fp->rules[i];
        fp->n = i + 1;
        r->matcher = PyTuple_GET_ITEM(pair, 0);
        r->decision = PyTuple_GET_ITEM(pair, 1);
        Py_INCREF(r->matcher);
        Py_INCREF(r->decision);
        if (r->matcher == g_ALLOW_ALL) {
            r->kind = 0;
        } else if (g_RedisRule != NULL && (PyObject *)Py_TYPE(r->matcher) == g_RedisRule) {
            r->kind = 1;
            r->base = attr_none_null(r->matcher, s_base);
            r->name = attr_none_null(r->matcher, s_name);
            r->category = attr_none_null(r->matcher, s_category);
            r->exact = attr_none_null(r->matcher, s_exact);
            r->prefix = attr_none_null(r->matcher, s_prefix);
            r->regex = attr_none_null(r->matcher, s_regex);
            PyObject *keyed = PyErr_Occurred() ? NULL : PyObject_GetAttr(r->matcher, s_keyed);
            r->keyed = keyed ? PyObject_IsTrue(keyed) : -1;
            Py_XDECREF(keyed);
            if (PyErr_Occurred() || r->keyed < 0 || (r->base && !PyUnicode_CheckExact(r->base)) ||
                (r->name && !PyUnicode_CheckExact(r->name)) ||
                (r->category && !PyUnicode_CheckExact(r->category)) || (r->exact && !PyBytes_Check(r->exact)) ||
                (r->prefix && !PyBytes_Check(r->prefix))) {
                PyErr_Clear();
                r->kind = 2; /* not the shape this code knows: ask the matcher itself */
            }
        } else {
            r->kind = 2;
        }
    }
    Py_DECREF(matchers);
    fp->always = always == Py_None ? (Py_DECREF(always), NULL) : always;
    fp->denied = denied;
    fp->cp = cp;
    Py_INCREF(cp);
    fp->pure = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        RRule *r = &fp->rules[i];
        if (r->kind == 2 || r->regex != NULL) fp->pure = 0;
        if (decision_flags(r->decision, &r->pass, &r->audit) < 0) return -1;
    }
    if (fp->always && decision_flags(fp->always, &fp->always_pass, &fp->always_audit) < 0) return -1;
    if (decision_flags(fp->denied, &fp->denied_pass, &fp->denied_audit) < 0) return -1;
    return 0;
}

/* rules.py RedisRule.matches for a rule without regex, on a key's bytes (NULL: no key) */
int rrule_matches_raw(RRule *r, PyObject *name, PyObject *base, PyObject *cats, const char *kp,
                             Py_ssize_t kl) {
    if (r->kind == 0) return 1;
    int c;
    if (r->base) c = str_eq(base, r->base);
    else if (r->name) c = str_eq(name, r->name);
    else if (r->category) {
        c = str_eq(r->category, s_all);
        if (c == 0) c = PySet_Contains(cats, r->category);
    } else c = 1;
    if (c <= 0) return c;
    if (!r->keyed) return 1;
    if (kp == NULL) return 0;
    if (r->exact && (kl != PyBytes_GET_SIZE(r->exact) || memcmp(kp, PyBytes_AS_STRING(r->exact), (size_t)kl)))
        return 0;
    if (r->prefix) {
        Py_ssize_t pl = PyBytes_GET_SIZE(r->prefix);
        if (kl < pl || memcmp(kp, PyBytes_AS_STRING(r->prefix), (size_t)pl)) return 0;
    }
    return 1;
}

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


/* RedisRule.matches(RedisRequest(name, base, categories, True, key)): 1, 0, -1 */
int rrule_matches(RRule *r, PyObject *name, PyObject *base, PyObject *cats, PyObject *key) {
    if (r->kind == 0) return 1;
    if (r->kind == 2) {
        PyObject *req = redis_request(name, base, cats, key);
        if (req == NULL) return -1;
        PyObject *res = PyObject_CallMethodOneArg(r->matcher, s_matches, req);
        Py_DECREF(req);
        if (res == NULL) return -1;
        int t = PyObject_IsTrue(res);
        Py_DECREF(res);
        return t;
    }
    int c;
    if (r->base) c = str_eq(base, r->base);
    else if (r->name) c = str_eq(name, r->name);
    else if (r->category) {
        c = str_eq(r->category, s_all);
        if (c == 0) c = PySet_Contains(cats, r->category);
    } else c = 1;
    if (c <= 0) return c;
    if (!r->keyed) return 1;
    if (key == NULL) return 0;
    const char *kp = PyBytes_AS_STRING(key);
    Py_ssize_t kl = PyBytes_GET_SIZE(key);
    if (r->exact && (kl != PyBytes_GET_SIZE(r->exact) || memcmp(kp, PyBytes_AS_STRING(r->exact), (size_t)kl)))
        return 0;
    if (r->prefix) {
        Py_ssize_t pl = PyBytes_GET_SIZE(r->prefix);
        if (kl < pl || memcmp(kp, PyBytes_AS_STRING(r->prefix), (size_t)pl)) return 0;
    }
    if (r->regex == NULL) return 1;
    PyObject *res = PyObject_CallMethodOneArg(r->regex, s_search, key);
    if (res == NULL) return -1;
    int t = PyObject_IsTrue(res);
    Py_DECREF(res);
    return t;
}


#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return -1; } while (0)

int redis_rules_init(void) {
    INTERN(s_rd_allowed, "allowed");
    INTERN(s_rd_always, "always");
    INTERN(s_rd_denied, "denied");
    INTERN(s_rd_matchers, "matchers");
    INTERN(s_base, "base");
    INTERN(s_name, "name");
    INTERN(s_category, "category");
    INTERN(s_exact, "exact");
    INTERN(s_prefix, "prefix");
    INTERN(s_regex, "regex");
    INTERN(s_keyed, "keyed");
    INTERN(s_search, "search");
    INTERN(s_all, "all");
    return 0;
}

#undef INTERN
