/* The flattened-policy interface, read and evaluated in C (proxyd/policy/flat.py, version 2).
 *
 * Context.matches(request) is policy.decide(request) -> LiveConnectionPolicy.decide ->
 * ConnectionPolicy.decide -> each rule's matches -> RuleRegex.search: five Python frames and
 * more per request. A native parser instead keeps the connection's FlatPolicy (the tuple
 * `ctx.policy.flat()` returns: plain data in documented positions, built once per revision)
 * converted to C structs, checks per request that it still holds (the same `ctx.policy`, and
 * the store's revision cell still holding the stamp: two pointer comparisons, no Python call),
 * and evaluates the rules here with flat.evaluate's semantics: the first rule whose conditions
 * all hold decides. Nothing else of the policy package is read by name.
 *
 * Regexes run in RE2 through the compiled Match the Regex operand carries, on the bytes
 * RuleRegex would hand it (wire bytes read as Go reads a string: each byte that is not part of
 * a valid UTF-8 sequence becomes U+FFFD). A "call" condition, or a regex without a Match, is
 * called as Python; a "defer" condition, once reached, leaves the request to ctx.matches. A flat form this build does not know (a field the parser does not give, a
 * form of a later version) is not guessed at: the parser calls ctx.matches instead. */
#include "native.h"

enum { FORM_IN = 1, FORM_EXACT, FORM_PREFIX, FORM_REGEX, FORM_CALL, FORM_DEFER };

typedef struct FlatCond {
    int field;          /* index into the parser's schema; -1 for a call */
    int form;           /* FORM_* */
    PyObject *operand;  /* borrowed from the FlatPolicy tuple, as are the three below */
    PyObject *test;     /* REGEX: Regex.test (the reference callable) */
    PyObject *rx_match; /* REGEX: RE2's Match, or NULL: call test */
    PyObject *anchor;   /* REGEX: the anchor test uses */
    PyObject *seen;     /* REGEX with a Match: its answers table (strong; see rx_table) */
} FlatCond;

typedef struct FlatRule {
    FlatCond *conds;
    Py_ssize_t n;
    PyObject *decision; /* borrowed: FlatDecision.decision */
    int forwards;       /* FlatDecision.forwards */
    int audit;          /* decision.audit */
} FlatRule;

/* A regex answer is a pure function of (compiled regex, anchor, value); clients reuse keys,
 * and one RE2 call through its Python binding costs thousands of instructions. One table of
 * answers per (Match, anchor) for the process, shared by every connection whose policy holds
 * that regex, found once when a FlatPolicy is converted (hashing the anchor, a pybind11 enum,
 * is a Python-level call: never per request), then keyed by the value alone. Each table is
 * bounded in entries (cleared when full) and in the length of a value worth remembering
 * (regex.py's MEMO_VALUE), so fresh long keys cannot grow it without bound; the index of
 * tables is bounded too (cleared when full: the conditions hold their tables). */
#define RX_CACHE 65536
#define RX_CACHE_VALUE 256
#define RX_TABLES 256
static PyObject *g_rx_tables;

static PyObject *s_flat, *s_policy, *s_startswith, *f_in, *f_exact, *f_prefix, *f_regex, *f_call, *f_defer;

#define INTERN(var, s) do { var = PyUnicode_InternFromString(s); if (var == NULL) return -1; } while (0)

int policy_init(void) {
    INTERN(s_flat, "flat");
    INTERN(s_policy, "policy");
    INTERN(s_startswith, "startswith");
    INTERN(f_in, "in");
    INTERN(f_exact, "exact");
    INTERN(f_prefix, "prefix");
    INTERN(f_regex, "regex");
    INTERN(f_call, "call");
    INTERN(f_defer, "defer");
    return 0;
}

#undef INTERN

/* --- Context's slots ------------------------------------------------------------------------ */

/* Context declares __slots__ (policy, last_decision among them): for an object of exactly that
 * type each is a PyObject * at a fixed offset, which the member descriptor reads and writes.
 * Reading it here costs a load instead of an attribute lookup through the type (two per
 * question and two more per forwarded request otherwise). Found once from the descriptors; -1:
 * not a plain object slot (then getattr/setattr). */
static Py_ssize_t off_policy = 0, off_last = 0; /* 0: not looked up yet */

static Py_ssize_t slot_offset(PyTypeObject *tp, const char *name) {
    PyObject *d = PyDict_GetItemString(tp->tp_dict, name); /* borrowed; Context's own slots */
    if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)) return -1;
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    if ((m->type != T_OBJECT_EX && m->type != T_OBJECT) || (m->flags & READONLY)) return -1;
    return m->offset;
}

static int ctx_slots_first(PyObject *ctx) {
    if (g_Context == NULL || Py_TYPE(ctx) != (PyTypeObject *)g_Context) return 0;
    if (off_policy == 0) {
        off_policy = slot_offset((PyTypeObject *)g_Context, "policy");
        off_last = slot_offset((PyTypeObject *)g_Context, "last_decision");
    }
    return off_policy > 0 && off_last > 0;
}

/* asked several times per request: the common answer inline, the first look-up out of line */
static inline int ctx_slots(PyObject *ctx) {
    if (off_policy > 0 && off_last > 0 && g_Context != NULL && Py_TYPE(ctx) == (PyTypeObject *)g_Context) return 1;
    return ctx_slots_first(ctx);
}

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

PyObject *ctx_get_last_decision(PyObject *ctx) {
    if (ctx_slots(ctx) && SLOT(ctx, off_last) != NULL) {
        Py_INCREF(SLOT(ctx, off_last));
        return SLOT(ctx, off_last);
    }
    return PyObject_GetAttr(ctx, s_last_decision);
}

int ctx_set_last_decision(PyObject *ctx, PyObject *decision) {
    if (!ctx_slots(ctx)) return PyObject_SetAttr(ctx, s_last_decision, decision);
    if (SLOT(ctx, off_last) == decision) return 0;
    Py_INCREF(decision);
    Py_XSETREF(SLOT(ctx, off_last), decision);
    return 0;
}

static Py_ssize_t off_audit = 0; /* L7Decision's audit slot; 0: not looked up, -1: none */

int decision_audit(PyObject *decision) {
    PyObject *v = NULL;
    if (g_ALLOWED != NULL && Py_TYPE(decision) == Py_TYPE(g_ALLOWED)) {
        if (off_audit == 0) off_audit = slot_offset(Py_TYPE(g_ALLOWED), "audit");
        if (off_audit > 0) v = SLOT(decision, off_audit);
    }
    if (v == Py_False) return 0;
    if (v == Py_True) return 1;
    if (v != NULL) Py_INCREF(v);
    else if ((v = PyObject_GetAttr(decision, s_audit)) == NULL) return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static PyObject *ctx_get_policy(PyObject *ctx) {
    if (ctx_slots(ctx) && SLOT(ctx, off_policy) != NULL) {
        Py_INCREF(SLOT(ctx, off_policy));
        return SLOT(ctx, off_policy);
    }
    return PyObject_GetAttr(ctx, s_policy);
}

/* --- the C copy of a FlatPolicy ------------------------------------------------------------- */

void flat_init(FlatPolicy *fp, const char *const *schema, int ok) {
    flat_clear(fp);
    fp->schema = schema;
    fp->ok = ok;
}

void flat_clear(FlatPolicy *fp) {
    for (Py_ssize_t i = 0; i < fp->n; i++) {
        for (Py_ssize_t j = 0; j < fp->rules[i].n; j++) Py_XDECREF(fp->rules[i].conds[j].seen);
        PyMem_Free(fp->rules[i].conds);
    }
    PyMem_Free(fp->rules);
    fp->rules = NULL;
    fp->n = 0;
    for (int i = 0; i < FLAT_MEMOS; i++) {
        for (int k = 0; k < fp->memos[i].nfixed; k++) Py_CLEAR(fp->memos[i].fixed[k]);
        PyMem_Free(fp->memos[i].rules);
        fp->memos[i].rules = NULL;
        fp->memos[i].nfixed = 0;
    }
    fp->memo_next = fp->memo_last = 0;
    fp->memoizable = 0;
    fp->usable = 0;
    fp->always = NULL;
    fp->otherwise = NULL;
    fp->stamp = fp->cell = NULL;
    Py_CLEAR(fp->flat);
    Py_CLEAR(fp->policy);
}

static int form_of(PyObject *form) {
    if (!PyUnicode_Check(form)) return 0;
    PyObject *forms[] = {f_in, f_exact, f_prefix, f_regex, f_call, f_defer};
    for (int i = 0; i < 6; i++)
        if (form == forms[i] || PyUnicode_Compare(form, forms[i]) == 0) return i + 1;
    return 0;
}

static int field_of(FlatPolicy *fp, PyObject *field) {
    if (!PyUnicode_Check(field)) return -1;
    for (int i = 0; fp->schema[i] != NULL; i++)
        if (PyUnicode_CompareWithASCIIString(field, fp->schema[i]) == 0) return i;
    return -1;
}

/* FlatDecision (decision, forwards) -> its parts; 0, or -1 when it is not that shape */
static int decision_of(PyObject *fd, PyObject **decision, int *forwards, int *audit) {
    if (!PyTuple_Check(fd) || PyTuple_GET_SIZE(fd) != 2) return -1;
    int f = PyObject_IsTrue(PyTuple_GET_ITEM(fd, 1));
    if (f < 0) return -1;
    int a = decision_audit(PyTuple_GET_ITEM(fd, 0));
    if (a < 0) return -1;
    *decision = PyTuple_GET_ITEM(fd, 0);
    *forwards = f;
    *audit = a;
    return 0;
}

/* The answers table of (match, anchor), new reference; NULL with an exception. */
static PyObject *rx_table(PyObject *match, PyObject *anchor) {
    if (g_rx_tables == NULL && (g_rx_tables = PyDict_New()) == NULL) return NULL;
    PyObject *k = PyTuple_Pack(2, match, anchor);
    if (k == NULL) return NULL;
    PyObject *t = PyDict_GetItemWithError(g_rx_tables, k);
    if (t != NULL) {
        Py_DECREF(k);
        Py_INCREF(t);
        return t;
    }
    if (PyErr_Occurred() || (t = PyDict_New()) == NULL) {
        Py_DECREF(k);
        return NULL;
    }
    if (PyDict_GET_SIZE(g_rx_tables) >= RX_TABLES) PyDict_Clear(g_rx_tables);
    int rc = PyDict_SetItem(g_rx_tables, k, t);
    Py_DECREF(k);
    if (rc < 0) Py_CLEAR(t);
    return t;
}

/* One (field, form, operand); 0, -1 when this build does not know the form, -2 on an error
 * (an exception set). */
static int cond_of(FlatPolicy *fp, PyObject *c, FlatCond *out) {
    if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != 3) return -1;
    PyObject *field = PyTuple_GET_ITEM(c, 0);
    out->form = form_of(PyTuple_GET_ITEM(c, 1));
    out->operand = PyTuple_GET_ITEM(c, 2);
    if (out->form == 0) return -1;
    if (out->form == FORM_DEFER) {
        out->field = -1;
        return field == Py_None ? 0 : -1;
    }
    if (out->form == FORM_CALL) {
        out->field = -1;
        return field == Py_None && PyCallable_Check(out->operand) ? 0 : -1;
    }
    out->field = field_of(fp, field);
    if (out->field < 0) return -1;
    if (out->form == FORM_REGEX) {
        PyObject *rx = out->operand;
        if (!PyTuple_Check(rx) || PyTuple_GET_SIZE(rx) != 3) return -1;
        out->test = PyTuple_GET_ITEM(rx, 0);
        out->rx_match = PyTuple_GET_ITEM(rx, 1);
        out->anchor = PyTuple_GET_ITEM(rx, 2);
        if (!PyCallable_Check(out->test)) return -1;
        if (!PyCallable_Check(out->rx_match)) out->rx_match = NULL;
        if (out->rx_match != NULL && (out->seen = rx_table(out->rx_match, out->anchor)) == NULL) return -2;
    }
    return 0;
}

/* Convert fp->flat (held) into C structs; fp->usable says whether every part was understood.
 * 0, or -1 with an exception. */
static int flat_convert(FlatPolicy *fp) {
    PyObject *f = fp->flat;
    if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 5) return 0;
    PyObject *cell = PyTuple_GET_ITEM(f, 1), *always = PyTuple_GET_ITEM(f, 2), *rules = PyTuple_GET_ITEM(f, 3);
    if (!PyList_CheckExact(cell) || !PyTuple_Check(rules)) return 0;
    fp->stamp = PyTuple_GET_ITEM(f, 0);
    fp->cell = cell;
    if (always != Py_None) {
        if (decision_of(always, &fp->always, &fp->always_forwards, &fp->always_audit) < 0) goto unknown;
    }
    if (decision_of(PyTuple_GET_ITEM(f, 4), &fp->otherwise, &fp->otherwise_forwards, &fp->otherwise_audit) < 0) goto unknown;
    Py_ssize_t n = PyTuple_GET_SIZE(rules);
    fp->rules = PyMem_Calloc((size_t)(n ? n : 1), sizeof(FlatRule));
    if (fp->rules == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rule = PyTuple_GET_ITEM(rules, i);
        if (!PyTuple_Check(rule) || PyTuple_GET_SIZE(rule) != 2) goto unknown;
        PyObject *conds = PyTuple_GET_ITEM(rule, 0);
        if (!PyTuple_Check(conds)) goto unknown;
        FlatRule *r = &fp->rules[i];
        fp->n = i + 1;
        if (decision_of(PyTuple_GET_ITEM(rule, 1), &r->decision, &r->forwards, &r->audit) < 0) goto unknown;
        Py_ssize_t nc = PyTuple_GET_SIZE(conds);
        r->conds = PyMem_Calloc((size_t)(nc ? nc : 1), sizeof(FlatCond));
        if (r->conds == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->n = nc;
        for (Py_ssize_t j = 0; j < nc; j++) {
            int c = cond_of(fp, PyTuple_GET_ITEM(conds, j), &r->conds[j]);
            if (c == -2) return -1;
            if (c < 0) goto unknown;
        }
    }
    fp->usable = 1;
    fp->memoizable = 1;
    for (Py_ssize_t i = 0; i < fp->n; i++)
        for (Py_ssize_t j = 0; j < fp->rules[i].n; j++)
            if (fp->rules[i].conds[j].form == FORM_CALL || fp->rules[i].conds[j].form == FORM_DEFER) fp->memoizable = 0;
    return 0;
unknown: /* not a form this build reads: ctx.matches answers instead */
    PyErr_Clear();
    return 0;
}

/* Take `policy` (ctx.policy) and its flat form, replacing what fp held. 0 or -1. */
static int flat_load(FlatPolicy *fp, PyObject *policy) {
    const char *const *schema = fp->schema;
    int ok = fp->ok;
    flat_clear(fp);
    fp->schema = schema;
    fp->ok = ok;
    Py_INCREF(policy);
    fp->policy = policy;
    PyObject *meth = PyObject_GetAttr(policy, s_flat);
    if (meth == NULL) { /* a policy without a flat form: always ctx.matches */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return 0;
    }
    if (meth == Py_None) { /* flat = None: the same (as __hash__ = None says "not hashable") */
        Py_DECREF(meth);
        return 0;
    }
    PyObject *f = PyObject_CallNoArgs(meth);
    Py_DECREF(meth);
    if (f == NULL) return -1;
    if (f == Py_None) {
        Py_DECREF(f);
        return 0;
    }
    fp->flat = f;
    return flat_convert(fp);
}

/* --- evaluating ----------------------------------------------------------------------------- */

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

static int truth_of_call(PyObject *fn, PyObject *arg) {
    PyObject *res = PyObject_CallOneArg(fn, arg);
    if (res == NULL) return -1;
    int t = PyObject_IsTrue(res);
    Py_DECREF(res);
    return t;
}

/* The UTF-8 subject RuleRegex would hand RE2 for value (bytes: Go's reading; str: encoded). */
static PyObject *rx_subject(PyObject *value) {
    if (PyUnicode_Check(value)) return PyUnicode_AsUTF8String(value);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t n = PyBytes_GET_SIZE(value), i;
    for (i = 0; i < n && p[i] < 0x80; i++) {
    }
    if (i == n) {
        Py_INCREF(value);
        return value;
    }
    /* each byte outside a valid sequence -> U+FFFD (EF BF BD): at most 3 bytes per byte */
    PyObject *subject = PyBytes_FromStringAndSize(NULL, 3 * n);
    if (subject == NULL) return NULL;
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
    if (_PyBytes_Resize(&subject, o) < 0) return NULL;
    return subject;
}

/* Regex.test(value) through RE2's Match: 1, 0 or -1 */
static int rx_test_uncached(FlatCond *c, PyObject *value) {
    if (c->rx_match == NULL || !(PyBytes_CheckExact(value) || PyUnicode_CheckExact(value)))
        return truth_of_call(c->test, value);
    PyObject *subject = rx_subject(value);
    if (subject == NULL) return -1;
    PyObject *pos = PyLong_FromLong(0), *end = PyLong_FromSsize_t(PyBytes_GET_SIZE(subject));
    PyObject *spans = (pos && end) ? PyObject_CallFunctionObjArgs(c->rx_match, c->anchor, subject, pos, end, NULL)
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

/* Regex.test(value), remembered: 1, 0 or -1 */
static int rx_test(FlatCond *c, PyObject *value) {
    /* bytes (memcache, redis keys) and str (http's method, path, host) alike */
    if (c->rx_match == NULL ||
        !(PyBytes_CheckExact(value) ? PyBytes_GET_SIZE(value) <= RX_CACHE_VALUE
                                    : PyUnicode_CheckExact(value) && PyUnicode_GET_LENGTH(value) <= RX_CACHE_VALUE))
        return rx_test_uncached(c, value);
    PyObject *hit = PyDict_GetItemWithError(c->seen, value);
    if (hit != NULL) return hit == Py_True;
    int m = PyErr_Occurred() ? -1 : rx_test_uncached(c, value);
    if (m >= 0) {
        if (PyDict_GET_SIZE(c->seen) >= RX_CACHE) PyDict_Clear(c->seen);
        if (PyDict_SetItem(c->seen, value, BOOL(m)) < 0) m = -1;
    }
    return m;
}

/* flat._passes(form, operand, value): 1, 0 or -1 */
static int cond_passes(FlatCond *c, PyObject *v) {
    PyObject *op = c->operand;
    switch (c->form) {
    case FORM_IN:
        return PyAnySet_Check(op) ? PySet_Contains(op, v) : PySequence_Contains(op, v);
    case FORM_EXACT:
        if (PyBytes_CheckExact(v) && PyBytes_CheckExact(op))
            return PyBytes_GET_SIZE(v) == PyBytes_GET_SIZE(op) &&
                   memcmp(PyBytes_AS_STRING(v), PyBytes_AS_STRING(op), (size_t)PyBytes_GET_SIZE(op)) == 0;
        if (v == op) return 1;
        if (PyUnicode_CheckExact(v) && PyUnicode_CheckExact(op) && PyUnicode_IS_READY(v) && PyUnicode_IS_READY(op))
            /* unicode_eq's test, without the rich-compare dispatch */
            return PyUnicode_GET_LENGTH(v) == PyUnicode_GET_LENGTH(op) && PyUnicode_KIND(v) == PyUnicode_KIND(op) &&
                   memcmp(PyUnicode_DATA(v), PyUnicode_DATA(op), (size_t)(PyUnicode_GET_LENGTH(v) * PyUnicode_KIND(v))) == 0;
        return PyObject_RichCompareBool(v, op, Py_EQ);
    case FORM_PREFIX:
        if (PyBytes_CheckExact(v) && PyBytes_CheckExact(op))
            return PyBytes_GET_SIZE(v) >= PyBytes_GET_SIZE(op) &&
                   memcmp(PyBytes_AS_STRING(v), PyBytes_AS_STRING(op), (size_t)PyBytes_GET_SIZE(op)) == 0;
        {
            PyObject *res = PyObject_CallMethodOneArg(v, s_startswith, op);
            if (res == NULL) return -1;
            int t = PyObject_IsTrue(res);
            Py_DECREF(res);
            return t;
        }
    case FORM_REGEX:
        return rx_test(c, v);
    default:
        PyErr_SetString(PyExc_SystemError, "flat policy: unknown condition form");
        return -1;
    }
}

PyObject *flat_raw_bytes(const FlatValues *fv) {
    if (*fv->made == NULL) *fv->made = PyBytes_FromStringAndSize(fv->raw, fv->rawlen);
    return *fv->made;
}

/* exact or prefix of a raw value against bytes op[0:k], compared where both lie */
static inline int raw_passes(int form, const FlatValues *fv, const char *op, Py_ssize_t k) {
    if (form == FORM_EXACT ? fv->rawlen != k : fv->rawlen < k) return 0;
    for (Py_ssize_t i = 0; i < k; i++) /* keys and operands are short: no call */
        if (fv->raw[i] != op[i]) return 0;
    return 1;
}

/* cond_passes on value j of fv; a raw value against a bytes operand of exact or prefix is
 * compared where it lies */
static int cond_passes_at(FlatCond *c, const FlatValues *fv, Py_ssize_t j) {
    if (fv->v == NULL && (c->form == FORM_EXACT || c->form == FORM_PREFIX) && PyBytes_CheckExact(c->operand))
        return raw_passes(c->form, fv, PyBytes_AS_STRING(c->operand), PyBytes_GET_SIZE(c->operand));
    PyObject *v = fv->v != NULL ? fv->v[j] : flat_raw_bytes(fv);
    return v == NULL ? -1 : cond_passes(c, v);
}

/* Every value of a condition's field passes it (none: the condition fails): 1, 0, -1 */
static int cond_holds(FlatCond *c, const FlatRequest *req) {
    const FlatValues *fv = &req->fields[c->field];
    if (fv->n == 0) return 0;
    for (Py_ssize_t j = 0; j < fv->n; j++) {
        int t = cond_passes_at(c, fv, j);
        if (t <= 0) return t;
    }
    return 1;
}

/* flat.holds(conditions, request, values): 1, 0 or -1; 2 for a "defer" condition (flat.Deferred:
 * ctx.matches decides). *obj caches the parser's request object, built on the first call
 * condition. */
static int rule_holds(FlatRule *r, const FlatRequest *req, PyObject **obj) {
    for (Py_ssize_t i = 0; i < r->n; i++) {
        FlatCond *c = &r->conds[i];
        if (c->form == FORM_DEFER) return 2;
        if (c->form == FORM_CALL) {
            if (*obj == NULL && (*obj = req->build(req)) == NULL) return -1;
            int t = truth_of_call(c->operand, *obj);
            if (t <= 0) return t;
            continue;
        }
        int t = cond_holds(c, req);
        if (t <= 0) return t;
    }
    return 1;
}

/* --- partial evaluation (flat_decide) -------------------------------------------------------- */

/* A new memo for req's fixed values in slot m: the rules whose conditions on the fixed fields
 * hold, in order, up to the first with no other condition (which then always decides), each
 * with its open conditions. Conditions are pure functions of their value, so evaluating the
 * fixed ones once, ahead, finds the same first rule as evaluating each rule whole, in order.
 * 1; 0 when an evaluation failed (none is expected of these forms on these values: the whole
 * evaluation then raises it in its own order); -1 with an exception (memory). */
static int memo_make(FlatPolicy *fp, FlatMemo *m, const FlatRequest *req, int nfixed) {
    Py_ssize_t nrules = 0, nconds = 0;
    int *keep = PyMem_Malloc((size_t)(fp->n ? fp->n : 1) * sizeof(int));
    if (keep == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < fp->n; i++) {
        FlatRule *r = &fp->rules[i];
        int holds = 1;
        Py_ssize_t open = 0;
        for (Py_ssize_t j = 0; j < r->n && holds == 1; j++) {
            if (r->conds[j].field < nfixed) holds = cond_holds(&r->conds[j], req);
            else open++;
        }
        if (holds < 0) {
            PyErr_Clear();
            PyMem_Free(keep);
            return 0;
        }
        keep[i] = holds;
        if (!holds) continue;
        nrules++;
        nconds += open;
        if (!open) { /* always decides: nothing after it is reached */
            for (Py_ssize_t k = i + 1; k < fp->n; k++) keep[k] = 0;
            break;
        }
    }
    FlatMemoRule *rules = PyMem_Malloc((size_t)(nrules ? nrules : 1) * sizeof(FlatMemoRule) +
                                       (size_t)nconds * sizeof(FlatMemoCond));
    if (rules == NULL) {
        PyMem_Free(keep);
        PyErr_NoMemory();
        return -1;
    }
    FlatMemoCond *conds = (FlatMemoCond *)(rules + (nrules ? nrules : 1));
    Py_ssize_t r_at = 0, c_at = 0;
    for (Py_ssize_t i = 0; i < fp->n && r_at < nrules; i++) {
        if (!keep[i]) continue;
        FlatRule *r = &fp->rules[i];
        FlatMemoRule *mr = &rules[r_at++];
        mr->decision = r->decision;
        mr->forwards = r->forwards;
        mr->audit = r->audit;
        mr->first = c_at;
        for (Py_ssize_t j = 0; j < r->n; j++) {
            FlatCond *c = &r->conds[j];
            if (c->field < nfixed) continue;
            FlatMemoCond *mc = &conds[c_at++];
            mc->cond = c;
            mc->field = c->field;
            mc->raw_form = 0;
            mc->oplen = 0;
            if ((c->form == FORM_EXACT || c->form == FORM_PREFIX) && PyBytes_CheckExact(c->operand) &&
                PyBytes_GET_SIZE(c->operand) <= FLAT_MEMO_OP) {
                mc->raw_form = c->form;
                mc->oplen = PyBytes_GET_SIZE(c->operand);
                memcpy(mc->op, PyBytes_AS_STRING(c->operand), (size_t)mc->oplen);
            }
        }
        mr->ncond = c_at - mr->first;
    }
    PyMem_Free(keep);
    for (int k = 0; k < m->nfixed; k++) Py_CLEAR(m->fixed[k]);
    PyMem_Free(m->rules);
    m->nfixed = nfixed;
    for (int k = 0; k < nfixed; k++) {
        m->fixed[k] = req->fields[k].v[0];
        Py_INCREF(m->fixed[k]);
    }
    m->n = nrules;
    m->rules = rules;
    m->conds = conds;
    return 1;
}

static int memo_is(const FlatMemo *m, const FlatRequest *req, int nfixed) {
    if (m->nfixed != nfixed) return 0;
    for (int k = 0; k < nfixed; k++)
        if (m->fixed[k] != req->fields[k].v[0]) return 0;
    return 1;
}

/* The memo of req's fixed values, found or made; NULL when there is none to be had (no error
 * set: the whole rules are evaluated instead), or with an exception (memory). */
static FlatMemo *memo_for(FlatPolicy *fp, const FlatRequest *req, int nfixed) {
    if (!fp->memoizable || nfixed <= 0 || nfixed > FLAT_MEMO_FIELDS) return NULL;
    for (int k = 0; k < nfixed; k++)
        if (req->fields[k].n != 1 || req->fields[k].v == NULL) return NULL;
    if (memo_is(&fp->memos[fp->memo_last], req, nfixed)) return &fp->memos[fp->memo_last];
    for (int i = 0; i < FLAT_MEMOS; i++) {
        if (memo_is(&fp->memos[i], req, nfixed)) {
            fp->memo_last = i;
            return &fp->memos[i];
        }
    }
    int slot = fp->memo_next;
    int got = memo_make(fp, &fp->memos[slot], req, nfixed);
    if (got <= 0) return NULL;
    fp->memo_next = (slot + 1) % FLAT_MEMOS;
    fp->memo_last = slot;
    return &fp->memos[slot];
}

/* An open condition on the request: a raw value against a copied operand compared where both
 * lie, anything else by the condition itself. 1, 0, -1 */
static int memo_cond_holds(const FlatMemoCond *mc, const FlatRequest *req) {
    const FlatValues *fv = &req->fields[mc->field];
    if (mc->raw_form && fv->v == NULL && fv->n == 1) return raw_passes(mc->raw_form, fv, mc->op, mc->oplen);
    return cond_holds(mc->cond, req);
}

/* The first of the memo's rules whose open conditions hold (NULL: none, otherwise decides), or
 * NULL with an exception */
static const FlatMemoRule *memo_first(const FlatMemo *m, const FlatRequest *req) {
    for (Py_ssize_t i = 0; i < m->n; i++) {
        const FlatMemoRule *r = &m->rules[i];
        int holds = 1;
        for (Py_ssize_t j = 0; j < r->ncond && holds == 1; j++) holds = memo_cond_holds(&m->conds[r->first + j], req);
        if (holds < 0) return NULL;
        if (holds) return r;
    }
    return NULL;
}

/* The flat copy, reloaded when ctx.policy or its revision moved: 1 usable, 0 not, -1 */
static int flat_current(FlatPolicy *fp, PyObject *ctx) {
    if (!fp->ok) return 0;
    /* the flat copy holds while ctx.policy is the same object and the store's revision cell
     * still holds its stamp (LiveConnectionPolicy.l4's revision check, without the call). The
     * slot is compared without a reference taken: the policy object itself is not touched. */
    int cell_ok = fp->cell == NULL || (PyList_GET_SIZE(fp->cell) >= 1 && PyList_GET_ITEM(fp->cell, 0) == fp->stamp);
    if (cell_ok && fp->policy != NULL && ctx_slots(ctx) && SLOT(ctx, off_policy) == fp->policy) return fp->usable;
    PyObject *policy = ctx_get_policy(ctx);
    if (policy == NULL) return -1;
    int rc = policy != fp->policy || !cell_ok ? flat_load(fp, policy) : 0;
    Py_DECREF(policy);
    if (rc < 0) return -1;
    return fp->usable;
}

int flat_decide(FlatPolicy *fp, PyObject *ctx, const FlatRequest *req, int nfixed, PyObject **decision, int *audit) {
    int cur = flat_current(fp, ctx);
    if (cur <= 0) return cur < 0 ? -1 : 2;
    if (fp->always != NULL) {
        *decision = fp->always;
        *audit = fp->always_audit;
        return fp->always_forwards;
    }
    FlatMemo *m = memo_for(fp, req, nfixed);
    if (m != NULL) {
        const FlatMemoRule *r = memo_first(m, req);
        if (r == NULL && PyErr_Occurred()) return -1;
        if (r != NULL) {
            *decision = r->decision;
            *audit = r->audit;
            return r->forwards;
        }
    } else {
        if (PyErr_Occurred()) return -1;
        PyObject *obj = NULL;
        for (Py_ssize_t i = 0; i < fp->n; i++) {
            int h = rule_holds(&fp->rules[i], req, &obj);
            if (h < 0 || h == 2) { /* an error, or deferred: nothing was set */
                Py_XDECREF(obj);
                return h < 0 ? -1 : 2;
            }
            if (h) {
                Py_XDECREF(obj);
                *decision = fp->rules[i].decision;
                *audit = fp->rules[i].audit;
                return fp->rules[i].forwards;
            }
        }
        Py_XDECREF(obj);
    }
    *decision = fp->otherwise;
    *audit = fp->otherwise_audit;
    return fp->otherwise_forwards;
}

int flat_matches(FlatPolicy *fp, PyObject *ctx, const FlatRequest *req) {
    PyObject *decision;
    int audit;
    int forwards = flat_decide(fp, ctx, req, 0, &decision, &audit);
    if (forwards < 0 || forwards == 2) return forwards;
    /* Context.matches: self.last_decision = decision; return decision.allowed or decision.audit
     * (precomputed as forwards). The decision is borrowed from fp->flat: held across the set. */
    Py_INCREF(decision);
    int rc = ctx_set_last_decision(ctx, decision);
    Py_DECREF(decision);
    return rc < 0 ? -1 : forwards;
}
