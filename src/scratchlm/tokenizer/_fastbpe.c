/*
 * _fastbpe: the two hot loops of byte-level BPE in C, for speed only.
 *
 * This is a line-for-line port of the plain-Python reference in merging.py (read that first;
 * tests hold the two to identical merges and ids). It holds no tokenizer logic of its own:
 *
 *   learn_merges(words, counts, vocab_size, progress) -> (vocab, merges)
 *       words: list of bytes (the unique chunks), counts: list of int (their occurrences).
 *       Pair counts are built once, then updated only around each merge; a max-heap of
 *       (count, left, right) entries, stale ones fixed when popped. Ties: highest count, then
 *       smallest (left, right). A merge whose bytes already exist reuses that token's id.
 *
 *   Encoder(vocab).encode_chunks(chunks) -> list[int];  Encoder(vocab).encode_bytes(b)
 *       tiktoken's rule: a chunk that is a token is that token; otherwise repeatedly join the
 *       adjacent pair whose concatenation is the lowest-id token (leftmost on ties). Short
 *       chunks by rescanning, long ones by a heap over a linked list (never quadratic).
 *       A dict caches chunk (str) -> packed uint32 ids.
 *
 *   split(text, mode) -> list[str];  Encoder.encode_text(text, mode) -> list[int]
 *       The named split patterns (mode 1 = gpt4, 2 = gpt2, see patterns.py) as hand-written
 *       scanners: one left-to-right pass that gives exactly the chunks `regex.findall` gives
 *       (tests compare them), several times faster. Character classes (\p{L}, \p{N}, \s) come
 *       from a table the Python side builds with the `regex` module itself (set_classes).
 *       Custom patterns stay with `regex`.
 *
 * Not for anything about files or special tokens; see the Python modules.
 */
/* Bumped whenever the interface changes; merging.py ignores a stale build that differs. */
#define FASTBPE_VERSION 2

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ growable int32 array */

typedef struct {
    int32_t *data;
    int32_t len, cap;
} IntVec;

static int vec_push(IntVec *v, int32_t x) {
    if (v->len == v->cap) {
        int32_t cap = v->cap ? v->cap * 2 : 4;
        int32_t *d = realloc(v->data, (size_t)cap * sizeof(int32_t));
        if (!d) return -1;
        v->data = d;
        v->cap = cap;
    }
    v->data[v->len++] = x;
    return 0;
}

static void vec_free(IntVec *v) {
    free(v->data);
    v->data = NULL;
    v->len = v->cap = 0;
}

/* ------------------------------------------------- hash map: (left, right) pair -> int32 */

/* Open addressing with linear probing; keys are (left << 32 | right), never deleted. */
typedef struct {
    uint64_t *keys;
    int32_t *vals;
    size_t cap, len; /* cap is a power of two */
} PairMap;

#define EMPTY_KEY UINT64_MAX

static uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

static size_t mix64(uint64_t k) { /* splitmix64 finaliser: spreads nearby keys apart */
    k ^= k >> 30; k *= 0xbf58476d1ce4e5b9ULL;
    k ^= k >> 27; k *= 0x94d049bb133111ebULL;
    k ^= k >> 31;
    return (size_t)k;
}

static int pmap_init(PairMap *m, size_t cap) {
    size_t c = 16;
    while (c < cap) c <<= 1;
    m->keys = malloc(c * sizeof(uint64_t));
    m->vals = malloc(c * sizeof(int32_t));
    if (!m->keys || !m->vals) return -1;
    memset(m->keys, 0xff, c * sizeof(uint64_t));
    m->cap = c;
    m->len = 0;
    return 0;
}

static void pmap_free(PairMap *m) {
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
}

static int32_t pmap_get(const PairMap *m, uint64_t key) {
    size_t mask = m->cap - 1, i = mix64(key) & mask;
    while (m->keys[i] != EMPTY_KEY) {
        if (m->keys[i] == key) return m->vals[i];
        i = (i + 1) & mask;
    }
    return -1;
}

static int pmap_put(PairMap *m, uint64_t key, int32_t val);

static int pmap_grow(PairMap *m) {
    PairMap bigger;
    if (pmap_init(&bigger, m->cap * 2) < 0) return -1;
    for (size_t i = 0; i < m->cap; i++)
        if (m->keys[i] != EMPTY_KEY) pmap_put(&bigger, m->keys[i], m->vals[i]);
    pmap_free(m);
    *m = bigger;
    return 0;
}

static int pmap_put(PairMap *m, uint64_t key, int32_t val) {
    if ((m->len + 1) * 2 > m->cap && pmap_grow(m) < 0) return -1;
    size_t mask = m->cap - 1, i = mix64(key) & mask;
    while (m->keys[i] != EMPTY_KEY) {
        if (m->keys[i] == key) { m->vals[i] = val; return 0; }
        i = (i + 1) & mask;
    }
    m->keys[i] = key;
    m->vals[i] = val;
    m->len++;
    return 0;
}

/* ======================================================================== learning */

typedef struct { int64_t count; int32_t a, b; } HeapEntry;

/* True when x should be popped before y: higher count, then smaller (a, b). */
static int heap_before(const HeapEntry *x, const HeapEntry *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

typedef struct { HeapEntry *e; size_t len, cap; } Heap;

static int heap_push(Heap *h, HeapEntry x) {
    if (h->len == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 1024;
        HeapEntry *e = realloc(h->e, cap * sizeof(HeapEntry));
        if (!e) return -1;
        h->e = e;
        h->cap = cap;
    }
    size_t i = h->len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_before(&x, &h->e[parent])) break;
        h->e[i] = h->e[parent];
        i = parent;
    }
    h->e[i] = x;
    return 0;
}

static HeapEntry heap_pop(Heap *h) {
    HeapEntry top = h->e[0], last = h->e[--h->len];
    size_t i = 0, n = h->len;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && heap_before(&h->e[child + 1], &h->e[child])) child++;
        if (!heap_before(&h->e[child], &last)) break;
        h->e[i] = h->e[child];
        i = child;
    }
    if (n) h->e[i] = last;
    return top;
}

/* Everything the merge loop works on. Pairs are numbered in order of first appearance. */
typedef struct {
    int32_t *sym;       /* all words' symbols, back to back */
    int64_t *start;     /* word w occupies sym[start[w] .. start[w] + len[w]) */
    int32_t *len;
    int64_t *count;     /* occurrences of word w in the corpus */
    int32_t *stamp;     /* last merge that visited word w (skips duplicate list entries) */
    Py_ssize_t n_words;
    PairMap pair_index; /* (a, b) -> pair number */
    int64_t *pcount;    /* pair number -> current count */
    int32_t *pa, *pb;   /* pair number -> its left and right ids */
    IntVec *pwords;     /* pair number -> words that (may) hold it */
    size_t n_pairs, pairs_cap;
    IntVec touched;     /* pairs that gained count during the current merge */
    int32_t *touched_stamp;
} Trainer;

/* The pair number for (a, b), created with count 0 if new; -1 on memory failure. */
static int32_t pair_id(Trainer *t, int32_t a, int32_t b) {
    uint64_t key = pair_key(a, b);
    int32_t p = pmap_get(&t->pair_index, key);
    if (p >= 0) return p;
    if (t->n_pairs == t->pairs_cap) {
        size_t cap = t->pairs_cap ? t->pairs_cap * 2 : 1 << 16;
        int64_t *pc = realloc(t->pcount, cap * sizeof(int64_t));
        if (pc) t->pcount = pc;
        int32_t *pa = realloc(t->pa, cap * sizeof(int32_t));
        if (pa) t->pa = pa;
        int32_t *pb = realloc(t->pb, cap * sizeof(int32_t));
        if (pb) t->pb = pb;
        IntVec *pw = realloc(t->pwords, cap * sizeof(IntVec));
        if (pw) t->pwords = pw;
        int32_t *ts = realloc(t->touched_stamp, cap * sizeof(int32_t));
        if (ts) t->touched_stamp = ts;
        if (!pc || !pa || !pb || !pw || !ts) return -1;
        t->pairs_cap = cap;
    }
    p = (int32_t)t->n_pairs++;
    t->pcount[p] = 0;
    t->pa[p] = a;
    t->pb[p] = b;
    t->pwords[p] = (IntVec){0};
    t->touched_stamp[p] = -1;
    if (pmap_put(&t->pair_index, key, p) < 0) return -1;
    return p;
}

/* Add `delta` to pair (a, b); a gain also records word w and marks the pair for the heap. */
static int add_pair(Trainer *t, int32_t a, int32_t b, int64_t delta, int32_t w, int32_t merge_no) {
    int32_t p = pair_id(t, a, b);
    if (p < 0) return -1;
    t->pcount[p] += delta;
    if (delta > 0) {
        if (vec_push(&t->pwords[p], w) < 0) return -1;
        if (t->touched_stamp[p] != merge_no) {
            t->touched_stamp[p] = merge_no;
            if (vec_push(&t->touched, p) < 0) return -1;
        }
    }
    return 0;
}

/* Merge (a, b) -> new_id inside word w, moving pair counts around each occurrence. Reading the
 * left neighbour from the output and the right one from the input keeps runs like "a b a b"
 * right (same bookkeeping as HF's Word::merge, written out here). */
static int merge_word(Trainer *t, int32_t w, int32_t a, int32_t b, int32_t new_id, int32_t merge_no) {
    int32_t *s = t->sym + t->start[w];
    int32_t n = t->len[w], out = 0;
    int64_t c = t->count[w];
    for (int32_t i = 0; i < n;) {
        if (i + 1 < n && s[i] == a && s[i + 1] == b) {
            if (out > 0) {
                int32_t x = s[out - 1];
                if (add_pair(t, x, a, -c, w, merge_no) < 0 || add_pair(t, x, new_id, c, w, merge_no) < 0)
                    return -1;
            }
            if (i + 2 < n) {
                int32_t y = s[i + 2];
                if (add_pair(t, b, y, -c, w, merge_no) < 0 || add_pair(t, new_id, y, c, w, merge_no) < 0)
                    return -1;
            }
            s[out++] = new_id;
            i += 2;
        } else {
            s[out++] = s[i++];
        }
    }
    t->len[w] = out;
    return 0;
}

static void trainer_free(Trainer *t) {
    free(t->sym); free(t->start); free(t->len); free(t->count); free(t->stamp);
    pmap_free(&t->pair_index);
    for (size_t p = 0; p < t->n_pairs; p++) vec_free(&t->pwords[p]);
    free(t->pcount); free(t->pa); free(t->pb); free(t->pwords); free(t->touched_stamp);
    vec_free(&t->touched);
}

/* Copy the Python words/counts into the flat arrays and count every pair once. */
static int trainer_load(Trainer *t, PyObject *words, PyObject *counts) {
    Py_ssize_t n = PyList_GET_SIZE(words);
    int64_t total = 0;
    for (Py_ssize_t w = 0; w < n; w++) {
        PyObject *item = PyList_GET_ITEM(words, w);
        if (!PyBytes_Check(item)) { PyErr_SetString(PyExc_TypeError, "words must be bytes"); return -1; }
        total += PyBytes_GET_SIZE(item);
    }
    t->n_words = n;
    t->sym = malloc((size_t)(total ? total : 1) * sizeof(int32_t));
    t->start = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    t->len = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    t->count = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    t->stamp = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    if (!t->sym || !t->start || !t->len || !t->count || !t->stamp ||
        pmap_init(&t->pair_index, (size_t)total) < 0) { PyErr_NoMemory(); return -1; }
    int64_t pos = 0;
    for (Py_ssize_t w = 0; w < n; w++) {
        PyObject *item = PyList_GET_ITEM(words, w);
        const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(item);
        Py_ssize_t len = PyBytes_GET_SIZE(item);
        if (len > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "word too long"); return -1; }
        long long c = PyLong_AsLongLong(PyList_GET_ITEM(counts, w));
        if (c == -1 && PyErr_Occurred()) return -1;
        t->start[w] = pos;
        t->len[w] = (int32_t)len;
        t->count[w] = c;
        t->stamp[w] = -1;
        for (Py_ssize_t i = 0; i < len; i++) t->sym[pos + i] = bytes[i];
        for (Py_ssize_t i = 0; i + 1 < len; i++) {
            int32_t p = pair_id(t, bytes[i], bytes[i + 1]);
            if (p < 0) { PyErr_NoMemory(); return -1; }
            t->pcount[p] += c;
            IntVec *pw = &t->pwords[p];
            if ((pw->len == 0 || pw->data[pw->len - 1] != (int32_t)w) && vec_push(pw, (int32_t)w) < 0) {
                PyErr_NoMemory();
                return -1;
            }
        }
        pos += len;
    }
    return 0;
}

/* The id for vocab[a] + vocab[b]: an existing token's, or a new one appended to the vocab. */
static Py_ssize_t token_for(PyObject *vocab, PyObject *id_of, int32_t a, int32_t b) {
    PyObject *merged = PyBytes_FromStringAndSize(NULL, 0);
    if (!merged) return -1;
    PyBytes_Concat(&merged, PyList_GET_ITEM(vocab, a));
    if (!merged) return -1;
    PyBytes_Concat(&merged, PyList_GET_ITEM(vocab, b));
    if (!merged) return -1;
    PyObject *existing = PyDict_GetItemWithError(id_of, merged);
    Py_ssize_t id;
    if (existing) {
        id = PyLong_AsSsize_t(existing);
    } else if (PyErr_Occurred()) {
        id = -1;
    } else {
        id = PyList_GET_SIZE(vocab);
        PyObject *idobj = PyLong_FromSsize_t(id);
        if (!idobj || PyList_Append(vocab, merged) < 0 || PyDict_SetItem(id_of, merged, idobj) < 0) id = -1;
        Py_XDECREF(idobj);
    }
    Py_DECREF(merged);
    return id;
}

static PyObject *learn_merges(PyObject *self, PyObject *args) {
    PyObject *words, *counts, *progress;
    Py_ssize_t vocab_size;
    if (!PyArg_ParseTuple(args, "O!O!nO", &PyList_Type, &words, &PyList_Type, &counts, &vocab_size, &progress))
        return NULL;
    if (PyList_GET_SIZE(words) != PyList_GET_SIZE(counts)) {
        PyErr_SetString(PyExc_ValueError, "words and counts differ in length");
        return NULL;
    }
    Trainer t = {0};
    Heap heap = {0};
    PyObject *vocab = PyList_New(0), *id_of = PyDict_New(), *merges = PyList_New(0), *result = NULL;
    if (!vocab || !id_of || !merges) goto done;
    for (int i = 0; i < 256; i++) {
        char byte = (char)i;
        PyObject *b = PyBytes_FromStringAndSize(&byte, 1), *id = PyLong_FromLong(i);
        int bad = !b || !id || PyList_Append(vocab, b) < 0 || PyDict_SetItem(id_of, b, id) < 0;
        Py_XDECREF(b);
        Py_XDECREF(id);
        if (bad) goto done;
    }
    if (trainer_load(&t, words, counts) < 0) goto done;
    for (size_t p = 0; p < t.n_pairs; p++)
        if (t.pcount[p] > 0 && heap_push(&heap, (HeapEntry){t.pcount[p], t.pa[p], t.pb[p]}) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    int32_t merge_no = 0;
    while (PyList_GET_SIZE(vocab) < vocab_size && heap.len > 0) {
        HeapEntry top = heap_pop(&heap);
        int32_t p = pmap_get(&t.pair_index, pair_key(top.a, top.b));
        int64_t current = p >= 0 ? t.pcount[p] : 0;
        if (current <= 0) continue;
        if (current != top.count) { /* stale: the count dropped since this entry was pushed */
            top.count = current;
            if (heap_push(&heap, top) < 0) { PyErr_NoMemory(); goto done; }
            continue;
        }
        Py_ssize_t new_id = token_for(vocab, id_of, top.a, top.b);
        if (new_id < 0) goto done;
        PyObject *m = Py_BuildValue("(iin)", top.a, top.b, new_id);
        if (!m || PyList_Append(merges, m) < 0) { Py_XDECREF(m); goto done; }
        Py_DECREF(m);
        /* Take the pair's word list out first: merging may grow (and move) the pair arrays. */
        IntVec holders = t.pwords[p];
        t.pwords[p] = (IntVec){0};
        t.touched.len = 0;
        for (int32_t k = 0; k < holders.len; k++) {
            int32_t w = holders.data[k];
            if (t.stamp[w] == merge_no) continue;
            t.stamp[w] = merge_no;
            if (merge_word(&t, w, top.a, top.b, (int32_t)new_id, merge_no) < 0) {
                vec_free(&holders);
                PyErr_NoMemory();
                goto done;
            }
        }
        vec_free(&holders);
        t.pcount[p] = 0;
        for (int32_t k = 0; k < t.touched.len; k++) {
            int32_t q = t.touched.data[k];
            if (t.pcount[q] > 0 && heap_push(&heap, (HeapEntry){t.pcount[q], t.pa[q], t.pb[q]}) < 0) {
                PyErr_NoMemory();
                goto done;
            }
        }
        merge_no++;
        if (progress != Py_None && (merge_no % 256 == 0)) {
            PyObject *r = PyObject_CallFunction(progress, "n", PyList_GET_SIZE(vocab));
            if (!r) goto done;
            Py_DECREF(r);
        }
    }
    if (progress != Py_None) {
        PyObject *r = PyObject_CallFunction(progress, "n", PyList_GET_SIZE(vocab));
        if (!r) goto done;
        Py_DECREF(r);
    }
    result = Py_BuildValue("(OO)", vocab, merges);
done:
    trainer_free(&t);
    free(heap.e);
    Py_XDECREF(vocab);
    Py_XDECREF(id_of);
    Py_XDECREF(merges);
    return result;
}


/* ======================================================================== splitting */

#define CL_LETTER 1
#define CL_NUMBER 2
#define CL_SPACE 4
#define N_CODEPOINTS 0x110000

static unsigned char *char_class = NULL; /* code point -> CL_* bits; set once by set_classes */

static PyObject *set_classes(PyObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg) || PyBytes_GET_SIZE(arg) != N_CODEPOINTS) {
        PyErr_SetString(PyExc_ValueError, "class table must be 0x110000 bytes");
        return NULL;
    }
    unsigned char *table = malloc(N_CODEPOINTS);
    if (!table) return PyErr_NoMemory();
    memcpy(table, PyBytes_AS_STRING(arg), N_CODEPOINTS);
    free(char_class);
    char_class = table;
    Py_RETURN_NONE;
}

typedef struct { int kind; const void *data; Py_ssize_t n; } Text;

static inline Py_UCS4 at(const Text *t, Py_ssize_t i) { return PyUnicode_READ(t->kind, t->data, i); }
static inline int cls(const Text *t, Py_ssize_t i) { return char_class[at(t, i)]; }
static inline int is_letter(const Text *t, Py_ssize_t i) { return cls(t, i) & CL_LETTER; }
static inline int is_number(const Text *t, Py_ssize_t i) { return cls(t, i) & CL_NUMBER; }
static inline int is_space(const Text *t, Py_ssize_t i) { return cls(t, i) & CL_SPACE; }
static inline int is_other(const Text *t, Py_ssize_t i) { return cls(t, i) == 0; } /* [^\s\p{L}\p{N}] */
static inline int is_newline(Py_UCS4 c) { return c == '\r' || c == '\n'; }

static Py_ssize_t run_of(const Text *t, Py_ssize_t j, int (*test)(const Text *, Py_ssize_t)) {
    while (j < t->n && test(t, j)) j++;
    return j;
}

/* The whitespace alternatives shared by both patterns, at a whitespace character i:
 * (gpt4 only) \s*[\r\n]  then  \s+(?!\S)  then  \s+ ; returns the chunk's end. */
static Py_ssize_t space_chunk(const Text *t, Py_ssize_t i, int newline_rule) {
    Py_ssize_t r = run_of(t, i, is_space);
    if (newline_rule) /* \s*[\r\n]: backtrack to the last newline inside the run */
        for (Py_ssize_t p = r - 1; p >= i; p--)
            if (is_newline(at(t, p))) return p + 1;
    if (r == t->n) return r;       /* \s+(?!\S) at the end of the text */
    if (r - i >= 2) return r - 1;  /* \s+(?!\S): leave the last space for the next word */
    return r;                      /* \s+ */
}

/* '(?i:[sdmt]|ll|ve|re) — with the `regex` module's case folding (ſ folds to s). */
static Py_ssize_t contraction_gpt4(const Text *t, Py_ssize_t i) {
    if (at(t, i) != '\'' || i + 1 >= t->n) return -1;
    Py_UCS4 d = at(t, i + 1);
    if (d == 's' || d == 'S' || d == 0x17F || d == 'd' || d == 'D' || d == 'm' || d == 'M' ||
        d == 't' || d == 'T')
        return i + 2;
    if (i + 2 >= t->n) return -1;
    Py_UCS4 e = at(t, i + 2);
    d = d < 128 ? (Py_UCS4)(d | 0x20) : d; /* ASCII lower case; the letters here fold only in ASCII */
    e = e < 128 ? (Py_UCS4)(e | 0x20) : e;
    if ((d == 'l' && e == 'l') || (d == 'v' && e == 'e') || (d == 'r' && e == 'e')) return i + 3;
    return -1;
}

/* gpt4 (cl100k): '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|
 *                 ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+   (first alternative wins) */
static Py_ssize_t next_gpt4(const Text *t, Py_ssize_t i) {
    Py_ssize_t j = contraction_gpt4(t, i);
    if (j >= 0) return j;
    Py_UCS4 c = at(t, i);
    int k = char_class[c];
    if (k & CL_LETTER) return run_of(t, i + 1, is_letter);
    if (!is_newline(c) && !(k & CL_NUMBER) && i + 1 < t->n && is_letter(t, i + 1))
        return run_of(t, i + 2, is_letter);
    if (k & CL_NUMBER) {
        j = i + 1;
        while (j < t->n && j < i + 3 && is_number(t, j)) j++;
        return j;
    }
    Py_ssize_t p = (c == ' ' && i + 1 < t->n && is_other(t, i + 1)) ? i + 1 : i;
    if (is_other(t, p)) {
        j = run_of(t, p + 1, is_other);
        while (j < t->n && is_newline(at(t, j))) j++;
        return j;
    }
    return space_chunk(t, i, 1);
}

/* gpt2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static Py_ssize_t next_gpt2(const Text *t, Py_ssize_t i) {
    Py_UCS4 c = at(t, i);
    if (c == '\'' && i + 1 < t->n) {
        Py_UCS4 d = at(t, i + 1);
        if (d == 's' || d == 't' || d == 'm' || d == 'd') return i + 2;
        if (i + 2 < t->n) {
            Py_UCS4 e = at(t, i + 2);
            if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) return i + 3;
        }
    }
    Py_ssize_t p = (c == ' ' && i + 1 < t->n) ? i + 1 : i; /* after the optional space */
    if (is_letter(t, p)) return run_of(t, p + 1, is_letter);
    if (is_number(t, p)) return run_of(t, p + 1, is_number);
    if (is_other(t, p)) return run_of(t, p + 1, is_other);
    return space_chunk(t, i, 0);
}

typedef Py_ssize_t (*NextChunk)(const Text *, Py_ssize_t);

static NextChunk splitter_for(int mode) {
    if (!char_class) {
        PyErr_SetString(PyExc_RuntimeError, "set_classes() has not been called");
        return NULL;
    }
    if (mode == 1) return next_gpt4;
    if (mode == 2) return next_gpt2;
    PyErr_SetString(PyExc_ValueError, "mode must be 1 (gpt4) or 2 (gpt2)");
    return NULL;
}

static PyObject *split(PyObject *self, PyObject *args) {
    PyObject *text;
    int mode;
    if (!PyArg_ParseTuple(args, "Ui", &text, &mode)) return NULL;
    NextChunk next = splitter_for(mode);
    if (!next) return NULL;
    Text t = {PyUnicode_KIND(text), PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text)};
    PyObject *chunks = PyList_New(0);
    for (Py_ssize_t i = 0; chunks && i < t.n;) {
        Py_ssize_t j = next(&t, i);
        PyObject *chunk = PyUnicode_Substring(text, i, j);
        if (!chunk || PyList_Append(chunks, chunk) < 0) Py_CLEAR(chunks);
        Py_XDECREF(chunk);
        i = j;
    }
    return chunks;
}

/* ======================================================================== encoding */

#define SHORT_CHUNK 48        /* same threshold as merging.py */
#define MAX_CACHE (1 << 19)   /* entries */
#define MAX_CACHED_CHUNK 256  /* characters */

typedef struct {
    PyObject_HEAD
    PairMap pairs;            /* (left, right) -> id of the token they spell */
    /* bytes -> id: open addressing over the vocabulary's bytes (for the whole-chunk rule) */
    int32_t *slots;
    size_t slot_mask;
    char *blob;               /* every token's bytes back to back */
    int64_t *offset;          /* token i is blob[offset[i] .. offset[i + 1]) */
    Py_ssize_t n_tokens;
    PyObject *cache;          /* dict: chunk str -> bytes of packed uint32 ids */
} Encoder;

static size_t hash_bytes(const char *s, size_t n) { /* FNV-1a */
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ULL; }
    return mix64(h);
}

static int32_t token_of_bytes(const Encoder *e, const char *s, size_t n) {
    size_t i = hash_bytes(s, n) & e->slot_mask;
    while (e->slots[i] >= 0) {
        int32_t id = e->slots[i];
        size_t len = (size_t)(e->offset[id + 1] - e->offset[id]);
        if (len == n && memcmp(e->blob + e->offset[id], s, n) == 0) return id;
        i = (i + 1) & e->slot_mask;
    }
    return -1;
}

/* Short chunk: rescan all adjacent pairs each step (ids[] is rewritten in place). */
static Py_ssize_t merge_by_scan(const Encoder *e, int32_t *ids, Py_ssize_t n) {
    while (n >= 2) {
        int32_t best = -1;
        Py_ssize_t at = -1;
        for (Py_ssize_t i = 0; i + 1 < n; i++) {
            int32_t tok = pmap_get(&e->pairs, pair_key(ids[i], ids[i + 1]));
            if (tok >= 0 && (best < 0 || tok < best)) { best = tok; at = i; }
        }
        if (best < 0) break;
        ids[at] = best;
        memmove(ids + at + 1, ids + at + 2, (size_t)(n - at - 2) * sizeof(int32_t));
        n--;
    }
    return n;
}

/* Long chunk: a heap of (token, position) over a doubly linked list; a merge keeps the left
 * position; an entry is skipped when the pair at its position has changed since. */
typedef struct { int32_t tok; int32_t pos; int32_t left, right; } MergeEntry;

static int merge_before(const MergeEntry *x, const MergeEntry *y) {
    return x->tok != y->tok ? x->tok < y->tok : x->pos < y->pos;
}

static void mheap_push(MergeEntry *h, size_t *len, MergeEntry x) {
    size_t i = (*len)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!merge_before(&x, &h[parent])) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = x;
}

static MergeEntry mheap_pop(MergeEntry *h, size_t *len) {
    MergeEntry top = h[0], last = h[--(*len)];
    size_t i = 0, n = *len;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && merge_before(&h[child + 1], &h[child])) child++;
        if (!merge_before(&h[child], &last)) break;
        h[i] = h[child];
        i = child;
    }
    if (n) h[i] = last;
    return top;
}

static Py_ssize_t merge_by_heap(const Encoder *e, int32_t *ids, Py_ssize_t n) {
    int32_t *nxt = malloc((size_t)n * sizeof(int32_t)), *prv = malloc((size_t)n * sizeof(int32_t));
    char *alive = malloc((size_t)n);
    /* Each merge pushes at most 2 entries, and there are at most n - 1 merges. */
    MergeEntry *heap = malloc((size_t)(3 * n + 1) * sizeof(MergeEntry));
    if (!nxt || !prv || !alive || !heap) {
        free(nxt); free(prv); free(alive); free(heap);
        PyErr_NoMemory();
        return -1;
    }
    size_t hlen = 0;
    for (Py_ssize_t i = 0; i < n; i++) { nxt[i] = (int32_t)(i + 1); prv[i] = (int32_t)(i - 1); alive[i] = 1; }
    for (Py_ssize_t i = 0; i + 1 < n; i++) {
        int32_t tok = pmap_get(&e->pairs, pair_key(ids[i], ids[i + 1]));
        if (tok >= 0) mheap_push(heap, &hlen, (MergeEntry){tok, (int32_t)i, ids[i], ids[i + 1]});
    }
    while (hlen > 0) {
        MergeEntry m = mheap_pop(heap, &hlen);
        int32_t i = m.pos, j = nxt[i];
        if (!alive[i] || j >= n || ids[i] != m.left || ids[j] != m.right) continue;
        ids[i] = m.tok;
        alive[j] = 0;
        nxt[i] = nxt[j];
        if (nxt[j] < n) prv[nxt[j]] = i;
        int32_t p = prv[i];
        if (p >= 0) {
            int32_t tok = pmap_get(&e->pairs, pair_key(ids[p], ids[i]));
            if (tok >= 0) mheap_push(heap, &hlen, (MergeEntry){tok, p, ids[p], ids[i]});
        }
        if (nxt[i] < n) {
            int32_t q = nxt[i];
            int32_t tok = pmap_get(&e->pairs, pair_key(ids[i], ids[q]));
            if (tok >= 0) mheap_push(heap, &hlen, (MergeEntry){tok, i, ids[i], ids[q]});
        }
    }
    Py_ssize_t out = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (alive[i]) ids[out++] = ids[i];
    free(nxt); free(prv); free(alive); free(heap);
    return out;
}

/* Encode one chunk's bytes into ids (caller provides room for n ids); returns the count. */
static Py_ssize_t encode_piece(const Encoder *e, const char *s, Py_ssize_t n, int32_t *ids) {
    int32_t whole = token_of_bytes(e, s, (size_t)n);
    if (whole >= 0) { ids[0] = whole; return 1; }
    for (Py_ssize_t i = 0; i < n; i++) ids[i] = (unsigned char)s[i];
    return n <= SHORT_CHUNK ? merge_by_scan(e, ids, n) : merge_by_heap(e, ids, n);
}

/* UTF-8 bytes of a str, lone surrogates passed through (a new reference, or NULL). */
static PyObject *utf8_of(PyObject *str) {
    return PyUnicode_AsEncodedString(str, "utf-8", "surrogatepass");
}

typedef struct { int32_t *data; Py_ssize_t len, cap; } IdBuf;

static int idbuf_reserve(IdBuf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra) cap *= 2;
    int32_t *d = realloc(b->data, (size_t)cap * sizeof(int32_t));
    if (!d) { PyErr_NoMemory(); return -1; }
    b->data = d;
    b->cap = cap;
    return 0;
}

/* Append the ids of one chunk (str) to buf, through the cache. */
static int encode_chunk_into(Encoder *e, PyObject *chunk, IdBuf *buf) {
    PyObject *hit = PyDict_GetItemWithError(e->cache, chunk);
    if (hit) {
        Py_ssize_t k = PyBytes_GET_SIZE(hit) / (Py_ssize_t)sizeof(int32_t);
        if (idbuf_reserve(buf, k) < 0) return -1;
        memcpy(buf->data + buf->len, PyBytes_AS_STRING(hit), (size_t)k * sizeof(int32_t));
        buf->len += k;
        return 0;
    }
    if (PyErr_Occurred()) return -1;
    Py_ssize_t n;
    const char *s;
    PyObject *encoded = NULL;
    if (PyUnicode_IS_ASCII(chunk)) {
        s = (const char *)PyUnicode_DATA(chunk);
        n = PyUnicode_GET_LENGTH(chunk);
    } else {
        encoded = utf8_of(chunk);
        if (!encoded) return -1;
        s = PyBytes_AS_STRING(encoded);
        n = PyBytes_GET_SIZE(encoded);
    }
    if (n == 0) { Py_XDECREF(encoded); return 0; }
    if (idbuf_reserve(buf, n) < 0) { Py_XDECREF(encoded); return -1; }
    int32_t *dst = buf->data + buf->len;
    Py_ssize_t k = encode_piece(e, s, n, dst);
    Py_XDECREF(encoded);
    if (k < 0) return -1;
    buf->len += k;
    if (PyUnicode_GET_LENGTH(chunk) <= MAX_CACHED_CHUNK) {
        if (PyDict_GET_SIZE(e->cache) >= MAX_CACHE) PyDict_Clear(e->cache);
        PyObject *packed = PyBytes_FromStringAndSize((const char *)dst, k * (Py_ssize_t)sizeof(int32_t));
        if (!packed) return -1;
        int rc = PyDict_SetItem(e->cache, chunk, packed);
        Py_DECREF(packed);
        if (rc < 0) return -1;
    }
    return 0;
}

static PyObject *ids_to_list(const int32_t *ids, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLong(ids[i]);
        if (!v) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static PyObject *Encoder_encode_chunks(Encoder *e, PyObject *chunks) {
    PyObject *seq = PySequence_Fast(chunks, "chunks must be a sequence of str");
    if (!seq) return NULL;
    IdBuf buf = {0};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_Check(items[i])) { PyErr_SetString(PyExc_TypeError, "chunks must be str"); goto done; }
        if (encode_chunk_into(e, items[i], &buf) < 0) goto done;
    }
    result = ids_to_list(buf.data, buf.len);
done:
    free(buf.data);
    Py_DECREF(seq);
    return result;
}

/* Split (named pattern) and encode in one pass: no list of chunks is ever built. */
static PyObject *Encoder_encode_text(Encoder *e, PyObject *args) {
    PyObject *text;
    int mode;
    if (!PyArg_ParseTuple(args, "Ui", &text, &mode)) return NULL;
    NextChunk next = splitter_for(mode);
    if (!next) return NULL;
    Text t = {PyUnicode_KIND(text), PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text)};
    IdBuf buf = {0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < t.n;) {
        Py_ssize_t j = next(&t, i);
        PyObject *chunk = PyUnicode_Substring(text, i, j);
        int rc = chunk ? encode_chunk_into(e, chunk, &buf) : -1;
        Py_XDECREF(chunk);
        if (rc < 0) goto done;
        i = j;
    }
    result = ids_to_list(buf.data, buf.len);
done:
    free(buf.data);
    return result;
}

static PyObject *Encoder_encode_bytes(Encoder *e, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    int32_t *ids = malloc((size_t)(view.len ? view.len : 1) * sizeof(int32_t));
    PyObject *result = NULL;
    if (!ids) { PyErr_NoMemory(); goto done; }
    Py_ssize_t k = view.len ? encode_piece(e, view.buf, view.len, ids) : 0;
    if (k >= 0) result = ids_to_list(ids, k);
done:
    free(ids);
    PyBuffer_Release(&view);
    return result;
}

static void Encoder_dealloc(Encoder *e) {
    pmap_free(&e->pairs);
    free(e->slots);
    free(e->blob);
    free(e->offset);
    Py_XDECREF(e->cache);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int Encoder_init(Encoder *e, PyObject *args, PyObject *kwds) {
    PyObject *vocab;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &vocab)) return -1;
    Py_ssize_t n = PyList_GET_SIZE(vocab);
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyList_GET_ITEM(vocab, i);
        if (!PyBytes_Check(b)) { PyErr_SetString(PyExc_TypeError, "vocab must be a list of bytes"); return -1; }
        total += PyBytes_GET_SIZE(b);
    }
    e->n_tokens = n;
    e->blob = malloc((size_t)(total ? total : 1));
    e->offset = malloc((size_t)(n + 1) * sizeof(int64_t));
    size_t slots = 16;
    while (slots < (size_t)n * 2) slots <<= 1;
    e->slots = malloc(slots * sizeof(int32_t));
    e->slot_mask = slots - 1;
    e->cache = PyDict_New();
    if (!e->blob || !e->offset || !e->slots || !e->cache || pmap_init(&e->pairs, (size_t)n * 8) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    memset(e->slots, 0xff, slots * sizeof(int32_t));
    int64_t pos = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyList_GET_ITEM(vocab, i);
        Py_ssize_t len = PyBytes_GET_SIZE(b);
        e->offset[i] = pos;
        memcpy(e->blob + pos, PyBytes_AS_STRING(b), (size_t)len);
        size_t h = hash_bytes(PyBytes_AS_STRING(b), (size_t)len) & e->slot_mask;
        while (e->slots[h] >= 0) h = (h + 1) & e->slot_mask;
        e->slots[h] = (int32_t)i;
        pos += len;
    }
    e->offset[n] = pos;
    /* Every split of every merged token into two tokens -> that token (see build_pair_table). */
    for (Py_ssize_t id = 256; id < n; id++) {
        const char *s = e->blob + e->offset[id];
        int64_t len = e->offset[id + 1] - e->offset[id];
        for (int64_t cut = 1; cut < len; cut++) {
            int32_t left = token_of_bytes(e, s, (size_t)cut);
            int32_t right = token_of_bytes(e, s + cut, (size_t)(len - cut));
            if (left >= 0 && right >= 0 && pmap_put(&e->pairs, pair_key(left, right), (int32_t)id) < 0) {
                PyErr_NoMemory();
                return -1;
            }
        }
    }
    return 0;
}

static PyMethodDef Encoder_methods[] = {
    {"encode_chunks", (PyCFunction)Encoder_encode_chunks, METH_O, "ids of a sequence of str chunks"},
    {"encode_bytes", (PyCFunction)Encoder_encode_bytes, METH_O, "ids of one chunk's bytes"},
    {"encode_text", (PyCFunction)Encoder_encode_text, METH_VARARGS, "split (mode 1 gpt4, 2 gpt2) and encode"},
    {NULL}
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "scratchlm.tokenizer._fastbpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BPE chunk encoder over a fixed vocabulary (see merging.ChunkEncoder)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};

static PyMethodDef module_methods[] = {
    {"learn_merges", learn_merges, METH_VARARGS, "learn BPE merges (see merging.learn_merges)"},
    {"set_classes", set_classes, METH_O, "code point -> class bits table (1 letter, 2 number, 4 space)"},
    {"split", split, METH_VARARGS, "split text with a named pattern (mode 1 gpt4, 2 gpt2)"},
    {NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastbpe", "C hot loops for byte-level BPE (see merging.py)", -1, module_methods
};

PyMODINIT_FUNC PyInit__fastbpe(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "VERSION", FASTBPE_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
