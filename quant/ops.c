/* The decode step's small operations as one call each (qvl.quant.decode_ops): RMSNorm with the
 * residual add before it, SiLU(gate) x up, and attention for one new token per row with its
 * rotary, its KV-cache write and the read of every cached key.
 *
 * Why this file exists: a one-token decode step of a 2B model spends ~1 ms a layer outside its
 * matrix products, in ~35 torch operator calls on vectors of 1536-8960 values, each paying
 * dispatch and a pass over memory (bench/results/step.md). llama.cpp's ggml does these in C inside
 * its graph; torch would need torch.compile (a C++ toolchain and minutes of compilation at every
 * load) to fuse them. Here each is one C loop over the data, called through ctypes.
 *
 * Rounding: every function reproduces the rounding points of the torch code it replaces
 * (qvl.model.decoder), so only the order of fp32 sums and the exp approximation differ:
 *   rms_norm:  s = dt(x + r); y = dt(w * dt(s * rsqrt(mean(s^2) + eps)))
 *   silu_mul:  y = dt(dt(g / (1 + exp(-g))) * u)
 *   rotary:    y = dt(dt(x * cos) + dt(swap_halves(x) * sin_signed))
 * where dt() rounds to the activation dtype (bf16: nearest even; fp32: nothing). Attention keeps
 * its scores, softmax and weighted sum in fp32 and rounds the output once; torch's SDPA rounds
 * the probabilities to bf16 before multiplying by V, so the two agree to bf16 rounding, not bits.
 * An int8 cache row (one fp16 scale per head and position, qvl.model.kv_cache) is written with
 * quantize_rows' rounding and read as dt(q * s), as dequantize_rows reads it.
 *
 * Plain C written for the compiler's vectoriser (no reduction relies on -ffast-math: dot products
 * run in 16 independent lanes folded in halves, one AVX-512 register where there is one), so the
 * same file serves the AVX-512 and AVX2 builds of qgemv.c's library, with the same bits.
 */
#pragma GCC optimize("fp-contract=off") /* a*b + c*d must round as the torch ops do, not as one FMA */
#if defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512") /* -march=native on Intel picks 256-bit vectors by default */
#endif

#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define ROUND_MAGIC 12582912.f /* 1.5 * 2^23: adding and subtracting it rounds to an integer, nearest even */

static inline float bf(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf(float f) { /* nearest even, NaN kept quiet: torch's rounding; branch-free */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40 : r);
}

/* Whole vectors between the activation dtype (bf16 or fp32) and fp32 work buffers: each pass is
 * one loop the compiler vectorises, which per-element type checks would prevent. */
static void to_f32(const void *p, int is_bf16, size_t off, int n, float *restrict dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)p + off;
        for (int i = 0; i < n; i++) dst[i] = bf(src[i]);
    } else {
        memcpy(dst, (const float *)p + off, sizeof(float) * (size_t)n);
    }
}

static void from_f32(void *p, int is_bf16, size_t off, int n, const float *restrict src) {
    if (is_bf16) {
        uint16_t *dst = (uint16_t *)p + off;
        for (int i = 0; i < n; i++) dst[i] = to_bf(src[i]);
    } else {
        memcpy((float *)p + off, src, sizeof(float) * (size_t)n);
    }
}

/* v rounded to the activation dtype in place (nothing for fp32) */
static void round_dt(float *v, int n, int is_bf16) {
    if (is_bf16)
        for (int i = 0; i < n; i++) v[i] = bf(to_bf(v[i]));
}

/* A work buffer of n floats, one per (thread, slot), kept between calls and grown when needed:
 * a malloc + free of tens of KB a call returns the pages to the kernel and faults them in again
 * the next time, which costs more than the operation. NULL when memory runs out. */
#define SCRATCH_SLOTS 3
static float *scratch(int slot, size_t n) {
    static _Thread_local float *buf[SCRATCH_SLOTS];
    static _Thread_local size_t cap[SCRATCH_SLOTS];
    if (n > cap[slot]) {
        float *grown = (float *)realloc(buf[slot], sizeof(float) * n);
        if (!grown) return NULL;
        buf[slot] = grown;
        cap[slot] = n;
    }
    return buf[slot];
}

/* exp(x) for the softmax and SiLU: Cody-Waite reduction to |r| <= ln2/2 and a degree-6
 * polynomial, within 2 ulp of expf over [-87, 88] (below: e^-87; above 88.72: inf); branch-free
 * so loops over it vectorise */
static inline float qexp(float x) {
    float big = x > 88.72f ? INFINITY : 1.f; /* past expf's range: inf, as expf gives */
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    float n = (x * 1.44269504088896341f + ROUND_MAGIC) - ROUND_MAGIC;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s * big;
}

/* sum of a[i] * b[i], i < n: LANES independent fp32 sums (the compiler's vectors) folded in halves
 * (a tree, not a 16-add chain), then the tail */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
#if defined(__AVX512F__)
    /* the same sums in one register: _mm512_reduce_add_ps folds in halves, as the loop below does */
    __m512 acc = _mm512_setzero_ps();
    for (; i + LANES <= n; i += LANES)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
    float s = _mm512_reduce_add_ps(acc);
#else
    float lanes[LANES] = {0};
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] += a[i + l] * b[i + l];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
    float s = lanes[0];
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y [M, D] = RMSNorm(s) * w with s = x + r where r is given (written to s_out), else s = x.
 * x, r, s_out, y in the activation dtype; w in it too (the model's parameter). */
int qvl_rms_norm(const void *x, const void *r, void *s_out, const void *w, int is_bf16, int M, int D,
                 float eps, void *y) {
    if (M <= 0 || D <= 0) return -1;
    float *buf = scratch(0, (size_t)D * 3);
    if (!buf) return -2;
    float *s = buf, *t = buf + D, *wf = buf + 2 * (size_t)D;
    to_f32(w, is_bf16, 0, D, wf);
    for (int m = 0; m < M; m++) {
        size_t o = (size_t)m * D;
        to_f32(x, is_bf16, o, D, s);
        if (r) {
            to_f32(r, is_bf16, o, D, t);
            for (int d = 0; d < D; d++) s[d] += t[d];
            round_dt(s, D, is_bf16);
            from_f32(s_out, is_bf16, o, D, s);
        }
        float inv = 1.f / sqrtf(dot(s, s, D) / (float)D + eps);
        for (int d = 0; d < D; d++) t[d] = s[d] * inv;
        round_dt(t, D, is_bf16);
        for (int d = 0; d < D; d++) t[d] *= wf[d];
        from_f32(y, is_bf16, o, D, t);
    }
    return 0;
}

/* y [M, I] = SiLU(g) * u; row m of g and of u start at m * stride elements */
int qvl_silu_mul(const void *g, const void *u, long stride, int is_bf16, int M, int I, void *y, int threads) {
    if (M <= 0 || I <= 0) return -1;
    int fail = 0;
    /* rows to threads: a batched step's rows are independent, each computed as alone */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M > 1)
    for (int m = 0; m < M; m++) {
        float *buf = scratch(0, (size_t)I * 2);
        if (!buf) {
#pragma omp atomic write
            fail = 1;
            continue;
        }
        float *gf = buf, *uf = buf + I;
        size_t o = (size_t)m * stride;
        to_f32(g, is_bf16, o, I, gf);
        to_f32(u, is_bf16, o, I, uf);
        for (int i = 0; i < I; i++) gf[i] = gf[i] / (1.f + qexp(-gf[i]));
        round_dt(gf, I, is_bf16);
        for (int i = 0; i < I; i++) gf[i] *= uf[i];
        from_f32(y, is_bf16, (size_t)m * I, I, gf);
    }
    return fail ? -2 : 0;
}

/* fp16 bits -> float, and float -> fp16 bits (nearest even), without F16C so the AVX2 build runs */
static inline float half_f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f; /* 2^-24 */
        return sign ? -f : f;
    }
    u = sign | ((e == 31 ? 255 : e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f_half(float f) { /* f finite, positive, within [2^-24, 65504] */
    uint32_t u;
    memcpy(&u, &f, 4);
    int e = (int)((u >> 23) & 0xff) - 127;
    if (e < -14) { /* subnormal half: units of 2^-24, nearest even */
        float q = nearbyintf(f * 16777216.f);
        return (uint16_t)q;
    }
    uint32_t m = u & 0x7fffff, keep = m >> 13, rest = m & 0x1fff;
    uint32_t h = ((uint32_t)(e + 15) << 10) | keep;
    if (rest > 0x1000 || (rest == 0x1000 && (keep & 1))) h++; /* may carry into the exponent: right */
    return (uint16_t)h;
}

/* One row of D values into an int8 cache row: quantize_rows' symmetric rounding against the
 * fp16 scale that is stored (scale = clamp(max|x| / 127, 2^-24, 65504)) */
static void put_q8(const float *x, int D, int8_t *q, uint16_t *scale) {
    float amax = 0.f;
    for (int d = 0; d < D; d++) amax = fmaxf(amax, fabsf(x[d]));
    float s = amax / 127.f;
    s = s < 5.9604644775390625e-8f ? 5.9604644775390625e-8f : (s > 65504.f ? 65504.f : s);
    uint16_t h = f_half(s);
    float sf = half_f(h);
    for (int d = 0; d < D; d++) {
        float v = (x[d] / sf + ROUND_MAGIC) - ROUND_MAGIC; /* |x / sf| <= 127.5: exact */
        q[d] = (int8_t)(v > 127.f ? 127.f : (v < -127.f ? -127.f : v));
    }
    *scale = h;
}

/* Cache row ``at`` (of Dh values) in fp32: a float cache's values, or an int8 one's codes read as
 * dequantize_rows reads them, dt(code * scale) */
static void read_row(const void *cache, const uint16_t *scales, size_t at, int Dh, int is_bf16, float *row) {
    if (!scales) {
        to_f32(cache, is_bf16, at * Dh, Dh, row);
        return;
    }
    float s = half_f(scales[at]);
    const int8_t *codes = (const int8_t *)cache + at * Dh;
    for (int d = 0; d < Dh; d++) row[d] = (float)codes[d] * s;
    round_dt(row, Dh, is_bf16);
}

/* One decode token per row b of B: rotary on its q and k heads, k and v written into cache row
 * row0 + b at write_pos[b], then attention of each q head over the keys j < L of that row where
 * mask[b, j], grouped heads sharing their kv head. q/k/v row b starts at b * stride elements
 * (the fused q/k/v output, or three tensors). cos/sin_signed [B, Dh] as qvl.model.rope builds
 * them. Caches [slots, Hkv, S, Dh]: the activation dtype, or int8 codes with fp16 scales
 * [slots, Hkv, S] (k_scale/v_scale non-NULL). out [B, H * Dh] in the activation dtype. */
int qvl_decode_attention(const void *q, const void *k, const void *v, long stride, int is_bf16, int B, int H,
                         int Hkv, int Dh, const void *cos, const void *sin, void *k_cache, void *v_cache,
                         uint16_t *k_scale, uint16_t *v_scale, int S, int row0, const int64_t *write_pos,
                         const uint8_t *mask, int L, float scale, void *out, int threads) {
    if (B <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || Dh % 2 || L <= 0 || L > S) return -1;
    for (int b = 0; b < B; b++)
        if (write_pos[b] < 0 || write_pos[b] >= S) return -2;
    const int half = Dh / 2, group = H / Hkv, q8 = k_scale != NULL;
    /* the step's roped queries [B, H, Dh], in fp32 (their values are the dtype's) */
    float *qr = scratch(1, (size_t)B * H * Dh), *tmp = scratch(0, (size_t)Dh * 6);
    if (!qr || !tmp) return -3;
    float *xf = tmp, *cf = tmp + Dh, *sf = tmp + 2 * Dh, *a = tmp + 3 * Dh, *c = tmp + 4 * Dh, *vf = tmp + 5 * Dh;
    for (int b = 0; b < B; b++) {
        size_t o = (size_t)b * stride;
        to_f32(cos, is_bf16, (size_t)b * Dh, Dh, cf);
        to_f32(sin, is_bf16, (size_t)b * Dh, Dh, sf);
        for (int h = 0; h < H + Hkv; h++) { /* H query heads, then Hkv key heads */
            float *dst = h < H ? qr + ((size_t)b * H + h) * Dh : xf;
            to_f32(h < H ? q : k, is_bf16, o + (size_t)(h < H ? h : h - H) * Dh, Dh, dst);
            for (int d = 0; d < half; d++) { /* swap_halves(x) * sin_signed */
                c[d] = dst[d + half] * sf[d];
                c[d + half] = dst[d] * sf[d + half];
            }
            for (int d = 0; d < Dh; d++) a[d] = dst[d] * cf[d];
            round_dt(a, Dh, is_bf16);
            round_dt(c, Dh, is_bf16);
            for (int d = 0; d < Dh; d++) dst[d] = a[d] + c[d];
            round_dt(dst, Dh, is_bf16);
            if (h < H) continue;
            int hk = h - H;
            size_t at = ((size_t)(row0 + b) * Hkv + hk) * S + (size_t)write_pos[b];
            to_f32(v, is_bf16, o + (size_t)hk * Dh, Dh, vf);
            if (q8) {
                put_q8(xf, Dh, (int8_t *)k_cache + at * Dh, k_scale + at);
                put_q8(vf, Dh, (int8_t *)v_cache + at * Dh, v_scale + at);
            } else {
                from_f32(k_cache, is_bf16, at * Dh, Dh, xf);
                from_f32(v_cache, is_bf16, at * Dh, Dh, vf);
            }
        }
    }
    int fail = 0;
    /* one (row, kv head) a task: its group of query heads reads each key and value row once;
     * threads only where the reads outweigh waking them (long contexts, several rows) */
    const int tasks = B * Hkv;
    const long work = (long)B * H * L * Dh;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tasks > 1 && work > (1L << 19))
    for (int t = 0; t < tasks; t++) {
        int b = t / Hkv, hk = t % Hkv;
        size_t base = ((size_t)(row0 + b) * Hkv + hk) * S;
        const uint8_t *mrow = mask + (size_t)b * L;
        float *p = scratch(2, (size_t)group * L + (size_t)group * Dh + Dh);
        if (!p) {
#pragma omp atomic write
            fail = 1;
            continue;
        }
        float *acc = p + (size_t)group * L, *row = acc + (size_t)group * Dh;
        for (int j = 0; j < L; j++) {
            if (!mrow[j]) continue;
            size_t at = base + (size_t)j;
            read_row(k_cache, k_scale, at, Dh, is_bf16, row);
            for (int g = 0; g < group; g++)
                p[(size_t)g * L + j] = dot(qr + ((size_t)b * H + (size_t)hk * group + g) * Dh, row, Dh) * scale;
        }
        for (int g = 0; g < group; g++) {
            float *pg = p + (size_t)g * L, mx = -INFINITY, sum = 0.f;
            for (int j = 0; j < L; j++)
                if (mrow[j] && pg[j] > mx) mx = pg[j];
            for (int j = 0; j < L; j++) pg[j] = mrow[j] ? pg[j] - mx : -INFINITY;
            for (int j = 0; j < L; j++) pg[j] = mrow[j] ? qexp(pg[j]) : 0.f;
            for (int j = 0; j < L; j++) sum += pg[j];
            float inv = sum > 0.f ? 1.f / sum : 0.f; /* no key at all: zeros, not NaN */
            for (int j = 0; j < L; j++) pg[j] *= inv;
        }
        memset(acc, 0, sizeof(float) * (size_t)group * Dh);
        for (int j = 0; j < L; j++) {
            if (!mrow[j]) continue;
            size_t at = base + (size_t)j;
            read_row(v_cache, v_scale, at, Dh, is_bf16, row);
            for (int g = 0; g < group; g++) {
                float pj = p[(size_t)g * L + j], *ag = acc + (size_t)g * Dh;
                for (int d = 0; d < Dh; d++) ag[d] += pj * row[d];
            }
        }
        for (int g = 0; g < group; g++)
            from_f32(out, is_bf16, ((size_t)b * H + (size_t)hk * group + g) * Dh, Dh, acc + (size_t)g * Dh);
    }
    return fail ? -3 : 0;
}
