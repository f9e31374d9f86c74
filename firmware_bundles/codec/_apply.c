/* Inner loop of PATCH chunk decoding (firmware_bundles/codec/chunk.py documents the format).
 *
 * Why C: a chunk holds up to hundreds of thousands of covers and diff runs; a Python loop over
 * them is 100x slower than the zstd decoder next to it, and the vectorised numpy equivalent
 * needs index arrays of 8 bytes per output byte (a 4 MiB chunk would cost ~70 MiB of RSS).
 * This function walks the decoded streams once, checks every length and offset against the
 * buffers it was given (a hostile chunk can only make it fail), and writes the output chunk.
 *
 * apply_patch(out_size, window, ctrl, ncov, zruns, nzruns, nrun, values, literals) -> bytes
 * Raises ValueError with a short reason on any inconsistency (the caller maps it to
 * DeltaCorrupt).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static int read_uvarint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    int shift = 0;
    while (*p < end) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (b < 0x80) {
            *out = v;
            return 1;
        }
        shift += 7;
        if (shift > 56) return 0;
    }
    return 0;
}

static uint32_t plane_u32(const uint8_t *planes, Py_ssize_t n, Py_ssize_t i) {
    return (uint32_t)planes[i] | ((uint32_t)planes[n + i] << 8) |
           ((uint32_t)planes[2 * n + i] << 16) | ((uint32_t)planes[3 * n + i] << 24);
}

/* Diff run state: the covered bytes are zr zeros, nr values, zr zeros, ... (then zeros). */
typedef struct {
    const uint8_t *zp, *zend, *np, *nend, *vp, *vend;
    uint64_t runs_left;
    uint64_t zeros;   /* zeros left in the current zero run */
    uint64_t nonzero; /* values left in the current value run */
} runs_t;

static int next_run(runs_t *r) {
    if (r->runs_left == 0) {
        r->zeros = UINT64_MAX; /* implied trailing zeros */
        return 1;
    }
    r->runs_left--;
    if (!read_uvarint(&r->zp, r->zend, &r->zeros)) return 0;
    if (!read_uvarint(&r->np, r->nend, &r->nonzero)) return 0;
    if (r->nonzero > (uint64_t)(r->vend - r->vp)) return 0;
    return 1;
}

/* out[0:len] = src[0:len] + diff (from the runs), consuming len diff bytes. */
static int add_cover(uint8_t *out, const uint8_t *src, uint64_t len, runs_t *r) {
    while (len > 0) {
        if (r->zeros == 0 && r->nonzero == 0) {
            if (!next_run(r)) return 0;
            continue;
        }
        if (r->zeros > 0) {
            uint64_t k = r->zeros < len ? r->zeros : len;
            memcpy(out, src, (size_t)k);
            out += k; src += k; len -= k;
            if (r->zeros != UINT64_MAX) r->zeros -= k;
            continue;
        }
        uint64_t k = r->nonzero < len ? r->nonzero : len;
        const uint8_t *v = r->vp;
        for (uint64_t i = 0; i < k; i++) out[i] = (uint8_t)(src[i] + v[i]);
        r->vp += k;
        out += k; src += k; len -= k;
        r->nonzero -= k;
    }
    return 1;
}

#define FAIL(msg) do { reason = (msg); goto fail; } while (0)

static PyObject *apply_patch(PyObject *self, PyObject *args) {
    Py_ssize_t out_size, ncov, nrun;
    Py_buffer win, ctrl, zr, nr, vals, lit;
    const char *reason = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "ny*y*ny*y*ny*y*", &out_size, &win, &ctrl, &ncov, &zr, &nr,
                          &nrun, &vals, &lit))
        return NULL;
    if (out_size < 0 || ncov < 0 || nrun < 0) {
        reason = "negative size";
        goto done;
    }
    if (ctrl.len != ncov * 12) {
        reason = "cover table of the wrong size";
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, out_size);
    if (result == NULL) goto done;
    {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
        const uint8_t *w = (const uint8_t *)win.buf;
        const uint64_t wlen = (uint64_t)win.len;
        const uint8_t *c = (const uint8_t *)ctrl.buf;
        const uint8_t *lp = (const uint8_t *)lit.buf, *lend = lp + lit.len;
        runs_t r = {(const uint8_t *)zr.buf, (const uint8_t *)zr.buf + zr.len,
                    (const uint8_t *)nr.buf, (const uint8_t *)nr.buf + nr.len,
                    (const uint8_t *)vals.buf, (const uint8_t *)vals.buf + vals.len,
                    (uint64_t)nrun, 0, 0};
        uint64_t opos = 0, wpos = 0;
        const uint64_t osize = (uint64_t)out_size;
        for (Py_ssize_t i = 0; i < ncov; i++) {
            uint64_t gap = plane_u32(c, ncov, i);
            uint64_t len = plane_u32(c + 4 * ncov, ncov, i);
            uint32_t zz = plane_u32(c + 8 * ncov, ncov, i);
            int64_t delta = (int64_t)(zz >> 1) ^ -(int64_t)(zz & 1);
            if (gap > osize - opos) FAIL("literal run past the chunk end");
            if (gap > (uint64_t)(lend - lp)) FAIL("literal stream too short");
            memcpy(out + opos, lp, (size_t)gap);
            lp += gap; opos += gap;
            if (delta < 0 && (uint64_t)(-delta) > wpos) FAIL("cover before the window");
            wpos = (uint64_t)((int64_t)wpos + delta);
            if (len > osize - opos) FAIL("cover past the chunk end");
            if (wpos > wlen || len > wlen - wpos) FAIL("cover outside the base window");
            if (!add_cover(out + opos, w + wpos, len, &r)) FAIL("diff runs inconsistent");
            opos += len; wpos += len;
        }
        if (osize - opos != (uint64_t)(lend - lp)) FAIL("literal stream of the wrong size");
        memcpy(out + opos, lp, (size_t)(osize - opos));
        /* Every run and value must have been used: a chunk has exactly one decoding. */
        if (r.runs_left != 0 || r.nonzero != 0 || (r.zeros != 0 && r.zeros != UINT64_MAX) ||
            r.zp != r.zend || r.np != r.nend || r.vp != r.vend)
            FAIL("diff runs longer than the covers");
    }
    goto done;
fail:
    Py_CLEAR(result);
done:
    if (reason != NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, reason);
    PyBuffer_Release(&win);
    PyBuffer_Release(&ctrl);
    PyBuffer_Release(&zr);
    PyBuffer_Release(&nr);
    PyBuffer_Release(&vals);
    PyBuffer_Release(&lit);
    return result;
}

static PyMethodDef methods[] = {
    {"apply_patch", apply_patch, METH_VARARGS, "Decode a PATCH chunk's streams into its output."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_apply", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__apply(void) { return PyModule_Create(&module); }
