/* Elementwise hot loops of a bf16 training step on a CPU, for scratchlm.train.native.

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

#define NATIVE_TRAIN_VERSION 4

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
