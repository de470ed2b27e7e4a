/* The twin of proxyd/parsers/http/rules.py HttpRule.matches, over a connection's policy flattened.
 *
 * As policy.c does for memcache: when the context is a Context and its policy a
 * LiveConnectionPolicy, l4() gives the ConnectionPolicy in force (following reloads), whose
 * (matcher, decision) pairs are kept flat while that object stays the same, and evaluated here
 * in policy order, first match deciding, with HttpRule's semantics: method, path and host are
 * RE2 full matches (RuleRegex.fullmatch, answered from the regex's own memo, RuleRegex._full, when
 * it has the answer, else by calling fullmatch, which fills it), headers are (name, value or
 * any) presences. A rule this file does not evaluate (headerMatches, whose mismatch actions
 * rewrite the request, or a matcher of another type) makes the whole decision go to
 * ctx.matches: 2 is answered before anything was set. Reads only what docs/native.md lists. */
#include "native.h"

typedef struct HttpFlatRule {
    int kind;          /* 0 allow all, 1 HttpRule evaluated here, 2 the reference decides */
    PyObject *decision;
    PyObject *rx[3];   /* method, path, host: RuleRegex or NULL */
    PyObject *memo[3]; /* their fullmatch memos (dict) */
    PyObject *headers; /* tuple of (lname bytes, value bytes or None) */
} HttpFlatRule;

static PyObject *s_l4, *s_always, *s_matchers, *s_denied, *s_allowed, *s_policy, *s_method, *s_path, *s_host,
    *s_headers, *s_header_matches, *s__full, *s_fullmatch;

#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return -1; } while (0)

int http_rules_init(void) {
    INTERN(s_l4, "l4");
    INTERN(s_always, "always");
    INTERN(s_matchers, "matchers");
    INTERN(s_denied, "denied");
    INTERN(s_allowed, "allowed");
    INTERN(s_policy, "policy");
    INTERN(s_method, "method");
    INTERN(s_path, "path");
    INTERN(s_host, "host");
    INTERN(s_headers, "headers");
    INTERN(s_header_matches, "header_matches");
    INTERN(s__full, "_full");
    INTERN(s_fullmatch, "fullmatch");
    return 0;
}

#undef INTERN

void http_flat_clear(HttpFlat *fp) {
    for (Py_ssize_t i = 0; i < fp->n; i++) {
        HttpFlatRule *r = &fp->rules[i];
        Py_XDECREF(r->decision);
        for (int j = 0; j < 3; j++) {
            Py_XDECREF(r->rx[j]);
            Py_XDECREF(r->memo[j]);
        }
        Py_XDECREF(r->headers);
    }
    PyMem_Free(fp->rules);
    fp->rules = NULL;
    fp->n = 0;
    Py_CLEAR(fp->cp);
    Py_CLEAR(fp->always);
    Py_CLEAR(fp->denied);
}

/* An HttpRule's parts, or kind 2 when it has a shape this file does not evaluate. 0 or -1. */
static int flat_http_rule(HttpFlatRule *r, PyObject *m) {
    PyObject *names[3] = {s_method, s_path, s_host};
    PyObject *hm = PyObject_GetAttr(m, s_header_matches);
    if (hm == NULL) return -1;
    int plain = PyTuple_Check(hm) && PyTuple_GET_SIZE(hm) == 0;
    Py_DECREF(hm);
    if (!plain) return 0; /* headerMatches: the reference (kind stays 2) */
    for (int j = 0; j < 3; j++) {
        PyObject *rx = PyObject_GetAttr(m, names[j]);
        if (rx == NULL) return -1;
        if (rx == Py_None) {
            Py_DECREF(rx);
            continue;
        }
        r->rx[j] = rx;
        if ((PyObject *)Py_TYPE(rx) != g_RuleRegex) return 0;
        r->memo[j] = PyObject_GetAttr(rx, s__full);
        if (r->memo[j] == NULL) return -1;
        if (!PyDict_CheckExact(r->memo[j])) return 0;
    }
    PyObject *hs = PyObject_GetAttr(m, s_headers);
    if (hs == NULL) return -1;
    if (!PyTuple_Check(hs)) {
        Py_DECREF(hs);
        return 0;
    }
    Py_ssize_t nh = PyTuple_GET_SIZE(hs);
    r->headers = PyTuple_New(nh);
    if (r->headers == NULL) {
        Py_DECREF(hs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nh; i++) {
        PyObject *pair = PyTuple_GET_ITEM(hs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(pair, 0))) {
            Py_DECREF(hs);
            return 0;
        }
        PyObject *v = PyTuple_GET_ITEM(pair, 1);
        PyObject *name = PyUnicode_AsLatin1String(PyTuple_GET_ITEM(pair, 0));
        PyObject *val = v == Py_None ? (Py_INCREF(Py_None), Py_None)
                                     : (PyUnicode_Check(v) ? PyUnicode_AsLatin1String(v) : NULL);
        PyObject *t = name && val ? PyTuple_Pack(2, name, val) : NULL;
        Py_XDECREF(name);
        Py_XDECREF(val);
        if (t == NULL) { /* not Latin-1 (rules.py refuses that): the reference decides */
            PyErr_Clear();
            Py_DECREF(hs);
            return 0;
        }
        PyTuple_SET_ITEM(r->headers, i, t);
    }
    Py_DECREF(hs);
    r->kind = 1;
    return 0;
}

static int flat_build(HttpFlat *fp, PyObject *cp) {
    http_flat_clear(fp);
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
    fp->rules = PyMem_Calloc((size_t)(n ? n : 1), sizeof(HttpFlatRule));
    int rc = fp->rules == NULL ? (PyErr_NoMemory(), -1) : 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        PyObject *pair = PyTuple_GET_ITEM(matchers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "ConnectionPolicy.matchers: not (matcher, decision) pairs");
            rc = -1;
            break;
        }
        HttpFlatRule *r = &fp->rules[i];
        fp->n = i + 1;
        PyObject *m = PyTuple_GET_ITEM(pair, 0);
        r->decision = PyTuple_GET_ITEM(pair, 1);
        Py_INCREF(r->decision);
        r->kind = 2;
        if (m == g_ALLOW_ALL) r->kind = 0;
        else if ((PyObject *)Py_TYPE(m) == g_HttpRule) rc = flat_http_rule(r, m);
    }
    Py_DECREF(matchers);
    if (rc < 0) {
        Py_DECREF(always);
        Py_DECREF(denied);
        http_flat_clear(fp);
        return -1;
    }
    fp->always = always == Py_None ? (Py_DECREF(always), NULL) : always;
    fp->denied = denied;
    fp->cp = cp;
    Py_INCREF(cp);
    return 0;
}

/* RuleRegex.fullmatch(text): its memo first. 1, 0, -1 */
static int fullmatch(PyObject *rx, PyObject *memo, PyObject *text) {
    PyObject *hit = PyDict_GetItemWithError(memo, text);
    if (hit != NULL) return PyObject_IsTrue(hit);
    if (PyErr_Occurred()) return -1;
    PyObject *r = PyObject_CallMethodOneArg(rx, s_fullmatch, text);
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

int http_flat_matches(HttpFlat *fp, PyObject *ctx, PyObject *method, PyObject *path, PyObject *host,
                      const char *block, Py_ssize_t blen) {
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
    PyObject *texts[3] = {method, path, host};
    if (decision == NULL) {
        decision = fp->denied;
        for (Py_ssize_t i = 0; i < fp->n; i++) {
            HttpFlatRule *r = &fp->rules[i];
            if (r->kind == 2) return 2;
            int m = 1;
            if (r->kind == 1) {
                for (int j = 0; j < 3 && m == 1; j++)
                    if (r->rx[j] != NULL) m = fullmatch(r->rx[j], r->memo[j], texts[j]);
                if (m < 0) return -1;
                for (Py_ssize_t k = 0; m == 1 && k < PyTuple_GET_SIZE(r->headers); k++) {
                    PyObject *name = PyTuple_GET_ITEM(PyTuple_GET_ITEM(r->headers, k), 0);
                    PyObject *val = PyTuple_GET_ITEM(PyTuple_GET_ITEM(r->headers, k), 1);
                    m = http_field_has(block, blen, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name),
                                       val == Py_None ? NULL : PyBytes_AS_STRING(val),
                                       val == Py_None ? 0 : PyBytes_GET_SIZE(val));
                }
            }
            if (m) {
                decision = r->decision;
                break;
            }
        }
    }
    Py_INCREF(decision);
    /* Context.matches: self._last = decision; return decision.allowed or decision.audit */
    int rc = PyObject_SetAttr(ctx, s_last_decision, decision);
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
