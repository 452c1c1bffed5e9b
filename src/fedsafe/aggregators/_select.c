/* Column-wise order statistics for the coordinate-wise aggregation rules (see _native.py).

   For every column j of an (n, d) row-major matrix (rows picked by `rows`), sort the n values
   with a sorting network applied to LINE_BYTES worth of adjacent columns at once -- SIMD
   compare + blend on GCC/Clang vector types, with no transpose and no per-column call -- then
   average sorted positions [start_j, start_j + size) and count, per row, in how many columns
   its value lies in that run (lo <= x <= hi, or x == lo for a run of one).

   The Python side builds the network (pairs: the first line gets the min, the second the max)
   and redoes the columns flagged `unclear` with the torch code, exactly as the numpy kernel
   does: a column is unclear when it holds a non-finite value or when a run end ties with the
   value just outside the run (then which client "was used" depends on how a sort orders ties).

   The file includes itself once per element type (float, double) to define both kernels.
*/
#ifndef T
#include <math.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VBYTES 32     /* one AVX register; wider GCC vector types compile to scalar code on AVX2 */
#ifndef LINE_BYTES
#define LINE_BYTES 128 /* columns per tile: 32 floats or 16 doubles (tuned on an AVX2 CPU) */
#endif
#ifndef STAGE_BYTES
#define STAGE_BYTES (256 * 1024) /* a panel of rows that stays in L2 */
#endif

/* C11 wants sizes that are multiples of the alignment (glibc does not check; others return NULL). */
#define ALLOC(bytes) aligned_alloc(64, ((size_t)(bytes) + 63) / 64 * 64)

#define T float
#define I int32_t
#define NAME fs_window_f32
#include __FILE__
#undef T
#undef I
#undef NAME

#define T double
#define I int64_t
#define NAME fs_window_f64
#include __FILE__

#else /* the kernel for element type T (I: the integer type of the same size) */

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define V CAT(NAME, _vec)
#define M CAT(NAME, _mask)
#define CX CAT(NAME, _cx)
typedef T V __attribute__((vector_size(VBYTES)));
typedef I M __attribute__((vector_size(VBYTES)));

/* One comparator: *a gets the lane-wise min, *b the max. Where u < v is false (u >= v, or a
   NaN: such columns are redone anyway) the lane swaps. */
static inline void CX(V *a, V *b) {
  V u = *a, v = *b;
#ifdef __AVX__ /* minps/maxps: exactly u < v ? u : v and u > v ? u : v, one instruction each */
  if (sizeof(T) == 4) {
    *a = (V)__builtin_ia32_minps256((__v8sf)u, (__v8sf)v);
    *b = (V)__builtin_ia32_maxps256((__v8sf)u, (__v8sf)v);
  } else {
    *a = (V)__builtin_ia32_minpd256((__v4df)u, (__v4df)v);
    *b = (V)__builtin_ia32_maxpd256((__v4df)u, (__v4df)v);
  }
#else /* compare + blend on any SIMD target */
  M lt = u < v, ui = (M)u, vi = (M)v;
  *a = (V)((ui & lt) | (vi & ~lt));
  *b = (V)((vi & lt) | (ui & ~lt));
#endif
}

#ifdef NETWORK /* one n's network as straight-line code (see _native.py): lines live in registers */
static inline void CAT(NAME, _sort)(V *buf) {
#include NETWORK
}
#endif

int NAME(const T *x, int64_t ld, const int64_t *rows, int64_t n, int64_t c, const int32_t *net,
         int64_t ncomp, int64_t start, int64_t size, int64_t bulyan_f, T *values,
         uint8_t *unclear, int64_t *counts) {
  enum { L = LINE_BYTES / sizeof(T), NV = LINE_BYTES / VBYTES, VL = VBYTES / sizeof(T) };
#ifdef NETWORK
  if (n != NETWORK_N || NV != 1) return 2; /* built for another n */
#endif
  /* Rows are copied a panel of P columns at a time into `stage` (sequential reads, which the
     hardware prefetches; rows of x are often 2^k bytes apart, which maps them all to one cache
     set), then sorted a tile of L columns at a time. One line = one row's values in a tile. */
  int64_t P = (int64_t)(STAGE_BYTES / sizeof(T)) / (n > 0 ? n : 1) / L * L;
  if (P < L) P = L;
  int64_t SP = P + L; /* staged row stride: not a multiple of 4 KiB */
  T *stage = ALLOC((size_t)n * SP * sizeof(T));
  V *buf = ALLOC((size_t)n * LINE_BYTES); /* being sorted */
  M *acc = ALLOC((size_t)n * LINE_BYTES); /* minus the use counts, per lane */
  if (!buf || !stage || !acc) {
    free(buf), free(stage), free(acc);
    return 1;
  }
  memset(acc, 0, (size_t)n * LINE_BYTES);
  T *sorted = (T *)buf;
  for (int64_t p0 = 0; p0 < c; p0 += P) {
    int64_t pw = c - p0 < P ? c - p0 : P;
    for (int64_t i = 0; i < n; i++) {
      memcpy(stage + i * SP, x + rows[i] * ld + p0, pw * sizeof(T));
      memset(stage + i * SP + pw, 0, (SP - pw) * sizeof(T)); /* padding lanes: any finite value */
    }
  for (int64_t j0 = p0; j0 < p0 + pw; j0 += L) {
    int64_t w = p0 + pw - j0 < L ? p0 + pw - j0 : L;
#define LINE(i) (stage + (i) * SP + (j0 - p0))
    M finite[NV];
    for (int h = 0; h < NV; h++) finite[h] = (M){0} == 0;
    for (int64_t i = 0; i < n; i++) {
      for (int h = 0; h < NV; h++) {
        V v;
        memcpy(&v, LINE(i) + h * VL, VBYTES);
        buf[i * NV + h] = v;
        finite[h] &= v - v == 0; /* false for NaN and +-inf */
      }
    }
#ifdef NETWORK
    (void)net, (void)ncomp;
    CAT(NAME, _sort)(buf); /* NV == 1: the generated code works on one register per line */
#else
    for (int64_t k = 0; k < ncomp; k++)
      for (int h = 0; h < NV; h++) CX(buf + net[2 * k] * NV + h, buf + net[2 * k + 1] * NV + h);
#endif
    int64_t first[L];
    _Alignas(64) T lo[L], hi[L];
    for (int l = 0; l < L; l++) {
      first[l] = start;
      if (bulyan_f >= 0) { /* the run [j, j + size) whose farthest member is nearest the median */
        T med = (sorted[((n - 1) / 2) * L + l] + sorted[(n / 2) * L + l]) / 2, best = 0;
        for (int64_t j = 0; j <= 2 * bulyan_f; j++) {
          T below = med - sorted[j * L + l], above = sorted[(size - 1 + j) * L + l] - med;
          T reach = below < above ? above : below;
          if (j == 0 || reach < best) best = reach, first[l] = j;
        }
      }
      int64_t s0 = first[l], s1 = s0 + size - 1;
      T a = sorted[s0 * L + l], b = sorted[s1 * L + l];
      int bad = !((I *)finite)[l] || l >= w;
      bad |= s0 > 0 && !(sorted[(s0 - 1) * L + l] < a);
      bad |= s1 + 1 < n && !(b < sorted[(s1 + 1) * L + l]);
      lo[l] = bad ? (T)NAN : a; /* NaN equals nothing: such columns count no row here */
      hi[l] = bad ? (T)NAN : b;
      if (l < w) {
        unclear[j0 + l] = (uint8_t)bad;
        values[j0 + l] = size == 1 ? a : (a + b) / 2; /* (a + b) / 2 as numpy and torch do */
      }
    }
    /* Count the rows in each run, and for longer runs sum them (in double): a clear column's
       run is exactly its values in [lo, hi], so the network only has to place the run's ends
       (see network() in _native.py); unclear columns (lo = NaN here) are redone anyway. */
    double sum[4][L]; /* 4 partial sums per lane: adds that do not wait on each other */
    memset(sum, 0, sizeof(sum));
    for (int64_t i = 0; i < n; i++) {
      _Alignas(64) T kept[L];
      for (int h = 0; h < NV; h++) {
        V v, a = ((V *)lo)[h], b = ((V *)hi)[h];
        memcpy(&v, LINE(i) + h * VL, VBYTES);
        M in = size == 1 ? (M)(v == a) : (M)((a <= v) & (v <= b));
        acc[i * NV + h] += in;
        ((V *)kept)[h] = (V)((M)v & in); /* the value where it is in the run, else +0 */
      }
      if (size > 2)
        for (int l = 0; l < L; l++) sum[i & 3][l] += (double)kept[l];
    }
    if (size > 2)
      for (int l = 0; l < w; l++)
        values[j0 + l] = (T)(((sum[0][l] + sum[1][l]) + (sum[2][l] + sum[3][l])) / (double)size);
#undef LINE
  }
  }
  for (int64_t i = 0; i < n; i++)
    for (int l = 0; l < L; l++) counts[i] -= ((I *)acc)[i * L + l];
  free(buf), free(stage), free(acc);
  return 0;
}

/* Residual's repeated-median slopes: for each row of s (c, n), and each i, the median over
   j != i of (s_i - s_j) / (i - j) -- the same IEEE operations as the numpy code, each pair
   divided once (the slope is symmetric) -- by the network for n - 1 lines, 8 (or 4) rows at a
   time in the SIMD lanes. Writes out (c, n). Returns 2 if the network is not for n - 1. */
int CAT(NAME, _slopes)(const T *s, int64_t c, int64_t n, const int32_t *net, int64_t ncomp,
                        T *out) {
  enum { L = LINE_BYTES / sizeof(T), NV = LINE_BYTES / VBYTES };
  int64_t m = n - 1;
#ifdef NETWORK
  if (m != NETWORK_N || NV != 1) return 2;
#endif
  T *line = ALLOC((size_t)n * LINE_BYTES);      /* s, one line per position */
  T *pair = ALLOC((size_t)n * n * LINE_BYTES);  /* slope (i, j), i < j */
  V *buf = ALLOC((size_t)(m > 0 ? m : 1) * LINE_BYTES);
  if (!line || !pair || !buf) {
    free(line), free(pair), free(buf);
    return 1;
  }
  T *sorted = (T *)buf;
  for (int64_t j0 = 0; j0 < c; j0 += L) {
    int64_t w = c - j0 < L ? c - j0 : L;
    for (int64_t j = 0; j < n; j++) /* transpose the tile: lanes are rows of s */
      for (int l = 0; l < L; l++) line[j * L + l] = l < w ? s[(j0 + l) * n + j] : 0;
    for (int64_t i = 0; i < n; i++)
      for (int64_t j = i + 1; j < n; j++)
        for (int l = 0; l < L; l++)
          pair[(i * n + j) * L + l] = (line[i * L + l] - line[j * L + l]) / (T)(i - j);
    for (int64_t i = 0; i < n; i++) {
      for (int64_t j = 0, k = 0; j < n; j++) {
        if (j == i) continue;
        const T *src = pair + ((j < i ? j * n + i : i * n + j) * L);
        memcpy(buf + k * NV, src, LINE_BYTES);
        k++;
      }
#ifdef NETWORK
      (void)net, (void)ncomp;
      CAT(NAME, _sort)(buf);
#else
      for (int64_t k = 0; k < ncomp; k++)
        for (int h = 0; h < NV; h++) CX(buf + net[2 * k] * NV + h, buf + net[2 * k + 1] * NV + h);
#endif
      for (int l = 0; l < w; l++) {
        T a = sorted[((m - 1) / 2) * L + l], b = sorted[(m / 2) * L + l];
        out[(j0 + l) * n + i] = m % 2 ? a : (a + b) / 2;
      }
    }
  }
  free(line), free(pair), free(buf);
  return 0;
}
#undef V
#undef M
#undef CX
#endif
