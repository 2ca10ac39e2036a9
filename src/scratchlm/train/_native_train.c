/* Hot loops of a bf16 training step on a CPU, for scratchlm.train.native (the causal attention
   at the end has its own note).

   What torch runs slowly here, measured at the benchmark shape (n_layer 4, d_model 256,
   4,096 tokens a step) on the 2-core Zen 4 box: tanh-GELU forward and backward in bf16
   (~19 ms a layer: torch's vectorised tanh is slow), the causal softmax of attention (a full
   [T, T] pass over scores half of which are masked), and the chunked cross-entropy's softmax,
   -log p[target] and (softmax - one-hot) cast to bf16 (five passes over each logits chunk).
   Each function here does one of those in one or two passes over the row, in fp32 arithmetic
   with bf16 loads and stores (round to nearest even, as torch casts) and an inline exponential.

   Every function works on a range [start, stop) of elements or rows, so the Python side can
   split one call across threads (ctypes releases the GIL). Compiled with -ffast-math so gcc
   vectorises the loops' sums and maxima; linked without it, so the process's floating-point
   mode (flush-to-zero) is not changed by loading this library. NaN and infinities are detected
   on the bits (fast-math may assume they do not exist) and passed on as torch would.
   Not for fp32 tensors, strided layouts or anything that is not a training step's own buffers:
   the Python wrappers check dtypes and contiguity before calling. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define NATIVE_TRAIN_VERSION 5

int native_train_version(void) { return NATIVE_TRAIN_VERSION; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest, ties to even (NaN stays NaN: its high mantissa bit survives the carry). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* e^x for x in about [-87, 88] (clamped there, NaN kept), to ~2e-7 relative: x = n ln2 + r with
   |r| <= ln2/2 (ln2 split in two so n * hi is exact), e^r by its Taylor series to r^6, and 2^n
   put straight into the exponent bits. Plain arithmetic, so gcc vectorises it inline with no
   need for glibc's vector math library (2.35+ for tanhf), which was 10-20% slower here. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = rintf(x * 1.4426950408889634f);
    float r = (x - n * 0.693145751953125f) - n * 1.4286068203094172e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* True for a bf16 NaN or infinity, tested on the bits: -ffast-math lets the compiler assume
   floats are finite, so a float comparison could not be trusted to see them. */
static inline int bf16_not_finite(uint16_t h) { return (h & 0x7f80u) == 0x7f80u; }

static inline float f32_nan(void) {
    uint32_t u = 0x7fc00000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- GELU with the tanh approximation (GPT-2's gelu_new) -------------------------------- */

#define GELU_K0 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_K1 0.044715f

/* 0.5 x (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + e^(-2u)): one exponential, no tanh. */
void gelu_tanh_fwd_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t start, int64_t stop) {
    for (int64_t i = start; i < stop; i++) {
        float v = bf16_to_f32(x[i]);
        float u = GELU_K0 * (v + GELU_K1 * v * v * v);
        y[i] = f32_to_bf16(v / (1.0f + exp_approx(-2.0f * u)));
    }
}

/* dx = g * [s + 2 x s (1 - s) u'(x)], s = sigmoid(2u), u' = k0 (1 + 3 k1 x^2): the derivative of
   x * sigmoid(2u), which is that of 0.5 x (1 + tanh(u)) (0.5 (1 - tanh^2) = 2 s (1 - s)). */
void gelu_tanh_bwd_bf16(const uint16_t *restrict g, const uint16_t *restrict x, uint16_t *restrict dx,
                        int64_t start, int64_t stop) {
    for (int64_t i = start; i < stop; i++) {
        float v = bf16_to_f32(x[i]);
        float v2 = v * v;
        float s = 1.0f / (1.0f + exp_approx(-2.0f * GELU_K0 * (v + GELU_K1 * v2 * v)));
        float du = GELU_K0 * (1.0f + 3.0f * GELU_K1 * v2);
        float d = s + 2.0f * v * s * (1.0f - s) * du;
        dx[i] = f32_to_bf16(bf16_to_f32(g[i]) * d);
    }
}

/* ---- Causal softmax of attention scores ------------------------------------------------- */

/* The shared first half of a softmax over one bf16 row of n values: scratch[j] = exp(scale *
   row[j] - max), returned sum, *max_out = the max of scale * row, *bad = 1 if any input is NaN/inf. */
static inline float exp_shifted_row(const uint16_t *restrict row, int64_t n, float scale,
                                    float *restrict scratch, float *max_out, int *bad) {
    float m = -FLT_MAX;
    int not_finite = 0;
    for (int64_t j = 0; j < n; j++) {
        float v = bf16_to_f32(row[j]) * scale;
        not_finite |= bf16_not_finite(row[j]);
        scratch[j] = v;
        m = v > m ? v : m;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float e = exp_approx(scratch[j] - m);
        scratch[j] = e;
        sum += e;
    }
    *max_out = m;
    *bad = not_finite;
    return sum;
}

/* Rows [start, stop) of s, viewed as [rows, t] with row r being query r % t: p = softmax(scale *
   s) over columns 0..q, 0 beyond (the causal mask). `scratch` holds t floats. */
void causal_softmax_fwd_bf16(const uint16_t *restrict s, uint16_t *restrict p, int64_t t, float scale,
                             int64_t start, int64_t stop, float *restrict scratch) {
    for (int64_t r = start; r < stop; r++) {
        const uint16_t *row = s + r * t;
        uint16_t *out = p + r * t;
        int64_t n = r % t + 1;
        float m;
        int bad;
        float sum = exp_shifted_row(row, n, scale, scratch, &m, &bad);
        float inv = bad ? f32_nan() : 1.0f / sum; /* a NaN/inf score makes the row NaN, as torch */
        for (int64_t j = 0; j < n; j++) out[j] = f32_to_bf16(scratch[j] * inv);
        memset(out + n, 0, (size_t)(t - n) * sizeof(uint16_t));
    }
}

/* ds = scale * p * (dp - sum_j dp_j p_j), on the causal part of each row (0 beyond it). */
void causal_softmax_bwd_bf16(const uint16_t *restrict dp, const uint16_t *restrict p, uint16_t *restrict ds,
                             int64_t t, float scale, int64_t start, int64_t stop) {
    for (int64_t r = start; r < stop; r++) {
        const uint16_t *g = dp + r * t, *pr = p + r * t;
        uint16_t *out = ds + r * t;
        int64_t n = r % t + 1;
        float dot = 0.0f;
        for (int64_t j = 0; j < n; j++) dot += bf16_to_f32(g[j]) * bf16_to_f32(pr[j]);
        for (int64_t j = 0; j < n; j++)
            out[j] = f32_to_bf16(scale * bf16_to_f32(pr[j]) * (bf16_to_f32(g[j]) - dot));
        memset(out + n, 0, (size_t)(t - n) * sizeof(uint16_t));
    }
}

/* ---- Cross-entropy of a chunk of logits -------------------------------------------------- */

/* For rows [start, stop) of logits [rows, v] (bf16): nll[r] = logsumexp(row) - row[target[r]]
   and, in place of the logits, the gradient of the summed loss softmax(row) - onehot(target)
   as bf16. A negative target marks an ignored row: nll 0 and a zero gradient row.
   `scratch` holds v floats. */
void cross_entropy_rows_bf16(uint16_t *restrict logits, const int64_t *restrict target, float *restrict nll,
                             int64_t v, int64_t start, int64_t stop, float *restrict scratch) {
    for (int64_t r = start; r < stop; r++) {
        uint16_t *row = logits + r * v;
        int64_t tgt = target[r];
        if (tgt < 0) {
            nll[r] = 0.0f;
            memset(row, 0, (size_t)v * sizeof(uint16_t));
            continue;
        }
        float m;
        int bad;
        float sum = exp_shifted_row(row, v, 1.0f, scratch, &m, &bad);
        float picked = bf16_to_f32(row[tgt]);
        /* a NaN/inf logit makes the loss NaN (as torch's), so the trainer skips the step */
        nll[r] = bad ? f32_nan() : m + logf(sum) - picked;
        float inv = bad ? f32_nan() : 1.0f / sum;
        for (int64_t j = 0; j < v; j++) row[j] = f32_to_bf16(scratch[j] * inv);
        row[tgt] = f32_to_bf16(scratch[tgt] * inv - 1.0f);
    }
}

/* ---- Accumulating a bf16 product into fp32 ------------------------------------------------ */

/* dst[i] += src[i] for elements [start, stop): one pass where torch needs a cast into a new
   fp32 tensor and then an add (the fused loss adds each group's weight gradient this way). */
void add_bf16_to_f32(const uint16_t *restrict src, float *restrict dst, int64_t start, int64_t stop) {
    for (int64_t i = start; i < stop; i++) dst[i] += bf16_to_f32(src[i]);
}

/* ---- AdamW -------------------------------------------------------------------------------- */

/* One AdamW update of elements [start, stop) of an fp32 parameter, in one pass over p, g and the
   two moments (torch's multi-tensor version makes eight passes, and the 5 M parameters' state
   does not fit in cache): m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2; p *= 1 - lr wd;
   p -= step_size m / (sqrt(v) / bc2_sqrt + eps), as torch.optim.AdamW. */
void adamw_f32(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
               int64_t start, int64_t stop, float beta1, float beta2, float decay, float step_size,
               float eps, float bc2_sqrt) {
    float inv_bc2_sqrt = 1.0f / bc2_sqrt;
    for (int64_t i = start; i < stop; i++) {
        float gi = g[i];
        float mi = m[i] + (1.0f - beta1) * (gi - m[i]);
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_bc2_sqrt + eps);
    }
}

/* ---- Causal attention with AVX-512 BF16 dot products -------------------------------------- */

/* Training attention of one layer, softmax(scale q k^T + causal) v, forward and backward, for
   bf16 q [B, H, T, D] and k, v [B, Hkv, T, D] given by strides (d contiguous; query head h
   reads kv head h / (H / Hkv)). Why here and not as torch's bmm + softmax + bmm: half the
   score matrix is masked, and batched GEMMs compute it anyway (and run at ~160 GFLOP/s at
   these small [T, T] x [T, D] shapes); these loops skip every key block after the query block
   and fuse the softmax into the score pass.

   The products use VDPBF16PS: each fp32 lane adds a[2l] b[2l] + a[2l+1] b[2l+1], so both
   operands come in pairs along the summed index. One operand is broadcast one pair (a 32-bit
   word) at a time, the other is packed once per head so that a 512-bit load holds the pairs of
   16 output columns:
     key tiles   [Tp/16][D/2][16] pairs (along d) of 16 keys    -> scores / dP, lanes = keys
     row pairs   [Tp/2][D] pairs (along t) of two rows' d-th values -> P v, dS k, ..., lanes = d
   P (the bf16 probabilities, as the bmm path keeps them) is saved for backward as [T, Tp]
   rows, zero after the diagonal. Rounding follows the bmm path: scores and softmax in fp32,
   P rounded to bf16 before P v, products accumulated in fp32. Not for masks other than causal,
   dropout, T != S (a KV cache) or D not a multiple of 16: the Python side checks. */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#include <stdlib.h>

int causal_attention_available(void) { return 1; }

#define ATT_ROWS 4 /* query (or key) rows per block: 4 x 4 fp32 accumulators of 16 lanes */

static inline uint32_t load_pair(const uint16_t *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
}

static inline __m512bh bcast_pair(uint32_t u) { return (__m512bh)_mm512_set1_epi32((int)u); }

/* out[jt][p][l] = (x[jt*16 + l][2p], x[jt*16 + l][2p + 1]); rows >= t are zero. */
static void pack_key_tiles(const uint16_t *x, int64_t row_stride, int64_t t, int64_t tp, int64_t d,
                           uint32_t *restrict out) {
    for (int64_t jt = 0; jt < tp / 16; jt++)
        for (int64_t p = 0; p < d / 2; p++)
            for (int64_t l = 0; l < 16; l++) {
                int64_t j = jt * 16 + l;
                out[(jt * (d / 2) + p) * 16 + l] = j < t ? load_pair(x + j * row_stride + 2 * p) : 0u;
            }
}

/* out[jp][c] = (x[2 jp][c], x[2 jp + 1][c]) for c < cols; rows >= t are zero. */
static void pack_row_pairs(const uint16_t *x, int64_t row_stride, int64_t t, int64_t tp, int64_t cols,
                           uint32_t *restrict out) {
    for (int64_t jp = 0; jp < tp / 2; jp++) {
        const uint16_t *r0 = x + 2 * jp * row_stride, *r1 = r0 + row_stride;
        uint32_t *o = out + jp * cols;
        if (2 * jp + 1 < t)
            for (int64_t c = 0; c < cols; c++) o[c] = (uint32_t)r0[c] | ((uint32_t)r1[c] << 16);
        else if (2 * jp < t)
            for (int64_t c = 0; c < cols; c++) o[c] = r0[c];
        else
            memset(o, 0, sizeof(uint32_t) * (size_t)cols);
    }
}

/* s[r][jt*16 + l] = alpha * sum_d a_r[d] x[jt*16 + l][d] for rows r < nr <= 4 (a_r: bf16 rows,
   d contiguous) and key tiles jt < ntiles of the packed x. Two tiles x four rows at a time in
   eight named accumulators, so they stay in registers. */
static void rows_times_key_tiles(const uint16_t *const *a, int nr, const uint32_t *xt, int64_t ntiles,
                                 int64_t d, float alpha, float *restrict s, int64_t s_stride) {
    int64_t pairs = d / 2;
    const uint16_t *a0 = a[0], *a1 = nr > 1 ? a[1] : a0, *a2 = nr > 2 ? a[2] : a0, *a3 = nr > 3 ? a[3] : a0;
    __m512 scale = _mm512_set1_ps(alpha);
    for (int64_t jt = 0; jt < ntiles; jt += 2) {
        int two = jt + 1 < ntiles;
        __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00;
        __m512 c20 = c00, c21 = c00, c30 = c00, c31 = c00;
        const uint32_t *x0 = xt + jt * pairs * 16, *x1 = two ? x0 + pairs * 16 : x0;
        for (int64_t p = 0; p < pairs; p++) {
            __m512bh k0 = (__m512bh)_mm512_loadu_si512(x0 + p * 16);
            __m512bh k1 = (__m512bh)_mm512_loadu_si512(x1 + p * 16);
            __m512bh q0 = bcast_pair(load_pair(a0 + 2 * p)), q1 = bcast_pair(load_pair(a1 + 2 * p));
            __m512bh q2 = bcast_pair(load_pair(a2 + 2 * p)), q3 = bcast_pair(load_pair(a3 + 2 * p));
            c00 = _mm512_dpbf16_ps(c00, q0, k0); c01 = _mm512_dpbf16_ps(c01, q0, k1);
            c10 = _mm512_dpbf16_ps(c10, q1, k0); c11 = _mm512_dpbf16_ps(c11, q1, k1);
            c20 = _mm512_dpbf16_ps(c20, q2, k0); c21 = _mm512_dpbf16_ps(c21, q2, k1);
            c30 = _mm512_dpbf16_ps(c30, q3, k0); c31 = _mm512_dpbf16_ps(c31, q3, k1);
        }
        __m512 rows[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
        for (int r = 0; r < nr; r++) {
            _mm512_storeu_ps(s + r * s_stride + jt * 16, _mm512_mul_ps(rows[r][0], scale));
            if (two) _mm512_storeu_ps(s + r * s_stride + (jt + 1) * 16, _mm512_mul_ps(rows[r][1], scale));
        }
    }
}

/* out[r][c0 + c] (+)= alpha * sum_{p0 <= p < p1} a_r[p * a_stride] . y[p][c0 + c] for rows
   r < nr <= 4 and the (up to) 64 columns from c0 of the row-pair pack y [pairs][cols]: each a_r
   element is a pair (u32) that multiplies the pairs of 16 columns per 512-bit load. Sixteen
   named accumulators (4 rows x 4 x 16 columns). cols - c0 is a multiple of 16. */
static void pair_rows_times_row_pairs(const uint32_t *const *a, int64_t a_stride, int nr, const uint32_t *y,
                                      int64_t cols, int64_t c0, int64_t p0, int64_t p1, float alpha,
                                      float *restrict out, int64_t out_stride, int add) {
    int nc = (int)((cols - c0) < 64 ? (cols - c0) / 16 : 4);
    const uint32_t *a0 = a[0], *a1 = nr > 1 ? a[1] : a0, *a2 = nr > 2 ? a[2] : a0, *a3 = nr > 3 ? a[3] : a0;
    int64_t o1 = nc > 1 ? 16 : 0, o2 = nc > 2 ? 32 : 0, o3 = nc > 3 ? 48 : 0;
    __m512 z = _mm512_setzero_ps();
    __m512 c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z;
    __m512 c20 = z, c21 = z, c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
    for (int64_t p = p0; p < p1; p++) {
        const uint32_t *yp = y + p * cols + c0;
        __m512bh y0 = (__m512bh)_mm512_loadu_si512(yp), y1 = (__m512bh)_mm512_loadu_si512(yp + o1);
        __m512bh y2 = (__m512bh)_mm512_loadu_si512(yp + o2), y3 = (__m512bh)_mm512_loadu_si512(yp + o3);
        __m512bh w0 = bcast_pair(a0[p * a_stride]), w1 = bcast_pair(a1[p * a_stride]);
        __m512bh w2 = bcast_pair(a2[p * a_stride]), w3 = bcast_pair(a3[p * a_stride]);
        c00 = _mm512_dpbf16_ps(c00, w0, y0); c01 = _mm512_dpbf16_ps(c01, w0, y1);
        c02 = _mm512_dpbf16_ps(c02, w0, y2); c03 = _mm512_dpbf16_ps(c03, w0, y3);
        c10 = _mm512_dpbf16_ps(c10, w1, y0); c11 = _mm512_dpbf16_ps(c11, w1, y1);
        c12 = _mm512_dpbf16_ps(c12, w1, y2); c13 = _mm512_dpbf16_ps(c13, w1, y3);
        c20 = _mm512_dpbf16_ps(c20, w2, y0); c21 = _mm512_dpbf16_ps(c21, w2, y1);
        c22 = _mm512_dpbf16_ps(c22, w2, y2); c23 = _mm512_dpbf16_ps(c23, w2, y3);
        c30 = _mm512_dpbf16_ps(c30, w3, y0); c31 = _mm512_dpbf16_ps(c31, w3, y1);
        c32 = _mm512_dpbf16_ps(c32, w3, y2); c33 = _mm512_dpbf16_ps(c33, w3, y3);
    }
    __m512 rows[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    __m512 scale = _mm512_set1_ps(alpha);
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) {
            float *o = out + r * out_stride + c0 + c * 16;
            __m512 v = _mm512_mul_ps(rows[r][c], scale);
            _mm512_storeu_ps(o, add ? _mm512_add_ps(_mm512_loadu_ps(o), v) : v);
        }
}

static void store_bf16_row(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t c = 0; c < n; c++) dst[c] = f32_to_bf16(src[c]);
}

/* out rows [r0, r0 + nr) of a [rows, cols] product as a_r . y, with rows of pairs a_r */
static void pair_rows_block(const uint32_t *a_base, int64_t a_row_stride, int64_t a_stride, int nr,
                            const uint32_t *y, int64_t cols, int64_t p0, int64_t p1, float alpha,
                            float *out, int64_t out_stride, int add) {
    const uint32_t *a[ATT_ROWS] = {0};
    for (int r = 0; r < nr; r++) a[r] = a_base + r * a_row_stride;
    for (int64_t c0 = 0; c0 < cols; c0 += 64)
        pair_rows_times_row_pairs(a, a_stride, nr, y, cols, c0, p0, p1, alpha, out, out_stride, add);
}

/* Forward for heads [start, stop) of B*H: o [B, T, H, D] (contiguous), p [B*H, T, Tp]. */
void causal_attention_fwd_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o,
                               uint16_t *p, int64_t h, int64_t hkv, int64_t t, int64_t d,
                               int64_t sqb, int64_t sqh, int64_t sqt, int64_t skb, int64_t skh, int64_t skt,
                               float scale, int64_t start, int64_t stop) {
    int64_t tp = (t + 15) / 16 * 16, rep = h / hkv;
    uint32_t *kt = malloc(sizeof(uint32_t) * (size_t)(tp * d / 2));
    uint32_t *vp = malloc(sizeof(uint32_t) * (size_t)(tp * d / 2));
    float *s = malloc(sizeof(float) * (size_t)(ATT_ROWS * tp));
    float *orow = malloc(sizeof(float) * (size_t)(ATT_ROWS * d));
    int64_t kv_done = -1;
    for (int64_t unit = start; unit < stop; unit++) {
        int64_t b = unit / h, hh = unit % h, kv = b * hkv + hh / rep;
        if (kv != kv_done) { /* consecutive query heads of a group share the packs */
            pack_key_tiles(k + b * skb + (hh / rep) * skh, skt, t, tp, d, kt);
            pack_row_pairs(v + b * skb + (hh / rep) * skh, skt, t, tp, d, vp);
            kv_done = kv;
        }
        const uint16_t *qh = q + b * sqb + hh * sqh;
        uint16_t *ph = p + unit * t * tp;
        for (int64_t i0 = 0; i0 < t; i0 += ATT_ROWS) {
            int nr = (int)(t - i0 < ATT_ROWS ? t - i0 : ATT_ROWS);
            const uint16_t *a[ATT_ROWS] = {0};
            for (int r = 0; r < nr; r++) a[r] = qh + (i0 + r) * sqt;
            int64_t nkeys = i0 + nr;
            rows_times_key_tiles(a, nr, kt, (nkeys + 15) / 16, d, scale, s, tp);
            for (int r = 0; r < nr; r++) {
                int64_t i = i0 + r, n = i + 1;
                float *sr = s + r * tp, m = -FLT_MAX, sum = 0.0f;
                for (int64_t j = 0; j < n; j++) m = sr[j] > m ? sr[j] : m;
                for (int64_t j = 0; j < n; j++) {
                    sr[j] = exp_approx(sr[j] - m);
                    sum += sr[j];
                }
                float inv = 1.0f / sum;
                uint16_t *pr = ph + i * tp;
                for (int64_t j = 0; j < n; j++) pr[j] = f32_to_bf16(sr[j] * inv);
                memset(pr + n, 0, (size_t)(tp - n) * sizeof(uint16_t));
            }
            pair_rows_block((const uint32_t *)(ph + i0 * tp), tp / 2, 1, nr, vp, d, 0, (nkeys + 1) / 2,
                            1.0f, orow, d, 0);
            for (int r = 0; r < nr; r++)
                store_bf16_row(orow + r * d, o + ((b * t + i0 + r) * h + hh) * d, d);
        }
    }
    free(kt);
    free(vp);
    free(s);
    free(orow);
}

/* Backward for the (batch, kv head) units [start, stop) of B*Hkv (each unit owns its dk, dv rows
   and the dq rows of its query heads): dq [B, T, H, D], dk, dv [B, T, Hkv, D] (contiguous).
   dV and dK are made transposed, dV^T = dO^T P and dK^T = scale q^T dS, so that P and dS are
   read as row pairs (two rows interleaved, a contiguous pass) rather than transposed. */
void causal_attention_bwd_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *p,
                               const uint16_t *go, uint16_t *dq, uint16_t *dk, uint16_t *dv,
                               int64_t h, int64_t hkv, int64_t t, int64_t d,
                               int64_t sqb, int64_t sqh, int64_t sqt, int64_t skb, int64_t skh, int64_t skt,
                               int64_t sgb, int64_t sgh, int64_t sgt, float scale, int64_t start, int64_t stop) {
    int64_t tp = (t + 15) / 16 * 16, rep = h / hkv;
    size_t pack = sizeof(uint32_t) * (size_t)(tp * d / 2);
    uint32_t *vt = malloc(pack), *kp = malloc(pack), *gp = malloc(pack), *qp = malloc(pack);
    uint32_t *pp = malloc(sizeof(uint32_t) * (size_t)(tp * tp / 2));
    uint32_t *dsp = malloc(sizeof(uint32_t) * (size_t)(tp * tp / 2));
    uint16_t *ds = calloc((size_t)(tp * tp), sizeof(uint16_t));
    float *dprow = malloc(sizeof(float) * (size_t)(ATT_ROWS * tp));
    float *acc = malloc(sizeof(float) * (size_t)(ATT_ROWS * d));
    float *dkt = malloc(sizeof(float) * (size_t)(d * tp)), *dvt = malloc(sizeof(float) * (size_t)(d * tp));
    for (int64_t unit = start; unit < stop; unit++) {
        int64_t b = unit / hkv, g = unit % hkv;
        const uint16_t *kh = k + b * skb + g * skh, *vh = v + b * skb + g * skh;
        pack_key_tiles(vh, skt, t, tp, d, vt);
        pack_row_pairs(kh, skt, t, tp, d, kp);
        memset(dkt, 0, sizeof(float) * (size_t)(d * tp));
        memset(dvt, 0, sizeof(float) * (size_t)(d * tp));
        for (int64_t hh = g * rep; hh < (g + 1) * rep; hh++) {
            const uint16_t *qh = q + b * sqb + hh * sqh, *gh = go + b * sgb + hh * sgh;
            const uint16_t *ph = p + (b * h + hh) * t * tp;
            pack_row_pairs(gh, sgt, t, tp, d, gp);
            pack_row_pairs(qh, sqt, t, tp, d, qp);
            for (int64_t i0 = 0; i0 < t; i0 += ATT_ROWS) {
                int nr = (int)(t - i0 < ATT_ROWS ? t - i0 : ATT_ROWS);
                const uint16_t *a[ATT_ROWS] = {0};
                for (int r = 0; r < nr; r++) a[r] = gh + (i0 + r) * sgt;
                int64_t nkeys = i0 + nr;
                rows_times_key_tiles(a, nr, vt, (nkeys + 15) / 16, d, 1.0f, dprow, tp);
                for (int r = 0; r < nr; r++) { /* dS = P (dP - sum_j P dP), 0 after the diagonal */
                    int64_t i = i0 + r, n = i + 1;
                    const uint16_t *pr = ph + i * tp;
                    const float *gr = dprow + r * tp;
                    float dot = 0.0f;
                    for (int64_t j = 0; j < n; j++) dot += bf16_to_f32(pr[j]) * gr[j];
                    uint16_t *out = ds + i * tp;
                    for (int64_t j = 0; j < n; j++) out[j] = f32_to_bf16(bf16_to_f32(pr[j]) * (gr[j] - dot));
                    memset(out + n, 0, (size_t)(tp - n) * sizeof(uint16_t));
                }
                pair_rows_block((const uint32_t *)(ds + i0 * tp), tp / 2, 1, nr, kp, d, 0, (nkeys + 1) / 2,
                                scale, acc, d, 0);
                for (int r = 0; r < nr; r++)
                    store_bf16_row(acc + r * d, dq + ((b * t + i0 + r) * h + hh) * d, d);
            }
            pack_row_pairs(ph, tp, t, tp, tp, pp);
            pack_row_pairs(ds, tp, t, tp, tp, dsp);
            /* dV^T[c][j] = sum_i dO[i][c] P[i][j]: rows c of dO^T are columns of the dO pack */
            for (int64_t c = 0; c < d; c += ATT_ROWS) {
                int nr = (int)(d - c < ATT_ROWS ? d - c : ATT_ROWS);
                for (int64_t j0 = 0; j0 < tp; j0 += 64) { /* queries i >= key j0: pairs from j0 / 2 */
                    const uint32_t *ag[ATT_ROWS], *aq[ATT_ROWS];
                    for (int r = 0; r < nr; r++) {
                        ag[r] = gp + c + r;
                        aq[r] = qp + c + r;
                    }
                    pair_rows_times_row_pairs(ag, d, nr, pp, tp, j0, j0 / 2, (t + 1) / 2, 1.0f, dvt + c * tp, tp, 1);
                    pair_rows_times_row_pairs(aq, d, nr, dsp, tp, j0, j0 / 2, (t + 1) / 2, scale, dkt + c * tp, tp, 1);
                }
            }
        }
        /* back to rows: read each transposed row once, in order (gathering columns was slower) */
        int64_t row_stride = hkv * d;
        uint16_t *dk0 = dk + (b * t * hkv + g) * d, *dv0 = dv + (b * t * hkv + g) * d;
        for (int64_t c = 0; c < d; c++) {
            const float *kr = dkt + c * tp, *vr = dvt + c * tp;
            for (int64_t j = 0; j < t; j++) {
                dk0[j * row_stride + c] = f32_to_bf16(kr[j]);
                dv0[j * row_stride + c] = f32_to_bf16(vr[j]);
            }
        }
    }
    free(vt); free(kp); free(gp); free(qp); free(pp); free(dsp); free(ds);
    free(dprow); free(acc); free(dkt); free(dvt);
}

#else
int causal_attention_available(void) { return 0; }
void causal_attention_fwd_bf16(void) {}
void causal_attention_bwd_bf16(void) {}
#endif
