/* The residual rule (residual.py: residual_block) for float32 columns, in one compiled pass.

   Per column of an (n, c) row-major block: a stable sort of the n client values with their
   ranks, Siegel's repeated-median line through (rank, sorted value), the residuals, their MAD,
   the Huber reweights, their spread, and per client the confidence sum, the replaced count and
   the (client, column, line - y) of every replaced value. Same float32 operations, in the same
   order, as the torch code (tested equal), except the spread (std), summed in double here.

   The repeated median without its n(n-1)/2 divisions and n selections: float32 rounding is
   monotone, so "slope_ij = fl(D_ij / k) <= t" (D_ij = |fl(s_j - s_i)|, k = |i - j|) holds iff
   D_ij < B_k(t), the least float whose quotient by k rounds above t (found from the midpoint of
   t and its successor times k, exact in double, and one float32 division). Counting rows' slopes
   below two thresholds (compares only, 8 per instruction) tells which rows' medians lie below,
   inside or above; the thresholds are narrowed by interpolation on the candidate rows only (a
   side still open steps out geometrically; a bracket that stops losing rows ends the counting),
   and the few remaining candidates get their slopes divided and selected exactly. Columns where this
   does not settle (or with NaN, infinities or an overflowing range) are flagged: the Python code
   redoes them, so a surprise costs speed, never a wrong result.

   Built with the full sorting network of n lines (see _native.py), -ffp-contract=off. */
#include "_select.c"
#include <float.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#if !defined(NETWORK) || !defined(NETWORK_N) || LINE_BYTES != 32
#error "_residual.c needs the full sorting network of n lines and LINE_BYTES=32"
#endif

#define N NETWORK_N
#define NP ((N + 7) / 8 * 8) /* values padded to whole vectors (padding: NaN) */
#define NV (NP / 8)
#define WP (2 * NP + 8)    /* a row's window into the symmetric |i - j| table */
#define NR (NP + 8)        /* B tables by k cover k < NR */
#define BOFF 16            /* and k >= -BOFF (B = -inf for k <= 0: the pair never counts) */
#ifndef P0A /* the first pass's thresholds, times the estimate (tuned on Gaussian columns) */
#define P0A 1.0f
#define P0B 1.1f
#endif
#ifndef MGDIV /* margin in ranks around the wanted medians: 1 + candidates / MGDIV */
#define MGDIV 12
#endif
#ifndef EXT_MIN
#define EXT_MIN 0.03f
#endif
#ifndef EXACT_AT
#define EXACT_AT 12 /* candidates left when dividing their slopes beats another counting pass */
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int64_t v4l __attribute__((vector_size(32)));

static inline v8f ld8(const float *p) { v8f v; memcpy(&v, p, 32); return v; }
static inline v8i ld8i(const int32_t *p) { v8i v; memcpy(&v, p, 32); return v; }
static inline void st8i(int32_t *p, v8i v) { memcpy(p, &v, 32); }
static inline int mask8(v8i m) { /* bit l: lane l's sign */
#ifdef __AVX__
  return __builtin_ia32_movmskps256((v8f)m);
#else
  int bits = 0;
  for (int l = 0; l < 8; l++) bits |= (m[l] < 0) << l;
  return bits;
#endif
}
static inline v8f abs8(v8f v) { return (v8f)((v8i)v & 0x7fffffff); }
static inline float next_up(float t) { /* t >= 0 finite */
  int32_t i;
  memcpy(&i, &t, 4), i++, memcpy(&t, &i, 4);
  return t;
}
static inline float next_down(float t) { /* t > 0 */
  int32_t i;
  memcpy(&i, &t, 4), i--, memcpy(&t, &i, 4);
  return t;
}

typedef struct {
  _Alignas(32) float s[NP + 16];     /* sorted values, NaN padded */
  _Alignas(32) float kw[WP];         /* kw[N - 1 + m] = |m| as float: row i's k_j = kw[N-1-i+j] */
  _Alignas(32) float kh[NR + 16];    /* kh[k] = k */
  _Alignas(32) double kd[NR + 16];   /* kd[k] = k */
  _Alignas(32) float ba[BOFF + NR + 16], bb[BOFF + NR + 16]; /* B_k(t) at BOFF + k, k >= -BOFF */
  _Alignas(32) float ra[NR + 16], rb[NR + 16]; /* the same reversed: r[NR - k] = B_k, -inf for k <= 0 */
  _Alignas(32) int32_t cnt[NP + 16]; /* first pass: slopes <= ta, plus 65536 x slopes <= tb */
  v8i accs[N];                       /* per row: the same, by lane */
  _Alignas(32) int32_t cand[N + 16], cntlo[N + 16], cnthi[N + 16], ca[N + 16], cb[N + 16];
  _Alignas(32) int32_t pack[256 * 8]; /* pack[8 m:]: the lanes set in m first, for packing */
  _Alignas(32) float est[N + 16];
  float exact[N + 8], tmp[N + 24];
} rm_ctx;

/* B_k(t) for k = 1 .. NR + 15 (k <= 0: -inf, so no pair j <= i counts), for two thresholds
   at once: the float nearest mid * k (exact in double), or its successor where that one's own
   quotient by k does not round above t. */
static void b_tables(const rm_ctx *c, float ta, float tb, float *ba, float *bb) { /* at BOFF + k */
  double mida = ((double)ta + (double)next_up(ta)) * 0.5; /* t = FLT_MAX: inf, B = inf */
  double midb = ((double)tb + (double)next_up(tb)) * 0.5;
#ifdef __AVX2__
  __m256d ma = _mm256_set1_pd(mida), mb = _mm256_set1_pd(midb);
  __m256 tav = _mm256_set1_ps(ta), tbv = _mm256_set1_ps(tb);
  __m256i one = _mm256_set1_epi32(1);
  for (int m = 0; m < NR + 16; m += 8) {
    __m256d k0 = _mm256_load_pd(c->kd + m), k1 = _mm256_load_pd(c->kd + m + 4);
    __m256 k = _mm256_load_ps(c->kh + m);
    __m256 b0 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(_mm256_mul_pd(k0, ma))),
                                     _mm256_cvtpd_ps(_mm256_mul_pd(k1, ma)), 1);
    __m256 b1 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(_mm256_mul_pd(k0, mb))),
                                     _mm256_cvtpd_ps(_mm256_mul_pd(k1, mb)), 1);
    __m256 up0 = _mm256_cmp_ps(_mm256_div_ps(b0, k), tav, _CMP_GT_OQ); /* b0's quotient above t */
    __m256 up1 = _mm256_cmp_ps(_mm256_div_ps(b1, k), tbv, _CMP_GT_OQ);
    /* bits + 1 - [up]: b where its quotient rounds above t, else its successor (b >= 0) */
    __m256i r0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_castps_si256(b0), one), _mm256_castps_si256(up0));
    __m256i r1 = _mm256_add_epi32(_mm256_add_epi32(_mm256_castps_si256(b1), one), _mm256_castps_si256(up1));
    _mm256_store_si256((__m256i *)(ba + BOFF + m), r0);
    _mm256_store_si256((__m256i *)(bb + BOFF + m), r1);
  }
#else
  for (int m = 0; m < NR + 16; m++) {
    float k = c->kh[m], b0 = (float)(c->kd[m] * mida), b1 = (float)(c->kd[m] * midb);
    ba[BOFF + m] = b0 / k > ta ? b0 : next_up(b0);
    bb[BOFF + m] = b1 / k > tb ? b1 : next_up(b1);
  }
#endif
  for (int m = 0; m <= BOFF; m++) ba[m] = bb[m] = -INFINITY; /* k <= 0 */
}

/* r[m] = b[NR - m] (k = NR - m), -inf where k <= 0: row i's B by j < i is r[NR - i + j]. */
static void reverse_table(const float *b, float *r) {
  for (int m = 0; m < NR; m += 8) {
    v8f v = ld8(b + NR - m - 7);
    v = __builtin_shuffle(v, (v8i){7, 6, 5, 4, 3, 2, 1, 0});
    memcpy(r + m, &v, 32);
  }
  for (int m = NR; m < NR + 16; m++) r[m] = -INFINITY;
}

/* Sum of the 8 lanes. */
static inline int32_t hsum8(v8i v) {
  typedef int32_t v4i __attribute__((vector_size(16)));
  v4i x = (v4i){v[0], v[1], v[2], v[3]} + (v4i){v[4], v[5], v[6], v[7]};
  x += __builtin_shuffle(x, (v4i){2, 3, 0, 1});
  x += __builtin_shuffle(x, (v4i){1, 0, 3, 2});
  return x[0];
}

/* out[r] = the sum of the 8 lanes of acc[r], for r < rows (8 rows per few instructions). */
static void hsum_rows(const v8i *acc, int rows, int32_t *out) {
  int r = 0;
#ifdef __AVX2__
  for (; r + 8 <= rows; r += 8) {
    const __m256i *a = (const __m256i *)(acc + r);
    __m256i h01 = _mm256_hadd_epi32(_mm256_load_si256(a), _mm256_load_si256(a + 1));
    __m256i h23 = _mm256_hadd_epi32(_mm256_load_si256(a + 2), _mm256_load_si256(a + 3));
    __m256i h45 = _mm256_hadd_epi32(_mm256_load_si256(a + 4), _mm256_load_si256(a + 5));
    __m256i h67 = _mm256_hadd_epi32(_mm256_load_si256(a + 6), _mm256_load_si256(a + 7));
    __m256i q0 = _mm256_hadd_epi32(h01, h23), q1 = _mm256_hadd_epi32(h45, h67);
    /* q0 = [r0 r1 r2 r3 | r0 r1 r2 r3] halves, likewise q1 for rows 4-7: add the halves */
    __m256i lo = _mm256_permute2x128_si256(q0, q1, 0x20), hi = _mm256_permute2x128_si256(q0, q1, 0x31);
    _mm256_storeu_si256((__m256i *)(out + r), _mm256_add_epi32(lo, hi));
  }
#endif
  for (; r < rows; r++) out[r] = hsum8(acc[r]);
}

/* First pass, all rows: each pair once (j > i, D = s_j - s_i >= 0 as s is sorted), counted for
   both its rows; the two thresholds' counts packed in one int (low and high 16 bits). */
static void count_all(rm_ctx *c) {
  /* Aligned vectors of j from the one holding i + 1: lanes j <= i meet B = -inf (k <= 0) and
     never count, and each column count is read and written at the same aligned address (a
     store then a load that overlap unaligned would wait for the store to finish). */
  memset(c->cnt, 0, sizeof(c->cnt));
  int32_t row[N];
  v8i *accs = c->accs;
  int i = 0;
  for (; i + 3 < N - 1; i += 4) { /* 4 rows together: one load of s_j and one column update */
    v8f s0 = (v8f){0} + c->s[i], s1 = (v8f){0} + c->s[i + 1];
    v8f s2 = (v8f){0} + c->s[i + 2], s3 = (v8f){0} + c->s[i + 3];
    v8i a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    const float *ka = c->ba + BOFF - i, *kb = c->bb + BOFF - i; /* ka[j] = B_{j - i} */
    for (int j = (i + 1) / 8 * 8; j < N; j += 8) { /* rows i + 1.. from here too: k >= -9 */
      v8f sj = ld8(c->s + j), d0 = sj - s0, d1 = sj - s1, d2 = sj - s2, d3 = sj - s3;
      v8i u0 = (v8i)(d0 < ld8(ka + j)) + ((v8i)(d0 < ld8(kb + j)) << 16); /* NaN: never */
      v8i u1 = (v8i)(d1 < ld8(ka + j - 1)) + ((v8i)(d1 < ld8(kb + j - 1)) << 16);
      v8i u2 = (v8i)(d2 < ld8(ka + j - 2)) + ((v8i)(d2 < ld8(kb + j - 2)) << 16);
      v8i u3 = (v8i)(d3 < ld8(ka + j - 3)) + ((v8i)(d3 < ld8(kb + j - 3)) << 16);
      a0 -= u0, a1 -= u1, a2 -= u2, a3 -= u3;
      st8i(c->cnt + j, ld8i(c->cnt + j) - ((u0 + u1) + (u2 + u3)));
    }
    accs[i] = a0, accs[i + 1] = a1, accs[i + 2] = a2, accs[i + 3] = a3;
  }
  for (; i < N - 1; i++) {
    v8f si = (v8f){0} + c->s[i];
    v8i acc = {0};
    const float *ka = c->ba + BOFF - i, *kb = c->bb + BOFF - i;
    for (int j = (i + 1) / 8 * 8; j < N; j += 8) {
      v8f d = ld8(c->s + j) - si;
      v8i u = (v8i)(d < ld8(ka + j)) + ((v8i)(d < ld8(kb + j)) << 16);
      acc -= u;
      st8i(c->cnt + j, ld8i(c->cnt + j) - u);
    }
    accs[i] = acc;
  }
  accs[N - 1] = (v8i){0};
  hsum_rows(accs, N, row);
  for (int i = 0; i < N; i++) {
    int32_t both = c->cnt[i] + row[i];
    c->ca[i] = both & 0xffff, c->cb[i] = both >> 16;
  }
}

/* Slopes of row i at most t_a plus 65536 x those at most t_b, per lane (tables ba, bb and
   reversed ra, rb). */
static inline v8i count2(const rm_ctx *c, int i) {
  v8f si = (v8f){0} + c->s[i];
  v8i acc = {0}, accb = {0}; /* packed once at the end: one instruction less per vector */
  const float *sj = c->s + i + 1, *ka = c->ba + BOFF + 1, *kb = c->bb + BOFF + 1;
  for (int v = 0, nv = (N - 1 - i + 7) / 8; v < nv; v++) { /* j > i; NaN padding never counts */
    v8f d = ld8(sj + 8 * v) - si;
    acc += (v8i)(d < ld8(ka + 8 * v)), accb += (v8i)(d < ld8(kb + 8 * v));
  }
  const float *wa = c->ra + NR - i, *wb = c->rb + NR - i;
  for (int v = 0, nv = (i + 7) / 8; v < nv; v++) { /* j < i; B = -inf for j >= i */
    v8f d = si - ld8(c->s + 8 * v);
    acc += (v8i)(d < ld8(wa + 8 * v)), accb += (v8i)(d < ld8(wb + 8 * v));
  }
  return -acc - (accb << 16);
}

/* About the ka-th and kb-th smallest of est[0:nc] (est padded with +inf): bisection on the
   value with vector counts, as the thresholds need not be exact (a quickselect mispredicts). */
static void pick2(const float *est, int nc, int ka, int kb, float *ta, float *tb) {
  int nv = (nc + 7) / 8;
  v8f mn = (v8f){0} + INFINITY, mx = (v8f){0} - INFINITY;
  for (int v = 0; v < nv; v++) {
    v8f e = ld8(est + 8 * v);
    v8i fin = (v8i)(e < INFINITY);
    mn = (v8f)(((v8i)(e < mn) & (v8i)e) | (~(v8i)(e < mn) & (v8i)mn));
    mx = (v8f)((fin & (v8i)(e > mx) & (v8i)e) | (~(fin & (v8i)(e > mx)) & (v8i)mx));
  }
  float lo0 = mn[0], hi0 = mx[0];
  for (int l = 1; l < 8; l++) lo0 = mn[l] < lo0 ? mn[l] : lo0, hi0 = mx[l] > hi0 ? mx[l] : hi0;
  float alo = lo0, ahi = hi0, blo = lo0, bhi = hi0;
  for (int it = 0; it < 4; it++) { /* two independent chains, 3 probes each (1/4 per step) */
    float as = (ahi - alo) * 0.25f, bs = (bhi - blo) * 0.25f;
    float pa[3] = {alo + as, alo + 2 * as, alo + 3 * as}, pb[3] = {blo + bs, blo + 2 * bs, blo + 3 * bs};
    v8i acc[3] = {{0}, {0}, {0}};
    for (int v = 0; v < nv; v++) {
      v8f e = ld8(est + 8 * v);
      for (int p = 0; p < 3; p++)
        acc[p] -= (v8i)(e <= pa[p]) + ((v8i)(e <= pb[p]) << 16);
    }
    float nalo = alo, nahi = ahi, nblo = blo, nbhi = bhi;
    for (int p = 2; p >= 0; p--) { /* the smallest probe reaching the rank, the largest not */
      int32_t both = hsum8(acc[p]);
      int ina = (both & 0xffff) > ka, inb = (both >> 16) > kb;
      nahi = ina ? pa[p] : nahi, nblo = inb ? nblo : (nblo > pb[p] ? nblo : pb[p]);
      nbhi = inb ? pb[p] : nbhi, nalo = ina ? nalo : (nalo > pa[p] ? nalo : pa[p]);
    }
    alo = nalo, ahi = nahi, blo = nblo, bhi = nbhi;
  }
  *ta = ahi, *tb = bhi;
}

/* The ka-th and kb-th smallest (0 <= ka, kb < len) of v[0:len] (room for 8 more): the largest
   x whose count of values below it is at most the rank, counted 8 x at a time with no branches
   (a sort of these few values mispredicts). */
static void kth2(float *v, int len, int ka, int kb, float *a, float *b) {
  v8f inf = (v8f){0} + INFINITY, ma = -inf, mb = -inf;
  memcpy(v + len, &inf, 32);
  for (int xv = 0; xv < len; xv += 8) {
    v8f x = ld8(v + xv);
    v8i lt = {0};
    for (int y = 0; y < len; y++) lt -= (v8i)((v8f){0} + v[y] < x);
    v8i ia = lt <= ka, ib = lt <= kb;
    ia &= (v8i)(x > ma), ib &= (v8i)(x > mb); /* the running maxima of the qualifying x */
    ma = (v8f)((ia & (v8i)x) | (~ia & (v8i)ma)), mb = (v8f)((ib & (v8i)x) | (~ib & (v8i)mb));
  }
  float ra = ma[0], rb = mb[0];
  for (int l = 1; l < 8; l++) ra = ma[l] > ra ? ma[l] : ra, rb = mb[l] > rb ? mb[l] : rb;
  *a = ra, *b = rb;
}

/* Row i's median slope exactly (its two middle ranks q1 <= q2 in [cl - 1, ch]), given cl =
   #slopes <= lo, ch = #slopes <= hi: the slopes in (lo, hi] sorted, with the largest below and
   the smallest above; NaN if the divisions disagree with those counts (then the column is left
   to the caller). */
static float row_median(rm_ctx *c, int i, float lo, float hi, int cl, int ch, int q1, int q2) {
  v8f si = (v8f){0} + c->s[i], lov = (v8f){0} + lo, hiv = (v8f){0} + hi;
  const float *kw = c->kw + (N - 1 - i);
  float *tmp = c->tmp;
  int len = 0;
  for (int v = 0; v < NV; v++) { /* the slopes in (lo, hi], packed */
    v8f sl = abs8(ld8(c->s + 8 * v) - si) / ld8(kw + 8 * v); /* self: 0/0 = NaN, padding NaN */
    unsigned bits = (unsigned)mask8((v8i)(sl > lov) & (v8i)(sl <= hiv)); /* NaN: never in */
    v8f packed = (v8f)__builtin_shuffle((v8i)sl, ld8i(c->pack + 8 * bits)); /* no branches */
    memcpy(tmp + (len < N ? len : N), &packed, 32);
    len += __builtin_popcount(bits);
  }
  if (len != ch - cl) return NAN;
  int ka = q1 - cl, kb = q2 - cl; /* ranks in tmp; -1: the largest slope <= lo, len: the smallest > hi */
  float a, b;
  kth2(tmp, len, ka < 0 ? 0 : ka, kb < 0 ? 0 : kb, &a, &b);
  if (ka < 0 || kb >= len) { /* a middle rank just outside the window (odd n only): find it */
    v8f under = (v8f){0} - INFINITY, over = (v8f){0} + INFINITY;
    for (int v = 0; v < NV; v++) {
      v8f sl = abs8(ld8(c->s + 8 * v) - si) / ld8(kw + 8 * v);
      v8i le = (v8i)(sl <= lov) & (v8i)(sl > under), gt = (v8i)(sl > hiv) & (v8i)(sl < over);
      under = (v8f)((le & (v8i)sl) | (~le & (v8i)under)); /* NaN compares false: never taken */
      over = (v8f)((gt & (v8i)sl) | (~gt & (v8i)over));
    }
    float u = under[0], o = over[0];
    for (int l = 1; l < 8; l++) u = under[l] > u ? under[l] : u, o = over[l] < o ? over[l] : o;
    a = ka < 0 ? u : ka >= len ? o : a;
    b = kb < 0 ? u : kb >= len ? o : b;
  }
  return q1 == q2 ? a : (a + b) / 2;
}

/* The repeated-median slope med_i med_{j != i} slope_ij of sorted finite s; 0 if settled. */
static int rm_slope(rm_ctx *c, float est, float *out) {
  const int q1 = (N - 2) / 2, q2 = (N - 1) / 2; /* the middle of a row's n - 1 slopes */
  const int r1 = (N - 1) / 2, r2 = N / 2;       /* the middle of the n row medians */
  const int odd = q1 < q2;
  const float qmid = 0.5f * (float)(q1 + q2) + 0.5f;
  int nc = N, below = 0;                        /* candidates; rows known <= lo */
  float lo = -1.0f, hi = INFINITY;              /* slopes are >= 0: -1 is "no bound yet" */
  /* By candidate position x: its row, slopes <= lo and <= hi, <= ta and <= tb, estimate. */
  int *cand = c->cand, *cl = c->cntlo, *ch = c->cnthi, *ca = c->ca, *cb = c->cb;
  for (int i = 0; i < N + 8; i++) cand[i] = i, cl[i] = 0, ch[i] = N - 1;
  float ta = est * P0A, tb = est * P0B; /* est / answer: 0.89-1.01 for 80% of Gaussian columns */
  float step = 0.08f; /* relative step while one side of the bracket is open */
  for (int pass = 0; pass < 12 && nc > EXACT_AT; pass++) {
    float floor_ = lo < 0 ? 0.0f : next_up(lo), roof = hi == INFINITY ? FLT_MAX : next_down(hi);
    if (hi == 0.0f || floor_ > roof) break; /* no float strictly inside: exact from here */
    if (!(ta >= floor_)) ta = floor_;       /* also catches NaN */
    if (!(ta <= roof)) ta = roof;
    if (!(tb >= ta)) tb = ta;
    if (!(tb <= roof)) tb = roof;
    b_tables(c, ta, tb, c->ba, c->bb);
    if (pass == 0) {
      count_all(c); /* by row = by candidate position */
    } else {
      reverse_table(c->ba + BOFF, c->ra);
      reverse_table(c->bb + BOFF, c->rb);
      for (int x = 0; x < nc; x++) c->accs[x] = count2(c, cand[x]);
      int32_t both[N];
      hsum_rows(c->accs, nc, both);
      for (int x = 0; x < nc; x++) ca[x] = both[x] & 0xffff, cb[x] = both[x] >> 16;
    }
    for (int x = nc; x < nc + 8; x++) ca[x] = cb[x] = 0; /* padding: neither below nor uncertain */
    v8i vsa = {0}, vua = {0}, vsb = {0}, vub = {0}; /* surely <= t, uncertain (odd n) */
    for (int x = 0; x < nc; x += 8) {
      v8i va = ld8i(ca + x), vb = ld8i(cb + x);
      vsa -= va > q2, vsb -= vb > q2;
      if (odd) vua -= va == q2, vub -= vb == q2;
    }
    int sa = hsum8(vsa), ua = hsum8(vua), sb = hsum8(vsb), ub = hsum8(vub);
    /* New bounds: lo while the r1-th median surely lies above it, hi once the r2-th is below. */
    int new_lo = 0, new_hi = 0; /* 0: unchanged, 1: ta, 2: tb */
    if (below + sb + ub <= r1) new_lo = 2;
    else if (below + sa + ua <= r1) new_lo = 1;
    if (below + sa >= r2 + 1) new_hi = 1;
    else if (below + sb >= r2 + 1) new_hi = 2;
    if (!new_lo && !new_hi) break; /* both between the middle ranks: exact from here */
    /* Keep the rows whose median may lie in the new (lo, hi], 8 at a time, packed by a table
       of permutations (the outcomes are coin flips: branches would mispredict). */
    const int *lo_by = new_lo == 1 ? ca : new_lo == 2 ? cb : cl;
    const int *hi_by = new_hi == 1 ? ca : new_hi == 2 ? cb : ch;
    v8f vta = (v8f){0} + ta, vspan = (v8f){0} + (tb - ta), vq = (v8f){0} + qmid;
    /* Rows beyond both thresholds: a step of at least EXT_MIN of the threshold (tb may equal ta). */
    float ext = tb - ta > tb * EXT_MIN ? tb - ta : tb * EXT_MIN;
    v8f vtb = (v8f){0} + tb, vext = (v8f){0} + ext;
    int keep = 0;
    v8i vbelow = {0}; /* minus the rows found <= the new lo, by lane */
    for (int x = 0; x < nc; x += 8) {
      v8i vl = ld8i(lo_by + x), vh = ld8i(hi_by + x), va = ld8i(ca + x), vb = ld8i(cb + x);
      v8i vc = ld8i(cand + x);
      v8i lane = (v8i){0, 1, 2, 3, 4, 5, 6, 7} + x;
      v8i under_lo = vl > q2, gone = under_lo | (vh <= q1) | (lane >= nc);
      vbelow += under_lo & (lane < nc);
      v8f fa = __builtin_convertvector(va, v8f), fb = __builtin_convertvector(vb, v8f);
      v8i inside = vb > va;
      v8f den = (v8f)((inside & (v8i)(fb - fa)) | (~inside & (v8i)((v8f){0} + 1.0f)));
      v8f e = vta + vspan * ((vq - fa) / den);
      v8f outside = (v8f)((v8i)(fa > vq) & (v8i)(vta - vext)) + (v8f)(~(v8i)(fa > vq) & (v8i)(vtb + vext));
      e = (v8f)((inside & (v8i)e) | (~inside & (v8i)outside));
      unsigned m = (unsigned)mask8(~gone);
      v8i perm = ld8i(c->pack + 8 * m);
      st8i(cand + keep, __builtin_shuffle(vc, perm));
      st8i(cl + keep, __builtin_shuffle(vl, perm));
      st8i(ch + keep, __builtin_shuffle(vh, perm));
      v8f pe = (v8f)__builtin_shuffle((v8i)e, perm);
      memcpy(c->est + keep, &pe, 32);
      keep += __builtin_popcount(m);
    }
    below -= hsum8(vbelow);
    float lo2 = new_lo == 1 ? ta : new_lo == 2 ? tb : lo, hi2 = new_hi == 1 ? ta : new_hi == 2 ? tb : hi;
    /* A two-sided bracket that lost no candidate only crept (its thresholds were clamped to
       it): dividing is cheaper than creeping on. */
    int progress = keep < nc || ((lo2 != lo || hi2 != hi) && (lo < 0 || hi == INFINITY));
    nc = keep, lo = lo2, hi = hi2;
    if (!progress || nc <= EXACT_AT) break;
    /* Next thresholds: the candidates' estimated medians a little outside the wanted ranks. */
    int mg = 1 + nc / MGDIV, ka = r1 - below - mg, kb = r2 - below + mg;
    ka = ka < 0 ? 0 : ka, kb = kb > nc - 1 ? nc - 1 : kb;
    for (int x = nc; x < nc + 8; x++) c->est[x] = INFINITY;
    if (nc <= 40) kth2(c->est, nc, ka, kb, &ta, &tb); /* exact, and cheaper for few */
    else pick2(c->est, nc, ka, kb, &ta, &tb);
    ta = ta - (tb - ta) * 0.05f, tb = tb + (tb - ta) * 0.05f;
    if (hi != INFINITY && lo >= 0 && !(ta > lo && tb < hi)) { /* estimates outside: interpolate */
      float span = hi - lo, fa = (float)(r1 - below - mg) / nc, fb = (float)(r2 + 1 - below + mg) / nc;
      ta = lo + span * (fa < 0 ? 0 : fa), tb = lo + span * (fb > 1 ? 1 : fb);
    } else if (lo < 0 && !(tb < hi)) { /* no lower bound yet: step down from hi, further each time */
      ta = hi * (1 - step), tb = hi * (1 - step / 4), step *= 2;
    } else if (hi == INFINITY && !(ta > lo)) { /* no upper bound yet: step up from lo */
      ta = lo * (1 + step / 4), tb = lo * (1 + step), step *= 2;
    }
  }
  /* The candidates' medians exactly, then the r1-th and r2-th of all n. */
  int under = 0, over = 0; /* candidates that still fall <= lo or > hi (odd n only) */
  for (int x = 0; x < nc; x++) {
    float m = row_median(c, cand[x], lo, hi, cl[x], ch[x], q1, q2);
    if (m != m) return 1;
    c->exact[x] = m;
    under += m <= lo, over += m > hi;
  }
  if (r1 < below + under || r2 >= below + nc - over) return 1;
  float a, b;
  kth2(c->exact, nc, r1 - below, r2 - below, &a, &b);
  *out = r1 == r2 ? a : (a + b) / 2;
  return 0;
}

static rm_ctx *new_ctx(void) {
  rm_ctx *ctx = ALLOC(sizeof(rm_ctx));
  if (!ctx) return NULL;
  for (int m = 0; m < WP; m++) ctx->kw[m] = m < 2 * N - 1 ? fabsf((float)(m - (N - 1))) : 1.0f;
  for (int m = 0; m < NR + 16; m++) ctx->kh[m] = (float)m, ctx->kd[m] = (double)m;
  for (int m = 0; m < 256; m++)
    for (int l = 0, k = 0; l < 8; l++) {
      if (m >> l & 1) ctx->pack[8 * m + k++] = l;
      if (l == 7)
        while (k < 8) ctx->pack[8 * m + k++] = 0;
    }
  for (int m = N; m < NP + 16; m++) ctx->s[m] = NAN;
  return ctx;
}

/* The repeated-median slope of the sorted values in ctx->s[0:N] (0 if they are all equal);
   0 if settled, else 1 (non-finite values, an overflowing range, an unsettled median). */
static int column_slope(rm_ctx *ctx, float *slope) {
  float range = ctx->s[N - 1] - ctx->s[0];
  if (!(range - range == 0)) return 1; /* NaN, infinities, or inf slopes */
  *slope = 0.0f;
  if (range == 0) return 0;
  int a = N / 5;
  float est = (ctx->s[N - 1 - a] - ctx->s[a]) / (float)(N - 1 - 2 * a);
  if (!(est > 0)) est = range / (float)(N - 1);
  return rm_slope(ctx, est, slope);
}

/* The repeated-median slope of each sorted row of s (c, n): for tests against numpy. */
int fs_rm_slope_f32(const float *s, int64_t n, int64_t c, float *out, uint8_t *unclear) {
  if (n != N) return 2;
  rm_ctx *ctx = new_ctx();
  if (!ctx) return 1;
  for (int64_t j = 0; j < c; j++) {
    memcpy(ctx->s, s + j * N, N * sizeof(float));
    out[j] = NAN;
    unclear[j] = (uint8_t)column_slope(ctx, out + j);
  }
  free(ctx);
  return 0;
}

/* Byte r bit c -> byte c bit r (Hacker's Delight, 7-7). */
static inline uint64_t transpose8x8(uint64_t x) {
  uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
  x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
  x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
  return x ^ t ^ (t << 28);
}

/* Sort keys of 8 finite float32 values of one row, as two vectors of 4 doubles whose order is
   (value, row): the value's order-preserving bits above the row, under the exponent of 2^52
   (a double 2^52 + integer, exact, compared as numbers). -0 and +0 tie, as in a stable sort. */
static inline void sort_keys(v8f v, int64_t row, v4l *k0, v4l *k1) {
  v8i b = (v8i)(v + 0.0f); /* -0 -> +0 */
  v8i u = b ^ ((b >> 31) | ((v8i){0} + INT32_MIN));
  typedef uint32_t v8u __attribute__((vector_size(32)));
  typedef uint32_t v4u __attribute__((vector_size(16)));
  v8u w = (v8u)u;
  v4l lo = __builtin_convertvector((v4u){w[0], w[1], w[2], w[3]}, v4l);
  v4l hi = __builtin_convertvector((v4u){w[4], w[5], w[6], w[7]}, v4l);
  v4l tag = (v4l){0} + (0x4330000000000000LL | row);
  *k0 = (lo << 9) | tag, *k1 = (hi << 9) | tag;
}

/* x: (n, c) block with row stride ld; h[r]: leverage root of rank r (torch's values); consts:
   c0 = float32 of 1.4826 (1 + 5/(n-1)), eps = float32 of 1e-7, kk = float32 of lam sqrt(2/n),
   thr = float32 of thresh. Accumulates conf (n) and replaced (n); writes the replaced values as
   (column * n + client, line - y) into fix_at / fix_val (capacity n * c) and their number to
   *nfix; unclear[j] = 1 for columns left to the caller. Returns 1 on allocation failure, 2 if
   built for another n. */
int fs_residual_f32(const float *x, int64_t ld, int64_t n, int64_t c, const float *h, float c0,
                    float eps, float kk, float thr, double *conf, int64_t *replaced,
                    int64_t *fix_at, float *fix_val, int64_t *nfix, uint8_t *unclear) {
  if (n != N || N > 511) return 2;
  rm_ctx *ctx = new_ctx();
  if (!ctx) return 1;
  _Alignas(32) float y[N][8], rank[N][8], hr[N][8], res[N][8], ar[N][8], sorted[8][N];
  _Alignas(32) int64_t key[N][4], key2[N][4];
  /* Rows are copied a panel of PANEL columns at a time (sequential reads; rows of x are often
     2^k bytes apart, which maps a tile's rows all to one cache set), row stride SP. */
  enum { PANEL = 128, SP = PANEL + 8 };
  float *stage = ALLOC((size_t)N * SP * sizeof(float));
  if (!stage) {
    free(ctx);
    return 1;
  }
  int64_t count = 0;
  for (int64_t j0 = 0; j0 < c; j0 += 8) {
    int w = c - j0 < 8 ? (int)(c - j0) : 8;
    int64_t p0 = j0 / PANEL * PANEL;
    if (j0 == p0) {
      int64_t pw = c - p0 < PANEL ? c - p0 : PANEL;
      for (int i = 0; i < N; i++) {
        memcpy(stage + i * SP, x + i * ld + p0, (size_t)pw * sizeof(float));
        memset(stage + i * SP + pw, 0, (size_t)(SP - pw) * sizeof(float)); /* padding: finite */
      }
    }
    v8i fin = (v8i){0} == 0;
    for (int i = 0; i < N; i++) {
      v8f v = ld8(stage + i * SP + (j0 - p0));
      memcpy(y[i], &v, 32);
      fin &= (v8i)(v - v == 0); /* finite */
    }
    int ok[8];
    for (int l = 0; l < 8; l++) ok[l] = l < w && fin[l];
    /* Stable sort with ranks: 4 columns per sort of exact double keys (value, row). */
    for (int i = 0; i < N; i++) {
      v8f v = ld8(y[i]);
      v = (v8f)((v8i)v & (v8i)(v - v == 0)); /* a non-finite value sorts as 0 (column redone) */
      sort_keys(v, i, (v4l *)key[i], (v4l *)key2[i]);
    }
    for (int half = 0; half < 2; half++) {
      v4l *kv = (v4l *)(half ? key2 : key);
      fs_window_f64_sort((fs_window_f64_vec *)kv);
      for (int r = 0; r < N; r++)
        for (int l = 0; l < 4; l++) {
          int row = (int)(kv[r][l] & 511);
          sorted[half * 4 + l][r] = y[row][half * 4 + l]; /* by column: copied whole below */
          rank[row][half * 4 + l] = (float)r;
          hr[row][half * 4 + l] = h[r]; /* the leverage root of the row's rank */
        }
    }
    float slope[8], icpt[8];
    for (int l = 0; l < 8; l++) {
      slope[l] = icpt[l] = 0;
      if (!ok[l]) continue;
      memcpy(ctx->s, sorted[l], sizeof(sorted[l]));
      float sl;
      if (column_slope(ctx, &sl)) { ok[l] = 0; continue; }
      float med = (N % 2) ? ctx->s[(N - 1) / 2] : (ctx->s[(N - 1) / 2] + ctx->s[N / 2]) / 2;
      float half_run = sl * (float)(N - 1);
      half_run = half_run / 2;
      slope[l] = sl, icpt[l] = med - half_run;
    }
    v8f sv = ld8(slope), iv = ld8(icpt);
    for (int i = 0; i < N; i++) {
      v8f prod = sv * ld8(rank[i]);
      v8f line = iv + prod;
      v8f e = ld8(y[i]) - line;
      memcpy(res[i], &e, 32);
      e = abs8(e);
      memcpy(ar[i], &e, 32);
    }
    fs_window_f32_sort((fs_window_f32_vec *)ar);
    /* MAD over the n - 1 largest |residuals|: sorted positions 1 + (n-2)/2 and 1 + (n-1)/2. */
    v8f mad = ld8(ar[1 + (N - 2) / 2]);
    if ((N - 1) % 2 == 0) mad = (mad + ld8(ar[1 + (N - 1) / 2])) / 2;
    v8f scale = mad * c0;
    scale = scale + eps;
    _Alignas(32) float rw[N][8];
    v4d sum0 = {0}, sum1 = {0}, sq0 = {0}, sq1 = {0}; /* per column, in double, lanes 0-3 and 4-7 */
    v8f below = {0}; /* columns with any reweight below thresh */
    uint8_t lowbits[NP] = {0}; /* bit l of row i: its reweight in column l is below thresh */
    for (int i = 0; i < N; i++) {
      v8f hv = ld8(hr[i]);
      v8f z = ld8(res[i]) / scale;
      z = z / hv;
      v8f inv = 1.0f / abs8(z);
      v8f r = inv * kk;
      v8i lt = (v8i)(r < 1.0f); /* torch's clamp(max=1); r is never NaN here */
      r = (v8f)((lt & (v8i)r) | (~lt & (v8i)((v8f){0} + 1.0f)));
      memcpy(rw[i], &r, 32);
      v8i lo_r = (v8i)(r < thr);
      below = (v8f)((v8i)below | lo_r);
      lowbits[i] = (uint8_t)mask8(lo_r);
      sum0 += __builtin_convertvector((v4f){r[0], r[1], r[2], r[3]}, v4d);
      sum1 += __builtin_convertvector((v4f){r[4], r[5], r[6], r[7]}, v4d);
    }
    v4d mean0 = sum0 / N, mean1 = sum1 / N; /* the spread as torch's std: two passes in double */
    for (int i = 0; i < N; i++) {
      v8f r = ld8(rw[i]);
      v4d d0 = __builtin_convertvector((v4f){r[0], r[1], r[2], r[3]}, v4d) - mean0;
      v4d d1 = __builtin_convertvector((v4f){r[4], r[5], r[6], r[7]}, v4d) - mean1;
      sq0 += d0 * d0, sq1 += d1 * d1;
    }
    float std_[8];
    for (int l = 0; l < 8; l++) std_[l] = (float)sqrt((l < 4 ? sq0[l] : sq1[l - 4]) / (N - 1));
    for (int l = 0; l < w; l++) unclear[j0 + l] = (uint8_t)!ok[l];
    v8f sv8 = ld8(std_);
    for (int l = 0; l < 8; l++) if (!ok[l]) sv8[l] = 0; /* left to the caller: adds nothing */
    for (int i = 0; i < N; i++) {
      v8f prod = ld8(rw[i]) * sv8; /* float32 products, as torch's, then summed in double */
      v4d p0 = __builtin_convertvector((v4f){prod[0], prod[1], prod[2], prod[3]}, v4d);
      v4d p1 = __builtin_convertvector((v4f){prod[4], prod[5], prod[6], prod[7]}, v4d);
      p0 += p1;
      conf[i] += (p0[0] + p0[2]) + (p0[1] + p0[3]);
    }
    /* The rows below thresh by column (8 x 8 bit blocks transposed): visiting only those
       leaves no data-dependent branch per value (they mispredicted). */
    uint64_t bycol[NV];
    for (int g = 0; g < NV; g++) {
      uint64_t b;
      memcpy(&b, lowbits + 8 * g, 8);
      bycol[g] = transpose8x8(b);
    }
    for (int l = 0; l < w; l++) { /* column by column: the order of torch's nonzero() */
      if (!ok[l] || !((v8i)below)[l]) continue;
      for (int g = 0; g < NV; g++)
        for (unsigned m = (unsigned)(bycol[g] >> (8 * l)) & 255; m; m &= m - 1) {
          int i = 8 * g + __builtin_ctz(m);
          float line = icpt[l] + slope[l] * rank[i][l];
          replaced[i]++;
          fix_at[count] = (j0 + l) * N + i;
          fix_val[count++] = line - y[i][l];
        }
    }
  }
  *nfix = count;
  free(stage);
  free(ctx);
  return 0;
}
