// The four passes of SN over the big tensor, viewed as contiguous rows
// (N * C rows of L positions), and the SIMD loops they are made of:
//
//   forward:  instance_moments  (mean, var per row)
//             rows_affine       y  = (x - mean) * scale + shift
//   backward: rows_grad_sums    sum(dy), sum(dy * (x - mean)) per row
//             rows_grad_input   dx = a * dy + b * (x - mean) + k
//
// Each pass reads the big tensors once; sums accumulate in double and the
// affine maps are applied to x - mean, so inputs with a large mean lose
// nothing.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <tuple>

// Compiled for AVX-512, AVX2 and baseline x86-64, picked at load time, so
// that the built library runs on any x86-64 machine at its best width.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMSN_MULTIVERSION \
  __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MMSN_MULTIVERSION
#endif

namespace mmsn {
namespace {
// Rows per task so that a task covers at least as many elements as ATen's
// own grain size (at::internal::GRAIN_SIZE): smaller work runs on one thread.
constexpr int64_t kGrainSize = 32768;

int64_t row_grain(int64_t length) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, length));
}

#define MMSN_ALWAYS_INLINE inline __attribute__((always_inline))

// Rows shorter than this are summed kLanes at a time, a row per vector
// lane: a vector loop along a short row costs more in its set-up and final
// reduction (a 1x1 map: 10 ns a row) than in its additions. Either way a
// row's sums accumulate in double.
constexpr int64_t kShortRow = 32;
constexpr int kLanes = 8;

// A row is summed Lanes positions at a time into as many partial sums,
// which lane_sum adds as a tree, with the tail's sum. Lanes and a tree, not
// ``omp simd reduction``: GCC ends that reduction with a chain of 16 scalar
// additions through the stack, which on rows of 49 positions took longer
// than the row's own sums. Rows of kLongRow positions or more take 16 lanes
// (two vectors of doubles: the additions of one do not wait for the
// other's); shorter ones 8 (a shorter tree).
constexpr int64_t kLongRow = 64;

template <int Lanes>
MMSN_ALWAYS_INLINE double lane_sum(const double* a, double tail) {
  static_assert(Lanes == 8 || Lanes == 16, "8 or 16 lanes");
  if constexpr (Lanes == 16) {
    double h[8];
    for (int k = 0; k < 8; ++k) h[k] = a[k] + a[k + 8];
    return lane_sum<8>(h, tail);
  }
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])) +
         tail;
}

// sum(x - pivot) and sum((x - pivot)^2) of a row
template <int Lanes, typename T>
MMSN_ALWAYS_INLINE void centered_sums_of_row(const T* x, int64_t n, T pivot,
                                             double* s, double* q) {
  double sl[Lanes] = {}, ql[Lanes] = {};
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) {
#pragma omp simd
    for (int l = 0; l < Lanes; ++l) {
      const double d = static_cast<double>(x[i + l] - pivot);
      sl[l] += d;
      ql[l] += d * d;
    }
  }
  double s_tail = 0, q_tail = 0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(x[i] - pivot);
    s_tail += d;
    q_tail += d * d;
  }
  *s = lane_sum<Lanes>(sl, s_tail);
  *q = lane_sum<Lanes>(ql, q_tail);
}

// IN mean and variance from the sums around a pivot taken from the row:
// the cancellation in m2 = sum(d^2) - sum(d)^2 / n is at most a factor n,
// since (x[0] - mean)^2 <= m2, which double precision absorbs.
template <typename T>
MMSN_ALWAYS_INLINE void finish_moments(T pivot, double s, double q, int64_t n,
                                       double dof, T* mean, T* var) {
  *mean = static_cast<T>(pivot + s / n);
  *var = static_cast<T>(std::max(q - s * s / n, 0.0) / dof);
}

// Up to kFinishGroup rows: each row's sums, then their means and
// variances in one vector loop (its three divisions per row, left in each
// row's tail, made up a sixth of the time on rows of 49 positions).
constexpr int64_t kFinishGroup = 16;

template <int Lanes, typename T>
MMSN_ALWAYS_INLINE void moments_of_rows_group(const T* x, int64_t count,
                                              int64_t n, double dof, T* mean,
                                              T* var) {
  T p[kFinishGroup];
  double s[kFinishGroup], q[kFinishGroup];
  for (int64_t k = 0; k < count; ++k, x += n) {
    p[k] = x[0];
    centered_sums_of_row<Lanes>(x, n, p[k], &s[k], &q[k]);
  }
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    finish_moments(p[k], s[k], q[k], n, dof, mean + k, var + k);
  }
}

template <typename T>
MMSN_ALWAYS_INLINE void moments_of_short_rows(const T* x, int64_t n,
                                              double dof, T* mean, T* var) {
  T p[kLanes];
  double s[kLanes] = {}, q[kLanes] = {};
  for (int k = 0; k < kLanes; ++k) p[k] = x[k * n];
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(x[k * n + i] - p[k]);
      s[k] += d;
      q[k] += d * d;
    }
  }
#pragma omp simd
  for (int k = 0; k < kLanes; ++k) {
    finish_moments(p[k], s[k], q[k], n, dof, mean + k, var + k);
  }
}

// sum(dy * (x - mean)) and sum(dy) of a row
template <int Lanes, typename T>
MMSN_ALWAYS_INLINE void grad_sums_of_row(const T* dy, const T* x, int64_t n,
                                         T m, T* dot, T* sum) {
  double s[Lanes] = {}, p[Lanes] = {};
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) {
#pragma omp simd
    for (int k = 0; k < Lanes; ++k) {
      s[k] += dy[i + k];
      p[k] += static_cast<double>(dy[i + k] * (x[i + k] - m));
    }
  }
  double s_tail = 0, p_tail = 0;
  for (; i < n; ++i) {
    s_tail += dy[i];
    p_tail += static_cast<double>(dy[i] * (x[i] - m));
  }
  *dot = static_cast<T>(lane_sum<Lanes>(p, p_tail));
  *sum = static_cast<T>(lane_sum<Lanes>(s, s_tail));
}

template <typename T>
MMSN_ALWAYS_INLINE void grad_sums_of_short_rows(const T* dy, const T* x,
                                                int64_t n, const T* mean,
                                                T* dot, T* sum) {
  double s[kLanes] = {}, p[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const T g = dy[k * n + i];
      s[k] += g;
      p[k] += static_cast<double>(g * (x[k * n + i] - mean[k]));
    }
  }
#pragma omp simd
  for (int k = 0; k < kLanes; ++k) {
    dot[k] = static_cast<T>(p[k]);
    sum[k] = static_cast<T>(s[k]);
  }
}

// Each kernel takes a block of consecutive rows (short rows would cost a
// call each otherwise) of n elements, with per-row operands in arrays.
#define MMSN_ROW_KERNELS(T)                                                   \
  MMSN_MULTIVERSION void rows_moments_block(const T* x, int64_t rows,         \
                                            int64_t n, double dof, T* mean,   \
                                            T* var) {                         \
    int64_t r = 0;                                                            \
    for (; n < kShortRow && r + kLanes <= rows; r += kLanes) {                \
      moments_of_short_rows(x + r * n, n, dof, mean + r, var + r);            \
    }                                                                         \
    for (; r < rows; r += kFinishGroup) {                                     \
      const int64_t count = std::min(kFinishGroup, rows - r);                 \
      if (n < kLongRow) {                                                     \
        moments_of_rows_group<8>(x + r * n, count, n, dof, mean + r, var + r);\
      } else {                                                                \
        moments_of_rows_group<16>(x + r * n, count, n, dof, mean + r,         \
                                  var + r);                                   \
      }                                                                       \
    }                                                                         \
  }                                                                           \
  MMSN_MULTIVERSION void rows_affine_block(const T* x, T* y, int64_t rows,    \
                                           int64_t n, const T* mean,          \
                                           const T* scale, const T* shift) {  \
    for (int64_t r = 0; r < rows; ++r, x += n, y += n) {                      \
      const T m = mean[r], a = scale[r], c = shift[r];                        \
      _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                   \
        y[i] = (x[i] - m) * a + c;                                            \
      }                                                                       \
    }                                                                         \
  }                                                                           \
  MMSN_MULTIVERSION void rows_grad_sums_block(const T* dy, const T* x,        \
                                              int64_t rows, int64_t n,        \
                                              const T* mean, T* dot,          \
                                              T* sum) {                       \
    int64_t r = 0;                                                            \
    for (; n < kShortRow && r + kLanes <= rows; r += kLanes) {                \
      grad_sums_of_short_rows(dy + r * n, x + r * n, n, mean + r, dot + r,    \
                              sum + r);                                       \
    }                                                                         \
    for (; n < kLongRow && r < rows; ++r) {                                   \
      grad_sums_of_row<8>(dy + r * n, x + r * n, n, mean[r], dot + r,         \
                          sum + r);                                           \
    }                                                                         \
    for (; r < rows; ++r) {                                                   \
      grad_sums_of_row<16>(dy + r * n, x + r * n, n, mean[r], dot + r,        \
                           sum + r);                                          \
    }                                                                         \
  }                                                                           \
  MMSN_MULTIVERSION void rows_grad_input_block(                               \
      const T* dy, const T* x, T* dx, int64_t rows, int64_t n, const T* mean, \
      const T* a, const T* b, const T* k) {                                   \
    for (int64_t r = 0; r < rows; ++r, x += n, dy += n, dx += n) {            \
      const T m = mean[r], ar = a[r], br = b[r], kr = k[r];                   \
      _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                   \
        dx[i] = ar * dy[i] + br * (x[i] - m) + kr;                            \
      }                                                                       \
    }                                                                         \
  }

MMSN_ROW_KERNELS(float)
MMSN_ROW_KERNELS(double)

// IN mean and variance of rows [b, e).
template <typename T>
void moments_of_rows(const T* x, T* mean, T* var, int64_t b, int64_t e,
                     int64_t length, int64_t correction) {
  rows_moments_block(x + b * length, e - b, length,
                     static_cast<double>(length - correction), mean + b,
                     var + b);
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "mmsn::", name, ": expected a CPU tensor");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "mmsn::", name,
              ": expected a contiguous (N, C, L) tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "mmsn::", name, ": expected float32 or float64, got ",
              x.scalar_type());
}

void check_per_row(const at::Tensor& rows, const at::Tensor& t,
                   const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.numel() == rows.size(0) * rows.size(1) &&
                  t.scalar_type() == rows.scalar_type(),
              "mmsn::", name, ": per-row operands must be contiguous, of ",
              rows.scalar_type(), " and have N * C elements");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                  b.is_contiguous(),
              "mmsn::", name, ": grad and input must match in shape and dtype");
}

std::tuple<at::Tensor, at::Tensor> instance_moments(const at::Tensor& x,
                                                    int64_t correction) {
  check_rows(x, "instance_moments");
  const int64_t rows = x.size(0) * x.size(1), length = x.size(2);
  TORCH_CHECK(length > correction, "mmsn::instance_moments: ", length,
              " positions leave no degrees of freedom for correction ",
              correction);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_instance_moments", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pm = mean.mutable_data_ptr<scalar_t>();
    scalar_t* pv = var.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t b, int64_t e) {
      moments_of_rows(px, pm, pv, b, e, length, correction);
    });
  });
  return {mean, var};
}

at::Tensor rows_affine(const at::Tensor& x, const at::Tensor& mean,
                       const at::Tensor& scale, const at::Tensor& shift) {
  check_rows(x, "rows_affine");
  for (const auto* t : {&mean, &scale, &shift}) {
    check_per_row(x, *t, "rows_affine");
  }
  const int64_t rows = x.size(0) * x.size(1), length = x.size(2);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_rows_affine", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pm = mean.const_data_ptr<scalar_t>();
    const scalar_t* ps = scale.const_data_ptr<scalar_t>();
    const scalar_t* pb = shift.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t b, int64_t e) {
      rows_affine_block(px + b * length, py + b * length, e - b, length,
                        pm + b, ps + b, pb + b);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rows_grad_sums(const at::Tensor& dy,
                                                  const at::Tensor& x,
                                                  const at::Tensor& mean) {
  check_rows(x, "rows_grad_sums");
  check_same(x, dy, "rows_grad_sums");
  check_per_row(x, mean, "rows_grad_sums");
  const int64_t rows = x.size(0) * x.size(1), length = x.size(2);
  at::Tensor dot = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor sum = at::empty_like(dot);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_rows_grad_sums", [&] {
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pm = mean.const_data_ptr<scalar_t>();
    scalar_t* pdot = dot.mutable_data_ptr<scalar_t>();
    scalar_t* psum = sum.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t b, int64_t e) {
      rows_grad_sums_block(pdy + b * length, px + b * length, e - b, length,
                           pm + b, pdot + b, psum + b);
    });
  });
  return {dot, sum};
}

at::Tensor rows_grad_input(const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& mean, const at::Tensor& a,
                           const at::Tensor& b, const at::Tensor& k) {
  check_rows(x, "rows_grad_input");
  check_same(x, dy, "rows_grad_input");
  for (const auto* t : {&mean, &a, &b, &k}) {
    check_per_row(x, *t, "rows_grad_input");
  }
  const int64_t rows = x.size(0) * x.size(1), length = x.size(2);
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_rows_grad_input", [&] {
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pm = mean.const_data_ptr<scalar_t>();
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* pk = k.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t lo, int64_t hi) {
      rows_grad_input_block(pdy + lo * length, px + lo * length,
                            pdx + lo * length, hi - lo, length, pm + lo,
                            pa + lo, pb + lo, pk + lo);
    });
  });
  return dx;
}

}  // namespace
}  // namespace mmsn
