/* Weight-only quantized matrix-vector products for x86-64 CPUs with AVX-512 or AVX2 + FMA
 * (qvl.quant.cpu).
 *
 * Why this file exists: torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) takes only bf16
 * activations (fp32 and fp16 run far slower), reads 8-bit weights only as two 4-bit passes and is
 * slow at prefill; batch-1 decode is bandwidth-bound, so streaming the packed bytes once at full
 * speed is the whole job. No maintained library offers a torch-callable int4/int8 GEMV with
 * AutoGPTQ/AutoAWQ group semantics for CPUs, so this one is small and written for that job only.
 *
 * Semantics, per output row n and group g of `group` input columns:
 *     y[m, n] = sum_g s[n, g] * (sum_{k in g} q[n, k] * x[m, k]  -  z[n, g] * sum_{k in g} x[m, k])
 * i.e. W = s * (q - z), the formats' own dequantization, with q and z integers, s an fp16 value.
 * With bf16 x the products q * x are exact in fp32 (8 x 8 significant bits); with fp32 x they
 * round once, as a dense fp32 product does. Sums accumulate in fp32.
 *
 * Layouts (built once at load by qvl.quant.cpu.pack / params):
 *   Rows go in blocks of ROWS = 4 (eight independent FMA chains), and the weight bytes of a
 *   block are interleaved in 32-byte chunks, [N/4, K-blocks, 4, 32], so each thread reads one
 *   sequential stream (DRAM, where decode reads from, serves one stream faster than four).
 *   int4 chunk: 64 columns; byte j holds column j (low nibble) and column j + 32 (high), so
 *   one load widens into two vectors of 32 codes.  int8 chunk: 32 columns, one byte each.
 *   scales: fp16 bits [N/4, G, 4]; zeros: uint8 [N/4, G, 4].
 *
 * Two code paths, picked by the compiler's target macros, with the same entry points, layouts
 * and arithmetic (only the order of the fp32 sums differs): AVX-512 (F, BW, F16C; qvl.quant.cpu
 * builds it with -march=native, and uses vdpbf16ps where AVX512_BF16 is there) and AVX2 + FMA
 * (built with -mavx2 -mfma only, for CPUs without AVX-512: Intel N100/N305, AMD before Zen 4;
 * bf16 activations are widened to fp32 first, and fp16 scales are decoded in software since
 * -mavx2 does not imply F16C).
 * qvl_isa() says which path is in: 512, 256 or 0 (none: every entry point returns -1).
 * The 8-bit-activation kernel (qvl_a8_*, at the end of this file) has its own layout and uses
 * vpdpbusd where AVX512-VNNI or AVX-VNNI is compiled in, vpmaddubsw otherwise.
 *
 * Several rows of x (batched decode): one row's work is bound by the arithmetic, not by reading
 * the weights, so the AVX-512 path takes up to MT_MAX rows per pass over a block, widening each
 * code vector to fp32 once for all of them (q4_tile, q8_tile); a row's result there is the same
 * whichever rows share its pass. One row keeps the row kernels (vdpbf16ps for bf16 x, the
 * fastest single stream), so a row can differ from its batched result in the last fp32 bits.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define QVL_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define QVL_AVX2 1
#endif
#if defined(QVL_AVX512) || defined(QVL_AVX2)
#define QVL_SIMD 1
#include <immintrin.h>
#endif

#define ROWS 4
#define CHUNK 32      /* bytes per row per k-block */
#define PREFETCH 4096 /* bytes ahead of the stream: DRAM latency on a VM is long */

int qvl_isa(void) {
#if defined(QVL_AVX512)
    return 512;
#elif defined(QVL_AVX2)
    return 256;
#else
    return 0;
#endif
}

#ifdef QVL_SIMD

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* x [M, K] (fp32 or bf16) -> fp32 copy, and per-group sums [M, G] */
static float *prepare_x(const void *x, int x_bf16, int M, int K, int group, float **xsum_out) {
    int G = K / group;
    float *xs = (float *)aligned_alloc(64, sizeof(float) * ((size_t)M * K + 16));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)M * G);
    if (!xs || !xsum) {
        free(xs);
        free(xsum);
        return NULL;
    }
    for (size_t i = 0; i < (size_t)M * K; i++)
        xs[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (int k = 0; k < group; k++) s += xs[(size_t)m * K + (size_t)g * group + k];
            xsum[(size_t)m * G + g] = s;
        }
    *xsum_out = xsum;
    return xs;
}

static inline void store(void *y, int y_bf16, size_t i, float v) {
    if (y_bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

static inline void prefetch_block(const uint8_t *blk) {
    _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
    _mm_prefetch((const char *)blk + PREFETCH + 64, _MM_HINT_T0);
}

#endif /* QVL_SIMD */

/* The vector type and the few operations the shared row code needs, per path. */
#if defined(QVL_AVX512)

typedef __m512 vf;
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm512_set1_ps(a); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float half_to_f32(uint16_t h) { return _cvtsh_ss(h); }

#elif defined(QVL_AVX2)

typedef __m256 vf;
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm256_set1_ps(a); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vf_sum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* IEEE fp16 bits -> fp32, exactly (subnormals, inf and NaN included): one per group and row, so
 * software costs nothing measurable and keeps the build to -mavx2 -mfma. */
static inline float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0x1fu) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e) {
        u = sign | ((e + 112u) << 23) | (m << 13);
    } else {  /* zero or subnormal: m * 2**-24, exact in fp32 */
        float f = (float)m * 0x1p-24f;
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif

#ifdef QVL_SIMD

/* What the row kernels share: per row, the scaled group sums and the zero term. */
typedef struct {
    vf tot[ROWS];
    float zt[ROWS];
} RowSums;

static inline void rows_init(RowSums *acc) {
    for (int r = 0; r < ROWS; r++) {
        acc->tot[r] = vf_zero();
        acc->zt[r] = 0.f;
    }
}

/* Close group g: y += s * (sum q * x); sf: the group's ROWS scales as fp32. */
static inline void rows_close_group(RowSums *acc, const vf *a0, const vf *a1, const float *sf) {
    for (int r = 0; r < ROWS; r++) acc->tot[r] = vf_fmadd(vf_set1(sf[r]), vf_add(a0[r], a1[r]), acc->tot[r]);
}

/* y -= sum_g s * (z + zoff) * sum x over g, zoff the codes' offset; sf, zr: [G, ROWS]. Kept out of
 * the group loop, where its scalar chain per row would cost as much as the products. */
static inline void rows_finish(RowSums *acc, const float *sf, const uint8_t *zr, const float *xsm, int G,
                               float zoff, float *out) {
    for (int g = 0; g < G; g++)
        for (int r = 0; r < ROWS; r++) {
            const size_t i = (size_t)g * ROWS + r;
            acc->zt[r] += sf[i] * (zoff + (float)zr[i]) * xsm[g];
        }
    for (int r = 0; r < ROWS; r++) out[r] = vf_sum(acc->tot[r]) - acc->zt[r];
}

/* A block's fp16 scales [G, ROWS] as fp32, converted once for every row of x. */
static inline void block_scales(const uint16_t *sc, int G, float *sf) {
    for (int i = 0; i < G * ROWS; i++) sf[i] = half_to_f32(sc[i]);
}

#endif /* QVL_SIMD */

#ifdef QVL_AVX512

static inline __m512 u8x16_to_ps(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }

#ifdef __AVX512BF16__
/* bf16 activations: the codes become bf16 numbers 128 + q with one OR (0x4300 is bf16 128.0,
 * whose 7 mantissa bits then hold q exactly), and vdpbf16ps multiplies 32 of them with x in one
 * instruction, products exact in fp32; the zero term subtracts the 128 back. */
static inline void q4_rows_bf16(const uint16_t *xm, const float *xsm, const uint8_t *w, const float *sf,
                                const uint8_t *zr, int G, int group, float *out) {
    const __m512i magic = _mm512_set1_epi16(0x4300), low = _mm512_set1_epi16(0x000f);
    RowSums acc;
    rows_init(&acc);
    for (int g = 0; g < G; g++) {
        __m512 a0[ROWS], a1[ROWS];
        for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
            const __m512bh xlo = (__m512bh)_mm512_loadu_si512(xm + k0);
            const __m512bh xhi = (__m512bh)_mm512_loadu_si512(xm + k0 + 32);
            const uint8_t *blk = w + (size_t)(k0 / 64) * ROWS * CHUNK;
            prefetch_block(blk);
            for (int r = 0; r < ROWS; r++) {
                const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + r * CHUNK)));
                const __m512i lo = _mm512_ternarylogic_epi32(b, low, magic, 0xEA);  /* (b & low) | magic */
                const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(b, 4), magic);
                a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)lo, xlo);
                a1[r] = _mm512_dpbf16_ps(a1[r], (__m512bh)hi, xhi);
            }
        }
        rows_close_group(&acc, a0, a1, sf + (size_t)g * ROWS);
    }
    rows_finish(&acc, sf, zr, xsm, G, 128.f, out);
}
#endif

/* fp32 activations (or no AVX512-BF16): codes widened to fp32, FMA with x. */
static inline void q4_rows(const float *xm, const float *xsm, const uint8_t *w, const float *sf,
                           const uint8_t *zr, int G, int group, float *out) {
    const __m128i low = _mm_set1_epi8(0x0f);
    RowSums acc;
    rows_init(&acc);
    for (int g = 0; g < G; g++) {
        __m512 a0[ROWS], a1[ROWS];
        for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
            const uint8_t *blk = w + (size_t)(k0 / 64) * ROWS * CHUNK;
            prefetch_block(blk);
            for (int h = 0; h < 32; h += 16) {
                const __m512 xlo = _mm512_loadu_ps(xm + k0 + h), xhi = _mm512_loadu_ps(xm + k0 + 32 + h);
                for (int r = 0; r < ROWS; r++) {
                    const __m128i b = _mm_loadu_si128((const __m128i *)(blk + r * CHUNK + h));
                    a0[r] = _mm512_fmadd_ps(u8x16_to_ps(_mm_and_si128(b, low)), xlo, a0[r]);
                    a1[r] = _mm512_fmadd_ps(u8x16_to_ps(_mm_and_si128(_mm_srli_epi16(b, 4), low)), xhi, a1[r]);
                }
            }
        }
        rows_close_group(&acc, a0, a1, sf + (size_t)g * ROWS);
    }
    rows_finish(&acc, sf, zr, xsm, G, 0.f, out);
}

/* int4 for up to MT_MAX rows of x at once (fp32 x): each code vector is widened to fp32 once and
 * feeds every row; one FMA chain per (row of x, row of W), the same sequence whatever MT is, so a
 * row's result does not depend on how many rows share the call. */
#define MT_MAX 4
static inline __attribute__((always_inline)) void q4_tile(const float *xs, const float *xsum, int K, int MT,
                                                          const uint8_t *w, const float *sf, const uint8_t *zr,
                                                          int G, int group, float out[][ROWS]) {
    const __m128i low = _mm_set1_epi8(0x0f);
    RowSums acc[MT_MAX];
    for (int m = 0; m < MT; m++) rows_init(&acc[m]);
    for (int g = 0; g < G; g++) {
        __m512 a[MT_MAX][ROWS];
        for (int m = 0; m < MT; m++)
            for (int r = 0; r < ROWS; r++) a[m][r] = _mm512_setzero_ps();
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
            const uint8_t *blk = w + (size_t)(k0 / 64) * ROWS * CHUNK;
            prefetch_block(blk);
            for (int h = 0; h < 32; h += 16) {
                __m512 xlo[MT_MAX], xhi[MT_MAX];
                for (int m = 0; m < MT; m++) {
                    xlo[m] = _mm512_loadu_ps(xs + (size_t)m * K + k0 + h);
                    xhi[m] = _mm512_loadu_ps(xs + (size_t)m * K + k0 + 32 + h);
                }
                for (int r = 0; r < ROWS; r++) {
                    const __m128i b = _mm_loadu_si128((const __m128i *)(blk + r * CHUNK + h));
                    const __m512 wlo = u8x16_to_ps(_mm_and_si128(b, low));
                    const __m512 whi = u8x16_to_ps(_mm_and_si128(_mm_srli_epi16(b, 4), low));
                    for (int m = 0; m < MT; m++) {
                        a[m][r] = _mm512_fmadd_ps(wlo, xlo[m], a[m][r]);
                        a[m][r] = _mm512_fmadd_ps(whi, xhi[m], a[m][r]);
                    }
                }
            }
        }
        for (int m = 0; m < MT; m++)
            for (int r = 0; r < ROWS; r++)
                acc[m].tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(sf[(size_t)g * ROWS + r]), a[m][r], acc[m].tot[r]);
    }
    for (int m = 0; m < MT; m++) rows_finish(&acc[m], sf, zr, xsum + (size_t)m * G, G, 0.f, out[m]);
}

/* int8 the same way: a 32-byte chunk holds 32 columns. */
static inline __attribute__((always_inline)) void q8_tile(const float *xs, const float *xsum, int K, int MT,
                                                          const uint8_t *w, const float *sf, const uint8_t *zr,
                                                          int G, int group, float out[][ROWS]) {
    RowSums acc[MT_MAX];
    for (int m = 0; m < MT; m++) rows_init(&acc[m]);
    for (int g = 0; g < G; g++) {
        __m512 a[MT_MAX][ROWS];
        for (int m = 0; m < MT; m++)
            for (int r = 0; r < ROWS; r++) a[m][r] = _mm512_setzero_ps();
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
            const uint8_t *blk = w + (size_t)(k0 / 32) * ROWS * CHUNK;
            prefetch_block(blk);
            for (int h = 0; h < 32; h += 16) {
                __m512 xv[MT_MAX];
                for (int m = 0; m < MT; m++) xv[m] = _mm512_loadu_ps(xs + (size_t)m * K + k0 + h);
                for (int r = 0; r < ROWS; r++) {
                    const __m512 wv = u8x16_to_ps(_mm_loadu_si128((const __m128i *)(blk + r * CHUNK + h)));
                    for (int m = 0; m < MT; m++) a[m][r] = _mm512_fmadd_ps(wv, xv[m], a[m][r]);
                }
            }
        }
        for (int m = 0; m < MT; m++)
            for (int r = 0; r < ROWS; r++)
                acc[m].tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(sf[(size_t)g * ROWS + r]), a[m][r], acc[m].tot[r]);
    }
    for (int m = 0; m < MT; m++) rows_finish(&acc[m], sf, zr, xsum + (size_t)m * G, G, 0.f, out[m]);
}

static inline void q8_rows(const float *xm, const float *xsm, const uint8_t *w, const float *sf,
                           const uint8_t *zr, int G, int group, float *out) {
    RowSums acc;
    rows_init(&acc);
    for (int g = 0; g < G; g++) {
        __m512 a0[ROWS], a1[ROWS];
        for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
            const __m512 x0 = _mm512_loadu_ps(xm + k0), x1 = _mm512_loadu_ps(xm + k0 + 16);
            const uint8_t *blk = w + (size_t)(k0 / 32) * ROWS * CHUNK;
            prefetch_block(blk);
            for (int r = 0; r < ROWS; r++) {
                const uint8_t *p = blk + r * CHUNK;
                a0[r] = _mm512_fmadd_ps(u8x16_to_ps(_mm_loadu_si128((const __m128i *)p)), x0, a0[r]);
                a1[r] = _mm512_fmadd_ps(u8x16_to_ps(_mm_loadu_si128((const __m128i *)(p + 16))), x1, a1[r]);
            }
        }
        rows_close_group(&acc, a0, a1, sf + (size_t)g * ROWS);
    }
    rows_finish(&acc, sf, zr, xsm, G, 0.f, out);
}

/* One row's chunk of codes (64 columns for int4, 32 for int8) -> s * (q - z) at dst[o...]. */
static inline void dequant_chunk(int bits, const uint8_t *p, float sf, float zf, void *dst, size_t o,
                                 int out_bf16) {
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m512 s = _mm512_set1_ps(sf), z = _mm512_set1_ps(zf);
    const int cols = bits == 4 ? 64 : 32;
    __m512 v[4];
    const __m128i b0 = _mm_loadu_si128((const __m128i *)p), b1 = _mm_loadu_si128((const __m128i *)(p + 16));
    if (bits == 4) {  /* columns 0..31 in the low nibbles, 32..63 in the high */
        v[0] = u8x16_to_ps(_mm_and_si128(b0, low));
        v[1] = u8x16_to_ps(_mm_and_si128(b1, low));
        v[2] = u8x16_to_ps(_mm_and_si128(_mm_srli_epi16(b0, 4), low));
        v[3] = u8x16_to_ps(_mm_and_si128(_mm_srli_epi16(b1, 4), low));
    } else {
        v[0] = u8x16_to_ps(b0);
        v[1] = u8x16_to_ps(b1);
    }
    for (int h = 0; h < cols / 16; h++) {
        const __m512 f = _mm512_mul_ps(_mm512_sub_ps(v[h], z), s);
        if (out_bf16) {  /* round to nearest even (weights are finite) */
            __m512i u = _mm512_castps_si512(f);
            u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                      _mm512_set1_epi32(1))));
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + o + 16 * h),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        } else {
            _mm512_storeu_ps((float *)dst + o + 16 * h, f);
        }
    }
}

#endif /* QVL_AVX512 */

#ifdef QVL_AVX2

/* 8 codes (bytes) -> 8 int32 lanes, loaded straight from memory (one vpmovzxbd). */
static inline __m256i u8x8_to_epi32(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* int4, fp32 activations (bf16 ones are widened by prepare_x): each 8-byte load holds columns
 * h..h+7 in its low nibbles and h+32..h+39 in its high ones. */
static inline void q4_rows(const float *xm, const float *xsm, const uint8_t *w, const float *sf,
                           const uint8_t *zr, int G, int group, float *out) {
    const __m256i low = _mm256_set1_epi32(0x0f);
    RowSums acc;
    rows_init(&acc);
    for (int g = 0; g < G; g++) {
        __m256 a0[ROWS], a1[ROWS];
        for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
            const uint8_t *blk = w + (size_t)(k0 / 64) * ROWS * CHUNK;
            prefetch_block(blk);
            for (int h = 0; h < 32; h += 8) {
                const __m256 xlo = _mm256_loadu_ps(xm + k0 + h), xhi = _mm256_loadu_ps(xm + k0 + 32 + h);
                for (int r = 0; r < ROWS; r++) {
                    const __m256i b = u8x8_to_epi32(blk + r * CHUNK + h);
                    a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low)), xlo, a0[r]);
                    a1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), xhi, a1[r]);
                }
            }
        }
        rows_close_group(&acc, a0, a1, sf + (size_t)g * ROWS);
    }
    rows_finish(&acc, sf, zr, xsm, G, 0.f, out);
}

static inline void q8_rows(const float *xm, const float *xsm, const uint8_t *w, const float *sf,
                           const uint8_t *zr, int G, int group, float *out) {
    RowSums acc;
    rows_init(&acc);
    for (int g = 0; g < G; g++) {
        __m256 a0[ROWS], a1[ROWS];
        for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
            const uint8_t *blk = w + (size_t)(k0 / 32) * ROWS * CHUNK;
            prefetch_block(blk);
            for (int h = 0; h < 32; h += 16) {
                const __m256 x0 = _mm256_loadu_ps(xm + k0 + h), x1 = _mm256_loadu_ps(xm + k0 + h + 8);
                for (int r = 0; r < ROWS; r++) {
                    const uint8_t *p = blk + r * CHUNK + h;
                    a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u8x8_to_epi32(p)), x0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u8x8_to_epi32(p + 8)), x1, a1[r]);
                }
            }
        }
        rows_close_group(&acc, a0, a1, sf + (size_t)g * ROWS);
    }
    rows_finish(&acc, sf, zr, xsm, G, 0.f, out);
}

/* fp32 -> bf16 bits, round to nearest even (weights are finite), 16 values from two vectors. */
static inline void store_bf16x16(uint16_t *dst, __m256 f0, __m256 f1) {
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    __m256i u0 = _mm256_castps_si256(f0), u1 = _mm256_castps_si256(f1);
    u0 = _mm256_srli_epi32(_mm256_add_epi32(u0, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u0, 16), one))), 16);
    u1 = _mm256_srli_epi32(_mm256_add_epi32(u1, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u1, 16), one))), 16);
    /* packus works per 128-bit lane: [u0 0..3, u1 0..3, u0 4..7, u1 4..7], put back in order */
    _mm256_storeu_si256((__m256i *)dst, _mm256_permute4x64_epi64(_mm256_packus_epi32(u0, u1), 0xD8));
}

static inline void dequant_chunk(int bits, const uint8_t *p, float sf, float zf, void *dst, size_t o,
                                 int out_bf16) {
    const __m256i low = _mm256_set1_epi32(0x0f);
    const __m256 s = _mm256_set1_ps(sf), z = _mm256_set1_ps(zf);
    const int cols = bits == 4 ? 64 : 32;
    __m256 v[8];
    for (int j = 0; j < 4; j++) {
        const __m256i b = u8x8_to_epi32(p + 8 * j);
        if (bits == 4) {  /* columns 0..31 in the low nibbles, 32..63 in the high */
            v[j] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
            v[4 + j] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        } else {
            v[j] = _mm256_cvtepi32_ps(b);
        }
    }
    for (int h = 0; h < cols / 8; h += 2) {
        const __m256 f0 = _mm256_mul_ps(_mm256_sub_ps(v[h], z), s);
        const __m256 f1 = _mm256_mul_ps(_mm256_sub_ps(v[h + 1], z), s);
        if (out_bf16) {
            store_bf16x16((uint16_t *)dst + o + 8 * h, f0, f1);
        } else {
            _mm256_storeu_ps((float *)dst + o + 8 * h, f0);
            _mm256_storeu_ps((float *)dst + o + 8 * h + 8, f1);
        }
    }
}

#endif /* QVL_AVX2 */

/* y [M, N] = x [M, K] @ W.T (+ bias [N] fp32). bits 4 or 8. Returns 0, or -1 (no SIMD path,
 * shapes it does not take: N % 4, group % 32, K % group) or -2 (out of memory). */
int qvl_qgemm(int bits, const void *x, int x_bf16, int M, int K, const uint8_t *w, const uint16_t *scales,
              const uint8_t *zeros, int N, int group, const float *bias, void *y, int y_bf16, int threads) {
#ifdef QVL_SIMD
    const int block = bits == 4 ? 64 : 32;
    if ((bits != 4 && bits != 8) || N % ROWS || group % block || K % group || M < 1) return -1;
    const int G = K / group;

    float *xsum;
    float *xs = prepare_x(x, x_bf16, M, K, group, &xsum);
    if (!xs) return -2;
    const int blocks = N / ROWS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *sf = (float *)malloc(sizeof(float) * (size_t)G * ROWS);
        if (!sf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            if (!sf) continue;
            const int n0 = b * ROWS;
            const uint8_t *wb = w + (size_t)b * ROWS * K * bits / 8;
            const uint8_t *zb = zeros + (size_t)b * G * ROWS;
            float out[ROWS];
            block_scales(scales + (size_t)b * G * ROWS, G, sf);
#ifdef QVL_AVX512
            if (M > 1) {  /* several rows (batched decode): share each widened code vector */
                float tile[MT_MAX][ROWS];
                for (int m0 = 0; m0 < M; m0 += MT_MAX) {
                    const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
                    const float *xm = xs + (size_t)m0 * K, *xsm = xsum + (size_t)m0 * G;
                    if (bits == 4) switch (mt) {
                    case 4: q4_tile(xm, xsm, K, 4, wb, sf, zb, G, group, tile); break;
                    case 3: q4_tile(xm, xsm, K, 3, wb, sf, zb, G, group, tile); break;
                    case 2: q4_tile(xm, xsm, K, 2, wb, sf, zb, G, group, tile); break;
                    default: q4_tile(xm, xsm, K, 1, wb, sf, zb, G, group, tile);
                    } else switch (mt) {
                    case 4: q8_tile(xm, xsm, K, 4, wb, sf, zb, G, group, tile); break;
                    case 3: q8_tile(xm, xsm, K, 3, wb, sf, zb, G, group, tile); break;
                    case 2: q8_tile(xm, xsm, K, 2, wb, sf, zb, G, group, tile); break;
                    default: q8_tile(xm, xsm, K, 1, wb, sf, zb, G, group, tile);
                    }
                    for (int m = 0; m < mt; m++)
                        for (int r = 0; r < ROWS; r++)
                            store(y, y_bf16, (size_t)(m0 + m) * N + n0 + r, tile[m][r] + (bias ? bias[n0 + r] : 0.f));
                }
                continue;
            }
#endif
            for (int m = 0; m < M; m++) {
#ifdef __AVX512BF16__
                if (bits == 4 && x_bf16)
                    q4_rows_bf16((const uint16_t *)x + (size_t)m * K, xsum + (size_t)m * G, wb, sf, zb, G, group, out);
                else
#endif
                if (bits == 4)
                    q4_rows(xs + (size_t)m * K, xsum + (size_t)m * G, wb, sf, zb, G, group, out);
                else
                    q8_rows(xs + (size_t)m * K, xsum + (size_t)m * G, wb, sf, zb, G, group, out);
                for (int r = 0; r < ROWS; r++)
                    store(y, y_bf16, (size_t)m * N + n0 + r, out[r] + (bias ? bias[n0 + r] : 0.f));
            }
        }
        free(sf);
    }
    free(xs);
    free(xsum);
    return failed ? -2 : 0;
#else
    (void)bits; (void)x; (void)x_bf16; (void)M; (void)K; (void)w; (void)scales; (void)zeros; (void)N;
    (void)group; (void)bias; (void)y; (void)y_bf16; (void)threads;
    return -1;
#endif
}

/* W [N, K] = s * (q - z) in fp32 or bf16 (rounded once from fp32): the dense weight a large-M
 * product (prefill) multiplies with torch's GEMM. Same return codes as qvl_qgemm. */
int qvl_dequant(int bits, const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int N, int K,
                int group, void *out, int out_bf16, int threads) {
#ifdef QVL_SIMD
    if ((bits != 4 && bits != 8) || N % ROWS || group % (bits == 4 ? 64 : 32) || K % group) return -1;
    const int G = K / group, cols = bits == 4 ? 64 : 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const int b = n / ROWS, r = n % ROWS;
        const uint8_t *wb = w + (size_t)b * ROWS * K * bits / 8;
        for (int g = 0; g < G; g++) {
            const size_t i = ((size_t)b * G + g) * ROWS + r;
            const float s = half_to_f32(scales[i]), z = (float)zeros[i];
            for (int k0 = g * group; k0 < (g + 1) * group; k0 += cols)
                dequant_chunk(bits, wb + ((size_t)(k0 / cols) * ROWS + r) * CHUNK, s, z, out, (size_t)n * K + k0,
                              out_bf16);
        }
    }
    return 0;
#else
    (void)bits; (void)w; (void)scales; (void)zeros; (void)N; (void)K; (void)group; (void)out; (void)out_bf16;
    (void)threads;
    return -1;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * 8-bit activations (quant_kernel "qvl-a8"), the way llama.cpp runs Q4_0 x Q8_0.
 *
 * Each row of x is rounded per block of `ablock` columns (32..256, dividing the group):
 *     x[m, k] ~ sx[m, b] * xq[m, k],  sx = max|x over the block| / 127,  xq = round(x / sx) in int8
 * and then, exactly in int32 per block (u8 codes x s8 activations: vpdpbusd, or vpmaddubsw where
 * there is no VNNI), with one fp32 multiply-add per block:
 *     y[m, n] = sum_b fma(s[n, g] * sx[m, b], sum_{k in b} (q[n, k] - z[n, g]) * xq[m, k], ...)
 * The zero point enters the integer as -z * sum xq. Only the fp32 step rounds and it is the same
 * sequence in every path, so a row's result is the same bits in any batch (one row included), on
 * any thread count and in every variant (AVX-512, AVX-VNNI, AVX2).
 *
 * Weights are read once per call: outputs go in tiles of A8_NT = 64 (a thread's tiles are one
 * sequential stream), and each group of a tile serves every row of x in register blocks, the
 * later blocks reading it from L1. Layout (qvl.quant.cpu.pack_a8), N padded to a multiple of 64 with
 * zero codes and scales: per tile [K/KV, 4, 16, 4] bytes, i.e. per k-step 4 vectors of 16 outputs
 * x 4 bytes, a 32-bit lane holding one output's next bytes. int4: KV = 8 columns, byte j holds
 * column j (low nibble) and j + 4 (high); int8: KV = 4, byte j column j.
 * scales fp16, zeros uint8: [N/64, G, 64].
 */

#define A8_NT 64
#define A8_STEP 256 /* bytes per k-step of a tile: 4 vectors of 64 */

#ifdef QVL_SIMD

typedef struct {
    const int8_t *q;   /* [M, K] */
    const float *s;    /* [M, nblk] */
    const int32_t *sum; /* [M, nblk] sum of xq per block */
    int K, nblk;
} A8x;

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(QVL_AVX512)
static inline __m512 a8_widen(const void *x, int x_bf16, size_t i) {
    if (x_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i))), 16));
    return _mm512_loadu_ps((const float *)x + i);
}

/* One row of x -> int8 codes, block scales and sums (round half to even, as torch.round). */
static void a8_quantize_row(const void *x, int x_bf16, int m, int K, int ablock, int8_t *xq, float *sx,
                            int32_t *sq) {
    const int nblk = K / ablock;
    for (int b = 0; b < nblk; b++) {
        const size_t o = (size_t)m * K + (size_t)b * ablock;
        __m512 amax = _mm512_setzero_ps();
        for (int k = 0; k < ablock; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(a8_widen(x, x_bf16, o + k)));
        const float d = _mm512_reduce_max_ps(amax) / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        const __m512 vid = _mm512_set1_ps(id);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        __m512i s = _mm512_setzero_si512();
        for (int k = 0; k < ablock; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(a8_widen(x, x_bf16, o + k), vid));
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            s = _mm512_add_epi32(s, q);
            _mm_storeu_si128((__m128i *)(xq + o + k), _mm512_cvtepi32_epi8(q));
        }
        sx[(size_t)m * nblk + b] = d;
        sq[(size_t)m * nblk + b] = _mm512_reduce_add_epi32(s);
    }
}

#ifdef __AVX512VNNI__
#define A8_DOT4(acc, lo, xa, hi, xb) _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, xa), hi, xb)
#define A8_DOT8(acc, v, lo, hi, xa) _mm512_dpbusd_epi32(acc, v, xa)
#else
/* vpmaddubsw sums two u8 x s8 products into int16: 2 * 15 * 127 per nibble pair never saturates,
 * so 8-bit codes go as two nibbles, 16 * hi + lo */
#define A8_DOT4(acc, lo, xa, hi, xb)                                                                      \
    _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, xa),              \
                                                             _mm512_maddubs_epi16(hi, xb)),             \
                                            _mm512_set1_epi16(1)))
#define A8_DOT8(acc, v, lo, hi, xa)                                                                       \
    _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(hi, xa), _mm512_set1_epi16(16)), \
                                           _mm512_madd_epi16(_mm512_maddubs_epi16(lo, xa), _mm512_set1_epi16(1))))
#endif

/* rows of x per register block: 4 x MB int32 and 4 x MB fp32 accumulators of 32 registers */
#define A8_MB 3

/* MB rows of x (from m0) against one tile's groups g0..g1-1: out[m][0..63] += their part (no bias). */
static inline __attribute__((always_inline)) void a8_tile(int bits, int MB, const A8x *x, int m0, const uint8_t *w,
                                                          const uint16_t *sc, const uint8_t *zr, int g0, int g1,
                                                          int group, int ablock, int prefetch, float out[][A8_NT]) {
    const int KV = bits == 4 ? 8 : 4, bpg = group / ablock, steps = ablock / KV;
    const __m512i low = _mm512_set1_epi8(0x0f), m16 = _mm512_set1_epi32(0xffff);
    __m512 y[A8_MB][4];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < 4; j++) y[m][j] = _mm512_loadu_ps(out[m] + 16 * j);
    for (int g = g0; g < g1; g++) {
        __m512 sw[4];
        __m512i nz[4]; /* -z as int16 in each lane's low half, 0 in the high: vpmaddwd makes -z * sum xq */
        for (int j = 0; j < 4; j++) {
            sw[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + (size_t)g * A8_NT + 16 * j)));
            nz[j] = _mm512_and_si512(_mm512_sub_epi32(_mm512_setzero_si512(), _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                                          (const __m128i *)(zr + (size_t)g * A8_NT + 16 * j)))),
                                     m16);
        }
        for (int bb = 0; bb < bpg; bb++) {
            const int b = g * bpg + bb, k0 = b * ablock;
            __m512i acc[A8_MB][4];
            for (int m = 0; m < MB; m++) {
                const __m512i sqv = _mm512_set1_epi32(x->sum[(size_t)(m0 + m) * x->nblk + b] & 0xffff);
                for (int j = 0; j < 4; j++) acc[m][j] = _mm512_madd_epi16(nz[j], sqv);
            }
            const uint8_t *blk = w + (size_t)(k0 / KV) * A8_STEP;
            const int8_t *xk = x->q + (size_t)m0 * x->K + k0;
            for (int o = 0; o < steps; o++) {
                const uint8_t *p = blk + (size_t)o * A8_STEP;
                if (prefetch)
                    for (int l = 0; l < 4; l++) _mm_prefetch((const char *)p + PREFETCH + 64 * l, _MM_HINT_T0);
                for (int j = 0; j < 4; j++) {
                    const __m512i v = _mm512_loadu_si512(p + 64 * j);
                    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    (void)lo;
                    (void)hi;
                    for (int m = 0; m < MB; m++) {
                        const int8_t *xm = xk + (size_t)m * x->K + o * KV;
                        const __m512i xa = _mm512_set1_epi32(load_i32(xm));
                        if (bits == 4)
                            acc[m][j] = A8_DOT4(acc[m][j], lo, xa, hi, _mm512_set1_epi32(load_i32(xm + 4)));
                        else
                            acc[m][j] = A8_DOT8(acc[m][j], v, lo, hi, xa);
                    }
                }
            }
            for (int m = 0; m < MB; m++) {
                const __m512 s = _mm512_set1_ps(x->s[(size_t)(m0 + m) * x->nblk + b]);
                for (int j = 0; j < 4; j++)
                    y[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][j]), _mm512_mul_ps(sw[j], s), y[m][j]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out[m] + 16 * j, y[m][j]);
}

/* One tile's k-step (KV columns x 64 outputs) -> W.T rows k0.. of [K, N], n0 the tile's first
 * output, nv of its outputs valid. */
static inline void a8_dequant_step(int bits, const uint8_t *p, const float *sf, const float *zf, void *dst,
                                   int k0, int N, int n0, int nv, int out_bf16) {
    const int KV = bits == 4 ? 8 : 4;
    for (int j = 0; j < 4; j++) {
        const int nj = nv - 16 * j;
        if (nj <= 0) break;
        const __mmask16 mask = nj >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nj) - 1);
        const __m512i v = _mm512_loadu_si512(p + 64 * j);
        const __m512 s = _mm512_loadu_ps(sf + 16 * j), z = _mm512_loadu_ps(zf + 16 * j);
        for (int c = 0; c < KV; c++) {
            const int shift = bits == 4 ? 8 * (c % 4) + 4 * (c / 4) : 8 * c;
            const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(bits == 4 ? 0x0f : 0xff));
            const __m512 f = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), z), s);
            const size_t o = (size_t)(k0 + c) * N + n0 + 16 * j;
            if (out_bf16) {
                __m512i u = _mm512_castps_si512(f);
                u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                         _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
                _mm256_mask_storeu_epi16((uint16_t *)dst + o, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
            } else {
                _mm512_mask_storeu_ps((float *)dst + o, mask, f);
            }
        }
    }
}

#elif defined(QVL_AVX2)

static inline __m256 a8_widen(const void *x, int x_bf16, size_t i) {
    if (x_bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16));
    return _mm256_loadu_ps((const float *)x + i);
}

static void a8_quantize_row(const void *x, int x_bf16, int m, int K, int ablock, int8_t *xq, float *sx,
                            int32_t *sq) {
    const int nblk = K / ablock;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int b = 0; b < nblk; b++) {
        const size_t o = (size_t)m * K + (size_t)b * ablock;
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < ablock; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(a8_widen(x, x_bf16, o + k), absmask));
        float lanes[8], mx = 0.f;
        _mm256_storeu_ps(lanes, amax);
        for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
        const float d = mx / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        const __m256 vid = _mm256_set1_ps(id);
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        __m256i s = _mm256_setzero_si256();
        for (int k = 0; k < ablock; k += 8) {
            __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(a8_widen(x, x_bf16, o + k), vid));
            q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
            s = _mm256_add_epi32(s, q);
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)t, q);
            for (int i = 0; i < 8; i++) xq[o + k + i] = (int8_t)t[i];
        }
        int32_t t[8], tot = 0;
        _mm256_storeu_si256((__m256i *)t, s);
        for (int i = 0; i < 8; i++) tot += t[i];
        sx[(size_t)m * nblk + b] = d;
        sq[(size_t)m * nblk + b] = tot;
    }
}

#ifdef __AVXVNNI__
#define A8_DOT4(acc, lo, xa, hi, xb) _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, lo, xa), hi, xb)
#define A8_DOT8(acc, v, lo, hi, xa) _mm256_dpbusd_avx_epi32(acc, v, xa)
#else
#define A8_DOT4(acc, lo, xa, hi, xb)                                                                      \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xa),              \
                                                             _mm256_maddubs_epi16(hi, xb)),             \
                                            _mm256_set1_epi16(1)))
#define A8_DOT8(acc, v, lo, hi, xa)                                                                       \
    _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(hi, xa), _mm256_set1_epi16(16)), \
                                           _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_set1_epi16(1))))
#endif

/* 16 registers: the tile goes 8 outputs (a half vector) at a time, the fp32 sums in out[][] */
#define A8_MB 4

static inline __attribute__((always_inline)) void a8_tile(int bits, int MB, const A8x *x, int m0, const uint8_t *w,
                                                          const uint16_t *sc, const uint8_t *zr, int g0, int g1,
                                                          int group, int ablock, int prefetch, float out[][A8_NT]) {
    const int KV = bits == 4 ? 8 : 4, bpg = group / ablock, steps = ablock / KV;
    const __m256i low = _mm256_set1_epi8(0x0f);
    float swf[A8_NT];
    int32_t nzi[A8_NT];
    for (int g = g0; g < g1; g++) {
        for (int n = 0; n < A8_NT; n++) {
            swf[n] = half_to_f32(sc[(size_t)g * A8_NT + n]);
            nzi[n] = (int32_t)((uint32_t)(-(int32_t)zr[(size_t)g * A8_NT + n]) & 0xffffu);
        }
        for (int bb = 0; bb < bpg; bb++) {
            const int b = g * bpg + bb, k0 = b * ablock;
            const uint8_t *blk = w + (size_t)(k0 / KV) * A8_STEP;
            const int8_t *xk = x->q + (size_t)m0 * x->K + k0;
            for (int j = 0; j < 8; j++) { /* outputs 8j..8j+7: bytes 32j.. of each k-step */
                const __m256i nzj = _mm256_loadu_si256((const __m256i *)(nzi + 8 * j));
                __m256i acc[A8_MB];
                for (int m = 0; m < MB; m++)
                    acc[m] = _mm256_madd_epi16(nzj, _mm256_set1_epi32(x->sum[(size_t)(m0 + m) * x->nblk + b] & 0xffff));
                for (int o = 0; o < steps; o++) {
                    const uint8_t *p = blk + (size_t)o * A8_STEP;
                    if (prefetch && j == 0)
                        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)p + PREFETCH + 64 * l, _MM_HINT_T0);
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * j));
                    const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    (void)lo;
                    (void)hi;
                    for (int m = 0; m < MB; m++) {
                        const int8_t *xm = xk + (size_t)m * x->K + o * KV;
                        const __m256i xa = _mm256_set1_epi32(load_i32(xm));
                        if (bits == 4)
                            acc[m] = A8_DOT4(acc[m], lo, xa, hi, _mm256_set1_epi32(load_i32(xm + 4)));
                        else
                            acc[m] = A8_DOT8(acc[m], v, lo, hi, xa);
                    }
                }
                const __m256 swj = _mm256_loadu_ps(swf + 8 * j);
                for (int m = 0; m < MB; m++) {
                    const __m256 s = _mm256_set1_ps(x->s[(size_t)(m0 + m) * x->nblk + b]);
                    __m256 yv = _mm256_loadu_ps(out[m] + 8 * j);
                    yv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_mul_ps(swj, s), yv);
                    _mm256_storeu_ps(out[m] + 8 * j, yv);
                }
            }
        }
    }
}

static inline void a8_dequant_step(int bits, const uint8_t *p, const float *sf, const float *zf, void *dst,
                                   int k0, int N, int n0, int nv, int out_bf16) {
    const int KV = bits == 4 ? 8 : 4;
    for (int c = 0; c < KV; c++) {
        const int shift = bits == 4 ? 8 * (c % 4) + 4 * (c / 4) : 8 * c;
        for (int n = 0; n < nv; n++) {
            uint32_t lane;
            memcpy(&lane, p + 4 * n, 4);
            const float f = ((float)((lane >> shift) & (bits == 4 ? 0x0fu : 0xffu)) - zf[n]) * sf[n];
            const size_t o = (size_t)(k0 + c) * N + n0 + n;
            if (out_bf16)
                ((uint16_t *)dst)[o] = f32_to_bf16(f);
            else
                ((float *)dst)[o] = f;
        }
    }
}

#endif

#endif /* QVL_SIMD */

static int a8_shapes_ok(int bits, int K, int N, int group, int ablock) {
    return (bits == 4 || bits == 8) && N >= 1 && ablock >= 32 && ablock <= 256 && ablock % 32 == 0 &&
           group % ablock == 0 && K % group == 0 && K >= group;
}

/* x [M, K] -> int8 codes [M, K], block scales and sums [M, K / ablock] (what qvl_a8_gemm
 * multiplies with; for tests). Returns 0, or -1 (no SIMD path, ablock). */
int qvl_a8_quantize(const void *x, int x_bf16, int M, int K, int ablock, int8_t *xq, float *sx, int32_t *sq) {
#ifdef QVL_SIMD
    if (ablock < 32 || ablock > 256 || ablock % 32 || K % ablock || M < 1) return -1;
    for (int m = 0; m < M; m++) a8_quantize_row(x, x_bf16, m, K, ablock, xq, sx, sq);
    return 0;
#else
    (void)x; (void)x_bf16; (void)M; (void)K; (void)ablock; (void)xq; (void)sx; (void)sq;
    return -1;
#endif
}

#define A8_CASE(B, MBV) a8_tile(B, MBV, &ax, m0, wt, sct, zt, g, g + 1, group, ablock, m0 == 0, yt + m0)

/* y [M, N] = x [M, K] @ W.T (+ bias [N] fp32) with x rounded to int8 per block (see above).
 * Returns 0, -1 (no SIMD path, shapes: group % ablock, K % group, ablock in 32..256 by 32) or
 * -2 (out of memory). */
int qvl_a8_gemm(int bits, const void *x, int x_bf16, int M, int K, const uint8_t *w, const uint16_t *scales,
                const uint8_t *zeros, int N, int group, int ablock, const float *bias, void *y, int y_bf16,
                int threads) {
#ifdef QVL_SIMD
    if (!a8_shapes_ok(bits, K, N, group, ablock) || M < 1) return -1;
    const int G = K / group, nblk = K / ablock, tiles = (N + A8_NT - 1) / A8_NT;
    const size_t tile_bytes = (size_t)A8_NT * K * bits / 8;
    int8_t *xq = (int8_t *)malloc((size_t)M * K + 64);
    float *sx = (float *)malloc(sizeof(float) * (size_t)M * nblk);
    int32_t *sq = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * nblk);
    if (!xq || !sx || !sq) {
        free(xq);
        free(sx);
        free(sq);
        return -2;
    }
    const A8x ax = {xq, sx, sq, K, nblk};
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* the tile's fp32 sums for every row of x: each group's weights serve all rows while they
         * are in L1, so a tile is read from memory once, whatever M */
        float(*yt)[A8_NT] = (float(*)[A8_NT])aligned_alloc(64, sizeof(float) * A8_NT * (size_t)M);
        if (!yt) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) a8_quantize_row(x, x_bf16, m, K, ablock, xq, sx, sq);
#pragma omp for schedule(static)
        for (int t = 0; t < tiles; t++) {
            if (!yt) continue;
            const uint8_t *wt = w + (size_t)t * tile_bytes;
            const uint16_t *sct = scales + (size_t)t * G * A8_NT;
            const uint8_t *zt = zeros + (size_t)t * G * A8_NT;
            const int n0 = t * A8_NT, nv = N - n0 < A8_NT ? N - n0 : A8_NT;
            memset(yt, 0, sizeof(float) * A8_NT * (size_t)M);
            for (int g = 0; g < G; g++)
            for (int m0 = 0; m0 < M; m0 += A8_MB) {
                const int mt = M - m0 < A8_MB ? M - m0 : A8_MB;
                if (bits == 4) switch (mt) {
#if A8_MB > 3
                case 4: A8_CASE(4, 4); break;
#endif
                case 3: A8_CASE(4, 3); break;
                case 2: A8_CASE(4, 2); break;
                default: A8_CASE(4, 1);
                } else switch (mt) {
#if A8_MB > 3
                case 4: A8_CASE(8, 4); break;
#endif
                case 3: A8_CASE(8, 3); break;
                case 2: A8_CASE(8, 2); break;
                default: A8_CASE(8, 1);
                }
            }
            for (int m = 0; m < M; m++)
                for (int n = 0; n < nv; n++)
                    store(y, y_bf16, (size_t)m * N + n0 + n, yt[m][n] + (bias ? bias[n0 + n] : 0.f));
        }
        free(yt);
    }
    free(xq);
    free(sx);
    free(sq);
    return failed ? -2 : 0;
#else
    (void)bits; (void)x; (void)x_bf16; (void)M; (void)K; (void)w; (void)scales; (void)zeros; (void)N;
    (void)group; (void)ablock; (void)bias; (void)y; (void)y_bf16; (void)threads;
    return -1;
#endif
}

/* W.T [K, N] = (s * (q - z)).T in fp32 or bf16 (rounded once from fp32), from the a8 layout: the
 * dense weight a large-M product multiplies with torch's GEMM. Same return codes as qvl_a8_gemm. */
int qvl_a8_dequant_t(int bits, const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int N, int K,
                     int group, void *out, int out_bf16, int threads) {
#ifdef QVL_SIMD
    if (!a8_shapes_ok(bits, K, N, group, 32)) return -1;
    const int G = K / group, KV = bits == 4 ? 8 : 4, tiles = (N + A8_NT - 1) / A8_NT;
    const size_t tile_bytes = (size_t)A8_NT * K * bits / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tiles; t++) {
        const int n0 = t * A8_NT, nv = N - n0 < A8_NT ? N - n0 : A8_NT;
        float sf[A8_NT], zf[A8_NT];
        for (int g = 0; g < G; g++) {
            for (int n = 0; n < A8_NT; n++) {
                sf[n] = half_to_f32(scales[((size_t)t * G + g) * A8_NT + n]);
                zf[n] = (float)zeros[((size_t)t * G + g) * A8_NT + n];
            }
            for (int k0 = g * group; k0 < (g + 1) * group; k0 += KV)
                a8_dequant_step(bits, w + (size_t)t * tile_bytes + (size_t)(k0 / KV) * A8_STEP, sf, zf, out, k0, N,
                                n0, nv, out_bf16);
        }
    }
    return 0;
#else
    (void)bits; (void)w; (void)scales; (void)zeros; (void)N; (void)K; (void)group; (void)out; (void)out_bf16;
    (void)threads;
    return -1;
#endif
}
