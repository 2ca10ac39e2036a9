/* _fastfilters: the statistics of the prose quality rules (scratchlm/data/filters.py) in C.
 *
 * What it is for: one pass over a document computes every number the Gopher-style prose rules
 * need (words of its lowered text, stop words, letterless words, symbols, bullet/ellipsis lines,
 * repeated lines and paragraphs, whether a rejected phrase occurs), and an `Ngrams` object
 * counts the n-gram repetition of its words. filters.py applies the thresholds in the same order
 * as its readable Python reference, and tests hold the two to identical decisions.
 * What it is not for: any decision (thresholds live in Python), code documents, normalisation,
 * deduplication.
 *
 * Speed: ASCII text (nearly all of it in practice) is lowered here, 8 bytes at a time, into a
 * padded scratch copy, and scanned a word at a time: Python's str.lower is not needed, and the
 * words are hashed and compared with whole 8-byte loads. Other text takes a general
 * character-at-a-time path over the lowered copy Python gives. N-grams are hashed only where
 * they can repeat: an n-gram occurs twice only if each of its words does (n <= 2) or each of
 * its bigrams does (n >= 3), so most positions of a document are skipped.
 *
 * Exactness: words, lines, paragraphs and n-grams are compared by content (a hash finds
 * candidates, a comparison confirms), so no hash collision can change a result. Whitespace for
 * str.split/strip is Py_UNICODE_ISSPACE, as in CPython; the letter and whitespace classes of
 * the `regex` module (newer Unicode than CPython's) come in as a table of one byte per code
 * point filled in by filters.py from `regex` itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define VERSION 4
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
    if (len >= 8) {
        const unsigned char *last = p + len - 8;
        for (; p < last; p += 8) {
            memcpy(&v, p, 8);
            h = (h ^ v) * 0x87c37b91114253d5ULL;
            h ^= h >> 29;
        }
        memcpy(&v, last, 8); /* the last 8 bytes, overlapping the previous ones */
        return mix64(h ^ v);
    }
    v = 0;
    for (size_t k = 0; k < len; k++) v |= (uint64_t)p[k] << (8 * k); /* no memcpy call */
    return mix64(h ^ v);
}

/* The lowest `len` bytes (1..8) of a little-endian 8-byte load; the highest on big-endian. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define FIRST_BYTES(len) (~0ULL << (64 - 8 * (len)))
#else
#define FIRST_BYTES(len) (~0ULL >> (64 - 8 * (len)))
#endif
/* Bytes past the end of a scratch copy ("padded buffer") that whole 8-byte loads may touch:
   a span of it is read 8 bytes at a time and the last load masked, with no byte loop. */
#define PADDING 16

/* memcmp(a, b, len) == 0 for 1 <= len bytes of a padded buffer, inline. */
ALWAYS_INLINE int equal_padded(const unsigned char *a, const unsigned char *b, size_t len) {
    uint64_t x, y;
    for (; len > 8; a += 8, b += 8, len -= 8) {
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        if (x != y) return 0;
    }
    memcpy(&x, a, 8);
    memcpy(&y, b, 8);
    return ((x ^ y) & FIRST_BYTES(len)) == 0;
}

/* ASCII upper case to lower case, 8 bytes at a time (every byte below 0x80, so no carries):
   a byte gets 0x20 added iff 'A' <= byte <= 'Z', exactly what str.lower does to ASCII. */
ALWAYS_INLINE uint64_t ascii_lower8(uint64_t v) {
    uint64_t at_least_A = v + 0x3f3f3f3f3f3f3f3fULL;  /* high bit set iff byte >= 0x41 */
    uint64_t above_Z = v + 0x2525252525252525ULL;     /* high bit set iff byte >= 0x5b */
    return v | (((at_least_A & ~above_Z) & 0x8080808080808080ULL) >> 2);
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
    const unsigned char *span = (const unsigned char *)base + start;
    uint64_t tag = hash_bytes(span, (size_t)len) >> 32;
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
            const unsigned char *seen = (const unsigned char *)base + t->starts[id];
            if (t->lens[id] == len &&
                memcmp(seen, span, (size_t)len) == 0) {
                *added = 0;
                return id;
            }
        }
        i = (i + 1) & t->mask;
    }
}


/* -- the words of ASCII text: a set of its own ------------------------------------------------ */
/* A slot holds a word's first 8 bytes next to its key (24 bits of hash, its length up to 255,
   id + 1; 0 = empty), so a word of 8 letters or fewer (most) is confirmed by the one slot,
   without loading the span of the earlier word, and whether it is new decides no branch:
   either the first slot probed holds it or is empty and takes it (conditional moves). Only a
   collision (rare: the table is kept sparse) takes the probing loop. The words are spans of
   one padded buffer (see PADDING). */
typedef struct {
    uint64_t key, head;
} WordSlot;

typedef struct {
    WordSlot *slots;
    size_t mask;
    int shift; /* 64 - log2(slots) */
    uint32_t used;
    const unsigned char *base;
    Py_ssize_t *starts, *lens; /* per id */
} WordSet;

#define WORD_KEY(hash, len) (((hash) >> 40 << 40) | ((uint64_t)((len) < 255 ? (len) : 255) << 32))

/* The hash of a word of a padded buffer: multiply-shift of its first 8 bytes (one multiply;
   the slot index is taken from the top bits, the good ones), the rest folded in 8 at a time. */
ALWAYS_INLINE uint64_t word_hash(const unsigned char *p, size_t len) {
    uint64_t v;
    memcpy(&v, p, 8);
    uint64_t h = (v & FIRST_BYTES(len < 8 ? len : 8)) * 0x9e3779b97f4a7c15ULL;
    for (size_t done = 8; done < len; done += 8) {
        memcpy(&v, p + done, 8);
        v &= FIRST_BYTES(len - done < 8 ? len - done : 8);
        h = (h ^ (h >> 29) ^ v) * 0xbf58476d1ce4e5b9ULL;
    }
    return h;
}
#define WORD_SLOT(t, h) ((size_t)((h) >> (t)->shift))

static void wordset_free(WordSet *t) {
    PyMem_Free(t->slots);
    PyMem_Free(t->starts);
    PyMem_Free(t->lens);
    t->slots = NULL; t->starts = t->lens = NULL;
}

ALWAYS_INLINE uint64_t word_head(const unsigned char *span, Py_ssize_t len) {
    uint64_t v;
    memcpy(&v, span, 8);
    return v & FIRST_BYTES(len < 8 ? len : 8);
}

static int wordset_alloc(WordSet *t, size_t size) {
    WordSlot *slots = PyMem_Calloc(size, sizeof(WordSlot));
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
    for (uint32_t id = 0; id < t->used; id++) { /* rehash what a smaller table held */
        const unsigned char *span = t->base + t->starts[id];
        uint64_t h = word_hash(span, (size_t)t->lens[id]);
        size_t j = (size_t)(h >> (64 - __builtin_ctzll(size)));
        while (slots[j].key != 0) j = (j + 1) & (size - 1);
        slots[j].key = WORD_KEY(h, t->lens[id]) | (id + 1);
        slots[j].head = word_head(span, t->lens[id]);
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->mask = size - 1;
    t->shift = 64 - __builtin_ctzll(size);
    return 0;
}

static int wordset_init(WordSet *t, const unsigned char *base, size_t expected) {
    size_t size = 16;
    while (size < expected + expected / 2 + 2) size <<= 1;
    memset(t, 0, sizeof *t);
    t->base = base;
    return wordset_alloc(t, size);
}

/* Whether the slot holds the word span[0:len] (key = WORD_KEY of its hash, head its first
   bytes): key and head, and for a longer word the rest of it. */
ALWAYS_INLINE int wordset_holds(const WordSet *t, WordSlot slot, uint64_t key, uint64_t head,
                                const unsigned char *span, Py_ssize_t len) {
    if ((slot.key & ~0xffffffffULL) != key || slot.head != head) return 0;
    if (len <= 8) return 1;
    uint32_t id = (uint32_t)slot.key - 1;
    return t->lens[id] == len && equal_padded(t->base + t->starts[id] + 8, span + 8, (size_t)len - 8);
}

/* The id (0-based, in order of first appearance) of the word base[start:start+len]; *added
   says whether it is new. -1 when out of memory. */
ALWAYS_INLINE int64_t wordset_id(WordSet *t, Py_ssize_t start, Py_ssize_t len, int *added) {
    if (3 * ((size_t)t->used + 1) > 2 * (t->mask + 1) && wordset_alloc(t, 2 * (t->mask + 1)) < 0)
        return -1;
    const unsigned char *span = t->base + start;
    uint64_t h = word_hash(span, (size_t)len), key = WORD_KEY(h, len);
    uint64_t head = word_head(span, len);
    size_t i = WORD_SLOT(t, h);
    WordSlot slot = t->slots[i];
    uint32_t new_id = t->used;
    int empty = slot.key == 0;
    /* the short case without a branch; a longer word is checked in full */
    int match = len <= 8 ? ((slot.key & ~0xffffffffULL) == key) & (slot.head == head)
                         : wordset_holds(t, slot, key, head, span, len);
    if (__builtin_expect(!(match | empty), 0)) { /* a collision: probe on */
        for (;;) {
            i = (i + 1) & t->mask;
            slot = t->slots[i];
            if (slot.key == 0) break;
            if (wordset_holds(t, slot, key, head, span, len)) {
                *added = 0;
                return (uint32_t)slot.key - 1;
            }
        }
        match = 0;
    }
    WordSlot fresh = {key | (new_id + 1), head};
    t->slots[i] = match ? slot : fresh;
    t->starts[new_id] = start; /* room for one more is ensured above; unused when matched */
    t->lens[new_id] = len;
    t->used = new_id + (uint32_t)!match;
    *added = !match;
    return match ? (uint32_t)slot.key - 1 : new_id;
}

/* Whether the set holds the word `word` (len bytes, zero padded). */
static int wordset_contains(const WordSet *t, const unsigned char *word, Py_ssize_t len) {
    uint64_t h = word_hash(word, (size_t)len), key = WORD_KEY(h, len);
    uint64_t head = word_head(word, len);
    for (size_t i = WORD_SLOT(t, h); t->slots[i].key != 0; i = (i + 1) & t->mask)
        if (wordset_holds(t, t->slots[i], key, head, word, len)) return 1;
    return 0;
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
    int ascii[MAX_STOP_WORDS];                     /* an ASCII stop word, 1..MAX_STOP_LEN long */
    unsigned char bytes[MAX_STOP_WORDS][32];       /* ASCII ones, zero padded (PADDING) */
} StopWords;

static void unpack_stop_words(PyObject *tuple, StopWords *sw) {
    sw->count = 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(tuple) && k < MAX_STOP_WORDS; k++) {
        PyObject *word = PyTuple_GET_ITEM(tuple, k);
        Py_ssize_t len = PyUnicode_GET_LENGTH(word);
        sw->len[k] = len <= MAX_STOP_LEN ? len : -1; /* longer ones never match (checked) */
        for (Py_ssize_t j = 0; j < len && j < MAX_STOP_LEN; j++)
            sw->chars[k][j] = PyUnicode_READ_CHAR(word, j);
        sw->ascii[k] = PyUnicode_IS_ASCII(word) && len >= 1 && len <= MAX_STOP_LEN;
        memset(sw->bytes[k], 0, sizeof sw->bytes[k]);
        if (sw->ascii[k]) memcpy(sw->bytes[k], PyUnicode_DATA(word), (size_t)len);
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
    SpanSet set;   /* the general path's words */
    WordSet ascii; /* the ASCII path's (padded) words */
    uint64_t stop_seen;
    const StopWords *stop;
    Words *w;
} WordSink;

/* A sink for the words of n characters: those of a padded ASCII buffer when `padded` is
   given, else any. */
static int sink_init(WordSink *sink, Py_ssize_t n, const StopWords *stop, Words *w,
                     const unsigned char *padded) {
    memset(sink, 0, sizeof *sink);
    sink->stop = stop;
    sink->w = w;
    /* room for a word in 6 characters: at most a quarter full in prose, so few collisions; a
       huge text starts smaller (its distinct words are far fewer) and the set grows if need be */
    size_t expected = (size_t)n / 6 + 64;
    if (expected > ((size_t)1 << 16)) expected = (size_t)1 << 16;
    int status = padded ? wordset_init(&sink->ascii, padded, expected)
                        : spanset_init(&sink->set, expected);
    if (status < 0) {
        spanset_free(&sink->set);
        wordset_free(&sink->ascii);
    }
    return status;
}

/* The stop words among the words of a padded ASCII text, looked up once each at the end
   instead of checking every new distinct word (a stop word is compared as given, so one with
   upper case or non-ASCII letters never matches the lowered ASCII words). */
static void ascii_stop_words(WordSink *sink) {
    const StopWords *stop = sink->stop;
    for (int k = 0; k < stop->count; k++)
        if (stop->ascii[k] && wordset_contains(&sink->ascii, stop->bytes[k], stop->len[k]))
            sink->stop_seen |= (uint64_t)1 << k;
}

static void sink_finish(WordSink *sink) {
    spanset_free(&sink->set);
    wordset_free(&sink->ascii);
    for (uint64_t seen = sink->stop_seen; seen; seen &= seen - 1) sink->w->stop_words++;
}

/* The word data[start:start+len] (characters of the given kind; PADDED: of a padded ASCII
   scratch copy, see PADDING). */
ALWAYS_INLINE int add_word_of(const int KIND, const int PADDED, WordSink *sink, const void *data,
                              Py_ssize_t start, Py_ssize_t len) {
    Words *w = sink->w;
    int added;
    int64_t id = PADDED ? wordset_id(&sink->ascii, start, len, &added)
                        : spanset_id(&sink->set, data, start * KIND, len * KIND, &added);
    if (id < 0) return -1;
    w->ids[w->count] = (uint32_t)id;
    w->lengths[w->count] = (uint32_t)len;
    w->count++;
    w->chars += len;
    if (len > w->longest) w->longest = len;
    if (!PADDED && added) { /* a new distinct word: is it a stop word? (PADDED: see
                                  ascii_stop_words, which asks once per stop word instead) */
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

/* lowered.split() on the general path (ASCII text is split inside scan_ascii). */
ALWAYS_INLINE int split_words(const int KIND, const void *data, Py_ssize_t n, WordSink *sink) {
    Py_ssize_t i = 0;
    while (i < n) {
        while (i < n && is_space(KIND, AT(KIND, data, i))) i++;
        if (i >= n) break;
        Py_ssize_t start = i;
        while (i < n && !is_space(KIND, AT(KIND, data, i))) i++;
        if (add_word_of(KIND, 0, sink, data, start, i - start) < 0) return -1;
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

/* Lines and paragraphs of the text, as they end. */
typedef struct {
    SpanSet lines, paragraphs;
    Py_ssize_t line_start, para_start;
    const Py_UCS4 *bullets;
    int n_bullets;
} LineState;

static int lines_init(LineState *ls, const Py_UCS4 *bullets, int n_bullets) {
    memset(ls, 0, sizeof *ls);
    ls->bullets = bullets;
    ls->n_bullets = n_bullets;
    return spanset_init(&ls->lines, 64) < 0 || spanset_init(&ls->paragraphs, 16) < 0 ? -1 : 0;
}

static void lines_free(LineState *ls) {
    spanset_free(&ls->lines);
    spanset_free(&ls->paragraphs);
}

/* A newline at i (or the end of the text, i == n) ends the line data[line_start:i]: a line of
   text.split("\n"), blank ones counting for nothing; and maybe a paragraph,
   [p.strip() for p in text.split("\n\n")], non-empty ones. A separator found at i-1 may not
   reuse the newline that ended the previous paragraph. */
ALWAYS_INLINE int end_line(const int KIND, const void *data, Py_ssize_t i, Py_ssize_t n,
                           LineState *ls, TextStats *st) {
    Py_ssize_t len = i - ls->line_start;
    if (len > 0) {
        Py_UCS4 first = AT(KIND, data, ls->line_start), last = AT(KIND, data, i - 1);
        for (int b = 0; b < ls->n_bullets; b++) {
            if (first == ls->bullets[b]) { st->bullet_lines++; break; }
        }
        if (last == 0x2026 || (len >= 3 && last == '.' && AT(KIND, data, i - 2) == '.' &&
                               AT(KIND, data, i - 3) == '.'))
            st->ellipsis_lines++;
        if (add_part(&ls->lines, data, KIND, ls->line_start, len, &st->lines) < 0) return -1;
    }
    ls->line_start = i + 1;
    int separator = i < n && i - 1 >= ls->para_start && AT(KIND, data, i - 1) == '\n';
    if (separator || i == n) {
        Py_ssize_t a = ls->para_start, b = separator ? i - 1 : n;
        while (a < b && Py_UNICODE_ISSPACE(AT(KIND, data, a))) a++;
        while (b > a && Py_UNICODE_ISSPACE(AT(KIND, data, b - 1))) b--;
        if (b > a && add_part(&ls->paragraphs, data, KIND, a, b - a, &st->paragraphs) < 0)
            return -1;
        ls->para_start = i + 1;
    }
    return 0;
}

/* The general path: everything but the words, a character at a time, for text of any kind. */
ALWAYS_INLINE int scan_text(const int KIND, const void *data, Py_ssize_t n,
                            const unsigned char *cls, const Py_UCS4 *bullets, int n_bullets,
                            TextStats *st) {
    LineState ls;
    int status = lines_init(&ls, bullets, n_bullets);
    unsigned in_token = 0, token_has_letter = 0, unknown = 0;
    Py_ssize_t dots = 0, letterless = 0, symbols = 0;
    for (Py_ssize_t i = 0; i <= n && status == 0; i++) {
        Py_UCS4 c = i < n ? AT(KIND, data, i) : '\n'; /* the end closes the last line */
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
        if (c == '\n') status = end_line(KIND, data, i, n, &ls, st);
    }
    st->unknown = (unknown & CLASS_KNOWN) != 0;
    st->letterless = letterless; /* locals above: no store through a pointer per character */
    st->symbols = symbols;
    lines_free(&ls);
    return status;
}

/* -- the ASCII path -------------------------------------------------------------------------- */
#define A_SPACE 1  /* str.isspace */
#define A_RARE 2   /* a newline, or a space where str.isspace and regex's \s differ (U+001C-U+001F) */
#define USE_GENERAL_PATH 1
#define BYTES(x) (0x0101010101010101ULL * (x))

/* The lowered copy of ASCII text, with PADDING bytes after it: a space first, then zeros. */
static unsigned char *ascii_lowered_copy(const unsigned char *data, Py_ssize_t n) {
    unsigned char *low = PyMem_Malloc((size_t)n + PADDING);
    if (!low) return NULL;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, data + i, 8);
        v = ascii_lower8(v);
        memcpy(low + i, &v, 8);
    }
    for (; i < n; i++) low[i] = data[i] + ((unsigned)(data[i] - 'A') < 26u ? 32 : 0);
    memset(low + n, 0, PADDING);
    low[n] = ' '; /* a sentinel: a word ends there */
    return low;
}

/* Whether the character table says of ASCII what scan_ascii assumes: letters are A-Z and a-z,
   the regex module's \s is str.isspace less U+001C-U+001F, and every byte at most 0x20 that
   is not a space (a control character) is no letter either. */
static int ascii_classes_as_assumed(const unsigned char *cls) {
    for (int c = 0; c < 128; c++) {
        int letter = (c | 32) >= 'a' && (c | 32) <= 'z';
        int re_space = latin1_space[c] && !(c >= 0x1c && c <= 0x1f);
        if (!(cls[c] & CLASS_KNOWN) || ((cls[c] & CLASS_LETTER) != 0) != letter ||
            ((cls[c] & CLASS_SPACE) != 0) != re_space || (latin1_space[c] && c > 0x20))
            return 0;
    }
    return 1;
}

/* Bit 7 of each byte of v (bytes below 0x80) set where that byte is below x; exact for the
   lowest such byte (the only one used), as borrows only run upwards. */
#define BELOW(v, x) (((v) - BYTES(x)) & BYTES(0x80))
/* Bit 7 set where a byte of v (bytes below 0x80) lies in [lo, hi]; no carries. */
#define WITHIN(v, lo, hi) ((((v) + BYTES(0x80 - (lo))) & ~((v) + BYTES(0x7f - (hi)))) & BYTES(0x80))

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define FIRST_FLAGGED(mask) (__builtin_clzll(mask) >> 3)
#else
#define FIRST_FLAGGED(mask) (__builtin_ctzll(mask) >> 3)
#endif

/* Bit 7 set exactly where a byte of v (bytes below 0x80) is c. */
#define EXACTLY(v, c) (~((((v) ^ BYTES(c)) + BYTES(0x7f)) | ((v) ^ BYTES(c))) & BYTES(0x80))

/* How many bits of a mask with bits only at bit 7 of bytes are set, with one multiply. */
#define COUNT80(mask) ((Py_ssize_t)((((mask) >> 7) * BYTES(1)) >> 56))

/* text.count("...") within the word low[start:end]: each run of dots counts a third. */
static Py_ssize_t dot_runs(const unsigned char *low, Py_ssize_t start, Py_ssize_t end) {
    Py_ssize_t count = 0, run = 0;
    for (Py_ssize_t j = start; j < end; j++) {
        if (low[j] == '.') { run++; continue; }
        count += run / 3;
        run = 0;
    }
    return count + run / 3;
}

/* Every statistic of ASCII text in one loop a word at a time, over the lowered copy `low`
   (letters, spaces and symbols are where they are in `data`; lines and paragraphs are
   compared as `data` has them). A word is read 8 bytes at a time: where it ends (the first
   byte below 0x21), whether it has a letter (a-z) or a symbol ('#', '.'), without a branch
   per character. USE_GENERAL_PATH when the text has a character where str.split and the
   regex module disagree about what a word is (U+001C-U+001F). */
static int scan_ascii(const unsigned char *data, const unsigned char *low, Py_ssize_t n,
                      const Py_UCS4 *bullets, int n_bullets, WordSink *sink, TextStats *st) {
    unsigned char flags[256];
    for (int c = 0; c < 256; c++)
        flags[c] = (latin1_space[c] ? A_SPACE : 0) |
                   (c == '\n' || (c >= 0x1c && c <= 0x1f) ? A_RARE : 0);
    LineState ls;
    int status = lines_init(&ls, bullets, n_bullets);
    Py_ssize_t letterless = 0, symbols = 0, i = 0;
    while (status == 0) {
        for (; i < n && (flags[low[i]] & A_SPACE); i++) { /* the spaces before a word */
            if (!(flags[low[i]] & A_RARE)) continue;
            if (low[i] != '\n') { status = USE_GENERAL_PATH; break; }
            if ((status = end_line(1, data, i, n, &ls, st)) != 0) break;
        }
        if (status != 0 || i >= n) break;
        Py_ssize_t start = i;
        uint64_t letters = 0;
        Py_ssize_t hashes = 0, dots = 0;
        for (;;) { /* loads stay within the padding: i <= n, and low[n] ends every word */
            uint64_t v, in_word = ~0ULL;
            memcpy(&v, low + i, 8);
            uint64_t ends = BELOW(v, 0x21);
            Py_ssize_t k = 8;
            if (ends) {
                k = FIRST_FLAGGED(ends);
                in_word = k ? FIRST_BYTES(k) : 0;
            }
            letters |= WITHIN(v, 'a', 'z') & in_word;
            hashes += COUNT80(EXACTLY(v, '#') & in_word);
            dots += COUNT80(EXACTLY(v, '.') & in_word);
            i += k;
            if (k < 8 && (flags[low[i]] & A_SPACE)) break;
            if (k < 8) i++; /* a control character below 0x21 that is no space: in the word */
        }
        if (add_word_of(1, 1, sink, low, start, i - start) < 0) { status = -1; break; }
        letterless += letters == 0;
        /* text.count("#") + text.count("..."): runs of dots lie within words, and most
           words with a dot end a sentence with one, which needs no closer look */
        symbols += hashes + (dots >= 3 ? dot_runs(low, start, i) : 0);
    }
    if (status == 0) status = end_line(1, data, n, n, &ls, st);
    st->letterless = letterless;
    st->symbols = symbols;
    lines_free(&ls);
    return status;
}

/* Whether any of `phrases` (a tuple of str) occurs in the lowered text: `low` (ASCII bytes)
   when given, else the str `lowered`. -1 on error. */
static int has_phrase(PyObject *phrases, const unsigned char *low, Py_ssize_t n,
                      PyObject *lowered) {
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(phrases); k++) {
        PyObject *phrase = PyTuple_GET_ITEM(phrases, k);
        if (!PyUnicode_Check(phrase)) {
            PyErr_SetString(PyExc_TypeError, "phrases must be str");
            return -1;
        }
        if (low == NULL) {
            int found = PyUnicode_Contains(lowered, phrase);
            if (found != 0) return found;
        } else if (PyUnicode_IS_ASCII(phrase)) { /* others cannot occur in ASCII text */
            Py_ssize_t len = PyUnicode_GET_LENGTH(phrase);
            if (len == 0 || (len <= n && memmem(low, (size_t)n, PyUnicode_DATA(phrase), (size_t)len)))
                return 1;
        }
    }
    return 0;
}

static PyObject *prose_stats(PyObject *self, PyObject *args) {
    PyObject *text, *lowered, *stop_words, *bullet_str, *phrases;
    Py_buffer table;
    if (!PyArg_ParseTuple(args, "UOy*O!UO!", &text, &lowered, &table, &PyTuple_Type, &stop_words,
                          &bullet_str, &PyTuple_Type, &phrases))
        return NULL;
    PyObject *result = NULL, *ids = NULL, *lengths = NULL;
    unsigned char *scratch = NULL;
    Words w = {0, 0, 0, 0, NULL, NULL};
    TextStats st;
    memset(&st, 0, sizeof st);
    WordSink sink;
    int have_sink = 0, status = 0, phrase = 0;
    Py_UCS4 bullets[MAX_BULLETS];
    int n_bullets = (int)PyUnicode_GET_LENGTH(bullet_str);
    int ascii = PyUnicode_IS_ASCII(text);
    if (table.len < 0x110000 || PyTuple_GET_SIZE(stop_words) > MAX_STOP_WORDS ||
        n_bullets > MAX_BULLETS) {
        PyErr_SetString(PyExc_ValueError, "bad character table, too many stop words or bullets");
        goto done;
    }
    if (!ascii && !PyUnicode_Check(lowered)) {
        PyErr_SetString(PyExc_TypeError, "text that is not ASCII needs its lowered copy");
        goto done;
    }
    for (int b = 0; b < n_bullets; b++) bullets[b] = PyUnicode_READ_CHAR(bullet_str, b);
    const unsigned char *cls = table.buf;
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    Py_ssize_t n_low = ascii ? n : PyUnicode_GET_LENGTH(lowered);
    StopWords stop;
    unpack_stop_words(stop_words, &stop);

    w.ids = PyMem_Malloc((n_low / 2 + 1) * sizeof(uint32_t));
    w.lengths = PyMem_Malloc((n_low / 2 + 1) * sizeof(uint32_t));
    if (ascii) scratch = ascii_lowered_copy(data, n);
    if (!w.ids || !w.lengths || (ascii && !scratch)) { PyErr_NoMemory(); goto done; }
    if (sink_init(&sink, n_low, &stop, &w, ascii ? scratch : NULL) < 0) goto done;
    have_sink = 1;
    if (ascii) {
        status = ascii_classes_as_assumed(cls)
                     ? scan_ascii(data, scratch, n, bullets, n_bullets, &sink, &st)
                     : USE_GENERAL_PATH;
        if (status == 0) ascii_stop_words(&sink);
        if (status == USE_GENERAL_PATH) { /* start again, a character at a time */
            sink_finish(&sink);
            have_sink = 0;
            w.count = w.chars = w.longest = w.stop_words = 0;
            memset(&st, 0, sizeof st);
            if (sink_init(&sink, n_low, &stop, &w, NULL) < 0) goto done;
            have_sink = 1;
            status = split_words(1, scratch, n, &sink);
            if (status == 0) status = scan_text(1, data, n, cls, bullets, n_bullets, &st);
        }
    } else {
        const void *low = PyUnicode_DATA(lowered);
        switch (PyUnicode_KIND(lowered)) {
        case 1: status = split_words(1, low, n_low, &sink); break;
        case 2: status = split_words(2, low, n_low, &sink); break;
        default: status = split_words(4, low, n_low, &sink); break;
        }
        int kind = PyUnicode_KIND(text);
        if (status == 0 && kind == 1)
            status = scan_text(1, data, n, cls, bullets, n_bullets, &st);
        else if (status == 0 && kind == 2)
            status = scan_text(2, data, n, cls, bullets, n_bullets, &st);
        else if (status == 0)
            status = scan_text(4, data, n, cls, bullets, n_bullets, &st);
    }
    sink_finish(&sink);
    have_sink = 0;
    if (status < 0) goto done;
    if (st.unknown) { /* the caller fills the table in and asks again */
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    phrase = has_phrase(phrases, scratch, n, lowered);
    if (phrase < 0) goto done;

    ids = PyBytes_FromStringAndSize((const char *)w.ids, w.count * sizeof(uint32_t));
    lengths = PyBytes_FromStringAndSize((const char *)w.lengths, w.count * sizeof(uint32_t));
    if (!ids || !lengths) goto done;
    /* a tuple: filters.py names the fields (ProseStats), cheaper than a dict per document */
    result = Py_BuildValue(
        "(nnnnnnnnnnnnnnnnNOO)", w.count, w.chars, w.longest, w.stop_words, st.letterless,
        st.symbols, st.bullet_lines, st.ellipsis_lines, st.lines.parts, st.lines.distinct,
        st.lines.total_chars, st.lines.distinct_chars, st.paragraphs.parts,
        st.paragraphs.distinct, st.paragraphs.total_chars, st.paragraphs.distinct_chars,
        PyBool_FromLong(phrase), ids, lengths);
done:
    if (have_sink) sink_finish(&sink);
    Py_XDECREF(ids);
    Py_XDECREF(lengths);
    PyMem_Free(w.ids);
    PyMem_Free(w.lengths);
    PyMem_Free(scratch);
    PyBuffer_Release(&table);
    return result;
}

/* -- n-grams of the words ---------------------------------------------------------------------- */
/* An Ngrams object holds a document's word ids (equal ids = equal words) and lengths, and
   answers, for any n, the count and length of the most frequent n-gram, the characters covered
   by repeated n-grams, and a cheap upper bound of how often any n-gram occurs.
   Exact counts need a hash table, and a branch per position that the predictor cannot guess;
   so first, without a branch, each bigram gets an upper bound of how often it occurs: the
   smaller of its two words' counts and the count of its bucket in a table of counters indexed
   by a hash of the pair (collisions only add). An n-gram can occur twice only at a "candidate"
   position, where each of its words (n = 1) or bigrams (n >= 2) has a bound of 2 or more;
   elsewhere it occurs once, so hashing only the candidates changes no count. In prose about 1
   position in 3 is a bigram candidate, and 1 in 100 a 5-gram candidate. */
typedef struct {
    PyObject_HEAD
    Py_buffer ids_buf, lengths_buf;
    const uint32_t *ids, *lengths;
    Py_ssize_t words;
    uint32_t *word_counts;    /* per word id; made on first use */
    uint32_t *bigram_bounds;  /* per position p < words - 1: at least the count of its bigram */
    uint32_t top_word_count, top_bigram_bound; /* the largest of each */
} NgramsObject;

/* The distinct n-grams at the candidate positions, in order of first appearance. */
typedef struct {
    Py_ssize_t candidates, distinct;
    Py_ssize_t *positions; /* per candidate, ascending */
    uint32_t *index;       /* per candidate: which distinct n-gram */
    uint32_t *counts;      /* per distinct n-gram */
    Py_ssize_t *first;     /* per distinct n-gram: its first position */
} Interned;

static void interned_free(Interned *in) {
    PyMem_Free(in->positions);
    PyMem_Free(in->index);
    PyMem_Free(in->counts);
    PyMem_Free(in->first);
}

static int ensure_bounds(NgramsObject *g) {
    if (g->bigram_bounds) return 0;
    Py_ssize_t words = g->words, pairs = words > 1 ? words - 1 : 0;
    const uint32_t *ids = g->ids;
    size_t size = 64;
    while (size < 2 * (size_t)pairs && size < ((size_t)1 << 22)) size <<= 1;
    int shift = 64 - __builtin_ctzll(size);
    uint32_t *wc = PyMem_Calloc((size_t)words + 1, sizeof(uint32_t));
    uint32_t *buckets = PyMem_Calloc(size, sizeof(uint32_t));
    uint32_t *bounds = PyMem_Malloc(((size_t)pairs + 1) * sizeof(uint32_t));
    if (!wc || !buckets || !bounds) {
        PyMem_Free(wc); PyMem_Free(buckets); PyMem_Free(bounds);
        PyErr_NoMemory();
        return -1;
    }
    uint32_t top_words = 0, top_bigrams = 0;
    for (Py_ssize_t p = 0; p < words; p++) {
        uint32_t count = ++wc[ids[p]];
        top_words = count > top_words ? count : top_words;
    }
    /* multiply-shift hashing of the pair: the top bits of a product */
#define PAIR_BUCKET(p) \
    ((size_t)((((uint64_t)ids[p] << 32 | ids[(p) + 1]) * 0x9e3779b97f4a7c15ULL) >> shift))
    for (Py_ssize_t p = 0; p < pairs; p++) buckets[PAIR_BUCKET(p)]++;
    for (Py_ssize_t p = 0; p < pairs; p++) {
        uint32_t bound = buckets[PAIR_BUCKET(p)], a = wc[ids[p]], b = wc[ids[p + 1]];
        bound = a < bound ? a : bound;
        bound = b < bound ? b : bound;
        bounds[p] = bound;
        top_bigrams = bound > top_bigrams ? bound : top_bigrams;
    }
    g->top_word_count = top_words;
    g->top_bigram_bound = top_bigrams;
#undef PAIR_BUCKET
    PyMem_Free(buckets);
    g->word_counts = wc;
    g->bigram_bounds = bounds;
    return 0;
}

/* For each n-gram position p, in order, the smallest bound of its bigrams (its word's count
   for n = 1): an upper bound of how often the n-gram occurs. */
#define FOR_EACH_NGRAM_BOUND(g, n, p, bound, BODY)                                           \
    do {                                                                                     \
        Py_ssize_t count_ = (g)->words - (n) + 1;                                            \
        for (Py_ssize_t p = 0; p < count_; p++) {                                            \
            uint32_t bound;                                                                  \
            if ((n) == 1) {                                                                  \
                bound = (g)->word_counts[(g)->ids[p]];                                       \
            } else {                                                                         \
                bound = (g)->bigram_bounds[p];                                               \
                for (Py_ssize_t k_ = 1; k_ < (n) - 1; k_++)                                  \
                    if ((g)->bigram_bounds[p + k_] < bound) bound = (g)->bigram_bounds[p + k_]; \
            }                                                                                \
            BODY                                                                             \
        }                                                                                    \
    } while (0)

ALWAYS_INLINE uint64_t ngram_hash(const uint32_t *ids, Py_ssize_t n) {
    uint64_t h = (uint64_t)n;
    for (Py_ssize_t k = 0; k < n; k++) h = (h + ids[k]) * 0x9e3779b97f4a7c15ULL;
    return mix64(h);
}

static int intern_ngrams(NgramsObject *g, Py_ssize_t n, Interned *in) {
    memset(in, 0, sizeof *in);
    Py_ssize_t count = g->words - n + 1; /* n-grams in the document */
    if (count <= 0) return 0;
    if (ensure_bounds(g) < 0) return -1;
    in->positions = PyMem_Malloc((size_t)count * sizeof(Py_ssize_t));
    if (!in->positions) { PyErr_NoMemory(); return -1; }
    const uint32_t *ids = g->ids;
    Py_ssize_t m = 0; /* branch-free selection */
    if (n <= 2) {
        FOR_EACH_NGRAM_BOUND(g, n, p, bound, {
            in->positions[m] = p;
            m += bound >= 2;
        });
    } else { /* a run of n-1 bigrams with bounds >= 2 ends at p+n-2 */
        Py_ssize_t run = 0;
        const uint32_t *bounds = g->bigram_bounds;
        for (Py_ssize_t q = 0; q < g->words - 1; q++) {
            run = (run + 1) & -(Py_ssize_t)(bounds[q] >= 2);
            in->positions[m] = q - (n - 2);
            m += run >= n - 1;
        }
    }
    in->candidates = m;
    if (m == 0) return 0;
    size_t size = 16;
    while (size < 2 * (size_t)m) size <<= 1;
    uint64_t *slots = PyMem_Calloc(size, sizeof(uint64_t)); /* hash tag << 32 | distinct + 1 */
    in->index = PyMem_Malloc((size_t)m * sizeof(uint32_t));
    in->counts = PyMem_Malloc((size_t)m * sizeof(uint32_t));
    in->first = PyMem_Malloc((size_t)m * sizeof(Py_ssize_t));
    if (!slots || !in->index || !in->counts || !in->first) {
        PyMem_Free(slots);
        PyErr_NoMemory();
        return -1;
    }
    uint32_t distinct = 0;
    for (Py_ssize_t k = 0; k < m; k++) {
        Py_ssize_t p = in->positions[k];
        uint64_t h = ngram_hash(ids + p, n), tag = h >> 32;
        size_t j = (size_t)h & (size - 1);
        for (;;) {
            uint64_t slot = slots[j];
            if (slot == 0) {
                slots[j] = (tag << 32) | (distinct + 1);
                in->first[distinct] = p;
                in->counts[distinct] = 1;
                in->index[k] = distinct++;
                break;
            }
            if ((slot >> 32) == tag) {
                uint32_t d = (uint32_t)slot - 1;
                const uint32_t *seen = ids + in->first[d];
                Py_ssize_t e = 0;
                while (e < n && seen[e] == ids[p + e]) e++;
                if (e == n) {
                    in->counts[d]++;
                    in->index[k] = d;
                    break;
                }
            }
            j = (j + 1) & (size - 1);
        }
    }
    in->distinct = distinct;
    PyMem_Free(slots);
    return 0;
}

static Py_ssize_t ngram_chars(NgramsObject *g, Py_ssize_t p, Py_ssize_t n) {
    Py_ssize_t chars = 0;
    for (Py_ssize_t k = 0; k < n; k++) chars += g->lengths[p + k];
    return chars;
}

static int parse_n(PyObject *arg, Py_ssize_t *n) {
    *n = PyLong_AsSsize_t(arg);
    if (*n == -1 && PyErr_Occurred()) return -1;
    if (*n < 1) {
        PyErr_SetString(PyExc_ValueError, "n must be at least 1");
        return -1;
    }
    return 0;
}

/* (count, chars) of the most frequent n-gram, the longest in characters among equally
   frequent ones; (0, 0) without n-grams. */
static PyObject *ngrams_top(NgramsObject *g, PyObject *arg) {
    Py_ssize_t n, best_count = 0, best_chars = 0;
    if (parse_n(arg, &n) < 0) return NULL;
    Interned in;
    if (intern_ngrams(g, n, &in) < 0) { interned_free(&in); return NULL; }
    for (Py_ssize_t d = 0; d < in.distinct; d++) {
        Py_ssize_t count = in.counts[d];
        if (count < 2 || count < best_count) continue;
        Py_ssize_t chars = ngram_chars(g, in.first[d], n);
        if (count > best_count || chars > best_chars) {
            best_count = count;
            best_chars = chars;
        }
    }
    interned_free(&in);
    if (best_count == 0 && g->words >= n) { /* every n-gram occurs once: the longest of all */
        best_count = 1;
        Py_ssize_t chars = ngram_chars(g, 0, n);
        best_chars = chars;
        for (Py_ssize_t p = 1; p + n <= g->words; p++) {
            chars += (Py_ssize_t)g->lengths[p + n - 1] - (Py_ssize_t)g->lengths[p - 1];
            if (chars > best_chars) best_chars = chars;
        }
    }
    return Py_BuildValue("nn", best_count, best_chars);
}

/* At least how often any n-gram occurs (n >= 2: the largest bigram bound; n = 1: the
   largest word count): with n x the longest word, a bound of count x chars in O(1). */
static PyObject *ngrams_count_bound(NgramsObject *g, PyObject *arg) {
    Py_ssize_t n;
    if (parse_n(arg, &n) < 0) return NULL;
    if (g->words < n) return PyLong_FromLong(0);
    if (ensure_bounds(g) < 0) return NULL;
    return PyLong_FromUnsignedLong(n == 1 ? g->top_word_count : g->top_bigram_bound);
}

/* Characters of the words covered by an n-gram occurrence that repeats an earlier one. */
static PyObject *ngrams_repeated_chars(NgramsObject *g, PyObject *arg) {
    Py_ssize_t n, chars = 0, covered_to = 0;
    if (parse_n(arg, &n) < 0) return NULL;
    Interned in;
    if (intern_ngrams(g, n, &in) < 0) { interned_free(&in); return NULL; }
    for (Py_ssize_t k = 0; k < in.candidates; k++) {
        Py_ssize_t p = in.positions[k];
        if (in.first[in.index[k]] == p) continue; /* the first occurrence */
        /* positions ascend: words up to the end of the last repeat are counted already */
        for (Py_ssize_t w = p > covered_to ? p : covered_to; w < p + n; w++) chars += g->lengths[w];
        covered_to = p + n;
    }
    interned_free(&in);
    return PyLong_FromSsize_t(chars);
}

static void ngrams_dealloc(NgramsObject *g) {
    PyBuffer_Release(&g->ids_buf);
    PyBuffer_Release(&g->lengths_buf);
    PyMem_Free(g->word_counts);
    PyMem_Free(g->bigram_bounds);
    PyObject_Free(g);
}

static PyMethodDef ngrams_methods[] = {
    {"top", (PyCFunction)ngrams_top, METH_O,
     "top(n) -> (count, chars) of the most frequent n-gram, the longest of equally frequent ones"},
    {"count_bound", (PyCFunction)ngrams_count_bound, METH_O,
     "count_bound(n) -> at least how often any n-gram occurs"},
    {"repeated_chars", (PyCFunction)ngrams_repeated_chars, METH_O,
     "repeated_chars(n) -> characters of the words covered by repeated n-gram occurrences"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject NgramsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "scratchlm.data._fastfilters.Ngrams",
    .tp_basicsize = sizeof(NgramsObject),
    .tp_dealloc = (destructor)ngrams_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The n-gram statistics of a document's words; made by ngrams(ids, lengths).",
    .tp_methods = ngrams_methods,
};

static PyObject *ngrams_new(PyObject *self, PyObject *args) {
    PyObject *ids, *lengths;
    if (!PyArg_ParseTuple(args, "OO", &ids, &lengths)) return NULL;
    NgramsObject *g = PyObject_New(NgramsObject, &NgramsType);
    if (!g) return NULL;
    g->word_counts = NULL;
    g->bigram_bounds = NULL;
    g->lengths_buf.obj = NULL;
    if (PyObject_GetBuffer(ids, &g->ids_buf, PyBUF_SIMPLE) < 0) {
        g->ids_buf.obj = NULL;
        goto fail;
    }
    if (PyObject_GetBuffer(lengths, &g->lengths_buf, PyBUF_SIMPLE) < 0) {
        g->lengths_buf.obj = NULL;
        goto fail;
    }
    g->ids = g->ids_buf.buf;
    g->lengths = g->lengths_buf.buf;
    g->words = g->ids_buf.len / 4;
    if (g->ids_buf.len % 4 || g->lengths_buf.len != g->ids_buf.len) {
        PyErr_SetString(PyExc_ValueError, "ids and lengths must be uint32 buffers of equal size");
        goto fail;
    }
    for (Py_ssize_t p = 0; p < g->words; p++) {
        if (g->ids[p] >= (uint64_t)g->words) {
            PyErr_SetString(PyExc_ValueError, "word ids must be below the number of words");
            goto fail;
        }
    }
    return (PyObject *)g;
fail:
    Py_DECREF(g);
    return NULL;
}

static PyMethodDef methods[] = {
    {"prose_stats", prose_stats, METH_VARARGS,
     "prose_stats(text, lowered, table, stop_words, bullets, phrases) -> tuple of the prose "
     "statistics (filters.ProseStats), ending with whether a phrase occurs in the lowered text, "
     "the word ids and lengths (uint32 bytes); None when the text has a character whose table "
     "entry is not filled in. `lowered` is text.lower(), needed only for text that is not ASCII "
     "(ASCII text is lowered here, and `lowered` is ignored)."},
    {"ngrams", ngrams_new, METH_VARARGS,
     "ngrams(ids, lengths) -> Ngrams: n-gram counts of the words with these ids and lengths"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastfilters",
                                    "C statistics for scratchlm.data.filters", -1, methods};

PyMODINIT_FUNC PyInit__fastfilters(void) {
    for (Py_UCS4 c = 0; c < 256; c++) latin1_space[c] = Py_UNICODE_ISSPACE(c) != 0;
    if (PyType_Ready(&NgramsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
