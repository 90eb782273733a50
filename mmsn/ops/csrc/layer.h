// The whole SN layer on the CPU: the passes of rows.h with the per-(n, c)
// algebra of mixing.h (and its loops, channel_loops.h) computed in double
// inside them.
//
//   train_rows     forward after the moments: BN statistics pooled from
//                  the IN ones, running statistics moved, the output
//   forward_fixed  forward when the BN statistics do not depend on the
//                  batch (running statistics, or none), sample by sample
//   backward_rows  gradients of x, gamma, beta and the shares: one pass for
//                  the per-row sums, one for dx
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "mixing.h"
#include "rows.h"
#include "running_stats.h"

namespace mmsn {
namespace {

// Sample blocks of the backward's reductions over (N, C).
constexpr int64_t kReductionBlocks = 8;

// What one call mixes: shares on the simplex, where the BN statistics come
// from, gamma and beta.
struct LayerArgs {
  std::optional<at::Tensor> weight, bias;
  std::vector<double> w, u;
  BatchStats bn;
  std::optional<at::Tensor> batch_mean, batch_var;  // BatchStats::kGiven
  double eps;
};

template <typename T>
Mixing<T> mixing_of(const at::Tensor& mean_in, const at::Tensor& var_in,
                    const LayerArgs& a, bool layer_stats_now = true) {
  return Mixing<T>(mean_in, var_in, a.weight, a.w, a.u, a.bn, a.batch_mean,
                   a.batch_var, a.eps, layer_stats_now);
}

// y of the rows x after their moments. With BN statistics pooled from this
// batch, ``running`` (when given) moves by them when they are finite;
// otherwise the batch is counted in ``nonfinite``.
at::Tensor train_rows(const at::Tensor& x, const at::Tensor& mean_in,
                      const at::Tensor& var_in, const LayerArgs& a,
                      const std::optional<RunningStats>& running,
                      const std::optional<at::Tensor>& nonfinite) {
  check_rows(x, "switchable_norm");
  check_per_row(x, mean_in, "switchable_norm");
  check_per_row(x, var_in, "switchable_norm");
  const int64_t c = x.size(1), rows = x.size(0) * c, length = x.size(2);
  const std::vector<double> beta = per_channel(a.bias, c, "bias");
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_train_rows", [&] {
    const Mixing<scalar_t> mix = mixing_of<scalar_t>(mean_in, var_in, a);
    if (running.has_value() && a.bn == BatchStats::kPooled) {
      if (mix.input_finite && mix.batch_finite) {
        update_running_stats(*running, mix.bn_mean, mix.bn_var);
      } else {
        count_nonfinite(nonfinite, mix.input_finite ? kOverflowedStats
                                                    : kNonFiniteInput);
      }
    }
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
// from cache. Returns y and the IN moments (kept for backward); counts the
// call in ``nonfinite`` (eval slot) when a statistic is not finite.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_fixed(
    const at::Tensor& x, const LayerArgs& a, int64_t correction,
    const std::optional<at::Tensor>& nonfinite) {
  check_rows(x, "switchable_norm");
  const int64_t n = x.size(0), c = x.size(1), length = x.size(2);
  TORCH_CHECK(length > correction, "mmsn::switchable_norm: ", length,
              " positions leave no degrees of freedom for correction ",
              correction);
  const std::vector<double> beta = per_channel(a.bias, c, "bias");
  at::Tensor mean = at::empty({n, c}, x.options());
  at::Tensor var = at::empty_like(mean);
  at::Tensor y = at::empty_like(x);
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_forward_fixed", [&] {
    Mixing<scalar_t> mix =
        mixing_of<scalar_t>(mean, var, a, /*layer_stats_now=*/false);
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
      if (!(std::isfinite(mix.ln_mean[i]) && std::isfinite(mix.ln_var[i]))) {
        finite = false;  // a non-finite IN statistic makes these so too
      }
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
  if (!finite) count_nonfinite(nonfinite, kNonFiniteEval);
  return {y, mean, var};
}

// Gradients of SN from the rows x and dy (same shape and dtype).
struct LayerGrads {
  at::Tensor dx;  // empty unless asked for
  std::vector<double> d_gamma, d_beta, d_mean_share, d_var_share;
};

// ``pooled_grad``: the BN statistics are this batch's pooling, so their
// gradient flows into dx; otherwise they are constants.
LayerGrads backward_rows(const at::Tensor& dy, const at::Tensor& x,
                         const at::Tensor& mean_in_t,
                         const at::Tensor& var_in_t, const LayerArgs& a,
                         bool pooled_grad, int64_t correction, bool need_dx) {
  check_rows(x, "switchable_norm_backward");
  check_same(x, dy, "switchable_norm_backward");
  check_per_row(x, mean_in_t, "switchable_norm_backward");
  check_per_row(x, var_in_t, "switchable_norm_backward");
  TORCH_CHECK(!pooled_grad || a.bn != BatchStats::kNone,
              "mmsn::switchable_norm_backward: pooled BN statistics need a "
              "BN branch");
  const int64_t n = x.size(0), c = x.size(1), length = x.size(2);
  LayerGrads out;
  out.dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  out.d_gamma.assign(c, 0.0);
  out.d_beta.assign(c, 0.0);
  const auto sums = rows_grad_sums(dy, x, mean_in_t);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmsn_backward_rows", [&] {
    const Mixing<scalar_t> mix = mixing_of<scalar_t>(mean_in_t, var_in_t, a);
    const scalar_t* dot = std::get<0>(sums).const_data_ptr<scalar_t>();
    const scalar_t* sum_dy = std::get<1>(sums).const_data_ptr<scalar_t>();
    // Row (per-sample) and column (per-channel) sums of the gradients of
    // the mixed statistics, and the gradients of the shares. Samples are
    // split into a fixed number of blocks, summed in parallel and merged in
    // order, so that the result does not depend on the thread count.
    std::vector<double> gm_row(n), gv_row(n);
    const int64_t blocks = std::min<int64_t>(n, kReductionBlocks);
    // per block: gm_col, gv_col, d_gamma, d_beta (C each), then gp_mean and
    // gp_var (3 each); each block zeroes its own
    const int64_t stride = 4 * c + 6;
    const std::unique_ptr<double[]> partial(new double[blocks * stride]);
    // the per-row gradients that the dx pass needs, kept from this pass
    // rather than computed again there (a square root and a division per
    // row: on 1x1 maps, a fifth of the backward); every element is written
    const int64_t rows = n * c;
    const std::unique_ptr<double[]> kept(new double[need_dx ? 3 * rows : 0]);
    double* const kept_scale = kept.get();
    double* const kept_neg_grad_mean = kept_scale + (need_dx ? rows : 0);
    double* const kept_grad_var = kept_neg_grad_mean + (need_dx ? rows : 0);
    at::parallel_for(0, blocks, 1, [&](int64_t kb, int64_t ke) {
      RowGradsScratch g(c);
      // without dx, the kept gradients of one sample at a time
      std::vector<double> own(need_dx ? 0 : 3 * c);
      for (int64_t k = kb; k < ke; ++k) {
        double* gm_col = &partial[k * stride];
        std::fill(gm_col, gm_col + stride, 0.0);
        double* gv_col = gm_col + c;
        double* dg = gv_col + c;
        double* db = dg + c;
        double* gp = db + c;  // gp_mean[0..2], gp_var[0..2]
        for (int64_t i = n * k / blocks; i < n * (k + 1) / blocks; ++i) {
          double* scale = need_dx ? kept_scale + i * c : own.data();
          double* neg_grad_mean =
              need_dx ? kept_neg_grad_mean + i * c : scale + c;
          double* grad_var = need_dx ? kept_grad_var + i * c : scale + 2 * c;
          row_grads_of_sample(mix, i, dot, sum_dy, &g, scale, neg_grad_mean,
                              grad_var);
          double sums[4];
          accumulate_row_grads(sum_dy + i * c, mix.mean_in + i * c,
                               mix.var_in + i * c, g.grad_centered.data(),
                               g.rstd.data(), neg_grad_mean, grad_var, c, dg,
                               db, gm_col, gv_col, sums);
          gm_row[i] = sums[0];
          gv_row[i] = sums[1];
          gp[0] += sums[2];
          gp[3] += sums[3];
          gp[1] += sums[0] * mix.ln_mean[i];
          gp[4] += sums[1] * mix.ln_var[i];
        }
      }
    });
    std::vector<double> gm_col(c, 0.0), gv_col(c, 0.0);
    std::vector<double> gp_mean(mix.w.size(), 0.0), gp_var(mix.u.size(), 0.0);
    for (int64_t k = 0; k < blocks; ++k) {
      const double* part = &partial[k * stride];
      add_into(gm_col.data(), part, c);
      add_into(gv_col.data(), part + c, c);
      add_into(out.d_gamma.data(), part + 2 * c, c);
      add_into(out.d_beta.data(), part + 3 * c, c);
      for (int t = 0; t < 2; ++t) {
        gp_mean[t] += part[4 * c + t];
        gp_var[t] += part[4 * c + 3 + t];
      }
    }
    if (mix.has_bn()) {
      double gp_bn_mean = 0, gp_bn_var = 0;
      const double *bm = mix.bn_mean.data(), *bv = mix.bn_var.data();
      _Pragma("omp simd reduction(+ : gp_bn_mean, gp_bn_var)")
      for (int64_t j = 0; j < c; ++j) {
        gp_bn_mean += gm_col[j] * bm[j];
        gp_bn_var += gv_col[j] * bv[j];
      }
      gp_mean[2] += gp_bn_mean;
      gp_var[2] += gp_bn_var;
    }
    // gp_mean holds the gradient of the negated mixed mean
    out.d_mean_share = gp_mean;
    for (double& v : out.d_mean_share) v = -v;
    out.d_var_share = gp_var;
    if (!need_dx) return;

    // dx = scale * dy + coef_x * (x - mean_in) + k per row, through the IN
    // statistics directly and through the pooled LN (and BN) ones:
    // mean_p = mean(mean_in), var_p = mean(var_in + (mean_in - mean_p)^2)
    // have d/dmean_in = (1 + 2 g_var (mean_in - mean_p)) / count and
    // d/dvar_in = 1 / count.
    const double dvar_dx = 2.0 / static_cast<double>(length - correction);
    // the BN branch's terms per channel, computed once (zero when the BN
    // statistics are constants)
    std::vector<double> gm_bn(c, 0.0), gv_bn(c, 0.0);
    if (pooled_grad) {
      for (int64_t j = 0; j < c; ++j) {
        gm_bn[j] = -gm_col[j] * mix.w[2] / n;
        gv_bn[j] = gv_col[j] * mix.u[2] / n;
      }
    }
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    scalar_t* pdx = out.dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * c, row_grain(length), [&](int64_t b, int64_t e) {
      std::vector<scalar_t> coef_a(c), coef_b(c), coef_k(c);
      for (int64_t r = b; r < e;) {
        const int64_t i = r / c, j0 = r % c, j1 = std::min(c, j0 + (e - r));
        // indexed by j - j0, as the coefficients are
        const double* scale = &kept_scale[r];
        const double* neg_grad_mean = &kept_neg_grad_mean[r];
        const double* grad_var = &kept_grad_var[r];
        const double gm_ln = gm_row[i] * mix.w[1] / c;
        const double gv_ln = gv_row[i] * mix.u[1] / c;
        const double ln_mean = mix.ln_mean[i], w0 = mix.w[0], u0 = mix.u[0];
        const scalar_t* mean_in = mix.mean_in + i * c;
        const double* bn_mean = mix.bn_mean_or_zero.data();
        // one loop per case, so that each is vectorized and the sums are
        // those of the formulas, term for term
        if (pooled_grad) {
          _Pragma("omp simd")
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t k = j - j0;
            const double mean_r = mean_in[j];
            const double grad_mean_in =
                -(gm_ln + w0 * neg_grad_mean[k]) +
                2.0 * (mean_r - ln_mean) * gv_ln +
                (gm_bn[j] + 2.0 * (mean_r - bn_mean[j]) * gv_bn[j]);
            const double grad_var_in = gv_ln + u0 * grad_var[k] + gv_bn[j];
            coef_a[k] = static_cast<scalar_t>(scale[k]);
            coef_b[k] = static_cast<scalar_t>(grad_var_in * dvar_dx);
            coef_k[k] = static_cast<scalar_t>(grad_mean_in / length);
          }
        } else {
          _Pragma("omp simd")
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t k = j - j0;
            const double grad_mean_in =
                -(gm_ln + w0 * neg_grad_mean[k]) +
                2.0 * (mean_in[j] - ln_mean) * gv_ln;
            const double grad_var_in = gv_ln + u0 * grad_var[k];
            coef_a[k] = static_cast<scalar_t>(scale[k]);
            coef_b[k] = static_cast<scalar_t>(grad_var_in * dvar_dx);
            coef_k[k] = static_cast<scalar_t>(grad_mean_in / length);
          }
        }
        rows_grad_input_block(pdy + r * length, px + r * length,
                              pdx + r * length, j1 - j0, length,
                              mix.mean_in + r, coef_a.data(), coef_b.data(),
                              coef_k.data());
        r += j1 - j0;
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace mmsn
