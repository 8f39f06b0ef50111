/* A one-token decode step over every decoder layer as one call (qvl.quant.decode_step).
 *
 * Why this file exists: with the matrix products and the small operations in C, what is left of a
 * step's time outside them is Python: ~10 calls a layer, each with its tensor allocations and its
 * ctypes argument conversion (bench/results/step.md). This loop calls the same C functions with the same
 * arguments in the same order as qvl.model.decoder's `decode` methods do through
 * qvl.quant.decode_ops, so the result is the same bits; only the Python between them is gone.
 *
 * Per layer (residual adds folded into the norms, as DecoderLayer.decode does):
 *     h, s = rms_norm(x + s)        qkv = [q | k | v](h)        a = o(attention(qkv))
 *     h, s = rms_norm(a + s)        x = down(silu(gate(h)) * up(h))
 * and after the last layer out = rms_norm(x + s).
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

int qvl_qgemm(int bits, const void *x, int x_bf16, int M, int K, const uint8_t *w, const uint16_t *scales,
              const uint8_t *zeros, int N, int group, const float *bias, void *y, int y_bf16, int threads);
int qvl_a8_gemm(int bits, const void *x, int x_bf16, int M, int K, const uint8_t *w, const uint16_t *scales,
                const uint8_t *zeros, int N, int group, int ablock, const float *bias, void *y, int y_bf16,
                int threads);
int qvl_rms_norm(const void *x, const void *r, void *s_out, const void *w, int is_bf16, int M, int D,
                 float eps, void *y);
int qvl_silu_mul(const void *g, const void *u, long stride, int is_bf16, int M, int I, void *y, int threads);
int qvl_decode_attention(const void *q, const void *k, const void *v, long stride, int is_bf16, int B, int H,
                         int Hkv, int Dh, const void *cos, const void *sin, void *k_cache, void *v_cache,
                         uint16_t *k_scale, uint16_t *v_scale, int S, int row0, const int64_t *write_pos,
                         const uint8_t *mask, int L, float scale, void *out, int threads);

/* One quantized linear in one of the CPU kernels' layouts (qvl.quant.linear.QuantLinear's buffers). */
typedef struct {
    int kernel; /* 0: qvl-a8 (qvl_a8_gemm), 1: qvl (qvl_qgemm) */
    int bits, n, k, group, ablock;
    const uint8_t *w;
    const uint16_t *scales;
    const uint8_t *zeros;
    const float *bias; /* fp32 [n] or NULL */
} QvlLinear;

/* One decoder layer: q/k/v as one joint linear (n_qkv = 1) or 3 parts, gate/up as one (its
 * output's halves) or 2 parts. */
typedef struct {
    const void *norm1, *norm2; /* RMSNorm weights, in the activation dtype */
    float eps1, eps2;
    int n_qkv, n_gate_up;
    QvlLinear qkv[3], o, gate_up[2], down;
    void *k_cache, *v_cache;     /* [slots, Hkv, S, Dh] */
    uint16_t *k_scale, *v_scale; /* int8 cache: fp16 [slots, Hkv, S]; else NULL */
} QvlLayer;

/* The model's shapes and the step's inputs. */
typedef struct {
    int is_bf16, B, D, H, Hkv, Dh, I, S, row0, L, threads;
    float scale;
    const void *final_norm;
    float final_eps;
    const void *cos, *sin;    /* [B, Dh] */
    const int64_t *write_pos; /* [B] */
    const uint8_t *mask;      /* [B, L] */
} QvlStep;

static int linear(const QvlLinear *l, const void *x, int M, void *y, int is_bf16, int threads) {
    if (l->kernel == 0)
        return qvl_a8_gemm(l->bits, x, is_bf16, M, l->k, l->w, l->scales, l->zeros, l->n, l->group, l->ablock,
                           l->bias, y, is_bf16, threads);
    return qvl_qgemm(l->bits, x, is_bf16, M, l->k, l->w, l->scales, l->zeros, l->n, l->group, l->bias, y, is_bf16,
                     threads);
}

/* parts [M, n_p] each -> y [M, sum n_p] side by side (torch.cat along the last dim) */
static int linear_parts(const QvlLinear *parts, int n_parts, const void *x, int M, void *y, char *tmp,
                        size_t el, int is_bf16, int threads) {
    if (n_parts == 1) return linear(parts, x, M, y, is_bf16, threads);
    size_t width = 0;
    for (int p = 0; p < n_parts; p++) width += (size_t)parts[p].n;
    size_t col = 0;
    for (int p = 0; p < n_parts; p++) {
        const size_t n = (size_t)parts[p].n;
        int rc = linear(parts + p, x, M, tmp, is_bf16, threads);
        if (rc) return rc;
        for (int m = 0; m < M; m++) memcpy((char *)y + ((size_t)m * width + col) * el, tmp + (size_t)m * n * el, n * el);
        col += n;
    }
    return 0;
}

static size_t widest(const QvlLinear *parts, int n_parts) {
    size_t w = 0;
    for (int p = 0; p < n_parts; p++) w = (size_t)parts[p].n > w ? (size_t)parts[p].n : w;
    return w;
}

/* Elements of the activation dtype the work buffer holds for B rows (qvl_decode_layers' `work`). */
size_t qvl_decode_layers_work(const QvlLayer *layers, int n_layers, int B, int D, int H, int Hkv, int Dh, int I) {
    size_t tmp = 0;
    for (int i = 0; i < n_layers; i++) {
        size_t a = layers[i].n_qkv > 1 ? widest(layers[i].qkv, layers[i].n_qkv) : 0;
        tmp = a > tmp ? a : tmp;
    }
    /* s, h, x: [B, D]; qkv: [B, (H + 2 Hkv) Dh]; attention out: [B, H Dh]; gate/up: [B, 2 I];
     * silu x up: [B, I]; a q/k/v part's output before it joins the others */
    return (size_t)B * (3 * (size_t)D + (size_t)(H + 2 * Hkv) * Dh + (size_t)H * Dh + 3 * (size_t)I + tmp);
}

/* x [B, D] (the embeddings) -> out [B, D] (the final-normed hidden states), writing each layer's
 * k and v into its cache. Returns 0, or for the first call that fails -(10 * (layer + 1) + part),
 * part 1 norm, 2 q/k/v, 3 attention, 4 o, 5 norm, 6 gate/up, 7 SiLU x up, 8 down (the final norm
 * counts as part 1 of layer n_layers), so the caller can say which call refused. */
int qvl_decode_layers(const QvlLayer *layers, int n_layers, const QvlStep *st, const void *x, void *work,
                      void *out) {
    const int B = st->B, D = st->D, bf = st->is_bf16, nt = st->threads;
    const size_t el = bf ? 2 : 4, qkv_w = (size_t)(st->H + 2 * st->Hkv) * st->Dh, q_w = (size_t)st->H * st->Dh;
    char *p = (char *)work;
    char *s = p, *h = s + (size_t)B * D * el, *xx = h + (size_t)B * D * el, *qkv = xx + (size_t)B * D * el;
    char *att = qkv + (size_t)B * qkv_w * el, *gu = att + (size_t)B * q_w * el;
    char *act = gu + (size_t)B * 2 * st->I * el, *tmp = act + (size_t)B * st->I * el;
    const char *in = (const char *)x;
#define CHECK(part, call)                                                                                  \
    do {                                                                                                   \
        int rc_ = (call);                                                                                  \
        if (rc_) return -(10 * (i + 1) + (part));                                                          \
    } while (0)
    for (int i = 0; i < n_layers; i++) {
        const QvlLayer *ly = layers + i;
        if (ly->n_qkv < 1 || ly->n_qkv > 3 || ly->n_gate_up < 1 || ly->n_gate_up > 2) return -(10 * (i + 1));
        if (i == 0) { /* s = x: the stream starts at the embeddings */
            memcpy(s, in, (size_t)B * D * el);
            CHECK(1, qvl_rms_norm(s, NULL, NULL, ly->norm1, bf, B, D, ly->eps1, h));
        } else {
            CHECK(1, qvl_rms_norm(xx, s, s, ly->norm1, bf, B, D, ly->eps1, h));
        }
        CHECK(2, linear_parts(ly->qkv, ly->n_qkv, h, B, qkv, tmp, el, bf, nt));
        CHECK(3, qvl_decode_attention(qkv, qkv + q_w * el, qkv + (q_w + (size_t)st->Hkv * st->Dh) * el, (long)qkv_w,
                                      bf, B, st->H, st->Hkv, st->Dh, st->cos, st->sin, ly->k_cache, ly->v_cache,
                                      ly->k_scale, ly->v_scale, st->S, st->row0, st->write_pos, st->mask, st->L,
                                      st->scale, att, nt));
        CHECK(4, linear(&ly->o, att, B, xx, bf, nt));
        CHECK(5, qvl_rms_norm(xx, s, s, ly->norm2, bf, B, D, ly->eps2, h));
        if (ly->n_gate_up == 1) {
            CHECK(6, linear(ly->gate_up, h, B, gu, bf, nt));
            CHECK(7, qvl_silu_mul(gu, gu + (size_t)st->I * el, 2L * st->I, bf, B, st->I, act, nt));
        } else {
            char *up = gu + (size_t)B * st->I * el;
            CHECK(6, linear(ly->gate_up, h, B, gu, bf, nt));
            CHECK(6, linear(ly->gate_up + 1, h, B, up, bf, nt));
            CHECK(7, qvl_silu_mul(gu, up, st->I, bf, B, st->I, act, nt));
        }
        CHECK(8, linear(&ly->down, act, B, xx, bf, nt));
    }
    {
        const int i = n_layers;
        CHECK(1, qvl_rms_norm(xx, s, s, st->final_norm, bf, B, D, st->final_eps, out));
    }
#undef CHECK
    return 0;
}
