/* _fastfilters: the statistics of the prose quality rules (scratchlm/data/filters.py) in C.
 *
 * What it is for: one pass over a document's lowered text (its words) and one over the text
 * itself (letterless words, symbols, bullet/ellipsis lines, repeated lines and paragraphs; for
 * ASCII text the two are one loop) compute every number the Gopher-style prose rules need, and
 * small functions count n-gram repetition over interned n-gram ids (an n-gram's id from those
 * of its two halves). filters.py applies the thresholds in the same order as its readable
 * Python reference, and tests hold the two to identical decisions.
 * What it is not for: any decision (thresholds live in Python), code documents, normalisation,
 * deduplication.
 *
 * Exactness: words, lines and paragraphs are compared by content (a hash finds candidates,
 * memcmp confirms) and n-grams are interned pair by pair, so no hash collision can change a
 * result. Whitespace for str.split/strip is Py_UNICODE_ISSPACE, as in CPython; the letter and
 * whitespace classes of the `regex` module (newer Unicode than CPython's) come in as a table of
 * one byte per code point filled in by filters.py from `regex` itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define VERSION 3
#define CLASS_LETTER 1 /* table flags, one byte per code point */
#define CLASS_SPACE 2
#define CLASS_KNOWN 4 /* the entry is filled in */
#define MAX_STOP_WORDS 64
#define MAX_BULLETS 16
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Character i of string data of the given kind; with a constant kind the switch folds away. */
#define AT(KIND, data, i)                                   \
    ((KIND) == 1 ? (Py_UCS4)((const Py_UCS1 *)(data))[i]   \
     : (KIND) == 2 ? (Py_UCS4)((const Py_UCS2 *)(data))[i] \
                   : ((const Py_UCS4 *)(data))[i])

static uint64_t mix64(uint64_t h) {
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* Hash of raw bytes, 8 at a time: spans of one string share its kind, so bytes suffice. */
static uint64_t hash_bytes(const unsigned char *p, size_t len) {
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (len * 0x100000001b3ULL), v;
    for (; len >= 8; p += 8, len -= 8) {
        memcpy(&v, p, 8);
        h = (h ^ v) * 0x87c37b91114253d5ULL;
        h ^= h >> 29;
    }
    v = 0;
    for (size_t k = 0; k < len; k++) v |= (uint64_t)p[k] << (8 * k); /* no memcpy call */
    return mix64(h ^ v);
}

/* -- a set of spans of one string, compared by content ------------------------------------ */
/* Slots are 8 bytes (32 bits of hash, id + 1; 0 = empty) so a document's table stays in L1;
   the spans themselves sit in arrays indexed by id. */
typedef struct {
    uint64_t *slots;
    size_t mask;
    uint32_t used;
    Py_ssize_t *starts, *lens; /* in bytes, per id */
} SpanSet;

static void spanset_free(SpanSet *t) {
    PyMem_Free(t->slots);
    PyMem_Free(t->starts);
    PyMem_Free(t->lens);
    t->slots = NULL; t->starts = t->lens = NULL;
}

static int spanset_alloc(SpanSet *t, size_t size) {
    uint64_t *slots = PyMem_Calloc(size, sizeof(uint64_t));
    size_t capacity = size * 2 / 3 + 1;
    Py_ssize_t *starts = PyMem_Realloc(t->starts, capacity * sizeof(Py_ssize_t));
    if (starts) t->starts = starts;
    Py_ssize_t *lens = PyMem_Realloc(t->lens, capacity * sizeof(Py_ssize_t));
    if (lens) t->lens = lens;
    if (!slots || !starts || !lens) {
        PyMem_Free(slots);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; t->slots && i <= t->mask; i++) { /* rehash what a smaller table held */
        if (t->slots[i] == 0) continue;
        size_t j = (size_t)(t->slots[i] >> 32) & (size - 1);
        while (slots[j] != 0) j = (j + 1) & (size - 1);
        slots[j] = t->slots[i];
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->mask = size - 1;
    return 0;
}

static int spanset_init(SpanSet *t, size_t expected) {
    size_t size = 16;
    while (size < expected + expected / 2 + 2) size <<= 1;
    t->slots = NULL; t->starts = t->lens = NULL;
    t->mask = 0; t->used = 0;
    return spanset_alloc(t, size);
}

/* The id (0-based, in order of first appearance) of the bytes base[start:start+len];
   *added says whether they are new. -1 when out of memory. The slot index and the stored tag
   both come from the high 32 bits of the hash (tables stay far below 2^32 slots). */
ALWAYS_INLINE int64_t spanset_id(SpanSet *t, const char *base, Py_ssize_t start,
                                 Py_ssize_t len, int *added) {
    if (3 * ((size_t)t->used + 1) > 2 * (t->mask + 1) && spanset_alloc(t, 2 * (t->mask + 1)) < 0)
        return -1;
    uint64_t tag = hash_bytes((const unsigned char *)base + start, (size_t)len) >> 32;
    size_t i = (size_t)tag & t->mask;
    for (;;) {
        uint64_t slot = t->slots[i];
        if (slot == 0) {
            uint32_t id = t->used++;
            t->slots[i] = (tag << 32) | (id + 1);
            t->starts[id] = start;
            t->lens[id] = len;
            *added = 1;
            return id;
        }
        if ((slot >> 32) == tag) {
            uint32_t id = (uint32_t)slot - 1;
            if (t->lens[id] == len &&
                memcmp(base + t->starts[id], base + start, (size_t)len) == 0) {
                *added = 0;
                return id;
            }
        }
        i = (i + 1) & t->mask;
    }
}

/* -- words of the lowered text: lowered.split() ---------------------------------------------- */
typedef struct {
    Py_ssize_t count, chars, longest, stop_words;
    uint32_t *ids, *lengths; /* per word: id (interned by content) and length in characters */
} Words;

/* The stop words, unpacked once per call: comparing against the str objects for every new
   distinct word cost as much as the rest of the word pass. */
#define MAX_STOP_LEN 16
typedef struct {
    int count;
    Py_ssize_t len[MAX_STOP_WORDS];
    Py_UCS4 chars[MAX_STOP_WORDS][MAX_STOP_LEN];
} StopWords;

static void unpack_stop_words(PyObject *tuple, StopWords *sw) {
    sw->count = 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(tuple) && k < MAX_STOP_WORDS; k++) {
        PyObject *word = PyTuple_GET_ITEM(tuple, k);
        Py_ssize_t len = PyUnicode_GET_LENGTH(word);
        sw->len[k] = len <= MAX_STOP_LEN ? len : -1; /* longer ones never match (checked) */
        for (Py_ssize_t j = 0; j < len && j < MAX_STOP_LEN; j++)
            sw->chars[k][j] = PyUnicode_READ_CHAR(word, j);
        sw->count++;
    }
}

/* str.isspace for code points below 256, as a table: Py_UNICODE_ISSPACE calls out above 127 */
static unsigned char latin1_space[256];

ALWAYS_INLINE int is_space(const int KIND, Py_UCS4 c) {
    return KIND == 1 ? latin1_space[c] : Py_UNICODE_ISSPACE(c);
}

/* Words go into a sink: interned, counted, checked against the stop words. */
typedef struct {
    SpanSet set;
    uint64_t stop_seen;
    const StopWords *stop;
    Words *w;
} WordSink;

static int sink_init(WordSink *sink, Py_ssize_t n, const StopWords *stop, Words *w) {
    sink->stop_seen = 0;
    sink->stop = stop;
    sink->w = w;
    if (spanset_init(&sink->set, (size_t)n / 16 + 64) < 0) { spanset_free(&sink->set); return -1; }
    return 0;
}

static void sink_finish(WordSink *sink) {
    spanset_free(&sink->set);
    for (uint64_t seen = sink->stop_seen; seen; seen &= seen - 1) sink->w->stop_words++;
}

/* The word data[start:start+len] (characters of the given kind). */
ALWAYS_INLINE int add_word(const int KIND, WordSink *sink, const void *data, Py_ssize_t start,
                           Py_ssize_t len) {
    Words *w = sink->w;
    int added;
    int64_t id = spanset_id(&sink->set, data, start * KIND, len * KIND, &added);
    if (id < 0) return -1;
    w->ids[w->count] = (uint32_t)id;
    w->lengths[w->count] = (uint32_t)len;
    w->count++;
    w->chars += len;
    if (len > w->longest) w->longest = len;
    if (added) { /* a new distinct word: is it a stop word? */
        const StopWords *stop = sink->stop;
        for (int k = 0; k < stop->count; k++) {
            if (stop->len[k] != len) continue;
            Py_ssize_t j = 0;
            while (j < len && stop->chars[k][j] == AT(KIND, data, start + j)) j++;
            if (j == len) sink->stop_seen |= (uint64_t)1 << k;
        }
    }
    return 0;
}

/* lowered.split(), for text that is not ASCII (ASCII text is split inside scan_text). */
ALWAYS_INLINE int split_words(const int KIND, const void *data, Py_ssize_t n, WordSink *sink) {
    Py_ssize_t i = 0;
    while (i < n) {
        while (i < n && is_space(KIND, AT(KIND, data, i))) i++;
        if (i >= n) break;
        Py_ssize_t start = i;
        while (i < n && !is_space(KIND, AT(KIND, data, i))) i++;
        if (add_word(KIND, sink, data, start, i - start) < 0) return -1;
    }
    return 0;
}

/* -- one pass over the text itself --------------------------------------------------------- */
typedef struct {
    Py_ssize_t parts, distinct, total_chars, distinct_chars;
} PartStats;

typedef struct {
    int unknown; /* a character whose class is not in the table yet */
    Py_ssize_t letterless, symbols, bullet_lines, ellipsis_lines;
    PartStats lines, paragraphs;
} TextStats;

static int add_part(SpanSet *set, const char *base, int kind, Py_ssize_t start, Py_ssize_t len,
                    PartStats *st) {
    int added;
    if (spanset_id(set, base, start * kind, len * kind, &added) < 0) return -1;
    st->parts++;
    st->total_chars += len;
    if (added) {
        st->distinct++;
        st->distinct_chars += len;
    }
    return 0;
}

/* With FUSED (ASCII text, whose lowered copy `low` has the same length and spaces), the words
   of `low` are split in the same loop, saving a second pass over the characters. */
ALWAYS_INLINE int scan_text(const int KIND, const int FUSED, const void *data, Py_ssize_t n,
                            const unsigned char *cls, const Py_UCS4 *bullets, int n_bullets,
                            const void *low, WordSink *sink, TextStats *st) {
    const char *base = data;
    SpanSet lines = {0}, paragraphs = {0};
    int status = 0;
    if (spanset_init(&lines, 64) < 0 || spanset_init(&paragraphs, 16) < 0) status = -1;
    unsigned in_token = 0, token_has_letter = 0, unknown = 0;
    Py_ssize_t dots = 0, line_start = 0, para_start = 0, letterless = 0, symbols = 0;
    Py_ssize_t word_start = -1;
    for (Py_ssize_t i = 0; i <= n && status == 0; i++) {
        Py_UCS4 c = i < n ? AT(KIND, data, i) : '\n'; /* the end closes the last line */
        if (FUSED) { /* lowered.split() */
            if (latin1_space[c]) {
                if (word_start >= 0) {
                    if (add_word(1, sink, low, word_start, i - word_start) < 0) {
                        status = -1;
                        break;
                    }
                    word_start = -1;
                }
            } else if (word_start < 0) {
                word_start = i;
            }
        }
        /* a letterless word: `(?<!\S)[^\s\p{L}]+(?!\S)` of the regex module; branch-free,
           since a word boundary every few characters defeats the branch predictor */
        unsigned k = i < n ? cls[c] : CLASS_SPACE | CLASS_KNOWN;
        unknown |= k ^ CLASS_KNOWN; /* the known bit, flipped; the rest is masked off below */
        unsigned space = (k >> 1) & 1, letter = k & CLASS_LETTER;
        letterless += in_token & space & (token_has_letter ^ 1);
        token_has_letter = (token_has_letter | letter) & (space ^ 1);
        in_token = space ^ 1;
        /* symbols: text.count("#") + text.count("...") + text.count("\u2026") */
        if (c == '.') {
            dots++;
            continue;
        }
        if (dots) {
            symbols += dots / 3;
            dots = 0;
        }
        symbols += (c == '#') | (c == 0x2026);
        if (c != '\n') continue;
        /* a line: text.split("\n"); blank ones count for nothing */
        Py_ssize_t len = i - line_start;
        if (len > 0) {
            Py_UCS4 first = AT(KIND, data, line_start), last = AT(KIND, data, i - 1);
            for (int b = 0; b < n_bullets; b++) {
                if (first == bullets[b]) { st->bullet_lines++; break; }
            }
            if (last == 0x2026 || (len >= 3 && last == '.' && AT(KIND, data, i - 2) == '.' &&
                                   AT(KIND, data, i - 3) == '.'))
                st->ellipsis_lines++;
            if (add_part(&lines, base, KIND, line_start, len, &st->lines) < 0) {
                status = -1;
                break;
            }
        }
        line_start = i + 1;
        /* a paragraph: [p.strip() for p in text.split("\n\n")], non-empty ones; a separator
           found at i-1 may not reuse the newline that ended the previous one */
        int separator = i < n && i - 1 >= para_start && AT(KIND, data, i - 1) == '\n';
        if (separator || i == n) {
            Py_ssize_t a = para_start, b = separator ? i - 1 : n;
            while (a < b && Py_UNICODE_ISSPACE(AT(KIND, data, a))) a++;
            while (b > a && Py_UNICODE_ISSPACE(AT(KIND, data, b - 1))) b--;
            if (b > a && add_part(&paragraphs, base, KIND, a, b - a, &st->paragraphs) < 0) {
                status = -1;
                break;
            }
            para_start = i + 1;
        }
    }
    st->unknown = (unknown & CLASS_KNOWN) != 0;
    st->letterless = letterless; /* locals above: no store through a pointer per character */
    st->symbols = symbols;
    spanset_free(&lines);
    spanset_free(&paragraphs);
    return status;
}

static PyObject *prose_stats(PyObject *self, PyObject *args) {
    PyObject *text, *lowered, *stop_words, *bullet_str;
    Py_buffer table;
    if (!PyArg_ParseTuple(args, "UUy*O!U", &text, &lowered, &table, &PyTuple_Type, &stop_words,
                          &bullet_str))
        return NULL;
    PyObject *result = NULL, *ids = NULL, *lengths = NULL;
    Words w = {0, 0, 0, 0, NULL, NULL};
    TextStats st;
    memset(&st, 0, sizeof st);
    Py_UCS4 bullets[MAX_BULLETS];
    int n_bullets = (int)PyUnicode_GET_LENGTH(bullet_str);
    if (table.len < 0x110000 || PyTuple_GET_SIZE(stop_words) > MAX_STOP_WORDS ||
        n_bullets > MAX_BULLETS) {
        PyErr_SetString(PyExc_ValueError, "bad character table, too many stop words or bullets");
        goto done;
    }
    for (int b = 0; b < n_bullets; b++) bullets[b] = PyUnicode_READ_CHAR(bullet_str, b);

    Py_ssize_t n_low = PyUnicode_GET_LENGTH(lowered), cap = n_low / 2 + 1;
    w.ids = PyMem_Malloc(cap * sizeof(uint32_t));
    w.lengths = PyMem_Malloc(cap * sizeof(uint32_t));
    if (!w.ids || !w.lengths) { PyErr_NoMemory(); goto done; }
    const void *low = PyUnicode_DATA(lowered);
    int status;
    StopWords stop;
    unpack_stop_words(stop_words, &stop);
    WordSink sink;
    if (sink_init(&sink, n_low, &stop, &w) < 0) goto done;
    const void *data = PyUnicode_DATA(text);
    const unsigned char *cls = table.buf;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (PyUnicode_IS_ASCII(text) && PyUnicode_IS_ASCII(lowered) && n_low == n) {
        status = scan_text(1, 1, data, n, cls, bullets, n_bullets, low, &sink, &st);
    } else {
        switch (PyUnicode_KIND(lowered)) {
        case 1: status = split_words(1, low, n_low, &sink); break;
        case 2: status = split_words(2, low, n_low, &sink); break;
        default: status = split_words(4, low, n_low, &sink); break;
        }
        int kind = PyUnicode_KIND(text);
        if (status == 0 && kind == 1)
            status = scan_text(1, 0, data, n, cls, bullets, n_bullets, NULL, NULL, &st);
        else if (status == 0 && kind == 2)
            status = scan_text(2, 0, data, n, cls, bullets, n_bullets, NULL, NULL, &st);
        else if (status == 0)
            status = scan_text(4, 0, data, n, cls, bullets, n_bullets, NULL, NULL, &st);
    }
    sink_finish(&sink);
    if (status < 0) goto done;
    if (st.unknown) { /* the caller fills the table in and asks again */
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }

    ids = PyBytes_FromStringAndSize((const char *)w.ids, w.count * sizeof(uint32_t));
    lengths = PyBytes_FromStringAndSize((const char *)w.lengths, w.count * sizeof(uint32_t));
    if (!ids || !lengths) goto done;
    /* a tuple: filters.py names the fields (ProseStats), cheaper than a dict per document */
    result = Py_BuildValue(
        "(nnnnnnnnnnnnnnnnOO)", w.count, w.chars, w.longest, w.stop_words, st.letterless,
        st.symbols, st.bullet_lines, st.ellipsis_lines, st.lines.parts, st.lines.distinct,
        st.lines.total_chars, st.lines.distinct_chars, st.paragraphs.parts,
        st.paragraphs.distinct, st.paragraphs.total_chars, st.paragraphs.distinct_chars, ids,
        lengths);
done:
    Py_XDECREF(ids);
    Py_XDECREF(lengths);
    PyMem_Free(w.ids);
    PyMem_Free(w.lengths);
    PyBuffer_Release(&table);
    return result;
}

/* -- n-grams: ids of (a+b)-grams from those of a-grams and b-grams ------------------------- */
/* Level 1 is the word ids. The (a+b)-gram at position p is the pair (its a-gram at p, the
   b-gram at p+a), so equal ids mean equal n-grams, exactly. Ids count up in order of first
   appearance: an occurrence repeats an earlier one iff its id is not a new maximum. */
static PyObject *combine_levels(PyObject *self, PyObject *args) {
    Py_buffer left, right;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "y*y*n", &left, &right, &offset)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = right.len / 4 - offset; /* (W - b + 1) - a = W - (a + b) + 1 */
    if (left.len % 4 || right.len % 4 || offset < 1 || count > left.len / 4) {
        PyErr_SetString(PyExc_ValueError, "levels must be uint32 buffers of a-grams and b-grams, "
                                          "with the offset a");
        goto done;
    }
    if (count <= 0) { result = PyBytes_FromStringAndSize(NULL, 0); goto done; }
    const uint32_t *l = left.buf, *r = right.buf;
    size_t size = 16;
    while (size < (size_t)count + (size_t)count / 2 + 2) size <<= 1;
    uint64_t *keys = PyMem_Malloc(size * sizeof(uint64_t));
    uint32_t *values = PyMem_Calloc(size, sizeof(uint32_t)); /* 0 = empty, else id + 1 */
    result = PyBytes_FromStringAndSize(NULL, count * sizeof(uint32_t));
    if (!keys || !values || !result) {
        PyMem_Free(keys); PyMem_Free(values); Py_CLEAR(result);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    uint32_t *out = (uint32_t *)PyBytes_AS_STRING(result), next_id = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t key = ((uint64_t)l[i] << 32) | r[i + offset];
        size_t j = (size_t)((key * 0x9e3779b97f4a7c15ULL) >> 32) & (size - 1); /* Fibonacci */
        while (values[j] != 0 && keys[j] != key) j = (j + 1) & (size - 1);
        if (values[j] == 0) {
            keys[j] = key;
            values[j] = ++next_id;
        }
        out[i] = values[j] - 1;
    }
    PyMem_Free(keys);
    PyMem_Free(values);
done:
    PyBuffer_Release(&left);
    PyBuffer_Release(&right);
    return result;
}

static int parse_level(PyObject *args, Py_buffer *level, Py_buffer *lengths, Py_ssize_t *n) {
    if (!PyArg_ParseTuple(args, "y*y*n", level, lengths, n)) return -1;
    if (level->len % 4 || lengths->len % 4 || *n < 1 ||
        level->len / 4 != (level->len ? lengths->len / 4 - *n + 1 : level->len / 4)) {
        PyBuffer_Release(level); PyBuffer_Release(lengths);
        PyErr_SetString(PyExc_ValueError, "a level of n-gram ids must have len(words) - n + 1 ids");
        return -1;
    }
    return 0;
}

/* (count, chars) of the most frequent n-gram, the longest in characters among equally frequent
   ones; (0, 0) without n-grams. */
static PyObject *top_ngram(PyObject *self, PyObject *args) {
    Py_buffer lb, wb;
    Py_ssize_t n;
    if (parse_level(args, &lb, &wb, &n) < 0) return NULL;
    const uint32_t *level = lb.buf, *lengths = wb.buf;
    Py_ssize_t count = lb.len / 4, best_count = 0, best_chars = 0;
    PyObject *result = NULL;
    uint32_t *counts = PyMem_Calloc(count + 1, sizeof(uint32_t));
    Py_ssize_t *chars = PyMem_Malloc((count + 1) * sizeof(Py_ssize_t));
    if (!counts || !chars) { PyErr_NoMemory(); goto done; }
    uint32_t distinct = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t id = level[i];
        if (id == distinct) { /* first occurrence: its length in characters */
            Py_ssize_t c = 0;
            for (Py_ssize_t k = 0; k < n; k++) c += lengths[i + k];
            chars[id] = c;
            distinct++;
        }
        counts[id]++;
    }
    for (uint32_t id = 0; id < distinct; id++) {
        if (counts[id] > best_count || (counts[id] == best_count && chars[id] > best_chars)) {
            best_count = counts[id];
            best_chars = chars[id];
        }
    }
    result = Py_BuildValue("nn", best_count, best_chars);
done:
    PyMem_Free(counts);
    PyMem_Free(chars);
    PyBuffer_Release(&lb); PyBuffer_Release(&wb);
    return result;
}

/* Characters of the words covered by an n-gram occurrence that repeats an earlier one. */
static PyObject *repeated_ngram_chars(PyObject *self, PyObject *args) {
    Py_buffer lb, wb;
    Py_ssize_t n;
    if (parse_level(args, &lb, &wb, &n) < 0) return NULL;
    const uint32_t *level = lb.buf, *lengths = wb.buf;
    Py_ssize_t count = lb.len / 4, chars = 0, covered_to = 0;
    int64_t newest = -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        if ((int64_t)level[i] > newest) { newest = level[i]; continue; }
        /* positions ascend: words up to the end of the last repeat are counted already */
        for (Py_ssize_t w = i > covered_to ? i : covered_to; w < i + n; w++) chars += lengths[w];
        covered_to = i + n;
    }
    PyBuffer_Release(&lb); PyBuffer_Release(&wb);
    return PyLong_FromSsize_t(chars);
}

static PyMethodDef methods[] = {
    {"prose_stats", prose_stats, METH_VARARGS,
     "prose_stats(text, lowered, table, stop_words, bullets) -> tuple of the prose statistics "
     "(filters.ProseStats), ending with word ids and lengths (uint32 bytes); None when the "
     "text has a character whose table entry is not filled in"},
    {"combine_levels", combine_levels, METH_VARARGS,
     "combine_levels(a_gram_ids, b_gram_ids, a) -> ids of the (a+b)-grams"},
    {"top_ngram", top_ngram, METH_VARARGS,
     "top_ngram(level_ids, lengths, n) -> (count, chars) of the most frequent n-gram"},
    {"repeated_ngram_chars", repeated_ngram_chars, METH_VARARGS,
     "repeated_ngram_chars(level_ids, lengths, n) -> chars covered by repeated n-grams"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastfilters",
                                    "C statistics for scratchlm.data.filters", -1, methods};

PyMODINIT_FUNC PyInit__fastfilters(void) {
    for (Py_UCS4 c = 0; c < 256; c++) latin1_space[c] = Py_UNICODE_ISSPACE(c) != 0;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
