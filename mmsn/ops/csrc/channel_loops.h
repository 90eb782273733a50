// The per-(n, c) loops of SN's CPU layer (mixing.h, layer.h): mixing the
// statistics, the output's per-row scale and shift, the per-row gradients,
// BN and LN pooling, and the backward's per-sample sums.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "rows.h"

namespace mmsn {
namespace {

// The per-(n, c) loops of a block of channels, on arrays offset to its
// first channel. They mix float and double, which the compiler vectorizes
// only beyond the baseline x86-64 width, so they are multiversioned as the
// row kernels are (rows.h); without FMA contraction (-std=c++20) every
// version gives the same bits.
//
// Mixed mean and 1 / sqrt(mixed variance + eps); whether one was NaN.
template <typename T>
MMSN_ALWAYS_INLINE int mix_block_impl(const T* m, const T* v, int64_t count,
                                      double lm, double lv, const double* bm,
                                      const double* bv, double wl, double wb,
                                      double ul, double ub, double eps,
                                      double* mean, double* rstd) {
  int nan = 0;  // an int: a bool reduction is not vectorized
#pragma omp simd reduction(| : nan)
  for (int64_t k = 0; k < count; ++k) {
    const double mi = m[k], vi = v[k];
    const double mm = mi + wl * (lm - mi) + wb * (bm[k] - mi);
    const double vv = vi + ul * (lv - vi) + ub * (bv[k] - vi);
    mean[k] = mm;
    rstd[k] = 1.0 / std::sqrt(vv + eps);
    nan |= (mm != mm) | (vv != vv);
  }
  return nan;
}

// Per-row scale and shift of y = (x - mean_in) * scale + shift; ``beta``
// may be null.
template <typename T>
MMSN_ALWAYS_INLINE void scale_shift_impl(const T* m, const double* mean,
                                         const double* rstd,
                                         const double* gamma,
                                         const double* beta, int64_t count,
                                         T* scale, T* shift) {
  if (beta == nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      const double sc = gamma[k] * rstd[k];
      scale[k] = static_cast<T>(sc);
      shift[k] = static_cast<T>((m[k] - mean[k]) * sc + 0.0);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      const double sc = gamma[k] * rstd[k];
      scale[k] = static_cast<T>(sc);
      shift[k] = static_cast<T>((m[k] - mean[k]) * sc + beta[k]);
    }
  }
}

// Per-row gradients of y = (x - mean) * scale + beta, scale = gamma * rstd,
// with respect to the mixed mean (negated) and the mixed variance + eps,
// from the backward's row sums d = sum(dy * (x - mean_in)), s = sum(dy).
template <typename T>
MMSN_ALWAYS_INLINE void row_grads_impl(const T* m, const T* d, const T* s,
                                       const double* gamma,
                                       const double* mean,
                                       const double* rstd, int64_t count,
                                       double* scale, double* centered,
                                       double* neg_grad_mean,
                                       double* grad_var) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    const double r = rstd[k], sc = gamma[k] * r;
    const double cen = d[k] + (m[k] - mean[k]) * s[k];
    scale[k] = sc;
    centered[k] = cen;
    neg_grad_mean[k] = sc * s[k];
    // d rsqrt(v) / dv = -rstd^3 / 2
    grad_var[k] = -0.5 * cen * sc * r * r;
  }
}

// BN statistics of a block of channels (arrays offset to its first channel;
// m and v have rows of c): the mean over the samples of mean_in, then of
// var_in + (mean_in - mean)^2, each summed sample by sample. Returns bit 0
// set when every mean_in read is finite, bit 1 when the statistics are.
template <typename T>
MMSN_ALWAYS_INLINE int pool_block_impl(const T* m, const T* v, int64_t n,
                                       int64_t c, int64_t count, double* bm,
                                       double* bv) {
  std::fill(bm, bm + count, 0.0);
  std::fill(bv, bv + count, 0.0);
  int input_finite = 1, stats_finite = 1;  // ints: bools do not vectorize
  for (int64_t i = 0; i < n; ++i) {
    const T* mi = m + i * c;
#pragma omp simd reduction(& : input_finite)
    for (int64_t k = 0; k < count; ++k) {
      bm[k] += mi[k];
      input_finite &= std::isfinite(static_cast<double>(mi[k]));
    }
  }
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) bm[k] /= n;
  for (int64_t i = 0; i < n; ++i) {
    const T* mi = m + i * c;
    const T* vi = v + i * c;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      const double d = mi[k] - bm[k];
      bv[k] += vi[k] + d * d;
    }
  }
#pragma omp simd reduction(& : stats_finite)
  for (int64_t k = 0; k < count; ++k) {
    bv[k] /= n;
    stats_finite &= std::isfinite(bm[k]) & std::isfinite(bv[k]);
  }
  return input_finite | (stats_finite << 1);
}

// sum(a[j]) and sum(b[j] + (a[j] - pivot)^2) over j < count, in 16 lanes
// added as a tree (rows.h): the same sums, bit for bit, at every vector
// width.
template <typename T>
MMSN_ALWAYS_INLINE double lane_sum_of(const T* a, int64_t count) {
  double l[16] = {};
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
#pragma omp simd
    for (int k = 0; k < 16; ++k) l[k] += a[j + k];
  }
  double tail = 0;
  for (; j < count; ++j) tail += a[j];
  return lane_sum<16>(l, tail);
}

template <typename T>
MMSN_ALWAYS_INLINE double lane_sum_of_spread(const T* a, const T* b,
                                             double pivot, int64_t count) {
  double l[16] = {};
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
#pragma omp simd
    for (int k = 0; k < 16; ++k) {
      const double d = a[j + k] - pivot;
      l[k] += b[j + k] + d * d;
    }
  }
  double tail = 0;
  for (; j < count; ++j) {
    const double d = a[j] - pivot;
    tail += b[j] + d * d;
  }
  return lane_sum<16>(l, tail);
}

// The backward's per-sample sums over its channels (the shares' and the
// pooled statistics' gradients) and per-channel accumulations, for one
// sample: sums[0..3] = sum(neg_grad_mean), sum(grad_var),
// sum(neg_grad_mean * mean_in), sum(grad_var * var_in), in lanes as above.
template <typename T>
MMSN_ALWAYS_INLINE void accumulate_row_grads_impl(
    const T* s, const T* m, const T* v, const double* grad_centered,
    const double* rstd, const double* neg_grad_mean, const double* grad_var,
    int64_t count, double* d_gamma, double* d_beta, double* gm_col,
    double* gv_col, double* sums) {
  double l[4][8] = {};
  double tail[4] = {};
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
#pragma omp simd
    for (int k = 0; k < 8; ++k) {
      const int64_t q = j + k;
      d_gamma[q] += grad_centered[q] * rstd[q];
      d_beta[q] += s[q];
      gm_col[q] += neg_grad_mean[q];
      gv_col[q] += grad_var[q];
      l[0][k] += neg_grad_mean[q];
      l[1][k] += grad_var[q];
      l[2][k] += neg_grad_mean[q] * m[q];
      l[3][k] += grad_var[q] * v[q];
    }
  }
  for (; j < count; ++j) {
    d_gamma[j] += grad_centered[j] * rstd[j];
    d_beta[j] += s[j];
    gm_col[j] += neg_grad_mean[j];
    gv_col[j] += grad_var[j];
    tail[0] += neg_grad_mean[j];
    tail[1] += grad_var[j];
    tail[2] += neg_grad_mean[j] * m[j];
    tail[3] += grad_var[j] * v[j];
  }
  for (int t = 0; t < 4; ++t) sums[t] = lane_sum<8>(l[t], tail[t]);
}

// dst += src, element by element.
MMSN_MULTIVERSION void add_into(double* dst, const double* src,
                                int64_t count) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) dst[k] += src[k];
}

#define MMSN_MIXING_KERNELS(T)                                                \
  MMSN_MULTIVERSION int pool_block(const T* m, const T* v, int64_t n,        \
                                   int64_t c, int64_t count, double* bm,     \
                                   double* bv) {                             \
    return pool_block_impl(m, v, n, c, count, bm, bv);                       \
  }                                                                           \
  MMSN_MULTIVERSION void layer_stats_kernel(const T* m, const T* v,          \
                                            int64_t c, double* mean,         \
                                            double* var) {                   \
    const double mu = lane_sum_of(m, c) / c;                                  \
    *mean = mu;                                                               \
    *var = lane_sum_of_spread(m, v, mu, c) / c;                               \
  }                                                                           \
  MMSN_MULTIVERSION void accumulate_row_grads(                                \
      const T* s, const T* m, const T* v, const double* grad_centered,       \
      const double* rstd, const double* neg_grad_mean,                       \
      const double* grad_var, int64_t count, double* d_gamma,                \
      double* d_beta, double* gm_col, double* gv_col, double* sums) {        \
    accumulate_row_grads_impl(s, m, v, grad_centered, rstd, neg_grad_mean,   \
                              grad_var, count, d_gamma, d_beta, gm_col,      \
                              gv_col, sums);                                  \
  }                                                                           \
  MMSN_MULTIVERSION int mix_block(                                            \
      const T* m, const T* v, int64_t count, double lm, double lv,           \
      const double* bm, const double* bv, double wl, double wb, double ul,   \
      double ub, double eps, double* mean, double* rstd) {                   \
    return mix_block_impl(m, v, count, lm, lv, bm, bv, wl, wb, ul, ub, eps,  \
                          mean, rstd);                                        \
  }                                                                           \
  MMSN_MULTIVERSION void scale_shift_block(                                   \
      const T* m, const double* mean, const double* rstd,                    \
      const double* gamma, const double* beta, int64_t count, T* scale,      \
      T* shift) {                                                             \
    scale_shift_impl(m, mean, rstd, gamma, beta, count, scale, shift);       \
  }                                                                           \
  MMSN_MULTIVERSION void row_grads_kernel(                                    \
      const T* m, const T* d, const T* s, const double* gamma,               \
      const double* mean, const double* rstd, int64_t count, double* scale,  \
      double* centered, double* neg_grad_mean, double* grad_var) {           \
    row_grads_impl(m, d, s, gamma, mean, rstd, count, scale, centered,       \
                   neg_grad_mean, grad_var);                                  \
  }

MMSN_MIXING_KERNELS(float)
MMSN_MIXING_KERNELS(double)

}  // namespace
}  // namespace mmsn
