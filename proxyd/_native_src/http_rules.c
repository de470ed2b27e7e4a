/* The twin of proxyd/parsers/http/rules.py's request side: HttpRequest's values for the
 * flattened-policy interface (HttpRequest.values; the fields HttpRule.flat's conditions read).
 * The rules themselves are evaluated by policy.c from the connection's FlatPolicy
 * (docs/native.md): method, path and host are RE2 full matches there; a rule's `headers` are a
 * call condition, given the HttpRequest http_build_request makes; a rule with `headerMatches` is
 * deferred, so the decision goes to ctx.matches (2, before anything was set). */
#include "native.h"

/* rules.py FIELD_METHOD, FIELD_PATH, FIELD_HOST: the order of HttpFlatRequest's values */
const char *const HTTP_FIELDS[] = {"method", "path", "host", NULL};

typedef struct {
    FlatRequest base;
    PyObject *method, *path, *host, *block;
    int v11;
} HttpFlatRequest;

static PyObject *http_flat_build(const FlatRequest *r) {
    const HttpFlatRequest *q = (const HttpFlatRequest *)r;
    return http_build_request(q->method, q->path, q->host, q->v11, q->block);
}

int http_flat_matches(FlatPolicy *fp, PyObject *ctx, PyObject *method, PyObject *path, PyObject *host, int v11,
                      PyObject *block) {
    FlatValues fields[3] = {{&method, 1}, {&path, 1}, {&host, 1}};
    HttpFlatRequest req = {{fields, http_flat_build}, method, path, host, block, v11};
    return flat_matches(fp, ctx, &req.base);
}
