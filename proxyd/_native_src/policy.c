/* The per-connection policy, flattened (item: a lookup the parser can use directly).
 *
 * Context.matches(request) is policy.decide(request) -> LiveConnectionPolicy.decide ->
 * ConnectionPolicy.decide -> each rule's matches -> RuleRegex.search: five Python frames and
 * more per request. When the connection's policy is a LiveConnectionPolicy, the parser asks it
 * for the ConnectionPolicy in force (l4(), one call, which also follows reloads), keeps a flat
 * copy of its rules while that object stays the same, and evaluates them here with the same
 * semantics (memcache/rules.py MemcacheRule.matches, in policy order, first match decides).
 * Regexes run in RE2 through the compiled object RuleRegex holds, on the bytes RuleRegex.search
 * would hand it (wire bytes read as Go reads a string: each byte that is not part of a valid
 * UTF-8 sequence becomes U+FFFD). Any other matcher type is called as Python. */
#include "native.h"

typedef struct FlatRule {
    int kind;           /* 0 allow all, 1 MemcacheRule, 2 other: call matcher.matches(request) */
    PyObject *matcher;
    PyObject *commands; /* frozenset or NULL */
    PyObject *exact, *prefix; /* bytes or NULL */
    PyObject *regex;    /* RuleRegex or NULL */
    PyObject *rx_match; /* its compiled Match, when regex is a RuleRegex */
    PyObject *decision;
} FlatRule;

/* A regex answer is a pure function of (compiled regex, key); clients reuse keys, and one RE2
 * call through its Python binding costs thousands of instructions. One cache for the process,
 * keyed by (the compiled object's Match, key), bounded: cleared when full. */
#define RX_CACHE 65536
static PyObject *g_rx_seen;

static PyObject *s_l4, *s_always, *s_matchers, *s_denied, *s_commands, *s_exact, *s_prefix, *s_regex,
    *s__match, *s_search, *s_allowed, *s_policy;

#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return -1; } while (0)

int policy_init(void) {
    INTERN(s_l4, "l4");
    INTERN(s_always, "always");
    INTERN(s_matchers, "matchers");
    INTERN(s_denied, "denied");
    INTERN(s_commands, "commands");
    INTERN(s_exact, "exact");
    INTERN(s_prefix, "prefix");
    INTERN(s_regex, "regex");
    INTERN(s__match, "_match");
    INTERN(s_search, "search");
    INTERN(s_allowed, "allowed");
    INTERN(s_policy, "policy");
    return 0;
}

#undef INTERN

void flat_clear(FlatPolicy *fp) {
    for (Py_ssize_t i = 0; i < fp->n; i++) {
        FlatRule *r = &fp->rules[i];
        Py_XDECREF(r->matcher);
        Py_XDECREF(r->commands);
        Py_XDECREF(r->exact);
        Py_XDECREF(r->prefix);
        Py_XDECREF(r->regex);
        Py_XDECREF(r->rx_match);
        Py_XDECREF(r->decision);
    }
    PyMem_Free(fp->rules);
    fp->rules = NULL;
    fp->n = 0;
    Py_CLEAR(fp->cp);
    Py_CLEAR(fp->always);
    Py_CLEAR(fp->denied);
}

static PyObject *attr_or_null(PyObject *o, PyObject *name) { /* None -> NULL, new ref */
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == Py_None) Py_CLEAR(v);
    return v;
}

/* Rebuild the flat rules from ConnectionPolicy cp. */
static int flat_build(FlatPolicy *fp, PyObject *cp) {
    flat_clear(fp);
    PyObject *always = PyObject_GetAttr(cp, s_always);
    if (always == NULL) return -1;
    PyObject *denied = PyObject_GetAttr(cp, s_denied);
    PyObject *matchers = denied ? PyObject_GetAttr(cp, s_matchers) : NULL;
    if (matchers == NULL || !PyTuple_Check(matchers)) {
        Py_DECREF(always);
        Py_XDECREF(denied);
        Py_XDECREF(matchers);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "ConnectionPolicy.matchers is not a tuple");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(matchers);
    fp->rules = PyMem_Calloc((size_t)(n ? n : 1), sizeof(FlatRule));
    if (fp->rules == NULL) {
        Py_DECREF(always);
        Py_DECREF(denied);
        Py_DECREF(matchers);
        PyErr_NoMemory();
        return -1;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        PyObject *pair = PyTuple_GET_ITEM(matchers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "ConnectionPolicy.matchers: not (matcher, decision) pairs");
            rc = -1;
            break;
        }
        FlatRule *r = &fp->rules[i];
        fp->n = i + 1;
        r->matcher = PyTuple_GET_ITEM(pair, 0);
        r->decision = PyTuple_GET_ITEM(pair, 1);
        Py_INCREF(r->matcher);
        Py_INCREF(r->decision);
        if (r->matcher == g_ALLOW_ALL) {
            r->kind = 0;
        } else if ((PyObject *)Py_TYPE(r->matcher) == g_MemcacheRule) {
            r->kind = 1;
            r->commands = attr_or_null(r->matcher, s_commands);
            r->exact = attr_or_null(r->matcher, s_exact);
            r->prefix = attr_or_null(r->matcher, s_prefix);
            r->regex = attr_or_null(r->matcher, s_regex);
            if (PyErr_Occurred() || (r->commands && !PyAnySet_Check(r->commands)) ||
                (r->exact && !PyBytes_Check(r->exact)) || (r->prefix && !PyBytes_Check(r->prefix))) {
                PyErr_Clear();
                r->kind = 2; /* not the shape this code knows: ask the matcher itself */
            } else if (r->regex && (PyObject *)Py_TYPE(r->regex) == g_RuleRegex) {
                r->rx_match = PyObject_GetAttr(r->regex, s__match);
                if (r->rx_match == NULL) PyErr_Clear();
            }
        } else {
            r->kind = 2;
        }
    }
    Py_DECREF(matchers);
    if (rc < 0) {
        Py_DECREF(always);
        Py_DECREF(denied);
        return -1;
    }
    fp->always = always == Py_None ? (Py_DECREF(always), NULL) : always;
    fp->denied = denied;
    fp->cp = cp;
    Py_INCREF(cp);
    return 0;
}

static int utf8_seq_len(const unsigned char *p, Py_ssize_t left) {
    unsigned c = p[0];
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return left >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (left < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && p[1] < 0xA0) return 0;  /* overlong */
        if (c == 0xED && p[1] > 0x9F) return 0;  /* surrogate */
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (left < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && p[1] < 0x90) return 0;  /* overlong */
        if (c == 0xF4 && p[1] > 0x8F) return 0;  /* > U+10FFFF */
        return 4;
    }
    return 0;
}

static int rx_search_uncached(FlatRule *r, PyObject *key);

/* RuleRegex.search(key), remembered: 1, 0 or -1 */
static int rx_search(FlatRule *r, PyObject *key) {
    if (r->rx_match == NULL) return rx_search_uncached(r, key);
    if (g_rx_seen == NULL) {
        g_rx_seen = PyDict_New();
        if (g_rx_seen == NULL) return -1;
    }
    PyObject *k = PyTuple_Pack(2, r->rx_match, key);
    if (k == NULL) return -1;
    PyObject *hit = PyDict_GetItemWithError(g_rx_seen, k);
    if (hit != NULL) {
        Py_DECREF(k);
        return hit == Py_True;
    }
    int m = PyErr_Occurred() ? -1 : rx_search_uncached(r, key);
    if (m >= 0) {
        if (PyDict_GET_SIZE(g_rx_seen) >= RX_CACHE) PyDict_Clear(g_rx_seen);
        if (PyDict_SetItem(g_rx_seen, k, BOOL(m)) < 0) m = -1;
    }
    Py_DECREF(k);
    return m;
}

/* RuleRegex.search(key) through its compiled Match: 1, 0 or -1 */
static int rx_search_uncached(FlatRule *r, PyObject *key) {
    if (r->rx_match == NULL) {
        PyObject *res = PyObject_CallMethodOneArg(r->regex, s_search, key);
        if (res == NULL) return -1;
        int t = PyObject_IsTrue(res);
        Py_DECREF(res);
        return t;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(key);
    Py_ssize_t n = PyBytes_GET_SIZE(key), i;
    for (i = 0; i < n && p[i] < 0x80; i++) {
    }
    PyObject *subject;
    if (i == n) {
        subject = key;
        Py_INCREF(subject);
    } else {
        /* each byte outside a valid sequence -> U+FFFD (EF BF BD): at most 3 bytes per byte */
        subject = PyBytes_FromStringAndSize(NULL, 3 * n);
        if (subject == NULL) return -1;
        unsigned char *w = (unsigned char *)PyBytes_AS_STRING(subject);
        Py_ssize_t o = 0;
        for (i = 0; i < n;) {
            int k = utf8_seq_len(p + i, n - i);
            if (k == 0) {
                w[o++] = 0xEF;
                w[o++] = 0xBF;
                w[o++] = 0xBD;
                i++;
            } else {
                memcpy(w + o, p + i, (size_t)k);
                o += k;
                i += k;
            }
        }
        if (_PyBytes_Resize(&subject, o) < 0) return -1;
    }
    PyObject *pos = PyLong_FromLong(0), *end = PyLong_FromSsize_t(PyBytes_GET_SIZE(subject));
    PyObject *spans = (pos && end) ? PyObject_CallFunctionObjArgs(r->rx_match, g_anchor, subject, pos, end, NULL)
                                   : NULL;
    Py_XDECREF(pos);
    Py_XDECREF(end);
    Py_DECREF(subject);
    if (spans == NULL) return -1;
    /* spans[0][0] != -1 */
    PyObject *first = PySequence_GetItem(spans, 0);
    Py_DECREF(spans);
    if (first == NULL) return -1;
    PyObject *start = PySequence_GetItem(first, 0);
    Py_DECREF(first);
    if (start == NULL) return -1;
    long v = PyLong_AsLong(start);
    Py_DECREF(start);
    if (v == -1 && PyErr_Occurred()) return -1;
    return v != -1;
}

/* MemcacheRule.matches(MemcacheRequest(name, keys, key_error)) */
static int flat_rule_matches(FlatRule *r, PyObject *name, PyObject *keys, int key_error, PyObject **req) {
    if (r->kind == 0) return 1;
    if (r->kind == 2) {
        if (*req == NULL) {
            PyObject *inner = PyTuple_Pack(3, name, keys, BOOL(key_error));
            PyObject *args = inner ? PyTuple_Pack(1, inner) : NULL;
            Py_XDECREF(inner);
            *req = args ? PyTuple_Type.tp_new((PyTypeObject *)g_MemcacheRequest, args, NULL) : NULL;
            Py_XDECREF(args);
            if (*req == NULL) return -1;
        }
        PyObject *res = PyObject_CallMethodOneArg(r->matcher, s_matches, *req);
        if (res == NULL) return -1;
        int t = PyObject_IsTrue(res);
        Py_DECREF(res);
        return t;
    }
    if (r->commands) {
        int c = PySet_Contains(r->commands, name);
        if (c <= 0) return c;
    }
    if (!r->exact && !r->prefix && !r->regex) return 1;
    Py_ssize_t nk = PyTuple_GET_SIZE(keys);
    if (key_error || nk == 0) return 0;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        const char *kp = PyBytes_AS_STRING(key);
        Py_ssize_t kl = PyBytes_GET_SIZE(key);
        if (r->exact && (kl != PyBytes_GET_SIZE(r->exact) || memcmp(kp, PyBytes_AS_STRING(r->exact), (size_t)kl)))
            return 0;
        if (r->prefix) {
            Py_ssize_t pl = PyBytes_GET_SIZE(r->prefix);
            if (kl < pl || memcmp(kp, PyBytes_AS_STRING(r->prefix), (size_t)pl)) return 0;
        }
        if (r->regex) {
            int m = rx_search(r, key);
            if (m <= 0) return m;
        }
    }
    return 1;
}

/* Context.matches through the flat policy: 1, 0, -1; or 2 when it does not apply (the caller
 * then calls ctx.matches). */
int flat_matches(FlatPolicy *fp, PyObject *ctx, PyObject *name, PyObject *keys, int key_error) {
    if (!fp->ok) return 2;
    PyObject *policy = PyObject_GetAttr(ctx, s_policy);
    if (policy == NULL) return -1;
    if ((PyObject *)Py_TYPE(policy) != g_LivePolicy) {
        Py_DECREF(policy);
        return 2;
    }
    PyObject *cp = PyObject_CallMethodNoArgs(policy, s_l4);
    Py_DECREF(policy);
    if (cp == NULL) return -1;
    if (cp != fp->cp && flat_build(fp, cp) < 0) {
        Py_DECREF(cp);
        return -1;
    }
    Py_DECREF(cp);
    PyObject *decision = fp->always;
    PyObject *req = NULL;
    if (decision == NULL) {
        decision = fp->denied;
        for (Py_ssize_t i = 0; i < fp->n; i++) {
            int m = flat_rule_matches(&fp->rules[i], name, keys, key_error, &req);
            if (m < 0) {
                Py_XDECREF(req);
                return -1;
            }
            if (m) {
                decision = fp->rules[i].decision;
                break;
            }
        }
    }
    Py_XDECREF(req);
    Py_INCREF(decision);
    /* self._last = decision; return decision.allowed or decision.audit */
    int rc = PyObject_SetAttr(ctx, s__last, decision);
    int t = -1;
    if (rc == 0) {
        PyObject *a = PyObject_GetAttr(decision, s_allowed);
        t = a ? PyObject_IsTrue(a) : -1;
        Py_XDECREF(a);
        if (t == 0) {
            a = PyObject_GetAttr(decision, s_audit);
            t = a ? PyObject_IsTrue(a) : -1;
            Py_XDECREF(a);
        }
    }
    Py_DECREF(decision);
    return t;
}
