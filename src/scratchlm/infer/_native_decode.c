/* Hot loops of a one-token-per-row decode step, in plain C (no Python or torch headers).
 *
 * Decoding one token per row reads every weight once per step and does a few multiply-adds with
 * it, so its speed is memory bandwidth plus per-op overhead. These loops read an `nn.Linear`
 * weight in its own [out, in] layout once for up to 8 rows at a time (a row's result never
 * depends on how many rows share the pass, so batched output equals one-by-one output exactly),
 * and fuse the small per-layer steps (RMSNorm, RoPE + cache write, attention over the cache,
 * SiLU-gating) into single calls. `scratchlm.infer.native` compiles this file and calls it
 * through ctypes; everything is fp32, contiguous, on the CPU. Not for prefill or training (large
 * matrix products belong to BLAS), nor for anything that needs gradients.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define VERSION 4

/* 16 floats (one AVX-512 register where available; the compiler splits it elsewhere), loaded
 * from any 4-byte-aligned address. */
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t i16 __attribute__((vector_size(64), aligned(4), may_alias));

/* Sum of the 16 lanes by halving: 4 shuffle-and-add steps instead of 15 dependent adds. */
static inline float hsum(v16 v) {
    v = v + __builtin_shuffle(v, (i16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v = v + __builtin_shuffle(v, (i16){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v = v + __builtin_shuffle(v, (i16){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v = v + __builtin_shuffle(v, (i16){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

/* e^x for 16 lanes: x = n ln2 + r with |r| <= ln2/2, e^r from Cephes' degree-6 minimax polynomial
 * (about 1 ulp), times 2^n built in the exponent bits. Inputs are clamped to the range where
 * e^x is a normal float; callers only need non-negative results that underflow to ~0. */
static inline v16 exp16(v16 x) {
    const v16 hi = (v16){0} + 88.3762626647949f, lo = (v16){0} - 87.3365447505531f;
    i16 above = x > hi, below = x < lo; /* lanes of all ones where true */
    x = (v16)(((i16)x & ~above) | ((i16)hi & above));
    x = (v16)(((i16)x & ~below) | ((i16)lo & below));
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    v16 n = (x * 1.44269504088896341f + shifter) - shifter;
    v16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
    v16 p = (v16){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
    return p * (v16)bits;
}

/* e^x for n floats in place. */
static void exp_inplace(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) *(v16 *)(x + i) = exp16(*(const v16 *)(x + i));
    if (i < n) {
        v16 tail = (v16){0};
        for (int64_t j = i; j < n; j++) tail[j - i] = x[j];
        tail = exp16(tail);
        for (int64_t j = i; j < n; j++) x[j] = tail[j - i];
    }
}

int native_version(void) { return VERSION; }

/* Ask the kernel to back the 2 MiB-aligned part of [p, p + bytes) with huge pages; call it before
 * the memory is first written. Streaming ~100 MB of weights per token through 4 KiB pages costs
 * a TLB miss every 4 KiB (and a two-level page walk in a VM): measured here the same GEMV pass
 * ran at 11-18 GB/s on 4 KiB pages and 32-35 GB/s on 2 MiB pages. Returns madvise's result,
 * 1 where nothing was aligned enough, or -2 where the system has no such advice. */
int advise_huge_pages(void *p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (end <= start) return 1;
    return madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
    return -2;
#endif
}

/* Weights are packed in panels of PANEL output columns: panel p holds w[p*PANEL:(p+1)*PANEL, :]
 * transposed, [K, PANEL] contiguous (zero-padded past N), so a pass over one panel reads one
 * sequential stream and each step of k is two vector loads broadcast-multiplied by x[m, k]. No
 * horizontal sums; every output is one sequential sum over k whatever the number of rows.
 * Packed weights are fp32, or bf16 (raw 16-bit patterns) widened exactly to fp32 on load, which
 * halves the bytes read per token; activations and sums are fp32 either way. */
#define PANEL 32

/* 16 bf16 bit patterns, loaded from any 2-byte-aligned address. */
typedef uint16_t h16 __attribute__((vector_size(32), aligned(2), may_alias));

/* Weights i..i+15 of a packed panel as fp32 (`bf16` is a compile-time constant at every use). */
static inline __attribute__((always_inline)) v16 load_weights(const void *wp, int64_t i, int bf16) {
    if (bf16) {
        i16 widened = __builtin_convertvector(*(const h16 *)((const uint16_t *)wp + i), i16);
        return (v16)(widened << 16); /* a bf16 is the top half of the fp32 with the same value */
    }
    return *(const v16 *)((const float *)wp + i);
}

static inline __attribute__((always_inline)) void panel_rows(const float *x, int MR, int64_t K,
                                                             const void *wp, int bf16,
                                                             const float *bias, float *y,
                                                             int64_t ldy, int64_t col, int64_t N,
                                                             int accumulate) {
    v16 a0[8], a1[8];
    for (int m = 0; m < MR; m++) a0[m] = a1[m] = (v16){0};
    for (int64_t k = 0; k < K; k++) {
        v16 w0 = load_weights(wp, k * PANEL, bf16), w1 = load_weights(wp, k * PANEL + 16, bf16);
        for (int m = 0; m < MR; m++) {
            float xs = x[m * K + k];
            a0[m] += w0 * xs;
            a1[m] += w1 * xs;
        }
    }
    int64_t width = N - col < PANEL ? N - col : PANEL;
    for (int m = 0; m < MR; m++) {
        float *out = y + m * ldy + col;
        for (int64_t j = 0; j < width; j++) {
            float v = j < 16 ? a0[m][j] : a1[m][j - 16];
            if (bias) v += bias[col + j];
            out[j] = accumulate ? out[j] + v : v;
        }
    }
}

typedef void (*panel_rows_fn)(const float *, int64_t, const void *, const float *, float *,
                              int64_t, int64_t, int64_t, int);

#define DEFINE_PANEL_ROWS(MR)                                                                     \
    static void panel_rows_##MR(const float *x, int64_t K, const void *wp, const float *bias,    \
                                float *y, int64_t ldy, int64_t col, int64_t N, int acc) {         \
        panel_rows(x, MR, K, wp, 0, bias, y, ldy, col, N, acc);                                   \
    }                                                                                             \
    static void panel_rows_bf16_##MR(const float *x, int64_t K, const void *wp,                  \
                                     const float *bias, float *y, int64_t ldy, int64_t col,       \
                                     int64_t N, int acc) {                                        \
        panel_rows(x, MR, K, wp, 1, bias, y, ldy, col, N, acc);                                   \
    }
DEFINE_PANEL_ROWS(1)
DEFINE_PANEL_ROWS(2)
DEFINE_PANEL_ROWS(3)
DEFINE_PANEL_ROWS(4)
DEFINE_PANEL_ROWS(5)
DEFINE_PANEL_ROWS(6)
DEFINE_PANEL_ROWS(7)
DEFINE_PANEL_ROWS(8)

static const panel_rows_fn PANEL_ROWS[9] = {0, panel_rows_1, panel_rows_2, panel_rows_3,
                                            panel_rows_4, panel_rows_5, panel_rows_6,
                                            panel_rows_7, panel_rows_8};
static const panel_rows_fn PANEL_ROWS_BF16[9] = {
    0, panel_rows_bf16_1, panel_rows_bf16_2, panel_rows_bf16_3, panel_rows_bf16_4,
    panel_rows_bf16_5, panel_rows_bf16_6, panel_rows_bf16_7, panel_rows_bf16_8};

int panel_width(void) { return PANEL; }

static void linear_packed(const panel_rows_fn *kernels, int64_t element_size, const float *x,
                          int64_t M, int64_t K, const void *wp, int64_t N, const float *bias,
                          float *y, int64_t ldy, int accumulate) {
    int64_t panels = (N + PANEL - 1) / PANEL;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        int rows = M - m0 < 8 ? (int)(M - m0) : 8;
        for (int64_t p = 0; p < panels; p++)
            kernels[rows](x + m0 * K, K, (const char *)wp + p * K * PANEL * element_size, bias,
                          y + m0 * ldy, ldy, p * PANEL, N, accumulate);
    }
}

/* y [M, N] = x [M, K] @ w^T (+ bias [N]) with w packed in panels (see above), or y += that
 * when `accumulate` (a residual connection); output row m starts at y + m * ldy. Rows go 8 at a
 * time: the weights are read from memory once per 8 rows. */
void linear_packed_f32(const float *x, int64_t M, int64_t K, const float *wp, int64_t N,
                       const float *bias, float *y, int64_t ldy, int accumulate) {
    linear_packed(PANEL_ROWS, sizeof(float), x, M, K, wp, N, bias, y, ldy, accumulate);
}

/* The same with bf16 packed weights (fp32 x, bias, y and sums). */
void linear_packed_bf16(const float *x, int64_t M, int64_t K, const uint16_t *wp, int64_t N,
                        const float *bias, float *y, int64_t ldy, int accumulate) {
    linear_packed(PANEL_ROWS_BF16, sizeof(uint16_t), x, M, K, wp, N, bias, y, ldy, accumulate);
}

/* y [M, K] = weight * (x / sqrt(mean(x^2) + eps)), as the model's RMSNorm computes it in fp32. */
void rmsnorm_f32(const float *x, int64_t M, int64_t K, const float *weight, float eps, float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float ss = 0.0f;
        for (int64_t k = 0; k < K; k++) ss += xr[k] * xr[k];
        float scale = 1.0f / sqrtf(ss / (float)K + eps);
        for (int64_t k = 0; k < K; k++) y[m * K + k] = weight[k] * (xr[k] * scale);
    }
}

/* HF Llama's rotate-half RoPE of one head vector: out = x * cos + rotate_half(x) * sin. */
static void rope_head(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* Splits fused qkv rows [B, (H + 2*Hkv) * D] into rotated queries q [B, H, D] and writes the
 * rotated key and the value of each row at cache slot `slot` of the buffers [Bmax, Hkv, S, D].
 * Row b is rotated by row positions[b] (NULL: `slot`) of the tables cos/sin [P, D], or not at
 * all when cos is NULL (models without RoPE). */
void qkv_to_cache_f32(const float *qkv, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                      const float *cos, const float *sin, const int64_t *positions, float *q,
                      float *kcache, float *vcache, int64_t S, int64_t slot) {
    int64_t width = (H + 2 * Hkv) * D;
    for (int64_t b = 0; b < B; b++) {
        const float *row = qkv + b * width;
        int64_t pos = positions ? positions[b] : slot;
        const float *c = cos ? cos + pos * D : 0, *s = cos ? sin + pos * D : 0;
        for (int64_t h = 0; h < H; h++) {
            if (c) rope_head(row + h * D, c, s, D, q + (b * H + h) * D);
            else memcpy(q + (b * H + h) * D, row + h * D, D * sizeof(float));
        }
        for (int64_t h = 0; h < Hkv; h++) {
            int64_t at = ((b * Hkv + h) * S + slot) * D;
            const float *k = row + (H + h) * D, *v = row + (H + Hkv + h) * D;
            if (c) rope_head(k, c, s, D, kcache + at);
            else memcpy(kcache + at, k, D * sizeof(float));
            memcpy(vcache + at, v, D * sizeof(float));
        }
    }
}

/* out [B, d] = rows ids[b] of the embedding table [V, d]; returns the index of the first id
 * outside 0..V-1 (nothing written from there on), or -1 when all are valid. */
int64_t embed_rows_f32(const float *table, int64_t V, const int64_t *ids, int64_t B, int64_t d,
                       float *out) {
    for (int64_t b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= V) return b;
        memcpy(out + b * d, table + ids[b] * d, d * sizeof(float));
    }
    return -1;
}

static float dot(const float *a, const float *b, int64_t D) {
    v16 acc = (v16){0};
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) acc += *(const v16 *)(a + i) * *(const v16 *)(b + i);
    float s = hsum(acc);
    for (; i < D; i++) s += a[i] * b[i];
    return s;
}

/* One query per row and head attends over cache slots 0..L-1 of buffers [Bmax, Hkv, S, D]:
 * out [B, H, D] = softmax(q k^T * scale) v, query head h reading key/value head h / (H / Hkv).
 * mask (NULL: every slot) is [B, L] bytes at row stride mask_stride, nonzero = may attend; the
 * caller guarantees each row may attend somewhere. `scores` is scratch for L floats. */
void attend_decode_f32(const float *q, const float *kcache, const float *vcache, int64_t B,
                       int64_t H, int64_t Hkv, int64_t D, int64_t S, int64_t L,
                       const uint8_t *mask, int64_t mask_stride, float scale, float *out,
                       float *scores) {
    int64_t group = H / Hkv;
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *visible = mask ? mask + b * mask_stride : 0;
        for (int64_t h = 0; h < H; h++) {
            const float *qh = q + (b * H + h) * D;
            const float *kh = kcache + (b * Hkv + h / group) * S * D;
            const float *vh = vcache + (b * Hkv + h / group) * S * D;
            float best = -INFINITY;
            for (int64_t t = 0; t < L; t++) {
                scores[t] = (visible && !visible[t]) ? -INFINITY : dot(qh, kh + t * D, D) * scale;
                if (scores[t] > best) best = scores[t];
            }
            for (int64_t t = 0; t < L; t++) scores[t] -= best;
            exp_inplace(scores, L);
            float total = 0.0f;
            for (int64_t t = 0; t < L; t++) {
                if (visible && !visible[t]) scores[t] = 0.0f;
                total += scores[t];
            }
            float *o = out + (b * H + h) * D;
            for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
            for (int64_t t = 0; t < L; t++) {
                if (scores[t] == 0.0f) continue;
                float p = scores[t] / total;
                const float *vt = vh + t * D;
                for (int64_t i = 0; i < D; i++) o[i] += p * vt[i];
            }
        }
    }
}

/* h [M, 2F] = gate | up side by side (the fused gate-up output) -> out [M, F] = silu(gate) * up. */
void silu_mul_f32(const float *h, int64_t M, int64_t F, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *gate = h + m * 2 * F, *up = gate + F;
        float *o = out + m * F;
        for (int64_t f = 0; f < F; f++) o[f] = -gate[f];
        exp_inplace(o, F);
        for (int64_t f = 0; f < F; f++) o[f] = (gate[f] / (1.0f + o[f])) * up[f];
    }
}
