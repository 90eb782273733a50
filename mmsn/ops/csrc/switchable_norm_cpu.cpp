// CPU kernels of Switchable Normalization (mmsn._C), over the big tensor
// viewed as contiguous rows (N * C rows of L positions). Four row passes:
//
//   forward:  instance_moments  (mean, var per row)
//             rows_affine       y  = (x - mean) * scale + shift
//   backward: rows_grad_sums    sum(dy), sum(dy * (x - mean)) per row
//             rows_grad_input   dx = a * dy + b * (x - mean) + k
//
// and the whole layer for the common cases, sn_affine (forward after the
// moments) and sn_backward, which compute the per-(n, c) algebra in double
// inside those passes. Each pass reads the big tensors once, so SN moves as
// many bytes as BatchNorm. Sums accumulate in double; the affine maps are
// applied to x - mean so that inputs with a large mean lose nothing.
// mmsn/ops/switchable_norm.py holds the reference formulation and the
// fallbacks for other devices.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

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
// Sample blocks of the backward's reductions over (N, C).
constexpr int64_t kReductionBlocks = 8;

int64_t row_grain(int64_t length) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, length));
}

#define MMSN_ROW_KERNELS(T)                                                   \
  MMSN_MULTIVERSION void row_moments(const T* x, int64_t n, double* mean,     \
                                     double* m2) {                            \
    /* One pass around a pivot taken from the row: the cancellation in   */ \
    /* m2 = sum(d^2) - sum(d)^2 / n is at most a factor n, since          */ \
    /* (x[0] - mean)^2 <= m2, which double precision absorbs.             */ \
    const T pivot = x[0];                                                     \
    double s = 0, q = 0;                                                      \
    _Pragma("omp simd reduction(+ : s, q)") for (int64_t i = 0; i < n; ++i) { \
      const double d = static_cast<double>(x[i] - pivot);                     \
      s += d;                                                                 \
      q += d * d;                                                             \
    }                                                                         \
    *mean = pivot + s / n;                                                    \
    *m2 = std::max(q - s * s / n, 0.0);                                       \
  }                                                                           \
  MMSN_MULTIVERSION void row_affine(const T* x, T* y, int64_t n, T mean,      \
                                    T scale, T shift) {                       \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                     \
      y[i] = (x[i] - mean) * scale + shift;                                   \
    }                                                                         \
  }                                                                           \
  MMSN_MULTIVERSION void row_grad_sums(const T* dy, const T* x, int64_t n,    \
                                       T mean, double* dot, double* sum) {    \
    double s = 0, p = 0;                                                      \
    _Pragma("omp simd reduction(+ : s, p)") for (int64_t i = 0; i < n; ++i) { \
      s += dy[i];                                                             \
      p += static_cast<double>(dy[i] * (x[i] - mean));                        \
    }                                                                         \
    *dot = p;                                                                 \
    *sum = s;                                                                 \
  }                                                                           \
  MMSN_MULTIVERSION void row_grad_input(const T* dy, const T* x, T* dx,       \
                                        int64_t n, T mean, T a, T b, T k) {   \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                     \
      dx[i] = a * dy[i] + b * (x[i] - mean) + k;                              \
    }                                                                         \
  }

MMSN_ROW_KERNELS(float)
MMSN_ROW_KERNELS(double)

// IN mean and variance of rows [b, e).
template <typename T>
void moments_of_rows(const T* x, T* mean, T* var, int64_t b, int64_t e,
                     int64_t length, int64_t correction) {
  const double dof = static_cast<double>(length - correction);
  for (int64_t r = b; r < e; ++r) {
    double m, m2;
    row_moments(x + r * length, length, &m, &m2);
    mean[r] = static_cast<T>(m);
    var[r] = static_cast<T>(m2 / dof);
  }
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
      for (int64_t r = b; r < e; ++r) {
        row_affine(px + r * length, py + r * length, length, pm[r], ps[r],
                   pb[r]);
      }
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
      for (int64_t r = b; r < e; ++r) {
        double d, s;
        row_grad_sums(pdy + r * length, px + r * length, length, pm[r], &d,
                      &s);
        pdot[r] = static_cast<scalar_t>(d);
        psum[r] = static_cast<scalar_t>(s);
      }
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
      for (int64_t r = lo; r < hi; ++r) {
        row_grad_input(pdy + r * length, px + r * length, pdx + r * length,
                       length, pm[r], pa[r], pb[r], pk[r]);
      }
    });
  });
  return dx;
}

// ---------------------------------------------------------------------------
// The whole layer for the common cases (no BN branch, BN statistics pooled
// from this batch's IN ones, or given constants such as running statistics):
// the small per-(n, c) algebra between the passes, in double, written out as
// in _small_forward / _FusedSwitchableNorm.backward of switchable_norm.py,
// which remains the implementation for other devices and for batch
// statistics with a custom gradient (SyncSN).
// ---------------------------------------------------------------------------
// Small tensors are read and written with plain loops: an ATen op on more
// than GRAIN_SIZE elements would open a parallel region for microseconds of
// work.
std::vector<double> as_doubles(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "mmsn: expected CPU tensors");
  const at::Tensor ct = t.contiguous();
  std::vector<double> out(ct.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, ct.scalar_type(), "mmsn_as_doubles", [&] {
        const scalar_t* p = ct.const_data_ptr<scalar_t>();
        for (size_t i = 0; i < out.size(); ++i) {
          out[i] = static_cast<double>(p[i]);
        }
      });
  return out;
}

at::Tensor from_doubles(const std::vector<double>& v, at::IntArrayRef sizes,
                        const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mmsn_from_doubles", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

// An optional per-channel tensor (gamma, beta, BN statistics) as doubles,
// empty when absent.
std::vector<double> per_channel(const std::optional<at::Tensor>& t,
                                int64_t c, const char* name) {
  if (!t.has_value()) return {};
  std::vector<double> out = as_doubles(*t);
  TORCH_CHECK(static_cast<int64_t>(out.size()) == c, "mmsn: ", name,
              " must have C = ", c, " elements");
  return out;
}

// Statistics and shares of one call. Per-(n, c) values are read in place
// and per-row coefficients computed inside the parallel passes: scratch
// arrays of N * C doubles would cost more (page faults) than the math.
template <typename T>
struct Mixing {
  int64_t n, c;
  const T* mean_in;                     // (N * C)
  const T* var_in;                      // (N * C)
  std::vector<double> w, u;             // shares [IN, LN(, BN)]
  std::vector<double> ln_mean, ln_var;  // (N)
  std::vector<double> bn_mean, bn_var;  // (C), empty without a BN branch
  std::vector<double> gamma;            // (C), empty without affine weight
  double eps;

  Mixing(const at::Tensor& mean_in_, const at::Tensor& var_in_,
         const std::optional<at::Tensor>& weight,
         const at::Tensor& mean_share, const at::Tensor& var_share,
         const std::optional<at::Tensor>& batch_mean,
         const std::optional<at::Tensor>& batch_var, double eps_,
         bool layer_stats_now = true)
      : n(mean_in_.size(0)),
        c(mean_in_.size(1)),
        mean_in(mean_in_.const_data_ptr<T>()),
        var_in(var_in_.const_data_ptr<T>()),
        w(as_doubles(mean_share)),
        u(as_doubles(var_share)),
        ln_mean(n, 0.0),
        ln_var(n, 0.0),
        eps(eps_) {
    const size_t branches = batch_mean.has_value() ? 3 : 2;
    TORCH_CHECK(batch_mean.has_value() == batch_var.has_value(),
                "mmsn: batch mean and variance must be given together");
    TORCH_CHECK(w.size() == branches && u.size() == branches,
                "mmsn: expected ", branches,
                " importance shares for the means and the variances, got ",
                w.size(), " and ", u.size());
    bn_mean = per_channel(batch_mean, c, "batch statistics");
    bn_var = per_channel(batch_var, c, "batch statistics");
    gamma = per_channel(weight, c, "weight");
    if (layer_stats_now) {
      for (int64_t i = 0; i < n; ++i) layer_stats(i);
    }
  }

  // LN statistics of sample i: mean of the means; mean of var_in +
  // (mean_in - mean)^2, which has no cancellation (see
  // layer_stats_from_instance).
  void layer_stats(int64_t i) {
    const T* m = mean_in + i * c;
    const T* v = var_in + i * c;
    double s = 0;
    for (int64_t j = 0; j < c; ++j) s += m[j];
    const double mu = s / c;
    double q = 0;
    for (int64_t j = 0; j < c; ++j) {
      const double d = m[j] - mu;
      q += v[j] + d * d;
    }
    ln_mean[i] = mu;
    ln_var[i] = q / c;
  }

  bool has_bn() const { return !bn_mean.empty(); }
  double g(int64_t j) const { return gamma.empty() ? 1.0 : gamma[j]; }
  double mixed_mean(int64_t i, int64_t j) const {
    const double m = w[0] * mean_in[i * c + j] + w[1] * ln_mean[i];
    return has_bn() ? m + w[2] * bn_mean[j] : m;
  }
  // 1 / sqrt(mixed variance + eps)
  double rstd(int64_t i, int64_t j) const {
    double v = u[0] * var_in[i * c + j] + u[1] * ln_var[i] + eps;
    if (has_bn()) v += u[2] * bn_var[j];
    return 1.0 / std::sqrt(v);
  }
};

// y = (x - mean_in) * scale + shift for rows [b, e), with the per-row scale
// and shift of the mixed statistics.
template <typename T>
void normalize_rows(const Mixing<T>& mix, const std::vector<double>& beta,
                    const T* x, T* y, int64_t b, int64_t e, int64_t length) {
  const int64_t c = mix.c;
  for (int64_t r = b, i = b / c, j = b % c; r < e; ++r, ++j) {
    if (j == c) j = 0, ++i;  // (i, j) = divmod(r, c), without dividing
    const double scale = mix.g(j) * mix.rstd(i, j);
    const double shift = (mix.mean_in[r] - mix.mixed_mean(i, j)) * scale +
                         (beta.empty() ? 0.0 : beta[j]);
    row_affine(x + r * length, y + r * length, length, mix.mean_in[r],
               static_cast<T>(scale), static_cast<T>(shift));
  }
}

at::Tensor sn_affine(const at::Tensor& x, const at::Tensor& mean_in,
                     const at::Tensor& var_in,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias,
                     const at::Tensor& mean_share,
                     const at::Tensor& var_share,
                     const std::optional<at::Tensor>& batch_mean,
                     const std::optional<at::Tensor>& batch_var,
                     double eps) {
  check_rows(x, "sn_affine");
  check_per_row(x, mean_in, "sn_affine");
  check_per_row(x, var_in, "sn_affine");
  const int64_t c = x.size(1), rows = x.size(0) * c, length = x.size(2);
  const std::vector<double> beta = per_channel(bias, c, "bias");
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_sn_affine", [&] {
    const Mixing<scalar_t> mix(mean_in, var_in, weight, mean_share,
                               var_share, batch_mean, batch_var, eps);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t b, int64_t e) {
      normalize_rows(mix, beta, px, py, b, e, length);
    });
  });
  return y;
}

// Forward when the BN statistics do not depend on this batch (running
// statistics in eval, or no BN branch): sample by sample, the moments, the
// LN statistics and the output, so that the second read of a sample comes
// from cache. Returns y and the IN moments (kept for backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sn_forward_fixed(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_share,
    const at::Tensor& var_share, const std::optional<at::Tensor>& batch_mean,
    const std::optional<at::Tensor>& batch_var, double eps,
    int64_t correction) {
  check_rows(x, "sn_forward_fixed");
  const int64_t n = x.size(0), c = x.size(1), length = x.size(2);
  TORCH_CHECK(length > correction, "mmsn::sn_forward_fixed: ", length,
              " positions leave no degrees of freedom for correction ",
              correction);
  const std::vector<double> beta = per_channel(bias, c, "bias");
  at::Tensor mean = at::empty({n, c}, x.options());
  at::Tensor var = at::empty_like(mean);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_sn_forward_fixed", [&] {
    Mixing<scalar_t> mix(mean, var, weight, mean_share, var_share,
                         batch_mean, batch_var, eps,
                         /*layer_stats_now=*/false);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pm = mean.mutable_data_ptr<scalar_t>();
    scalar_t* pv = var.mutable_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const int64_t grain = row_grain(length);
    // rows of one sample in parallel (runs inline inside the parallel loop
    // over samples below)
    auto sample = [&](int64_t i) {
      at::parallel_for(i * c, (i + 1) * c, grain, [&](int64_t b, int64_t e) {
        moments_of_rows(px, pm, pv, b, e, length, correction);
      });
      mix.layer_stats(i);
      at::parallel_for(i * c, (i + 1) * c, grain, [&](int64_t b, int64_t e) {
        normalize_rows(mix, beta, px, py, b, e, length);
      });
    };
    if (n >= at::get_num_threads()) {
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) sample(i);
      });
    } else {
      for (int64_t i = 0; i < n; ++i) sample(i);
    }
  });
  return {y, mean, var};
}

// Per-row gradients of y = (x - mean) * scale + beta, scale = gamma * rstd,
// with respect to the mixed mean (negated) and the mixed variance + eps.
struct RowGrads {
  double rstd, scale, neg_grad_mean, grad_var, grad_centered;
};

template <typename T>
RowGrads row_grads(const Mixing<T>& mix, int64_t i, int64_t j, double dot,
                   double sum_dy) {
  RowGrads g;
  g.rstd = mix.rstd(i, j);
  g.scale = mix.g(j) * g.rstd;
  g.grad_centered =
      dot + (mix.mean_in[i * mix.c + j] - mix.mixed_mean(i, j)) * sum_dy;
  g.neg_grad_mean = g.scale * sum_dy;
  // d rsqrt(v) / dv = -rstd^3 / 2
  g.grad_var = -0.5 * g.grad_centered * g.scale * g.rstd * g.rstd;
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sn_backward(const at::Tensor& dy, const at::Tensor& x,
            const at::Tensor& mean_in_t, const at::Tensor& var_in_t,
            const std::optional<at::Tensor>& weight,
            const at::Tensor& mean_share, const at::Tensor& var_share,
            const std::optional<at::Tensor>& batch_mean,
            const std::optional<at::Tensor>& batch_var, bool pooled_bn,
            double eps, int64_t correction, bool need_dx) {
  check_rows(x, "sn_backward");
  check_same(x, dy, "sn_backward");
  check_per_row(x, mean_in_t, "sn_backward");
  check_per_row(x, var_in_t, "sn_backward");
  TORCH_CHECK(!pooled_bn || batch_mean.has_value(),
              "mmsn::sn_backward: pooled_bn needs batch statistics");
  const int64_t n = x.size(0), c = x.size(1), length = x.size(2);
  const auto opts = x.options();
  at::Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, opts);
  std::vector<double> d_gamma(c, 0.0), d_beta(c, 0.0);
  std::vector<double> d_mean_share, d_var_share;
  const auto sums = rows_grad_sums(dy, x, mean_in_t);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_sn_backward", [&] {
    const Mixing<scalar_t> mix(mean_in_t, var_in_t, weight, mean_share,
                               var_share, batch_mean, batch_var, eps);
    const scalar_t* dot = std::get<0>(sums).const_data_ptr<scalar_t>();
    const scalar_t* sum_dy = std::get<1>(sums).const_data_ptr<scalar_t>();
    // Row (per-sample) and column (per-channel) sums of the gradients of
    // the mixed statistics, and the gradients of the shares. Samples are
    // split into a fixed number of blocks, summed in parallel and merged in
    // order, so that the result does not depend on the thread count.
    std::vector<double> gm_row(n, 0.0), gv_row(n, 0.0);
    const int64_t blocks = std::min<int64_t>(n, kReductionBlocks);
    // per block: gm_col, gv_col, d_gamma, d_beta (C each), then gp_mean and
    // gp_var (3 each)
    const int64_t stride = 4 * c + 6;
    std::vector<double> partial(blocks * stride, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t kb, int64_t ke) {
      for (int64_t k = kb; k < ke; ++k) {
        double* gm_col = &partial[k * stride];
        double* gv_col = gm_col + c;
        double* dg = gv_col + c;
        double* db = dg + c;
        double* gp = db + c;  // gp_mean[0..2], gp_var[0..2]
        for (int64_t i = n * k / blocks; i < n * (k + 1) / blocks; ++i) {
          double gm = 0, gv = 0;
          for (int64_t j = 0; j < c; ++j) {
            const int64_t r = i * c + j;
            const RowGrads g = row_grads(mix, i, j, dot[r], sum_dy[r]);
            dg[j] += g.grad_centered * g.rstd;
            db[j] += sum_dy[r];
            gm += g.neg_grad_mean;
            gv += g.grad_var;
            gm_col[j] += g.neg_grad_mean;
            gv_col[j] += g.grad_var;
            gp[0] += g.neg_grad_mean * mix.mean_in[r];
            gp[3] += g.grad_var * mix.var_in[r];
          }
          gm_row[i] = gm;
          gv_row[i] = gv;
          gp[1] += gm * mix.ln_mean[i];
          gp[4] += gv * mix.ln_var[i];
        }
      }
    });
    std::vector<double> gm_col(c, 0.0), gv_col(c, 0.0);
    std::vector<double> gp_mean(mix.w.size(), 0.0), gp_var(mix.u.size(), 0.0);
    for (int64_t k = 0; k < blocks; ++k) {
      const double* part = &partial[k * stride];
      for (int64_t j = 0; j < c; ++j) {
        gm_col[j] += part[j];
        gv_col[j] += part[c + j];
        d_gamma[j] += part[2 * c + j];
        d_beta[j] += part[3 * c + j];
      }
      for (int t = 0; t < 2; ++t) {
        gp_mean[t] += part[4 * c + t];
        gp_var[t] += part[4 * c + 3 + t];
      }
    }
    if (mix.has_bn()) {
      for (int64_t j = 0; j < c; ++j) {
        gp_mean[2] += gm_col[j] * mix.bn_mean[j];
        gp_var[2] += gv_col[j] * mix.bn_var[j];
      }
    }
    // gp_mean holds the gradient of the negated mixed mean
    d_mean_share = gp_mean;
    for (double& v : d_mean_share) v = -v;
    d_var_share = gp_var;
    if (!need_dx) return;

    // dx = scale * dy + coef_x * (x - mean_in) + k per row, through the IN
    // statistics directly and through the pooled LN (and BN) ones:
    // mean_p = mean(mean_in), var_p = mean(var_in + (mean_in - mean_p)^2)
    // have d/dmean_in = (1 + 2 g_var (mean_in - mean_p)) / count and
    // d/dvar_in = 1 / count.
    const double dvar_dx = 2.0 / static_cast<double>(length - correction);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * c, row_grain(length), [&](int64_t b, int64_t e) {
      for (int64_t r = b, i = b / c, j = b % c; r < e; ++r, ++j) {
        if (j == c) j = 0, ++i;  // (i, j) = divmod(r, c), without dividing
        const RowGrads g = row_grads(mix, i, j, dot[r], sum_dy[r]);
        const double gv_ln = gv_row[i] * mix.u[1] / c;
        const double mean_r = mix.mean_in[r];
        double grad_mean_in =
            -(gm_row[i] * mix.w[1] / c + mix.w[0] * g.neg_grad_mean) +
            2.0 * (mean_r - mix.ln_mean[i]) * gv_ln;
        double grad_var_in = gv_ln + mix.u[0] * g.grad_var;
        if (pooled_bn) {
          const double gv_bn = gv_col[j] * mix.u[2] / n;
          grad_mean_in += -gm_col[j] * mix.w[2] / n +
                          2.0 * (mean_r - mix.bn_mean[j]) * gv_bn;
          grad_var_in += gv_bn;
        }
        row_grad_input(pdy + r * length, px + r * length, pdx + r * length,
                       length, mix.mean_in[r],
                       static_cast<scalar_t>(g.scale),
                       static_cast<scalar_t>(grad_var_in * dvar_dx),
                       static_cast<scalar_t>(grad_mean_in / length));
      }
    });
  });
  return {dx, from_doubles(d_gamma, {c}, opts),
          from_doubles(d_beta, {c}, opts),
          from_doubles(d_mean_share, {mean_share.numel()}, opts),
          from_doubles(d_var_share, {var_share.numel()}, opts)};
}

}  // namespace

TORCH_LIBRARY(mmsn, m) {
  m.def("instance_moments(Tensor x, int correction) -> (Tensor, Tensor)");
  m.def("rows_affine(Tensor x, Tensor mean, Tensor scale, Tensor shift) -> "
        "Tensor");
  m.def("rows_grad_sums(Tensor dy, Tensor x, Tensor mean) -> "
        "(Tensor, Tensor)");
  m.def("rows_grad_input(Tensor dy, Tensor x, Tensor mean, Tensor a, "
        "Tensor b, Tensor k) -> Tensor");
  m.def("sn_affine(Tensor x, Tensor mean_in, Tensor var_in, Tensor? weight, "
        "Tensor? bias, Tensor mean_share, Tensor var_share, "
        "Tensor? batch_mean, Tensor? batch_var, float eps) -> Tensor");
  m.def("sn_forward_fixed(Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean_share, Tensor var_share, Tensor? batch_mean, "
        "Tensor? batch_var, float eps, int correction) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("sn_backward(Tensor dy, Tensor x, Tensor mean_in, Tensor var_in, "
        "Tensor? weight, Tensor mean_share, Tensor var_share, "
        "Tensor? batch_mean, Tensor? batch_var, bool pooled_bn, float eps, "
        "int correction, bool need_dx) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmsn, CPU, m) {
  m.impl("instance_moments", &instance_moments);
  m.impl("rows_affine", &rows_affine);
  m.impl("rows_grad_sums", &rows_grad_sums);
  m.impl("rows_grad_input", &rows_grad_input);
  m.impl("sn_affine", &sn_affine);
  m.impl("sn_forward_fixed", &sn_forward_fixed);
  m.impl("sn_backward", &sn_backward);
}

}  // namespace mmsn

// Importing mmsn._C runs the registrations above; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                               nullptr};
  return PyModule_Create(&module);
}
