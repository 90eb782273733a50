// The per-(n, c) algebra of SN in double: importance shares, LN and BN
// statistics pooled from the IN ones, the mixed mean and variance, and the
// per-row gradients of the output with respect to them. The formulation
// these follow (and the one other devices run) is mmsn/ops/statistics.py.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <vector>

#include "channel_loops.h"
#include "rows.h"

namespace mmsn {
namespace {

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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "mmsn_from_doubles", [&] {
        scalar_t* p = out.mutable_data_ptr<scalar_t>();
        for (size_t i = 0; i < v.size(); ++i) {
          p[i] = static_cast<scalar_t>(v[i]);
        }
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

// Shares on the simplex from a tensor of shares, or from importance logits
// by a softmax (computed in double).
std::vector<double> shares_of(const at::Tensor& t, bool softmax) {
  std::vector<double> v = as_doubles(t);
  if (!softmax) return v;
  double top = v.empty() ? 0.0 : v[0];
  for (double x : v) top = std::max(top, x);
  double total = 0;
  for (double& x : v) total += (x = std::exp(x - top));
  for (double& x : v) x /= total;
  return v;
}

// Gradient of the logits given that of their softmax shares s:
// s * (g - sum(s * g)).
std::vector<double> softmax_backward(const std::vector<double>& s,
                                     const std::vector<double>& g) {
  double dot = 0;
  for (size_t k = 0; k < s.size(); ++k) dot += s[k] * g[k];
  std::vector<double> out(s.size());
  for (size_t k = 0; k < s.size(); ++k) out[k] = s[k] * (g[k] - dot);
  return out;
}

// Where a layer's BN statistics come from.
enum class BatchStats { kNone, kGiven, kPooled };

// Statistics and shares of one call. Per-(n, c) values are read in place
// and per-row coefficients computed inside the parallel passes: scratch
// arrays of N * C doubles would cost more (page faults) than the math.
//
// Mixing is written as mean_in + sum_{k>0} w_k (mean_k - mean_in) (likewise
// the variance), so that equal IN, LN and BN statistics (a constant input)
// give exactly that statistic although float shares do not sum to exactly
// 1. The IN share acts as 1 - sum_{k>0} w_k, which ``w[0]`` holds for the
// gradients.
template <typename T>
struct Mixing {
  int64_t n, c;
  const T* mean_in;                     // (N * C)
  const T* var_in;                      // (N * C)
  std::vector<double> w, u;             // shares [IN, LN(, BN)]
  std::vector<double> w_given, u_given; // the shares as passed in
  std::vector<double> ln_mean, ln_var;  // (N)
  std::vector<double> bn_mean, bn_var;  // (C), empty without a BN branch
  std::vector<double> gamma;            // (C), empty without affine weight
  double eps;
  // what pooling the BN statistics found (kPooled only)
  bool input_finite = true, batch_finite = true;
  // the same, laid out for the per-sample loops over channels (which the
  // compiler vectorizes): gamma or ones, BN statistics or zeros with a
  // zero share
  std::vector<double> gamma_or_one, bn_mean_or_zero, bn_var_or_zero;
  double w_ln, w_bn, u_ln, u_bn;

  Mixing(const at::Tensor& mean_in_, const at::Tensor& var_in_,
         const std::optional<at::Tensor>& weight, std::vector<double> w_,
         std::vector<double> u_, BatchStats bn,
         const std::optional<at::Tensor>& batch_mean,
         const std::optional<at::Tensor>& batch_var, double eps_,
         bool layer_stats_now = true)
      : n(mean_in_.size(0)),
        c(mean_in_.size(1)),
        mean_in(mean_in_.const_data_ptr<T>()),
        var_in(var_in_.const_data_ptr<T>()),
        w_given(std::move(w_)),
        u_given(std::move(u_)),
        ln_mean(n, 0.0),
        ln_var(n, 0.0),
        eps(eps_) {
    const size_t branches = bn == BatchStats::kNone ? 2 : 3;
    TORCH_CHECK(w_given.size() == branches && u_given.size() == branches,
                "mmsn: expected ", branches,
                " importance shares for the means and the variances, got ",
                w_given.size(), " and ", u_given.size());
    w = effective(w_given);
    u = effective(u_given);
    if (bn == BatchStats::kGiven) {
      TORCH_CHECK(batch_mean.has_value() && batch_var.has_value(),
                  "mmsn: batch mean and variance must be given together");
      bn_mean = per_channel(batch_mean, c, "batch statistics");
      bn_var = per_channel(batch_var, c, "batch statistics");
    } else if (bn == BatchStats::kPooled) {
      pool_batch_stats();
    }
    gamma = per_channel(weight, c, "weight");
    gamma_or_one = gamma.empty() ? std::vector<double>(c, 1.0) : gamma;
    bn_mean_or_zero = has_bn() ? bn_mean : std::vector<double>(c, 0.0);
    bn_var_or_zero = has_bn() ? bn_var : std::vector<double>(c, 0.0);
    w_ln = w[1];
    u_ln = u[1];
    w_bn = has_bn() ? w[2] : 0.0;
    u_bn = has_bn() ? u[2] : 0.0;
    if (layer_stats_now) {
      for (int64_t i = 0; i < n; ++i) layer_stats(i);
    }
  }

  static std::vector<double> effective(std::vector<double> s) {
    double others = 0;
    for (size_t k = 1; k < s.size(); ++k) others += s[k];
    s[0] = 1.0 - others;
    return s;
  }

  // BN statistics of this batch, pooled over n as the LN ones are over c,
  // blocks of channels in parallel.
  void pool_batch_stats() {
    bn_mean.resize(c);
    bn_var.resize(c);
    std::atomic<int> flags{3};
    at::parallel_for(0, c, row_grain(n), [&](int64_t b, int64_t e) {
      const int f = pool_block(mean_in + b, var_in + b, n, c, e - b,
                               bn_mean.data() + b, bn_var.data() + b);
      if (f != 3) flags.fetch_and(f);
    });
    input_finite = flags & 1;
    batch_finite = (flags & 2) != 0;
  }

  // LN statistics of sample i: mean of the means; mean of var_in +
  // (mean_in - mean)^2, which has no cancellation (see
  // layer_stats_from_instance).
  void layer_stats(int64_t i) {
    layer_stats_kernel(mean_in + i * c, var_in + i * c, c, &ln_mean[i],
                       &ln_var[i]);
  }

  bool has_bn() const { return !bn_mean.empty(); }
  double g(int64_t j) const { return gamma.empty() ? 1.0 : gamma[j]; }
  double mixed_mean(int64_t i, int64_t j) const {
    return mixed(w, mean_in[i * c + j], ln_mean[i],
                 has_bn() ? bn_mean[j] : 0.0);
  }
  // 1 / sqrt(mixed variance + eps)
  double rstd(int64_t i, int64_t j) const {
    return 1.0 / std::sqrt(mixed(u, var_in[i * c + j], ln_var[i],
                                 has_bn() ? bn_var[j] : 0.0) +
                           eps);
  }
  // For the channels [j0, j1) of sample i: the mixed mean and 1 / sqrt(
  // mixed variance + eps), as mixed_mean and rstd give them, in one loop
  // the compiler vectorizes (on short rows the per-row arithmetic costs as
  // much as the row). Rows where a statistic is infinite are redone one by
  // one (inf - inf: the plain sum).
  void mixed_block(int64_t i, int64_t j0, int64_t j1, double* mean,
                   double* rstd_out) const {
    const int nan = mix_block(
        mean_in + i * c + j0, var_in + i * c + j0, j1 - j0, ln_mean[i],
        ln_var[i], bn_mean_or_zero.data() + j0, bn_var_or_zero.data() + j0,
        w_ln, w_bn, u_ln, u_bn, eps, mean, rstd_out);
    if (!nan) return;
    for (int64_t j = j0; j < j1; ++j) {
      mean[j - j0] = mixed_mean(i, j);
      rstd_out[j - j0] = rstd(i, j);
    }
  }

  // in + s1 (ln - in) + s2 (bn - in); where a statistic is infinite
  // (inf - inf) the plain sum of the given shares stands.
  double mixed(const std::vector<double>& s, double in, double ln,
               double bn) const {
    double m = in + s[1] * (ln - in);
    if (has_bn()) m += s[2] * (bn - in);
    if (!std::isnan(m)) return m;
    const std::vector<double>& given = &s == &w ? w_given : u_given;
    double plain = given[0] * in + given[1] * ln;
    return has_bn() ? plain + given[2] * bn : plain;
  }
};

// y = (x - mean_in) * scale + shift for rows [b, e), with the per-row scale
// and shift of the mixed statistics, computed a sample's channels at a time.
template <typename T>
void normalize_rows(const Mixing<T>& mix, const std::vector<double>& beta,
                    const T* x, T* y, int64_t b, int64_t e, int64_t length) {
  const int64_t c = mix.c;
  std::vector<double> mean(c), rstd(c);
  std::vector<T> scale(c), shift(c);
  for (int64_t r = b; r < e;) {
    const int64_t i = r / c, j0 = r % c, j1 = std::min(c, j0 + (e - r));
    mix.mixed_block(i, j0, j1, mean.data(), rstd.data());
    scale_shift_block(mix.mean_in + r, mean.data(), rstd.data(),
                      mix.gamma_or_one.data() + j0,
                      beta.empty() ? nullptr : beta.data() + j0, j1 - j0,
                      scale.data(), shift.data());
    rows_affine_block(x + r * length, y + r * length, j1 - j0, length,
                      mix.mean_in + r, scale.data(), shift.data());
    r += j1 - j0;
  }
}

// Per-row gradients of y = (x - mean) * scale + beta, scale = gamma * rstd,
// with respect to the mixed mean (negated) and the mixed variance + eps, for
// the C rows of sample i, from the per-row sums of the backward: scale,
// neg_grad_mean and grad_var into the given arrays (which the dx pass
// reads again), the rest into a scratch block.
struct RowGradsScratch {
  std::vector<double> mean, rstd, grad_centered;
  explicit RowGradsScratch(int64_t c) : mean(c), rstd(c), grad_centered(c) {}
};

template <typename T>
void row_grads_of_sample(const Mixing<T>& mix, int64_t i, const T* dot,
                         const T* sum_dy, RowGradsScratch* g, double* scale,
                         double* neg_grad_mean, double* grad_var) {
  mix.mixed_block(i, 0, mix.c, g->mean.data(), g->rstd.data());
  const int64_t row = i * mix.c;
  row_grads_kernel(mix.mean_in + row, dot + row, sum_dy + row,
                   mix.gamma_or_one.data(), g->mean.data(), g->rstd.data(),
                   mix.c, scale, g->grad_centered.data(), neg_grad_mean,
                   grad_var);
}

}  // namespace
}  // namespace mmsn
