/* Cover search for the delta encoder: approximate matches of a new image against an old one.
 *
 * Why our own (docs/delta-codec.md, "Our own matcher"): HDiffPatch's matcher, reached through
 * the `hdiffpatch` package, returns only when the whole image is matched, builds its suffix array on one thread (2-3.5x slower than libdivsufsort's here) and
 * rebuilds it on every call. Here the suffix array comes from libdivsufsort (the `pydivsufsort`
 * package) once per old image, and each chunk of the new image is matched by its own call, which
 * releases the GIL, so chunks can be matched on several threads sharing one index.
 *
 * The search, per chunk [start, end) of the new image (the idea is HDiffPatch's and bsdiff's;
 * the code and its constants are ours):
 *   1. Exact matches, left to right: the longest match of new[pos:] in the old image (suffix
 *      array binary search with the longest-common-prefix shortcut, entered through a table of
 *      the first two bytes; a bitset of the old image's 6-byte grams skips positions whose
 *      first bytes occur nowhere in it, which is most of new code). A match must be worth more
 *      than describing it (its length minus the varint cost of its position against the
 *      previous cover, at least ACCEPT). Of equally long matches, the one on the previous
 *      cover's line (same old - new offset) is taken. A match close behind the previous cover
 *      (LINK_GAP) on its line is linked into it; one that the previous line matches with at
 *      most (cover cost - 2) differing bytes extends the previous cover instead. Otherwise the
 *      previous cover moves onto the new match's line where that line fits it as well.
 *   2. Selection: covers on one line LINK_GAP or less apart are linked; a cover that links to
 *      none is kept only where its differences would code smaller than the same bytes as
 *      literals, by MIN_SCORE more than describing it costs. Both costs come from adaptive
 *      order-1 byte models of what was kept so far (the literal one warmed with the image just
 *      before the chunk), so a table whose entries all changed the same way is kept as a cover
 *      while text that only happens to match here and there stays literal.
 *   3. Extension: each cover grows into the gaps beside it, up to where the share of equal
 *      bytes (smoothed) peaks, if that share is at least RATIO_MIN/1024: changed pointers and
 *      immediates inside moved code become small byte-wise differences.
 * Long runs of equal bytes do not stall it: the exact comparison inside the binary search is
 * capped (CMP_CAP) and a capped match is extended linearly, and a match is skipped past whole.
 *
 * It also holds the encoder's per-chunk stream split (split_chunk, diff_runs): a numpy version
 * needs index arrays of 8 bytes per covered byte and is ~10x slower.
 *
 * build_index(old, sa) -> bytes     the two-byte bucket table and the gram bitset
 * find_covers(old, new, sa, index, start, end) -> bytes
 *     int64 triples (old_pos, new_pos, length), sorted and disjoint in new, inside [start, end)
 * sa: int32 or int64 buffer (format "i", "l" or "q"), the old image's suffix array; it is
 * spot-checked against the old image by build_index, and every position read from it is
 * bounds-checked, so a wrong array gives poor covers, never an out-of-bounds read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NBUCKET 65536
#define GRAM 8     /* bytes read to hash a gram (the hash keeps MINM of them) */
#define ACCEPT 2
#define MINM 6     /* shortest exact match searched for */
#define LINK_GAP 511
#define MIN_SCORE 6
#define GRAM_MASK (MINM >= 8 ? ~0ULL : ((1ULL << (8 * MINM)) - 1))
/* Exact comparison inside one binary-search step stops here; a match this long is extended
 * byte by byte afterwards (bounds the cost of searching inside long runs of equal bytes). */
#define CMP_CAP 4096
/* Bytes of the index before its bitset: the part's offset and length, the bucket table. */
#define INDEX_HEAD ((NBUCKET + 3) * (Py_ssize_t)sizeof(int64_t))
#define MAX_PARTS 16

typedef struct {
    const uint8_t *old; /* this part of the old image */
    int64_t n_old;      /* its length */
    int64_t base;       /* its offset in the old image */
    const void *sa;
    int sa64;
    const int64_t *bucket; /* NBUCKET + 1 entries: SA range of each first-two-byte value */
    const uint8_t *bits;   /* MINM-gram bitset */
    uint64_t bits_mask;    /* number of bits - 1 */
} index_t;

static inline int64_t sa_at(const index_t *ix, int64_t i) {
    return ix->sa64 ? ((const int64_t *)ix->sa)[i] : (int64_t)((const int32_t *)ix->sa)[i];
}

static inline uint64_t gram_hash(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    v &= GRAM_MASK;
    return (v * 0x9E3779B97F4A7C15ULL) >> 17;
}

static inline int64_t common_prefix(const uint8_t *a, const uint8_t *b, int64_t max) {
    int64_t i = 0;
    while (i + 8 <= max) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        if (x != y) return i + (__builtin_ctzll(x ^ y) >> 3);
        i += 8;
    }
    while (i < max && a[i] == b[i]) i++;
    return i;
}

/* Longest exact match of p[0:plen] in old; its length (0 if under 2) and old position. */
static int64_t longest_match(const index_t *ix, const uint8_t *p, int64_t plen, int64_t *opos) {
    if (plen < 2) return 0;
    unsigned key = ((unsigned)p[0] << 8) | p[1];
    int64_t lo = ix->bucket[key], hi = ix->bucket[key + 1] - 1;
    if (lo > hi || lo < 0 || hi >= ix->n_old) return 0;
    int64_t cap = plen < CMP_CAP ? plen : CMP_CAP;
    int64_t llcp = 0, rlcp = 0, best = 0, best_pos = 0;
    /* Binary search for where p sorts; the longest match is at one of the two ends. */
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        int64_t s = sa_at(ix, mid);
        if (s < 0 || s >= ix->n_old) return 0;
        int64_t k = llcp < rlcp ? llcp : rlcp;
        int64_t room = ix->n_old - s;
        int64_t lim = cap < room ? cap : room;
        int64_t l = k + common_prefix(ix->old + s + k, p + k, lim - k);
        if (l > best) {
            best = l;
            best_pos = s;
            if (l >= cap) break;
        }
        if (l == room || (l < cap && ix->old[s + l] < p[l])) {
            lo = mid;
            llcp = l;
        } else {
            hi = mid;
            rlcp = l;
        }
    }
    if (best < cap) {
        for (int end = 0; end < 2; end++) {
            int64_t s = sa_at(ix, end ? hi : lo);
            if (s < 0 || s >= ix->n_old) return 0;
            int64_t room = ix->n_old - s;
            int64_t l = common_prefix(ix->old + s, p, cap < room ? cap : room);
            if (l > best) {
                best = l;
                best_pos = s;
            }
        }
    }
    *opos = best_pos;
    return best;
}

static int64_t varint_cost(int64_t v) {
    uint64_t u = v < 0 ? ((uint64_t)(-v) << 1) | 1 : (uint64_t)v << 1;
    int64_t n = 1;
    while (u >= 0x80) {
        u >>= 7;
        n++;
    }
    return n;
}

/* Approximate extension over at most lim bytes, stepping by inc (+1 or -1) from the first
 * pair: the length where the share of equal bytes (smoothed over 4 more bytes) peaks, if that
 * share is at least RATIO_MIN/1024 and the length over 2; else 0. */
#define RATIO_MIN 474
static int64_t extend_ratio(const uint8_t *old, const uint8_t *new, int64_t lim, int inc) {
    int64_t same = 0, best_len = 0;
    uint64_t best_ratio = 0;
    for (int64_t len = 1; len <= lim; len++) {
        if (old[(len - 1) * inc] != new[(len - 1) * inc]) continue;
        same++;
        uint64_t ratio = (uint64_t)same * 1024 / (uint64_t)(len + 4);
        if (ratio >= best_ratio) {
            best_ratio = ratio;
            best_len = len;
        }
    }
    return best_ratio >= RATIO_MIN && best_len > 2 ? best_len : 0;
}

/* Estimated coded size of bytes under an adaptive order-1 model of what was already chosen
 * (HDiffPatch's selection idea, our model): literals and differences each have one, fed with
 * the last MODEL_WINDOW bytes of their kind, so a cover is kept only where its differences
 * code smaller than the same bytes would as literals. */
#define MODEL_WINDOW (256 * 1024)
#define MODEL_MAX_BITS 12
/* Literals of this much of the image before a chunk warm its literal model. */
#define MODEL_WARM 65536

typedef struct {
    uint32_t c1[256];
    uint32_t c2[256 * 256];
    uint8_t ring[MODEL_WINDOW];
    int64_t count; /* bytes added so far */
    int last;      /* previous byte added, -1 before any */
    int last_gone; /* previous byte forgotten, -1 before any */
} model_t;

static void model_add(model_t *m, uint8_t b) {
    if (m->count >= MODEL_WINDOW) {
        /* Forget the byte leaving the window and the pair it ended (bytes leave in the order
         * they came, so that pair began with the byte that left before it). */
        uint8_t gone = m->ring[m->count % MODEL_WINDOW];
        m->c1[gone]--;
        if (m->last_gone >= 0) m->c2[(m->last_gone << 8) | gone]--;
        m->last_gone = gone;
    }
    m->c1[b]++;
    if (m->last >= 0) m->c2[(m->last << 8) | b]++;
    m->ring[m->count % MODEL_WINDOW] = b;
    m->count++;
    m->last = b;
}

static int64_t model_bits(const model_t *m, int prev, uint8_t b) {
    if (prev < 0) return 8;
    uint32_t pair = m->c2[(prev << 8) | b];
    if (!pair) return MODEL_MAX_BITS;
    uint64_t total = 1 + (uint64_t)m->c1[prev];
    int64_t bits = 1;
    while (((uint64_t)pair << bits) < total && bits < MODEL_MAX_BITS) bits++;
    return bits;
}

/* Cost in bytes of new[0:n] as literals. */
static int64_t literal_cost(const model_t *m, const uint8_t *nw, int64_t n) {
    if (m->count == 0) return n;
    int64_t bits = 0;
    int prev = m->last;
    for (int64_t i = 0; i < n; i++) {
        bits += model_bits(m, prev, nw[i]);
        prev = nw[i];
    }
    return (bits + 7) / 8;
}

/* Cost in bytes of new[0:n] - old[0:n] as differences: a run of zeros costs about a byte (its
 * length), each other byte what the model says. */
static int64_t diff_cost(const model_t *m, const uint8_t *o, const uint8_t *nw, int64_t n) {
    int64_t bits = 0;
    int prev = m->count ? m->last : -1;
    int in_zero = 0;
    for (int64_t i = 0; i < n; i++) {
        uint8_t d = (uint8_t)(nw[i] - o[i]);
        if (d == 0) {
            if (!in_zero) bits += 8;
            in_zero = 1;
            continue;
        }
        in_zero = 0;
        bits += m->count ? model_bits(m, prev, d) : 8;
        prev = d;
    }
    return (bits + 7) / 8;
}

static void add_literals(model_t *m, const uint8_t *nw, int64_t n) {
    for (int64_t i = 0; i < n; i++) model_add(m, nw[i]);
}

static void add_diffs(model_t *m, const uint8_t *o, const uint8_t *nw, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint8_t d = (uint8_t)(nw[i] - o[i]);
        if (d) model_add(m, d);
    }
}

typedef struct {
    int64_t *v;
    Py_ssize_t n, cap;
} covers_t;

static int push(covers_t *c, int64_t o, int64_t n, int64_t len) {
    if (c->n + 3 > c->cap) {
        Py_ssize_t cap = c->cap ? c->cap * 2 : 3 * 1024;
        int64_t *v = realloc(c->v, (size_t)cap * sizeof(int64_t));
        if (!v) return 0;
        c->v = v;
        c->cap = cap;
    }
    c->v[c->n++] = o;
    c->v[c->n++] = n;
    c->v[c->n++] = len;
    return 1;
}

static int get_sa(PyObject *obj, Py_buffer *buf, int64_t n_old, int *sa64) {
    if (PyObject_GetBuffer(obj, buf, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return 0;
    const char *f = buf->format ? buf->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if ((strcmp(f, "i") == 0 && buf->itemsize == 4)) {
        *sa64 = 0;
    } else if ((strcmp(f, "l") == 0 || strcmp(f, "q") == 0) && buf->itemsize == 8) {
        *sa64 = 1;
    } else {
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "suffix array must be int32 or int64");
        return 0;
    }
    if (buf->len / buf->itemsize != n_old) {
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "suffix array length differs from the old image");
        return 0;
    }
    return 1;
}

static uint64_t bits_for(int64_t n_old) {
    uint64_t nbits = 1 << 16;
    while (nbits < (uint64_t)n_old * 4) nbits <<= 1;
    return nbits;
}

static PyObject *build_index(PyObject *self, PyObject *args) {
    Py_buffer oldb, sab;
    PyObject *sa_obj;
    Py_ssize_t offset = 0, length = -1;
    if (!PyArg_ParseTuple(args, "y*O|nn", &oldb, &sa_obj, &offset, &length)) return NULL;
    if (length < 0) length = oldb.len - offset;
    if (offset < 0 || offset > oldb.len || length > oldb.len - offset) {
        PyBuffer_Release(&oldb);
        PyErr_SetString(PyExc_ValueError, "part outside the old image");
        return NULL;
    }
    int sa64;
    if (!get_sa(sa_obj, &sab, length, &sa64)) {
        PyBuffer_Release(&oldb);
        return NULL;
    }
    uint64_t nbits = bits_for(length);
    Py_ssize_t size = INDEX_HEAD + (Py_ssize_t)(nbits / 8);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) goto done;
    /* Layout: the part's offset and length, the bucket table, the gram bitset. */
    int64_t *bucket = (int64_t *)PyBytes_AS_STRING(out) + 2;
    bucket[-2] = offset;
    bucket[-1] = length;
    uint8_t *bits = (uint8_t *)(bucket + NBUCKET + 1);
    const uint8_t *o = (const uint8_t *)oldb.buf + offset;
    int64_t n = length;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Bucket k holds the suffixes whose first two bytes are k; a one-byte suffix sorts first
     * among those starting with its byte, so it is counted in bucket (byte << 8). */
    int64_t *count = calloc(NBUCKET + 1, sizeof(int64_t));
    if (!count) {
        bad = 2;
    } else {
        for (int64_t i = 0; i < n; i++) {
            unsigned key = (unsigned)o[i] << 8;
            if (i + 1 < n) key |= o[i + 1];
            count[key + 1]++;
        }
        for (int k = 0; k < NBUCKET; k++) count[k + 1] += count[k];
        memcpy(bucket, count, (NBUCKET + 1) * sizeof(int64_t));
        free(count);
        /* Check the suffix array against the table (it must be the old image's). */
        index_t ix = {o, n, offset, sab.buf, sa64, bucket, bits, nbits - 1};
        int64_t step = n > 4096 ? n / 4096 : 1;
        for (int64_t i = 0; i < n && !bad; i += step) {
            int64_t s = sa_at(&ix, i);
            if (s < 0 || s >= n) bad = 1;
            else {
                unsigned key = (unsigned)o[s] << 8;
                if (s + 1 < n) key |= o[s + 1];
                if (i < bucket[key] || i >= bucket[key + 1]) bad = 1;
            }
        }
        memset(bits, 0, nbits / 8);
        for (int64_t i = 0; i + GRAM <= n; i++) {
            uint64_t h = gram_hash(o + i) & (nbits - 1);
            bits[h >> 3] |= (uint8_t)(1u << (h & 7));
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        Py_CLEAR(out);
        if (bad == 2) PyErr_NoMemory();
        else PyErr_SetString(PyExc_ValueError, "suffix array does not belong to the old image");
    }
done:
    PyBuffer_Release(&sab);
    PyBuffer_Release(&oldb);
    return out;
}

static PyObject *find_covers(PyObject *self, PyObject *args) {
    Py_buffer old, new, sab[MAX_PARTS], idx[MAX_PARTS];
    PyObject *parts;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*y*Onn", &old, &new, &parts, &start, &end)) return NULL;
    PyObject *out = NULL;
    index_t ixs[MAX_PARTS];
    int nparts = 0;
    PyObject *seq = PySequence_Fast(parts, "parts must be a sequence of (sa, index)");
    if (!seq) goto done;
    if (PySequence_Fast_GET_SIZE(seq) < 1 || PySequence_Fast_GET_SIZE(seq) > MAX_PARTS) {
        PyErr_SetString(PyExc_ValueError, "between 1 and 16 parts");
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "a part is a (sa, index) tuple");
            goto done;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &idx[nparts], PyBUF_SIMPLE) < 0)
            goto done;
        const int64_t *head = idx[nparts].buf;
        int64_t off = 0, len = -1;
        if (idx[nparts].len >= INDEX_HEAD) {
            off = head[0];
            len = head[1];
        }
        int sa64;
        if (len < 0 || off < 0 || off > old.len || len > old.len - off ||
            idx[nparts].len != (Py_ssize_t)(INDEX_HEAD + bits_for(len) / 8)) {
            PyBuffer_Release(&idx[nparts]);
            PyErr_SetString(PyExc_ValueError, "index does not belong to the old image");
            goto done;
        }
        if (!get_sa(PyTuple_GET_ITEM(item, 0), &sab[nparts], len, &sa64)) {
            PyBuffer_Release(&idx[nparts]);
            goto done;
        }
        ixs[nparts] = (index_t){(const uint8_t *)old.buf + off, len, off, sab[nparts].buf, sa64,
                                head + 2, (const uint8_t *)idx[nparts].buf + INDEX_HEAD,
                                bits_for(len) - 1};
        nparts++;
    }
    if (start < 0 || end > new.len || start > end) {
        PyErr_SetString(PyExc_ValueError, "chunk range outside the new image");
        goto done;
    }
    const uint8_t *o = old.buf, *nw = new.buf;
    int64_t n_old = old.len;
    covers_t c = {NULL, 0, 0};
    int oom = 0;
    Py_BEGIN_ALLOW_THREADS
    /* 1. Exact matches, left to right; a match on the same line (offset) as the previous one
     *    and at most LINK_GAP bytes after it is linked into it (the gap becomes differences). */
    int64_t pos = start;
    while (pos + GRAM <= end && !oom) {
        uint64_t hash = gram_hash(nw + pos);
        int seen = 0;
        for (int k = 0; k < nparts && !seen; k++) {
            uint64_t h = hash & ixs[k].bits_mask;
            seen = ixs[k].bits[h >> 3] & (1u << (h & 7));
        }
        if (!seen) {
            pos++;
            continue;
        }
        /* The longest match over the parts (each part's suffix array covers its own bytes);
         * of equally long ones, the nearest to where the previous cover's line points. */
        int64_t expect = c.n ? pos + (c.v[c.n - 3] - c.v[c.n - 2]) : pos;
        int64_t op = 0, len = 0;
        for (int k = 0; k < nparts; k++) {
            int64_t p = 0;
            int64_t l = longest_match(&ixs[k], nw + pos, end - pos, &p);
            p += ixs[k].base;
            if (l > len || (l == len && l > 0 && llabs(p - expect) < llabs(op - expect))) {
                len = l;
                op = p;
            }
        }
        if (len < MINM) {
            pos++;
            continue;
        }
        if (c.n) {
            /* Of equally long matches, the one on the previous cover's line: it keeps the
             * differences regular (same-offset covers link into one). */
            int64_t po = pos + (c.v[c.n - 3] - c.v[c.n - 2]);
            if (po >= 0 && po < n_old && po != op) {
                int64_t lim = n_old - po < end - pos ? n_old - po : end - pos;
                if (len < lim) lim = len;
                if (common_prefix(o + po, nw + pos, lim) >= len) op = po;
            }
        }
        {
            /* A match must be worth more than describing it (HDiffPatch's rule: short
             * matches only near the previous cover's line). */
            int64_t lo = c.n ? c.v[c.n - 3] : 0, ln = c.n ? c.v[c.n - 2] : start;
            if (len - (varint_cost(op - lo) + varint_cost(len) + varint_cost(pos - ln)) <
                ACCEPT) {
                pos++;
                continue;
            }
        }
        int64_t room = n_old - op < end - pos ? n_old - op : end - pos;
        if (len >= CMP_CAP) len += common_prefix(o + op + len, nw + pos + len, room - len);
        if (c.n) {
            int64_t *last = c.v + c.n - 3;
            if (pos - (last[1] + last[2]) <= LINK_GAP) {
                if (op - pos == last[0] - last[1]) {
                    last[2] = pos + len - last[1];
                    pos += len;
                    continue;
                }
                /* Nearly as good at the previous cover's offset: extend that cover over
                 * most of the match instead of starting a new line. */
                int64_t po = pos + (last[0] - last[1]);
                if (po >= 0 && po + len <= n_old) {
                    int64_t sw = varint_cost(op - last[0]) + varint_cost(len) +
                                 varint_cost(pos - last[1]) - 2;
                    int64_t miss = 0;
                    for (int64_t i = 0; i < len && miss <= sw; i++)
                        miss += o[po + i] != nw[pos + i];
                    if (miss <= sw) {
                        int64_t l = pos + len * 2 / 3 - last[1];
                        int64_t lroom = n_old - (last[0] + l) < end - (last[1] + l)
                                            ? n_old - (last[0] + l) : end - (last[1] + l);
                        l += common_prefix(o + last[0] + l, nw + last[1] + l, lroom);
                        while (l > 0 && o[last[0] + l - 1] != nw[last[1] + l - 1]) l--;
                        last[2] = l;
                        pos = last[1] + l > pos + 1 ? last[1] + l : pos + 1;
                        continue;
                    }
                }
            }
        }
        if (c.n) {
            /* The previous cover may do as well on the new match's line: moving it there
             * lets the two be linked into one cover (step 2). */
            int64_t *last = c.v + c.n - 3;
            int64_t lo = op - (pos - last[1]);
            if (lo >= 0 && lo + last[2] <= n_old) {
                int64_t here = 0, there = 0;
                for (int64_t i = 0; i < last[2]; i++) {
                    here += o[last[0] + i] != nw[last[1] + i];
                    there += o[lo + i] != nw[last[1] + i];
                }
                if (there <= here) last[0] = lo;
            }
        }
        if (!push(&c, op, pos, len)) oom = 1;
        pos += len;
    }
    /* 2. Keep a cover where its differences code smaller than the same bytes as literals,
     *    by more than it costs to describe it; covers on one line close together link. */
    Py_ssize_t kept = 0;
    int64_t last_oend = 0, last_nend = start;
    model_t *lit = calloc(1, sizeof(model_t)), *dif = calloc(1, sizeof(model_t));
    if (!lit || !dif) oom = 1;
    else {
        lit->last = lit->last_gone = dif->last = dif->last_gone = -1;
        /* The bytes before the chunk stand in for the literals seen so far (HDiffPatch's
         * model runs over the whole image; here each chunk is matched on its own). */
        int64_t w0 = start > MODEL_WARM ? start - MODEL_WARM : 0;
        add_literals(lit, nw + w0, start - w0);
    }
    for (Py_ssize_t i = 0; i < c.n && !oom; i += 3) {
        int64_t co = c.v[i], cn = c.v[i + 1], cl = c.v[i + 2];
        if (kept && co - cn == c.v[kept - 3] - c.v[kept - 2] &&
            cn - last_nend <= LINK_GAP) {
            int64_t ko = c.v[kept - 3], kn = c.v[kept - 2];
            add_diffs(dif, o + ko + (last_nend - kn), nw + last_nend, cn + cl - last_nend);
            c.v[kept - 1] = cn + cl - kn;
            last_oend = co + cl;
            last_nend = cn + cl;
            continue;
        }
        int64_t cost = varint_cost(co - last_oend) + varint_cost(cn - last_nend) +
                       varint_cost(cl);
        if (literal_cost(lit, nw + cn, cl) - diff_cost(dif, o + co, nw + cn, cl) - cost <
            MIN_SCORE)
            continue;
        add_literals(lit, nw + last_nend, cn - last_nend);
        add_diffs(dif, o + co, nw + cn, cl);
        c.v[kept] = co;
        c.v[kept + 1] = cn;
        c.v[kept + 2] = cl;
        kept += 3;
        last_oend = co + cl;
        last_nend = cn + cl;
    }
    free(lit);
    free(dif);
    c.n = kept;
    /* 3. Extend each cover into the gaps around it where the old bytes at its offset still
     *    match often enough (changed pointers and immediates inside moved code). */
    int64_t prev_end = start;
    for (Py_ssize_t i = 0; i < c.n && !oom; i += 3) {
        int64_t co = c.v[i], cn = c.v[i + 1], cl = c.v[i + 2];
        int64_t next = i + 3 < c.n ? c.v[i + 4] : end;
        int64_t blim = cn - prev_end < co ? cn - prev_end : co;
        int64_t b = extend_ratio(o + co - 1, nw + cn - 1, blim, -1);
        co -= b;
        cn -= b;
        cl += b;
        int64_t flim = next - (cn + cl);
        if (n_old - (co + cl) < flim) flim = n_old - (co + cl);
        cl += extend_ratio(o + co + cl, nw + cn + cl, flim, 1);
        c.v[i] = co;
        c.v[i + 1] = cn;
        c.v[i + 2] = cl;
        prev_end = cn + cl;
    }
    Py_END_ALLOW_THREADS
    if (oom) PyErr_NoMemory();
    else out = PyBytes_FromStringAndSize((const char *)c.v, c.n * (Py_ssize_t)sizeof(int64_t));
    free(c.v);
done:
    for (int k = 0; k < nparts; k++) {
        PyBuffer_Release(&sab[k]);
        PyBuffer_Release(&idx[k]);
    }
    Py_XDECREF(seq);
    PyBuffer_Release(&old);
    PyBuffer_Release(&new);
    return out;
}


/* ---- Chunk streams (the encoder's per-chunk split, docs/delta-codec.md "Format") ---- */

typedef struct {
    uint8_t *p;
    Py_ssize_t n, cap;
} buf_t;

static int buf_reserve(buf_t *b, Py_ssize_t more) {
    if (b->n + more <= b->cap) return 1;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + more) cap *= 2;
    uint8_t *p = realloc(b->p, (size_t)cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

static int put_uvarint(buf_t *b, uint64_t v) {
    if (!buf_reserve(b, 10)) return 0;
    while (v >= 0x80) {
        b->p[b->n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    b->p[b->n++] = (uint8_t)v;
    return 1;
}

/* split_chunk(old, chunk, old_pos, new_pos, length) -> (diff, literals)
 * Covers are int64 arrays, new_pos relative to the chunk, sorted and disjoint. diff is
 * chunk - old over every covered byte (in order), literals the chunk's other bytes. */
static PyObject *split_chunk(PyObject *self, PyObject *args) {
    Py_buffer old, chunk, ob, nb, lb;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*", &old, &chunk, &ob, &nb, &lb)) return NULL;
    PyObject *diff = NULL, *lit = NULL, *out = NULL;
    Py_ssize_t k = ob.len / 8;
    if (ob.len % 8 || nb.len != ob.len || lb.len != ob.len) {
        PyErr_SetString(PyExc_ValueError, "cover arrays differ in length");
        goto done;
    }
    const int64_t *op = ob.buf, *np_ = nb.buf, *lp = lb.buf;
    Py_ssize_t covered = 0, at = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (lp[i] < 0 || np_[i] < at || np_[i] > chunk.len - lp[i] || op[i] < 0 ||
            op[i] > old.len - lp[i]) {
            PyErr_SetString(PyExc_ValueError, "cover outside the images or out of order");
            goto done;
        }
        at = np_[i] + lp[i];
        covered += lp[i];
    }
    diff = PyBytes_FromStringAndSize(NULL, covered);
    lit = PyBytes_FromStringAndSize(NULL, chunk.len - covered);
    if (!diff || !lit) goto done;
    uint8_t *d = (uint8_t *)PyBytes_AS_STRING(diff), *l = (uint8_t *)PyBytes_AS_STRING(lit);
    const uint8_t *o = old.buf, *c = chunk.buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t pos = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        memcpy(l, c + pos, (size_t)(np_[i] - pos));
        l += np_[i] - pos;
        const uint8_t *a = c + np_[i], *b = o + op[i];
        for (int64_t j = 0; j < lp[i]; j++) d[j] = (uint8_t)(a[j] - b[j]);
        d += lp[i];
        pos = np_[i] + lp[i];
    }
    memcpy(l, c + pos, (size_t)(chunk.len - pos));
    Py_END_ALLOW_THREADS
    out = PyTuple_Pack(2, diff, lit);
done:
    Py_XDECREF(diff);
    Py_XDECREF(lit);
    PyBuffer_Release(&old);
    PyBuffer_Release(&chunk);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&nb);
    PyBuffer_Release(&lb);
    return out;
}

/* diff_runs(diff, min_zero_run) -> (nrun, zero-run lengths, value-run lengths, values)
 * The run-length split of a chunk's differences: value runs are maximal stretches that
 * begin and end with a non-zero byte and hold no zero run of min_zero_run or more; the two
 * length lists are unsigned LEB128, the values the bytes of the value runs. */
static PyObject *diff_runs(PyObject *self, PyObject *args) {
    Py_buffer db;
    Py_ssize_t min_zero;
    if (!PyArg_ParseTuple(args, "y*n", &db, &min_zero)) return NULL;
    if (min_zero < 1) {
        PyBuffer_Release(&db);
        PyErr_SetString(PyExc_ValueError, "min_zero_run must be at least 1");
        return NULL;
    }
    buf_t z = {0}, v = {0}, vals = {0};
    Py_ssize_t nrun = 0;
    int oom = 0;
    const uint8_t *d = db.buf;
    Py_ssize_t n = db.len;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0, prev_end = 0;
    while (i < n && !oom) {
        while (i < n && d[i] == 0) i++;
        if (i == n) break;
        Py_ssize_t start = i, end;
        for (;;) {
            end = i;
            while (end < n && d[end] != 0) end++;
            Py_ssize_t next = end;
            while (next < n && d[next] == 0) next++;
            if (next < n && next - end < min_zero) {
                i = next;
                continue;
            }
            break;
        }
        if (!put_uvarint(&z, (uint64_t)(start - prev_end)) ||
            !put_uvarint(&v, (uint64_t)(end - start)) || !buf_reserve(&vals, end - start)) {
            oom = 1;
            break;
        }
        memcpy(vals.p + vals.n, d + start, (size_t)(end - start));
        vals.n += end - start;
        nrun++;
        prev_end = i = end;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&db);
    PyObject *out = NULL;
    if (oom) PyErr_NoMemory();
    else
        out = Py_BuildValue("ny#y#y#", nrun, z.p ? (const char *)z.p : "", z.n,
                            v.p ? (const char *)v.p : "", v.n,
                            vals.p ? (const char *)vals.p : "", vals.n);
    free(z.p);
    free(v.p);
    free(vals.p);
    return out;
}

static PyMethodDef methods[] = {
    {"build_index", build_index, METH_VARARGS,
     "build_index(old, sa) -> bytes: bucket table and gram bitset of the old image."},
    {"find_covers", find_covers, METH_VARARGS,
     "find_covers(old, new, sa, index, start, end) -> bytes of int64 "
     "(old_pos, new_pos, length) triples."},
    {"split_chunk", split_chunk, METH_VARARGS,
     "split_chunk(old, chunk, old_pos, new_pos, length) -> (diff, literals)"},
    {"diff_runs", diff_runs, METH_VARARGS,
     "diff_runs(diff, min_zero_run) -> (nrun, zero runs, value runs, values)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_match", NULL, -1, methods};

PyMODINIT_FUNC PyInit__match(void) { return PyModule_Create(&module); }
