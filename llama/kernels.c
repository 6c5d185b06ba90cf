/* CPU kernels for what torch lacks there (see llama/kernels.py, which compiles this file on first use with the
 * machine's own C compiler, -march=native, and calls it through ctypes). Written with GCC's generic vectors of
 * the machine's width, W floats: 16 with AVX-512, 8 elsewhere (AVX2, NEON). Wider ones, which GCC splits in
 * two on AVX2, made it emulate their shuffles lane by lane, and attention 4x slower than torch's.
 *
 * decode_attention_*: one query token per row. The G query heads that share a KV head attend together, so each
 * cached key and value is read from memory once for all G of them. torch's scaled_dot_product_attention reads
 * a 4096-position cache at about 8 GB/s here. This reads it in one pass, BLOCK positions at a time with a
 * running (online) softmax, accumulating in float32 whatever the cache's dtype. (AVX-512 BF16's dot-product
 * instructions, tried for a bf16 cache, were only 11 % faster on the 1b shape: not worth a second code path.)
 * prefill_attention: a prompt's causal attention in float32, as products of matrices (a float32 or bf16 cache).
 *
 * linear_bf16: float32 rows times bf16 weights as stored, for decoding (one row or a batch) on a CPU without
 * native bf16; linear_packed_f32: the same on weights packed for it, any number of rows; linear_packed_bf16:
 * bf16 rows times packed bf16 weights, with AVX-512 BF16's dot products or AMX's tiles.
 *
 * rms_norm (with the residual sum before it), swiglu, rope: the small element-wise steps of a layer, one call
 * each where torch makes several.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 64 /* cached positions per block, a multiple of W: its scores and values stay in L1 */
#define AHEAD 128 /* positions ahead that keys and values are prefetched: the hardware's prefetcher alone read a
                   * 4096-position cache at half the speed, and a block's worth at once, 20 % slower */
#define MAX_D 256
#define MAX_G 16
#define TILE_ROWS 6 /* rows of an outer-product tile (prefill_attention's, linear_packed_f32's): 12 sums, two vectors
                     * of the other side, a broadcast and a load in AVX2's 16 registers */

#if defined(VECTOR_FLOATS) /* -DVECTOR_FLOATS=16 on AVX2: AVX-512's forms, emulated, for the tests to check them */
#define W VECTOR_FLOATS
#elif defined(__AVX512F__)
#define W 16 /* floats per vector */
#else
#define W 8
#endif

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));
typedef float vf_half __attribute__((vector_size(2 * W)));
typedef uint16_t vh_half __attribute__((vector_size(W)));

/* Shuffle masks, as literals (GCC emulates a shuffle whose mask it can't see as a constant, slowly). LANES: all
 * of a vector's, in order. SWAPn: lane i swapped with lane i ^ n. FIRSTn: of two vectors whose items take 2n
 * lanes each, the first n lanes of each item, item by item; the second n lanes are the same plus n. EVENS, ODDS:
 * each pair's first or second lane, in both of its lanes. ALTERNATE: -1 and 1 in turn. */
#if W == 16
#define LANES 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#define SWAP8 {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}
#define SWAP4 {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}
#define SWAP2 {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}
#define SWAP1 {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}
#define FIRST4 {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}
#define FIRST2 {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}
#define FIRST1 {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}
#define EVENS {0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14}
#define ODDS {1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15}
#define ALTERNATE {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1}
#else
#define LANES 0, 1, 2, 3, 4, 5, 6, 7
#define SWAP4 {4, 5, 6, 7, 0, 1, 2, 3}
#define SWAP2 {2, 3, 0, 1, 6, 7, 4, 5}
#define SWAP1 {1, 0, 3, 2, 5, 4, 7, 6}
#define FIRST2 {0, 1, 4, 5, 8, 9, 12, 13}
#define FIRST1 {0, 2, 4, 6, 8, 10, 12, 14}
#define EVENS {0, 0, 2, 2, 4, 4, 6, 6}
#define ODDS {1, 1, 3, 3, 5, 5, 7, 7}
#define ALTERNATE {-1, 1, -1, 1, -1, 1, -1, 1}
#endif
#define SWAP(x, n) __builtin_shuffle(x, (vi)SWAP##n)
#define HALVES(a, b, n) (__builtin_shuffle(a, b, (vi)FIRST##n) + __builtin_shuffle(a, b, (vi)FIRST##n + n))

static const float zeros[MAX_D]; /* a row of keys past the last, in either dtype */

/* bf16 to float32: bf16 is the top half of a float32. GCC 12 widens 16-bit lanes in two halves and joins them
 * (five instructions on AVX2), which cost linear_bf16 10-15 %; x86 has one instruction for it. */
static inline vf widen(vh h) {
#if W == 16 && defined(__AVX512F__)
    return (vf)((vu)_mm512_cvtepu16_epi32((__m256i)h) << 16);
#elif W == 8 && defined(__AVX2__)
    return (vf)((vu)_mm256_cvtepu16_epi32((__m128i)h) << 16);
#else
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

static inline vf load(const void *p, int64_t i, int bf16) {
    if (bf16) {
        vh h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        return widen(h);
    }
    vf x;
    memcpy(&x, (const float *)p + i, sizeof x);
    return x;
}

/* Two half vectors joined: a shuffle, where the compiler has __builtin_shufflevector (GCC 12 on). Older GCC
 * (Ubuntu 22.04's 11) joins them through memory, which stalls on store forwarding: slower, the same result. */
#if __GNUC__ >= 12 || defined(__clang__)
#define JOIN(type, a, b) __builtin_shufflevector(a, b, LANES)
#else
#define JOIN(type, a, b) ({ union { __typeof__(a) half[2]; type whole; } j_ = {.half = {a, b}}; j_.whole; })
#endif

/* Elements i..i+W/2-1 of a, then of b, as floats. */
static inline vf load_halves(const void *a, const void *b, int64_t i, int bf16) {
    if (bf16) {
        vh_half ha, hb;
        memcpy(&ha, (const uint16_t *)a + i, sizeof ha);
        memcpy(&hb, (const uint16_t *)b + i, sizeof hb);
        return widen(JOIN(vh, ha, hb));
    }
    vf_half fa, fb;
    memcpy(&fa, (const float *)a + i, sizeof fa);
    memcpy(&fb, (const float *)b + i, sizeof fb);
    return JOIN(vf, fa, fb);
}

static inline void store(void *p, int64_t i, vf x, int bf16) {
    if (bf16) { /* round to nearest even, as torch does */
        vu u = (vu)x;
        u += 0x7fffu + ((u >> 16) & 1u);
        vh h = __builtin_convertvector(u >> 16, vh);
        memcpy((uint16_t *)p + i, &h, sizeof h);
    } else {
        memcpy((float *)p + i, &x, sizeof x);
    }
}

static inline float scalar(const void *p, int64_t i, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return ((const float *)p)[i];
}

static inline vf broadcast(float x) { return x - (vf){0}; } /* x - 0 is x, even -0: folded away, unlike x + 0 */

/* a's lanes where mask is set (all ones), b's elsewhere. */
static inline vf choose(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf vmax(vf a, vf b) { return choose(a > b, a, b); }

/* The largest and the sum of x's lanes, in log2(W) rounds of halving rather than W - 1 dependent steps. */
static inline float hmax(vf x) {
#if W == 16
    x = vmax(x, SWAP(x, 8));
#endif
    x = vmax(x, SWAP(x, 4));
    x = vmax(x, SWAP(x, 2));
    return vmax(x, SWAP(x, 1))[0];
}

static inline float hsum(vf x) {
#if W == 16
    x += SWAP(x, 8);
#endif
    x += SWAP(x, 4);
    x += SWAP(x, 2);
    return (x + SWAP(x, 1))[0];
}

/* exp(x) for x <= 0, to about 2e-7 relative; 0 below -87 (and for -inf). x = n ln2 + r, |r| <= ln2 / 2. */
static inline vf vexp(vf x) {
    const vf magic = broadcast(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    vf t = x * 1.44269504f + magic;
    vf n = t - magic;
    vf r = x - n * 0.693145752f - n * 1.42860677e-6f;
    vf p = broadcast(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* unsigned: below -87 the exponent goes negative, and a signed left shift of it is undefined in C */
    vu scale = (vu)((vi)t - (vi)magic + 127) << 23;
    return (vf)((vi)(p * (vf)scale) & (vi)(x > -87.0f));
}

/* x: W/2 vectors, x[i]'s low half partial sums of item 2i and its high half of item 2i + 1. Lane j of the result
 * is item j's sum: rounds of pairing vectors and adding the halves of each item's lanes. */
static inline vf sum_halves(const vf *x) {
#if W == 16
    vf y[4] = {HALVES(x[0], x[1], 4), HALVES(x[2], x[3], 4), HALVES(x[4], x[5], 4), HALVES(x[6], x[7], 4)};
#else
    const vf *y = x;
#endif
    return HALVES(HALVES(y[0], y[1], 2), HALVES(y[2], y[3], 2), 1);
}

/* The queries, laid out for scores(): query g's elements i..i+W/2-1 twice over in each vector. */
static inline __attribute__((always_inline)) void prepare(const void *q, int64_t G, int64_t D, vf *qp, int bf16) {
    for (int64_t i = 0; i < G * D; i += W / 2)
        qp[i / (W / 2)] = load_halves(q, q, i, bf16);
}

/* part[g][step] for g in g0..g0+GT-1: GT prepared queries' partial sums against the pair of keys at a and b.
 * Each query's multiply-adds are a chain of their own, GT chains at once, and each vector of keys is loaded once
 * for all GT (holding a pair's keys in registers instead spilled them with AVX2, and chained the sums). */
static inline __attribute__((always_inline)) void pair_sums(const vf *qp, const char *a, const char *b, vf *part,
                                                            int64_t step, int64_t D, int64_t g0, const int GT,
                                                            int bf16) {
    const int64_t C = 2 * D / W; /* vectors per pair of keys */
    vf acc[8] = {0};
#pragma GCC unroll 4
    for (int64_t c = 0; c < C; c++) {
        const vf kv = load_halves(a, b, c * (W / 2), bf16);
        for (int g = 0; g < GT; g++)
            acc[g] += qp[(g0 + g) * C + c] * kv;
    }
    for (int g = 0; g < GT; g++)
        part[(g0 + g) * (W / 2) + step] = acc[g];
}

/* Scores s (G x BLOCK, query-major) of G prepared queries qp against nb keys, times scale. Two positions at a
 * time share a vector (one in each half), and each query's partial sums are summed W/2 pairs at a time. */
static inline __attribute__((always_inline)) void scores(const vf *qp, const void *k, const void *v, int64_t nb,
                                                         int64_t G, int64_t D, float scale, float *s, int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    vf part[MAX_G * W / 2];
    for (int64_t t = 0; t < nb; t += 2) {
        const char *a = (const char *)k + t * D * size, *b = t + 1 < nb ? a + D * size : (const char *)zeros;
        const int64_t step = t / 2 % (W / 2);
        for (int64_t i = 0; i < 2 * D * size; i += 64) { /* the keys and values AHEAD positions on */
            __builtin_prefetch(a + AHEAD * D * size + i);
            __builtin_prefetch((const char *)v + (t + AHEAD) * D * size + i);
        }
        int64_t g0 = 0;
        for (; g0 + 8 <= G; g0 += 8)
            pair_sums(qp, a, b, part, step, D, g0, 8, bf16);
        if (G - g0 >= 4)
            pair_sums(qp, a, b, part, step, D, g0, 4, bf16), g0 += 4;
        if (G - g0 >= 2)
            pair_sums(qp, a, b, part, step, D, g0, 2, bf16), g0 += 2;
        if (G - g0 == 1)
            pair_sums(qp, a, b, part, step, D, g0, 1, bf16);
        if (step == W / 2 - 1 || t + 2 >= nb) {
            for (int64_t g = 0; g < G; g++) {
                for (int64_t i = step + 1; i < W / 2; i++)
                    part[g * (W / 2) + i] = (vf){0};
                store(s, g * BLOCK + t / W * W, sum_halves(part + g * (W / 2)) * scale, 0);
            }
        }
    }
    for (int64_t t = (nb + W - 1) / W * W; t < BLOCK; t += W) /* blocks past nb: defined, and masked later */
        for (int64_t g = 0; g < G; g++)
            store(s, g * BLOCK + t, (vf){0}, 0);
}

/* acc's rows g0..g0+GT-1 += those of p times nb values v (nb x D, bf16 where bf16), CV vectors of D at a time:
 * the GT x CV sums stay in registers, and each vector of values is loaded (and widened) once for GT queries. */
static inline __attribute__((always_inline)) void weigh_rows(float *acc, const float *p, const void *v, int64_t nb,
                                                             int64_t D, int64_t g0, const int GT, int bf16) {
    enum { CV_MAX = W == 16 ? 4 : 8 };
    /* 8 chains of multiply-adds at once with AVX2, 16 with AVX-512 (D, a multiple of 64, bounds CV there) */
    const int CV = W == 16 ? (GT >= 8 ? 2 : 4) : 8 / GT;
    for (int64_t c = 0; c < D; c += CV * W) {
        vf a[8][CV_MAX];
        for (int g = 0; g < GT; g++)
            for (int j = 0; j < CV; j++)
                a[g][j] = load(acc, (g0 + g) * D + c + j * W, 0);
        for (int64_t t = 0; t < nb; t++) {
            vf xv[CV_MAX];
            for (int j = 0; j < CV; j++) {
                xv[j] = load(v, t * D + c + j * W, bf16);
#if W == 8 && defined(__AVX2__) /* kept in a register: GCC reloaded it in each multiply-add, whose loads then
                                 * held back an AMD Zen 3 (10 % of a 4096-position step's attention); AVX-512's
                                 * build is left as it was measured */
                __asm__("" : "+v"(xv[j]));
#endif
            }
            for (int g = 0; g < GT; g++) {
                const vf w = broadcast(p[(g0 + g) * BLOCK + t]);
                for (int j = 0; j < CV; j++)
                    a[g][j] += w * xv[j];
            }
        }
        for (int g = 0; g < GT; g++)
            for (int j = 0; j < CV; j++)
                store(acc, (g0 + g) * D + c + j * W, a[g][j], 0);
    }
}

/* acc (G x D float32) += p (G x BLOCK, query-major) times nb values v (nb x D): the queries 8 at a time, so that
 * Llama's groups of 8 read and widen each value once, then 4, 2 and 1 (a loop's bound that the compiler sees,
 * for the sums to stay in registers). Reading bf16 values so, rather than widening the block into a buffer
 * first, made 22 layers' attention over 4096 positions 12-19 % faster on an AMD Zen 3 (AVX2). */
static inline __attribute__((always_inline)) void weigh(float *acc, const float *p, const void *v, int64_t nb,
                                                        int64_t G, int64_t D, int bf16) {
    int64_t g0 = 0;
    for (; g0 + 8 <= G; g0 += 8)
        weigh_rows(acc, p, v, nb, D, g0, 8, bf16);
    if (G - g0 >= 4)
        weigh_rows(acc, p, v, nb, D, g0, 4, bf16), g0 += 4;
    if (G - g0 >= 2)
        weigh_rows(acc, p, v, nb, D, g0, 2, bf16), g0 += 2;
    if (G - g0 == 1)
        weigh_rows(acc, p, v, nb, D, g0, 1, bf16);
}

/* A query's running softmax: its largest score so far, and the sum of exp(score - max) over its scores so far. */
typedef struct {
    float max, sum;
} running;

/* One query's step of the running softmax over a block (decoding's and a prompt's): its scores s (BLOCK, the
 * masked ones -inf) made the block's weights, given top, their maximum with the running one; where that rose,
 * the query's weighed values so far (acc, D of them) and its sum rescaled to it. Returns the running softmax
 * after the block. */
static inline __attribute__((always_inline)) running softmax_step(float *s, vf top, running so_far, float *acc,
                                                                  int64_t D) {
    float peak = hmax(top);
    if (peak == -INFINITY) /* all masked so far: exp(-inf - 0) = 0 below */
        peak = 0;
    else if (peak > so_far.max) { /* rescale what came before to the new maximum */
        const float shrink = expf(so_far.max - peak);
        so_far.sum *= shrink;
        for (int64_t i = 0; i < D; i += W)
            store(acc, i, load(acc, i, 0) * shrink, 0);
        so_far.max = peak;
    }
    vf sum = {0};
    for (int64_t t = 0; t < BLOCK; t += W) {
        vf p = vexp(load(s, t, 0) - peak);
        store(s, t, p, 0);
        sum += p;
    }
    so_far.sum += hsum(sum);
    return so_far;
}

/* One (row, KV head): G queries q (G x D) against n cached keys and values (n x D each, rows D apart), mask
 * (n, additive, or NULL), into out (G x D). qb: q, mask and out are bf16; kb: the keys and values are. */
static inline __attribute__((always_inline)) void head(const void *q, const void *k, const void *v, const void *mask,
                                                       void *out, int64_t G, int64_t D, int64_t n, float scale,
                                                       int qb, int kb) {
    const int64_t size = kb ? 2 : 4;
    vf qp[2 * MAX_G * MAX_D / W];
    float acc[G * D], s[G * BLOCK], bias[BLOCK];
    running run[G];
    prepare(q, G, D, qp, qb);
    for (int64_t i = 0; i < G * D; i += W)
        store(acc, i, (vf){0}, 0);
    for (int64_t g = 0; g < G; g++)
        run[g] = (running){-INFINITY, 0};
    int64_t first = 0; /* a left-padded row's padding, masked, is not read: a short prompt batched with a long one
                        * reads its own positions, not the long one's count */
    while (mask && first < n && scalar(mask, first, qb) == -INFINITY)
        first++;
    for (int64_t t0 = first; t0 < n; t0 += BLOCK) {
        const int64_t nb = n - t0 < BLOCK ? n - t0 : BLOCK;
        scores(qp, (const char *)k + t0 * D * size, (const char *)v + t0 * D * size, nb, G, D, scale, s, kb);
        for (int64_t t = 0; t < BLOCK; t++) /* padding past nb: -inf, to weigh nothing */
            bias[t] = t >= nb ? -INFINITY : mask ? scalar(mask, t0 + t, qb) : 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float *sg = s + g * BLOCK;
            vf top = broadcast(run[g].max);
            for (int64_t t = 0; t < BLOCK; t += W) {
                vf x = load(sg, t, 0) + load(bias, t, 0);
                store(sg, t, x, 0);
                top = vmax(x, top);
            }
            run[g] = softmax_step(sg, top, run[g], acc + g * D, D);
        }
        weigh(acc, s, (const char *)v + t0 * D * size, nb, G, D, kb);
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = run[g].sum > 0 ? 1.0f / run[g].sum : 0.0f;
        for (int64_t i = g * D; i < (g + 1) * D; i += W)
            store(out, i, load(acc, i, 0) * inv, qb);
    }
}

/* q, out: (B, H, G, D) contiguous. k, v: the cache, key (b, h, t, d) at b * kv_b + h * kv_h + t * D + d.
 * mask: (B, n) with rows mask_b apart, or NULL. D a multiple of 64, at most MAX_D; G at most MAX_G. qb: q, mask
 * and out are bf16, else float32; kb: k and v are (float32 queries reading a bf16 cache: half the bytes). */
static inline __attribute__((always_inline)) void attend(const void *q, const void *k, const void *v,
                                                         const void *mask, void *out, int64_t B, int64_t H,
                                                         int64_t G, int64_t D, int64_t n, int64_t kv_b, int64_t kv_h,
                                                         int64_t mask_b, float scale, int threads, int qb, int kb) {
    const int64_t size = qb ? 2 : 4, kv_size = kb ? 2 : 4;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t at = (b * H + h) * G * D, kv = (b * kv_b + h * kv_h) * kv_size;
            const void *qh = (const char *)q + at * size, *kh = (const char *)k + kv, *vh = (const char *)v + kv;
            const void *mh = mask ? (const char *)mask + b * mask_b * size : NULL;
            void *oh = (char *)out + at * size;
            /* The dtypes and Llama's head sizes as constants here, inside the loop that OpenMP moves to a function
             * of its own (which would otherwise test them at run time, in the innermost loops) */
#define HEAD(qb_, kb_)                                                                                               \
    (D == 64    ? head(qh, kh, vh, mh, oh, G, 64, n, scale, qb_, kb_)                                                \
     : D == 128 ? head(qh, kh, vh, mh, oh, G, 128, n, scale, qb_, kb_)                                               \
                : head(qh, kh, vh, mh, oh, G, D, n, scale, qb_, kb_))
            if (qb)
                HEAD(1, 1);
            else if (kb)
                HEAD(0, 1);
            else
                HEAD(0, 0);
#undef HEAD
        }
}

/* Called with q's dtype in the name; bf16_cache: the keys and values are bf16 (always, for bf16 queries). */
void decode_attention_f32(const float *q, const void *k, const void *v, const float *mask, float *out, int64_t B,
                          int64_t H, int64_t G, int64_t D, int64_t n, int64_t kv_b, int64_t kv_h, int64_t mask_b,
                          float scale, int threads, int bf16_cache) {
    attend(q, k, v, mask, out, B, H, G, D, n, kv_b, kv_h, mask_b, scale, threads, 0, bf16_cache);
}

void decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *mask,
                           uint16_t *out, int64_t B, int64_t H, int64_t G, int64_t D, int64_t n, int64_t kv_b,
                           int64_t kv_h, int64_t mask_b, float scale, int threads) {
    attend(q, k, v, mask, out, B, H, G, D, n, kv_b, kv_h, mask_b, scale, threads, 1, 1);
}

/* prefill_attention: a prompt's causal attention to its own keys and values (float32 queries; the cache float32
 * or bf16), as products of matrices: torch's flash attention for the CPU ran a 1000-token prompt of the 1b shape
 * at 60-70 GFLOP/s on an AMD Zen 3 (AVX2), a third of its multiply-add rate; this at 95-115. A work item is up to
 * QROWS query rows (whole tokens times the G heads that share a KV head) against BLOCK keys at a time, with a
 * running softmax: the scores an outer product of the queries and the block's keys transposed, TILE_ROWS rows by
 * 2W keys of sums in registers; the values weighed the same way, TILE_ROWS rows by 2W of D. lay_out transposes the
 * keys and widens the values once for all the work items that read them (each item doing it for itself: 20 %
 * slower). */
#define QROWS 64

/* Rows r0..r0+R of c (ldc apart), columns 0..n rounded up to 2W = those of a (lda apart) times b (inner rows,
 * ldb apart), plus c's own where add: the outer product that matrix products are made of, TILE_ROWS rows x 2W
 * columns of sums in registers. The scores are the queries times the keys transposed; the output, the probabilities
 * times the values. */
static inline __attribute__((always_inline)) void outer_tile(const float *a, int64_t lda, const float *b, int64_t ldb,
                                                             float *c, int64_t ldc, int64_t inner, int64_t n,
                                                             int add, int64_t r0, const int R) {
    for (int64_t j = 0; j < n; j += 2 * W) {
        vf sums[TILE_ROWS][2];
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 2; h++)
                sums[r][h] = add ? load(c, (r0 + r) * ldc + j + h * W, 0) : (vf){0};
        for (int64_t i = 0; i < inner; i++) {
            const vf b0 = load(b, i * ldb + j, 0), b1 = load(b, i * ldb + j + W, 0);
            for (int r = 0; r < R; r++) {
                const vf x = broadcast(a[(r0 + r) * lda + i]);
                sums[r][0] += x * b0;
                sums[r][1] += x * b1;
            }
        }
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 2; h++)
                store(c, (r0 + r) * ldc + j + h * W, sums[r][h], 0);
    }
}

/* tile(r0, n) over R rows: TILE_ROWS at a time, then the rest, each count a constant for the sums to stay in
 * registers. */
#define TILES(tile, R)                                                                                               \
    do {                                                                                                             \
        int64_t r0 = 0;                                                                                              \
        for (; r0 + TILE_ROWS <= (R); r0 += TILE_ROWS)                                                               \
            tile(r0, TILE_ROWS);                                                                                     \
        switch ((R) - r0) {                                                                                          \
        case 5: tile(r0, 5); break;                                                                                  \
        case 4: tile(r0, 4); break;                                                                                  \
        case 3: tile(r0, 3); break;                                                                                  \
        case 2: tile(r0, 2); break;                                                                                  \
        case 1: tile(r0, 1); break;                                                                                  \
        }                                                                                                            \
    } while (0)

/* Tokens t0..t0+tokens-1 of one (row, KV head), G queries each (token i's at q + i * q_t, G x D contiguous), against
 * keys and values 0..t0+tokens-1 as lay_out leaves them (kt, x), into out (token i's at out + i * o_t). */
static inline __attribute__((always_inline)) void prefill_block(const float *q, const float *kt, const float *x,
                                                                float *out, int64_t q_t, int64_t o_t, int64_t t0,
                                                                int64_t tokens, int64_t G, int64_t D, float scale) {
    const int64_t R = tokens * G, end = t0 + tokens;
    float qs[R * D], acc[R * D], s[R * BLOCK];
    running run[R];
    for (int64_t r = 0; r < R; r++) {
        for (int64_t d = 0; d < D; d += W) {
            store(qs, r * D + d, load(q, r / G * q_t + r % G * D + d, 0) * scale, 0);
            store(acc, r * D + d, (vf){0}, 0);
        }
        run[r] = (running){-INFINITY, 0};
    }
    const vi lanes = {LANES};
    for (int64_t k0 = 0; k0 < end; k0 += BLOCK) {
        const int64_t nb = end - k0 < BLOCK ? end - k0 : BLOCK;
        const float *kb = kt + k0 * D, *xb = x + k0 * D;
#define SCORES(r0, n) outer_tile(qs, D, kb, BLOCK, s, BLOCK, D, nb, 0, r0, n)
        TILES(SCORES, R);
#undef SCORES
        for (int64_t r = 0; r < R; r++) {
            float *sr = s + r * BLOCK;
            const int64_t own = t0 + r / G - k0 + 1, seen = own < nb ? own : nb; /* keys up to the row's token */
            vf top = broadcast(run[r].max);
            for (int64_t t = 0; t < BLOCK; t += W) {
                const vf y = choose(lanes + (int32_t)t < (int32_t)seen, load(sr, t, 0), broadcast(-INFINITY));
                store(sr, t, y, 0);
                top = vmax(y, top);
            }
            run[r] = softmax_step(sr, top, run[r], acc + r * D, D);
        }
#define VALUES(r0, n) outer_tile(s, BLOCK, xb, D, acc, D, nb, D, 1, r0, n)
        TILES(VALUES, R);
#undef VALUES
    }
    for (int64_t r = 0; r < R; r++)
        for (int64_t d = 0; d < D; d += W)
            store(out, r / G * o_t + r % G * D + d, load(acc, r * D + d, 0) * (1.0f / run[r].sum), 0);
}

/* One (row, KV head)'s T keys transposed BLOCK at a time into kt (D x BLOCK each, zeros past T), its values
 * widened to float32 into x (T x D). */
static void lay_out(const void *k, const void *v, float *kt, float *x, int64_t T, int64_t D, int kb) {
    for (int64_t k0 = 0; k0 < T; k0 += BLOCK)
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = 0; j < BLOCK; j++)
                kt[k0 * D + d * BLOCK + j] = k0 + j < T ? scalar(k, (k0 + j) * D + d, kb) : 0.0f;
    for (int64_t i = 0; i < T * D; i += W)
        store(x, i, load(v, i, kb), 0);
}

/* q: (B, T, H * G, D), rows q_b and tokens q_t apart, each token's heads contiguous; out: the same, contiguous.
 * k, v: key (b, h, t, d) at b * kv_b + h * kv_h + t * D + d, bf16 where kb. Token t attends to keys 0..t.
 * scratch: 2 x B x H x span floats, span = T rounded up to BLOCK, times D. */
void prefill_attention(const float *q, const void *k, const void *v, float *out, float *scratch, int64_t B,
                       int64_t T, int64_t H, int64_t G, int64_t D, int64_t q_b, int64_t q_t, int64_t kv_b,
                       int64_t kv_h, float scale, int threads, int kb) {
    const int64_t per = QROWS / G > 0 ? QROWS / G : 1, items = (T + per - 1) / per, size = kb ? 2 : 4;
    const int64_t span = (T + BLOCK - 1) / BLOCK * BLOCK * D;
    float *kts = scratch, *xs = scratch + B * H * span;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++) {
                const int64_t at = (b * kv_b + h * kv_h) * size, i = (b * H + h) * span;
                lay_out((const char *)k + at, (const char *)v + at, kts + i, xs + i, T, D, kb);
            }
#pragma omp for collapse(3) schedule(dynamic)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < items; i++) {
                    const int64_t t0 = (items - 1 - i) * per, tokens = T - t0 < per ? T - t0 : per; /* longest first */
                    const float *qi = q + b * q_b + t0 * q_t + h * G * D, *kt = kts + (b * H + h) * span;
                    const float *x = xs + (b * H + h) * span;
                    float *o = out + (b * T + t0) * H * G * D + h * G * D;
                    /* Llama's head sizes as constants, as in attend() */
                    if (D == 64)
                        prefill_block(qi, kt, x, o, q_t, H * G * D, t0, tokens, G, 64, scale);
                    else if (D == 128)
                        prefill_block(qi, kt, x, o, q_t, H * G * D, t0, tokens, G, 128, scale);
                    else
                        prefill_block(qi, kt, x, o, q_t, H * G * D, t0, tokens, G, D, scale);
                }
    }
}

/* rms_norm: each row of x times 1 / sqrt(mean of its squares + eps), times the weight, summed in float32 and rounded
 * once to x's dtype; x and the weight each float32 or bf16 (constants here, once inlined). torch's rms_norm on the
 * CPU is a chain of seven small operations, 90-100 us a call for one row of 2048 on an Intel Xeon: 45 calls, 4 ms,
 * of each decoding step of the 1b shape there. Rows are shared among threads only where there are many.
 * With `add` (else NULL), x + add is written to `sum`, rounded to x's dtype as torch's sum would be, and normalised
 * instead of x: a residual sum and the norm after it, in one call. */
static inline __attribute__((always_inline)) void norm_rows(const void *x, const void *add, void *sum, const void *w,
                                                            void *y, int64_t R, int64_t D, float eps, int threads,
                                                            const int xbf16, const int wbf16) {
    const void *src = add ? sum : x;
#pragma omp parallel for schedule(static) num_threads(threads) if (R * D >= (1 << 16))
    for (int64_t r = 0; r < R; r++) {
        if (add)
            for (int64_t i = 0; i < D; i += W)
                store(sum, r * D + i, load(x, r * D + i, xbf16) + load(add, r * D + i, xbf16), xbf16);
        vf sq = {0};
        for (int64_t i = 0; i < D; i += W) {
            const vf v = load(src, r * D + i, xbf16);
            sq += v * v;
        }
        const vf scale = broadcast(1.0f / sqrtf(hsum(sq) / D + eps));
        for (int64_t i = 0; i < D; i += W)
            store(y, r * D + i, load(src, r * D + i, xbf16) * scale * load(w, i, wbf16), xbf16);
    }
}

void rms_norm(const void *x, const void *add, void *sum, const void *w, void *y, int64_t R, int64_t D, float eps,
              int threads, int xbf16, int wbf16) {
    if (xbf16 && wbf16)
        norm_rows(x, add, sum, w, y, R, D, eps, threads, 1, 1);
    else if (xbf16)
        norm_rows(x, add, sum, w, y, R, D, eps, threads, 1, 0);
    else if (wbf16)
        norm_rows(x, add, sum, w, y, R, D, eps, threads, 0, 1);
    else
        norm_rows(x, add, sum, w, y, R, D, eps, threads, 0, 0);
}

/* swiglu: silu(gate) * up, row by row, gate and up rows of H at a stride (the halves of one product's output, as
 * Transformer.pack_weights fuses w1 and w3), in float32, rounded once. silu(g) = g sigmoid(g), from exp(-|g|) <= 1:
 * sigmoid(|g|) = 1 / (1 + e) and sigmoid(-|g|) = e / (1 + e). torch's chunk, silu and product took about 120 us a
 * layer at batch 16 on an Intel Xeon. */
static inline __attribute__((always_inline)) void gate_rows(const void *gate, const void *up, void *y, int64_t R,
                                                            int64_t H, int64_t stride, int threads, const int bf16) {
#pragma omp parallel for schedule(static) num_threads(threads) if (R * H >= (1 << 16))
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < H; i += W) {
            const vf g = load(gate, r * stride + i, bf16);
            const vf e = vexp((vf)((vi)g | (vi)broadcast(-0.0f))); /* exp(-|g|) */
            store(y, r * H + i, g * choose(g < 0, e, broadcast(1.0f)) / (1 + e) * load(up, r * stride + i, bf16),
                  bf16);
        }
}

void swiglu(const void *gate, const void *up, void *y, int64_t R, int64_t H, int64_t stride, int threads, int bf16) {
    if (bf16)
        gate_rows(gate, up, y, R, H, stride, threads, 1);
    else
        gate_rows(gate, up, y, R, H, stride, threads, 0);
}

/* rope: rotate each head's interleaved pairs (x0, x1), ... by its token's rotations (cos, sin pairs, float32):
 * (x0 cos - x1 sin, x0 sin + x1 cos), in float32, rounded once. x: T tokens of `heads` heads of D, each token at
 * a stride, heads contiguous; y contiguous. torch's way (complex numbers in float32) took 7 operations, about 120
 * us a layer at batch 16 on an Intel Xeon. */
static inline __attribute__((always_inline)) void rotate_rows(const void *x, const float *rot, void *y, int64_t T,
                                                              int64_t heads, int64_t D, int64_t stride, int threads,
                                                              const int bf16) {
#pragma omp parallel for schedule(static) num_threads(threads) if (T * heads * D >= (1 << 16))
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < D; i += W) {
            vf r;
            memcpy(&r, rot + t * D + i, sizeof r);
            const vf c = __builtin_shuffle(r, (vi)EVENS), s = __builtin_shuffle(r, (vi)ODDS) * (vf)ALTERNATE;
            for (int64_t h = 0; h < heads; h++) {
                const vf v = load(x, t * stride + h * D + i, bf16);
                store(y, (t * heads + h) * D + i, v * c + SWAP(v, 1) * s, bf16);
            }
        }
}

void rope(const void *x, const float *rot, void *y, int64_t T, int64_t heads, int64_t D, int64_t stride,
          int threads, int bf16) {
    if (bf16)
        rotate_rows(x, rot, y, T, heads, D, stride, threads, 1);
    else
        rotate_rows(x, rot, y, T, heads, D, stride, threads, 0);
}

/* y[r, n0..n1) for R rows (a constant, once inlined), NB weight rows at a time: each weight element is loaded
 * and converted once for all R rows, and the R x NB sums stay in registers. Each step prefetches the same place
 * in the next NB rows: a row is a page or more (4 KB for K = 2048), which the hardware's prefetcher doesn't
 * enter until it is read, and prefetching one group ahead rather than 2 KB ahead in the same row read 2 to 16
 * rows' weights 1.15-1.9x faster (scripts/bench_kernels.py). */
static inline __attribute__((always_inline)) void rows_times(const float *x, const uint16_t *w, float *y, int64_t N,
                                                             int64_t K, int64_t n0, int64_t n1, const int R,
                                                             const int NB) {
    for (int64_t n = n0; n < n1; n += NB) {
        const uint16_t *ahead = w + (n + 2 * NB <= N ? n + NB : n) * K; /* the last group: itself */
        vf acc[7][4]; /* R x NB of them used: a constant size, for GCC to keep them in registers */
        memset(acc, 0, sizeof acc);
        for (int64_t k = 0; k < K; k += W) {
            vf wk[4];
            for (int j = 0; j < NB; j++) {
                vh h;
                __builtin_prefetch(ahead + j * K + k);
                memcpy(&h, w + (n + j) * K + k, sizeof h);
                wk[j] = widen(h);
            }
            for (int r = 0; r < R; r++) {
                vf xk;
                memcpy(&xk, x + r * K + k, sizeof xk);
                for (int j = 0; j < NB; j++)
                    acc[r][j] += xk * wk[j];
            }
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < NB; j++)
                y[r * N + n + j] = hsum(acc[r][j]);
    }
}

/* y[n0..n1) for one row: each weight row read in order as it lies in memory, in four chains of sums, prefetching
 * 2 KB ahead. rows_times's groups of four weight rows are four streams a page apart, which read the weight at 37
 * GB/s when the memory gave 48-53 (torch's matrix-vector product 43, this 47-48), under AVX2. (For two rows this
 * was faster than rows_times at that bandwidth but slower at 75-80 GB/s: 51 GB/s against 58.) */
static inline void rows_in_order(const float *x, const uint16_t *w, float *y, int64_t K, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *row = w + n * K;
        vf acc[4] = {0};
        int64_t k = 0;
        for (; k + 4 * W <= K; k += 4 * W) {
            __builtin_prefetch(row + k + 1024);
            for (int j = 0; j < 4; j++) {
                vh h;
                vf xk;
                memcpy(&h, row + k + j * W, sizeof h);
                memcpy(&xk, x + k + j * W, sizeof xk);
                acc[j] += xk * widen(h);
            }
        }
        for (; k < K; k += W) { /* K's last few vectors, fewer than four */
            vh h;
            vf xk;
            memcpy(&h, row + k, sizeof h);
            memcpy(&xk, x + k, sizeof xk);
            acc[0] += xk * widen(h);
        }
        y[n] = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
}

/* The weight rows [n0, n1) for R rows: as many at a time as keep R x NB sums and NB weights within AVX2's 16
 * registers (x is read from memory by the multiply-adds); one at a time for the last few. */
static inline __attribute__((always_inline)) void rows_span(const float *x, const uint16_t *w, float *y, int64_t N,
                                                            int64_t K, int64_t n0, int64_t n1, const int R) {
    const int NB = R <= 3 ? 4 : R <= 5 ? 3 : 2;
    const int64_t whole = n0 + (n1 - n0) / NB * NB;
    rows_times(x, w, y, N, K, n0, whole, R, NB);
    rows_times(x, w, y, N, K, whole, n1, R, 1);
}

/* y (R x N) = x (R x K, float32) times w (N x K, bf16) transposed, K a multiple of W. The threads take
 * contiguous spans of 64 weight rows. One row reads each span in order (rows_in_order); more use it in groups of
 * up to 7 rows in turn (the most whose sums stay in registers), the first group reading it from memory, the others
 * from the cache (where rows_times is faster for a last group of one, too). Groups of 7 and what is left were
 * faster than even groups (16 rows as 7, 7, 2 rather than 6, 5, 5, where 5 rows spill). */
void linear_bf16(const float *x, const uint16_t *w, float *y, int64_t R, int64_t N, int64_t K, int threads) {
    const int64_t span = 64;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += span) {
        const int64_t n1 = n0 + span < N ? n0 + span : N;
        if (R == 1)
            rows_in_order(x, w, y, K, n0, n1);
        else
            for (int64_t r0 = 0; r0 < R; r0 += 7) {
                const float *xr = x + r0 * K;
                float *yr = y + r0 * N;
                switch (R - r0) {
                case 1: rows_span(xr, w, yr, N, K, n0, n1, 1); break;
                case 2: rows_span(xr, w, yr, N, K, n0, n1, 2); break;
                case 3: rows_span(xr, w, yr, N, K, n0, n1, 3); break;
                case 4: rows_span(xr, w, yr, N, K, n0, n1, 4); break;
                case 5: rows_span(xr, w, yr, N, K, n0, n1, 5); break;
                case 6: rows_span(xr, w, yr, N, K, n0, n1, 6); break;
                default: rows_span(xr, w, yr, N, K, n0, n1, 7); break;
                }
            }
    }
}

/* linear_packed_f32: float32 rows times a bf16 weight packed by kernels.py's pack_f32, in float32, for CPUs
 * without native bf16 products. 2W output columns at a time, [N/2W][K][W] 32-bit lanes, lane i of step k holding
 * column i's weight in its low half and column W+i's in its high half: one load gives both halves' W columns as
 * float32 with a shift and a mask, no shuffle. Each step of a tile multiplies them by up to TILE_ROWS rows of x
 * broadcast one float at a time, into 2 x TILE_ROWS sums in registers: the outer product that float32 matrix
 * products are made of, on half the bytes. linear_bf16 (one weight row's dot product with each row) does the
 * same multiply-adds with a horizontal sum per output and fewer sums in registers: 16 rows ran there at 55-80
 * GFLOP/s, here at 100-115, on an Intel Xeon under AVX2; 128 rows faster than torch's float32 product of the
 * weight converted (the probe ran at 130), 1000 rows within 5 % of it.
 *
 * The first two tiles of a block of columns also prefetch the next block, half each: the first tile alone reads
 * the block from memory, at the pace of its multiply-adds, and the other tiles find it in the cache; spread
 * over two tiles the next block is read while the other tiles compute (16 rows 1.2-1.35x faster). Up to 3 rows
 * take two blocks at a time, two streams of the weight: one read 1 to 3 rows 5-15 % slower than linear_bf16,
 * which reads several weight rows at once; two, as fast. The rows go ROW_BLOCK at a time (their x, 768 KB at
 * K = 2048, stays in L2 for all the columns): 1000 rows as one block read x from L3 once per block of columns,
 * 20-30 % slower. */
#define ROW_BLOCK 96
#define UNROLL 8 /* steps a turn of a tile's loop, its prefetches issued once a turn. One step a turn, with a test
                  * and a branch for the prefetch at each, kept an AMD Zen 3 (AVX2 only) at 55-60 % of its
                  * multiply-add rate with everything in L1; like this 128 and 1000 rows ran 20-30 % faster there,
                  * 8 and 16 rows 5-30 %, 1 to 3 rows as fast (unrolled 4 times: less) */

/* The top half of every lane, loaded by each use: held in a register it is AVX2's 16th, and GCC spilled a sum
 * instead, whose store and reload at every step made 6 rows 30-40 % slower. */
static const uint32_t high_halves[16] = {0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
                                         0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
                                         0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
                                         0xffff0000u};

/* One step k of a tile of R rows: lo and hi are the sums of columns 0..W-1 and W..2W-1. */
static inline __attribute__((always_inline)) void widened_step(const float *x, const uint32_t *w, int64_t K,
                                                               int64_t k, vf *lo, vf *hi, const int R) {
    const uint32_t *high = high_halves;
    __asm__("" : "+r"(high)); /* hides the address, so that the mask is loaded here, not kept in a register */
    vu pairs, mask;
    memcpy(&pairs, w + k * W, sizeof pairs);
    memcpy(&mask, high, sizeof mask);
    const vf a = (vf)(pairs << 16), b = (vf)(pairs & mask);
    for (int r = 0; r < R; r++) {
        const vf xr = broadcast(x[r * K + k]);
        lo[r] += xr * a;
        hi[r] += xr * b;
    }
}

/* R rows times B adjacent blocks of 2W columns. ahead: where this tile prefetches, `step` bytes further each step
 * (UNROLL steps' lines at a time), or NULL. */
static inline __attribute__((always_inline)) void widened_tile(const float *x, const uint32_t *w, float *y,
                                                               int64_t N, int64_t K, const char *ahead,
                                                               int64_t step, const int R, const int B) {
    vf lo[2][TILE_ROWS], hi[2][TILE_ROWS]; /* B x R of them used */
    for (int b = 0; b < B; b++)
        for (int r = 0; r < R; r++)
            lo[b][r] = hi[b][r] = (vf){0};
    int64_t k = 0;
    for (; k + UNROLL <= K; k += UNROLL)
        for (int b = 0; b < B; b++) {
            if (ahead)
                for (int64_t o = 0; o < UNROLL * step; o += 64)
                    __builtin_prefetch(ahead + b * K * 4 * W + k * step + o);
#pragma GCC unroll 8 /* UNROLL, which the pragma can't take by name */
            for (int u = 0; u < UNROLL; u++)
                widened_step(x, w + b * K * W, K, k + u, lo[b], hi[b], R);
        }
    for (; k < K; k++)
        for (int b = 0; b < B; b++)
            widened_step(x, w + b * K * W, K, k, lo[b], hi[b], R);
    for (int b = 0; b < B; b++)
        for (int r = 0; r < R; r++) {
            memcpy(y + r * N + b * 2 * W, &lo[b][r], sizeof lo[b][r]);
            memcpy(y + r * N + b * 2 * W + W, &hi[b][r], sizeof hi[b][r]);
        }
}

/* widened_tile for R and B known at run time: each pair a constant, for the sums to stay in registers. */
static void widened_rows(const float *x, const uint32_t *w, float *y, int64_t N, int64_t K, const char *ahead,
                         int64_t step, int64_t R, int B) {
    switch (B == 2 ? -R : R) {
    case -1: widened_tile(x, w, y, N, K, ahead, step, 1, 2); break;
    case -2: widened_tile(x, w, y, N, K, ahead, step, 2, 2); break;
    case -3: widened_tile(x, w, y, N, K, ahead, step, 3, 2); break;
    case 1: widened_tile(x, w, y, N, K, ahead, step, 1, 1); break;
    case 2: widened_tile(x, w, y, N, K, ahead, step, 2, 1); break;
    case 3: widened_tile(x, w, y, N, K, ahead, step, 3, 1); break;
    case 4: widened_tile(x, w, y, N, K, ahead, step, 4, 1); break;
    case 5: widened_tile(x, w, y, N, K, ahead, step, 5, 1); break;
    default: widened_tile(x, w, y, N, K, ahead, step, TILE_ROWS, 1); break;
    }
}

void linear_packed_f32(const float *x, const uint32_t *p, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t blocks = N / (2 * W);
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t m1 = m0 + ROW_BLOCK < M ? m0 + ROW_BLOCK : M;
        const int B = m1 - m0 <= 3 ? 2 : 1; /* two blocks at a time for up to 3 rows (see above) */
        const int64_t tiles = (m1 - m0 + TILE_ROWS - 1) / TILE_ROWS, streaming = tiles < 2 ? tiles : 2;
        const int64_t step = 4 * W / streaming; /* bytes of each next block per step of a streaming tile */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t nb = 0; nb < blocks; nb += B) {
            const int b = nb + B <= blocks ? B : 1;
            const uint32_t *w = p + nb * K * W;
            for (int64_t t = 0; t < tiles; t++) {
                const int64_t r0 = m0 + t * TILE_ROWS;
                const char *ahead = t < streaming && nb + b < blocks ? (const char *)(w + b * K * W) + t * K * step : NULL;
                widened_rows(x + r0 * K, w, y + r0 * N + nb * 2 * W, N, K, ahead, step, m1 - r0, b);
            }
        }
    }
}

int packed_f32_columns(void) { return 2 * W; }

/* linear_packed_bf16: bf16 rows times a bf16 weight packed by pack order (kernels.py's pack_bf16): 16 output
 * columns at a time, each K pair of theirs adjacent, [N/16][K/2][16][2], so that one 64-byte load holds a pair of
 * K for 16 columns and AVX-512 BF16's dot-product instruction (vdpbf16ps) adds both into 16 float32 sums with no
 * shuffle. Each step of a tile loads CB such vectors and uses each for RT rows: 8 rows x 3 column blocks is 24
 * sums in registers. Where a tile is at most 256 KB, the first pass of 8 rows prefetches the next tile's weights
 * at the same place as it reads (as linear_bf16 does), or with more than 8 rows the first two passes a half each,
 * so that the next tile streams in while both compute (as linear_packed_f32's tiles do, where that made 16 rows
 * 1.2-1.35x faster; here neutral on an Intel Xeon, whose AVX-512 BF16 products of 16 rows are compute-bound, and
 * not yet measured where they are not). A larger tile (K over about 2700) would be evicted from L2 before it is
 * read, so there each block is prefetched 2 KB ahead of itself (which alone was 5-10 % slower for 16 rows at
 * K = 2048, and the next tile's place 15-40 % slower for 4-16 rows at K = 5632 and 11008). Further rows find the
 * tile in the cache. One row reads each block in order (packed_row). Against oneDNN's packed layout,
 * products of 16 rows and a 5632 x 2048 weight streamed 10-25 % faster here (scripts/bench_kernels.py), and 1 to
 * 512 rows were about as fast or faster. */
#if defined(__AVX512BF16__)
#define CB 3

static inline __attribute__((always_inline)) void packed_tile(const uint16_t *x, const uint16_t *p, uint16_t *y,
                                                              int64_t N, int64_t K, int64_t nb0, int cb, int64_t r0,
                                                              const uint16_t *ahead, int shift, const int RT) {
    const int64_t block = K / 2 * 32; /* elements per 16 columns */
    const uint16_t *w = p + nb0 * block;
    __m512 acc[8][CB];
    for (int r = 0; r < RT; r++)
        for (int c = 0; c < CB; c++)
            acc[r][c] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < K / 2; kp++) {
        __m512bh wv[CB];
        for (int c = 0; c < CB; c++) { /* to CB, not cb: loops of a constant length keep wv and acc in registers */
            wv[c] = c < cb ? (__m512bh)_mm512_loadu_si512(w + c * block + kp * 32) : (__m512bh)_mm512_setzero_si512();
            if (c < cb) /* this pass's share of the next tile, or 2 KB ahead in this block (see linear_packed_bf16) */
                _mm_prefetch((const char *)(ahead ? ahead + c * block + (kp >> shift) * 32
                                                  : w + c * block + (kp + 32) * 32), _MM_HINT_T0);
        }
        for (int r = 0; r < RT; r++) {
            int32_t pair;
            memcpy(&pair, x + (r0 + r) * K + 2 * kp, sizeof pair);
            const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
            for (int c = 0; c < CB; c++)
                if (c < cb)
                    acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[c], xr);
        }
    }
    for (int r = 0; r < RT; r++)
        for (int c = 0; c < CB; c++)
            if (c < cb)
                _mm256_storeu_si256((__m256i *)(y + (r0 + r) * N + (nb0 + c) * 16),
                                    (__m256i)_mm512_cvtneps_pbh(acc[r][c]));
}

/* One row: each block of 16 columns read in order, in four chains of sums, prefetching 2 KB ahead (as
 * rows_in_order: a tile's three blocks are three streams, slower for one row). */
static inline void packed_row(const uint16_t *x, const uint16_t *p, uint16_t *y, int64_t K, int64_t nb) {
    const uint16_t *w = p + nb * (K / 2 * 32);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t kp = 0;
    for (; kp + 4 <= K / 2; kp += 4) {
        _mm_prefetch((const char *)(w + kp * 32 + 1024), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + kp * 32 + 1056), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + kp * 32 + 1088), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + kp * 32 + 1120), _MM_HINT_T0);
        for (int j = 0; j < 4; j++) {
            int32_t pair;
            memcpy(&pair, x + 2 * (kp + j), sizeof pair);
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(w + (kp + j) * 32),
                                      (__m512bh)_mm512_set1_epi32(pair));
        }
    }
    for (; kp < K / 2; kp++) {
        int32_t pair;
        memcpy(&pair, x + 2 * kp, sizeof pair);
        acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(w + kp * 32), (__m512bh)_mm512_set1_epi32(pair));
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm256_storeu_si256((__m256i *)(y + nb * 16), (__m256i)_mm512_cvtneps_pbh(sum));
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* AMX: where the CPU has tile registers (Intel's since Sapphire Rapids), one instruction multiplies 16 rows by 32 K
 * by 16 columns, many times what vdpbf16ps does: there vdpbf16ps made products of 16 rows compute-bound at 120-150
 * GFLOP/s and a 128-token prompt 17 % of the matmul ceiling. A B tile is 16 K pairs of one 16-column block, 1 KB
 * that lies contiguous in pack order, so the weights packed for linear_packed_bf16 serve both. x is copied into
 * tile order ([M/16][K/32][16][32], the last rows zero), so that an A tile is 1 KB contiguous too. Each unit of
 * work is 2 x 2 tiles (32 rows x 32 columns; 4 sum tiles, 2 A and 2 B). A column pair's sums are kept in a float32
 * buffer and taken up again for each 256 K (KCHUNK tile steps), so that its B slice stays in L1 across the rows
 * of a block of MBLOCK rows, whose A (256 KB at K = 2048) stays in L2: without those blocks a 1000-row product
 * reloaded A and B from L2 for every tile product, 2.5x slower than oneDNN's; with them, as fast. Where the unit
 * is the first in its row block the weight is prefetched 2 KB ahead: 16 rows streamed 15-25 % faster. */
#include <sys/syscall.h>
#include <unistd.h>
#define MBLOCK 256
#define KCHUNK 8

/* Linux hands a process the AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); until
 * then tile instructions fault. */
static int amx_permitted(void) {
    static int permitted = -1;
    if (permitted < 0)
        permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return permitted;
}

/* Rows r0.. (RG groups of 16) x column blocks nb.. (CG of them) over tile steps kc0..kc1 (32 K each), their sums in acc
 * (32 floats a row: this column pair's), started from zero at the first step. */
static inline __attribute__((always_inline)) void amx_unit(const uint16_t *xt, const uint16_t *p, float *acc,
                                                           int64_t K, int64_t r0, int64_t nb, int64_t kc0,
                                                           int64_t kc1, int prefetch, const int RG, const int CG) {
    const int64_t block = K / 2 * 32;
    const uint16_t *a0 = xt + r0 * K, *a1 = a0 + 16 * K, *b0 = p + nb * block, *b1 = b0 + block;
    float *c0 = acc + r0 * 32, *c2 = c0 + 16 * 32;
    if (kc0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        _tile_loadd(0, c0, 128);
        if (CG == 2) _tile_loadd(1, c0 + 16, 128);
        if (RG == 2) _tile_loadd(2, c2, 128);
        if (RG == 2 && CG == 2) _tile_loadd(3, c2 + 16, 128);
    }
    for (int64_t kc = kc0; kc < kc1; kc++) {
        for (int line = 0; prefetch && line < 16; line++) {
            _mm_prefetch((const char *)(b0 + kc * 512 + 1024 + line * 32), _MM_HINT_T0);
            if (CG == 2) _mm_prefetch((const char *)(b1 + kc * 512 + 1024 + line * 32), _MM_HINT_T0);
        }
        _tile_loadd(4, a0 + kc * 512, 64);
        if (RG == 2) _tile_loadd(5, a1 + kc * 512, 64);
        _tile_loadd(6, b0 + kc * 512, 64);
        if (CG == 2) _tile_loadd(7, b1 + kc * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (CG == 2) _tile_dpbf16ps(1, 4, 7);
        if (RG == 2) _tile_dpbf16ps(2, 5, 6);
        if (RG == 2 && CG == 2) _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c0, 128);
    if (CG == 2) _tile_stored(1, c0 + 16, 128);
    if (RG == 2) _tile_stored(2, c2, 128);
    if (RG == 2 && CG == 2) _tile_stored(3, c2 + 16, 128);
}

/* One column pair (nb, and nb + 1 where there is one) for rows m0..m1 of the padded M, into y's first M rows. */
static void amx_columns(const uint16_t *xt, const uint16_t *p, uint16_t *y, float *acc, int64_t M, int64_t N,
                        int64_t K, int64_t m0, int64_t m1, int64_t nb, int two_cols) {
    const int64_t steps = K / 32, chunk = m1 - m0 <= 32 ? steps : KCHUNK; /* one row pair: nothing to keep in L1 */
    float *a = acc - m0 * 32;
    for (int64_t k0 = 0; k0 < steps; k0 += chunk) {
        const int64_t k1 = k0 + chunk < steps ? k0 + chunk : steps;
        for (int64_t r0 = m0; r0 < m1; r0 += 32) {
            const int two_rows = r0 + 16 < m1, prefetch = r0 == m0;
            if (two_rows && two_cols) amx_unit(xt, p, a, K, r0, nb, k0, k1, prefetch, 2, 2);
            else if (two_rows) amx_unit(xt, p, a, K, r0, nb, k0, k1, prefetch, 2, 1);
            else if (two_cols) amx_unit(xt, p, a, K, r0, nb, k0, k1, prefetch, 1, 2);
            else amx_unit(xt, p, a, K, r0, nb, k0, k1, prefetch, 1, 1);
        }
    }
    for (int64_t r = m0; r < m1 && r < M; r++)
        for (int c = 0; c <= two_cols; c++)
            _mm256_storeu_si256((__m256i *)(y + r * N + (nb + c) * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(a + r * 32 + c * 16)));
}

/* Returns 0, having done nothing, where it can't allocate x's copy. */
static int linear_packed_amx(const uint16_t *x, const uint16_t *p, uint16_t *y, int64_t M, int64_t N, int64_t K,
                             int threads) {
    const int64_t Mp = (M + 15) / 16 * 16, blocks = N / 16, mblock = Mp < MBLOCK ? Mp : MBLOCK;
    uint16_t *xt = aligned_alloc(64, Mp * K * 2);
    if (!xt)
        return 0;
    for (int64_t g = 0; g < Mp / 16; g++)
        for (int64_t kc = 0; kc < K / 32; kc++)
            for (int r = 0; r < 16; r++) {
                uint16_t *to = xt + g * 16 * K + kc * 512 + r * 32;
                if (g * 16 + r < M)
                    memcpy(to, x + (g * 16 + r) * K + kc * 32, 64);
                else
                    memset(to, 0, 64);
            }
#pragma omp parallel num_threads(threads)
    {
        const struct { uint8_t palette, start_row, reserved[14]; uint16_t bytes[16]; uint8_t rows[16]; } config = {
            .palette = 1, .bytes = {64, 64, 64, 64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 16, 16}};
        _tile_loadconfig(&config); /* each thread's own; every tile 16 rows of 64 bytes */
        float acc[MBLOCK * 32] __attribute__((aligned(64)));
        for (int64_t m0 = 0; m0 < Mp; m0 += mblock) {
            const int64_t m1 = m0 + mblock < Mp ? m0 + mblock : Mp;
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < blocks; nb += 2)
                amx_columns(xt, p, y, acc, M, N, K, m0, m1, nb, nb + 1 < blocks);
        }
        _tile_release();
    }
    free(xt);
    return 1;
}
#endif

void linear_packed_bf16(const uint16_t *x, const uint16_t *p, uint16_t *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    const int64_t blocks = N / 16, tiles = (blocks + CB - 1) / CB, block = K / 2 * 32;
    const int spread = M > 8 ? 2 : 1; /* passes of 8 rows that share the next tile's prefetch */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (K % 32 == 0 && amx_permitted() && linear_packed_amx(x, p, y, M, N, K, threads))
        return;
#endif
    if (M == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t nb = 0; nb < blocks; nb++)
            packed_row(x, p, y, K, nb);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t nb0 = t * CB;
        const int cb = blocks - nb0 < CB ? (int)(blocks - nb0) : CB;
        const int near = CB * block * 2 <= (256 << 10); /* a tile of at most 256 KB: the next is prefetched */
        const uint16_t *ahead = near && nb0 + 2 * CB <= blocks ? p + (nb0 + CB) * block : NULL;
        for (int64_t r0 = 0; r0 < M; r0 += 8) {
            const int64_t pass = r0 / 8; /* the first `spread` passes prefetch a share of the next tile each */
            const uint16_t *a = ahead && pass < spread ? ahead + pass * (K / 2 / spread) * 32 : NULL;
            const int sh = spread - 1;
            switch (M - r0 < 8 ? M - r0 : 8) { /* the rows as a constant, for the sums to stay in registers */
            case 1: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 1); break;
            case 2: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 2); break;
            case 3: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 3); break;
            case 4: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 4); break;
            case 5: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 5); break;
            case 6: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 6); break;
            case 7: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 7); break;
            default: packed_tile(x, p, y, N, K, nb0, cb, r0, a, sh, 8); break;
            }
        }
    }
}
#endif

/* Whether linear_packed_bf16 uses AMX (where K is a multiple of 32). */
int uses_amx(void) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    return amx_permitted();
#else
    return 0;
#endif
}

int has_linear_packed_bf16(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}
