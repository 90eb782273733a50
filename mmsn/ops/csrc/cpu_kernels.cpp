// CPU kernels of the operators declared in library.cpp: the row passes and
// whole-layer kernels the Python backends call (mmsn/ops/backends/
// compiled.py), and SN's and SSN's layer operators, which take a layer's
// parameters and buffers as they are and do all of a pass in one call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "layer.h"
#include "mixing.h"
#include "rows.h"
#include "sparsestmax.h"

namespace mmsn {
namespace {

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors5 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---------------------------------------------------------------------------
// Whole-layer kernels over prepared rows, for the Python backends
// ---------------------------------------------------------------------------
LayerArgs args_with_shares(const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias,
                           const at::Tensor& mean_share,
                           const at::Tensor& var_share,
                           const std::optional<at::Tensor>& batch_mean,
                           const std::optional<at::Tensor>& batch_var,
                           double eps) {
  return LayerArgs{weight,
                   bias,
                   shares_of(mean_share, false),
                   shares_of(var_share, false),
                   batch_mean.has_value() ? BatchStats::kGiven
                                          : BatchStats::kNone,
                   batch_mean,
                   batch_var,
                   eps};
}

at::Tensor sn_affine(const at::Tensor& x, const at::Tensor& mean_in,
                     const at::Tensor& var_in,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias,
                     const at::Tensor& mean_share, const at::Tensor& var_share,
                     const std::optional<at::Tensor>& batch_mean,
                     const std::optional<at::Tensor>& batch_var, double eps) {
  return train_rows(x, mean_in, var_in,
                    args_with_shares(weight, bias, mean_share, var_share,
                                     batch_mean, batch_var, eps),
                    std::nullopt, std::nullopt);
}

Tensors3 sn_forward_fixed(const at::Tensor& x,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias,
                          const at::Tensor& mean_share,
                          const at::Tensor& var_share,
                          const std::optional<at::Tensor>& batch_mean,
                          const std::optional<at::Tensor>& batch_var,
                          double eps, int64_t correction) {
  return forward_fixed(x,
                       args_with_shares(weight, bias, mean_share, var_share,
                                        batch_mean, batch_var, eps),
                       correction, std::nullopt);
}

Tensors5 sn_backward(const at::Tensor& dy, const at::Tensor& x,
                     const at::Tensor& mean_in, const at::Tensor& var_in,
                     const std::optional<at::Tensor>& weight,
                     const at::Tensor& mean_share, const at::Tensor& var_share,
                     const std::optional<at::Tensor>& batch_mean,
                     const std::optional<at::Tensor>& batch_var,
                     bool pooled_bn, double eps, int64_t correction,
                     bool need_dx) {
  TORCH_CHECK(!pooled_bn || batch_mean.has_value(),
              "mmsn::sn_backward: pooled_bn needs batch statistics");
  const LayerGrads g = backward_rows(
      dy, x, mean_in, var_in,
      args_with_shares(weight, std::nullopt, mean_share, var_share,
                       batch_mean, batch_var, eps),
      pooled_bn, correction, need_dx);
  const auto opts = x.options();
  const int64_t c = x.size(1);
  return {g.dx, from_doubles(g.d_gamma, {c}, opts),
          from_doubles(g.d_beta, {c}, opts),
          from_doubles(g.d_mean_share, {mean_share.numel()}, opts),
          from_doubles(g.d_var_share, {var_share.numel()}, opts)};
}

// ---------------------------------------------------------------------------
// The layer operators: any float input of shape (N, C, *), any layout
// ---------------------------------------------------------------------------
void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "mmsn::", op,
              ": expected a floating-point input, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0, "mmsn::", op,
              ": expected a non-empty (N, C, ...) input, got sizes ",
              x.sizes());
}

// x as contiguous (N, C, L) rows of float32 or float64 (half precision is
// computed in float32).
at::Tensor as_rows(const at::Tensor& x) {
  at::Tensor rows = x.reshape({x.size(0), x.size(1), -1});
  if (rows.scalar_type() != at::kFloat && rows.scalar_type() != at::kDouble) {
    rows = rows.to(at::kFloat);
  }
  return rows.contiguous();
}

// Rows back to the shape, dtype and memory format of ``like``.
at::Tensor like_input(const at::Tensor& rows, const at::Tensor& like) {
  at::Tensor out = rows.view(like.sizes());
  if (out.scalar_type() != like.scalar_type()) {
    out = out.to(like.scalar_type());
  }
  const auto format = like.suggest_memory_format();
  if (format != at::MemoryFormat::Contiguous && !out.is_contiguous(format)) {
    out = out.contiguous(format);
  }
  return out;
}

int64_t correction_of(const at::Tensor& rows, bool unbiased) {
  return unbiased && rows.size(2) > 1 ? 1 : 0;
}

BatchStats batch_stats_kind(const at::Tensor& mean_weight, bool given) {
  if (mean_weight.numel() == 2) return BatchStats::kNone;
  TORCH_CHECK(mean_weight.numel() == 3,
              "mmsn: expected 3 importance weights [IN, LN, BN] or 2 "
              "[IN, LN], got ", mean_weight.numel());
  return given ? BatchStats::kGiven : BatchStats::kPooled;
}

LayerArgs layer_args(const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias,
                     const at::Tensor& mean_weight,
                     const at::Tensor& var_weight, bool softmax,
                     BatchStats bn, const std::optional<at::Tensor>& mean,
                     const std::optional<at::Tensor>& var, double eps) {
  TORCH_CHECK(bn != BatchStats::kGiven || (mean.has_value() && var.has_value()),
              "mmsn: running statistics are needed with a BN branch in eval");
  return LayerArgs{weight,
                   bias,
                   shares_of(mean_weight, softmax),
                   shares_of(var_weight, softmax),
                   bn,
                   bn == BatchStats::kGiven ? mean : std::nullopt,
                   bn == BatchStats::kGiven ? var : std::nullopt,
                   eps};
}

Tensors3 switchable_norm_train(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_weight,
    const at::Tensor& var_weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    const std::optional<at::Tensor>& nonfinite, bool softmax,
    std::optional<double> momentum, bool moving_average, double eps,
    bool unbiased, bool update_stats) {
  check_input(x, "switchable_norm_train");
  const at::Tensor rows = as_rows(x);
  const BatchStats bn = batch_stats_kind(mean_weight, false);
  std::optional<RunningStats> running;
  if (bn == BatchStats::kPooled && update_stats && running_mean.has_value()) {
    TORCH_CHECK(running_var.has_value() && num_batches_tracked.has_value(),
                "mmsn::switchable_norm_train: running_mean, running_var and "
                "num_batches_tracked go together");
    running = RunningStats{*running_mean, *running_var, *num_batches_tracked,
                           momentum, moving_average};
  }
  auto [mean_in, var_in] = instance_moments(rows, correction_of(rows, unbiased));
  const at::Tensor y = train_rows(
      rows, mean_in, var_in,
      layer_args(weight, bias, mean_weight, var_weight, softmax, bn,
                 std::nullopt, std::nullopt, eps),
      running, nonfinite);
  return {like_input(y, x), mean_in, var_in};
}

Tensors3 switchable_norm_eval(const at::Tensor& x,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const at::Tensor& mean_weight,
                              const at::Tensor& var_weight,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& nonfinite,
                              bool softmax, double eps, bool unbiased) {
  check_input(x, "switchable_norm_eval");
  const at::Tensor rows = as_rows(x);
  const BatchStats bn = batch_stats_kind(mean_weight, true);
  auto [y, mean_in, var_in] = forward_fixed(
      rows,
      layer_args(weight, bias, mean_weight, var_weight, softmax, bn,
                 running_mean, running_var, eps),
      correction_of(rows, unbiased), nonfinite);
  return {like_input(y, x), mean_in, var_in};
}

Tensors5 switchable_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean_in,
    const at::Tensor& var_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean_weight, const at::Tensor& var_weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool softmax,
    bool batch_stats, double eps, bool unbiased, bool need_dx) {
  const at::Tensor rows = as_rows(x);
  const at::Tensor dy = as_rows(grad_y).to(rows.scalar_type()).contiguous();
  const BatchStats bn = batch_stats_kind(mean_weight, !batch_stats);
  const LayerArgs args =
      layer_args(weight, std::nullopt, mean_weight, var_weight, softmax, bn,
                 running_mean, running_var, eps);
  LayerGrads g = backward_rows(dy, rows, mean_in, var_in, args,
                               bn == BatchStats::kPooled,
                               correction_of(rows, unbiased), need_dx);
  if (softmax) {  // from the shares' gradients to the logits'
    g.d_mean_share = softmax_backward(args.w, g.d_mean_share);
    g.d_var_share = softmax_backward(args.u, g.d_var_share);
  }
  const int64_t c = x.size(1);
  const auto param_options = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->options() : x.options().dtype(rows.dtype());
  };
  return {need_dx ? like_input(g.dx, x) : at::empty({0}, x.options()),
          from_doubles(g.d_gamma, {c}, param_options(weight)),
          from_doubles(g.d_beta, {c}, param_options(weight)),
          from_doubles(g.d_mean_share, {mean_weight.numel()},
                       mean_weight.options()),
          from_doubles(g.d_var_share, {var_weight.numel()},
                       var_weight.options())};
}

// ---------------------------------------------------------------------------
// SSN's shares (vectors of K <= 3 numbers: plain loops, no ATen ops)
// ---------------------------------------------------------------------------
int64_t argmax_of(const std::vector<double>& v) {
  return std::max_element(v.begin(), v.end()) - v.begin();
}

bool is_fixed(const at::Tensor& flag) {
  TORCH_CHECK(flag.numel() == 1 && flag.scalar_type() == at::kLong,
              "mmsn: a fixed flag is an int64 tensor of one element");
  return *flag.const_data_ptr<int64_t>() != 0;
}

// Writes v into the contiguous tensor t of any floating dtype.
void write_doubles(const at::Tensor& t, const double* v, int64_t count) {
  TORCH_CHECK(t.is_contiguous() && t.numel() == count,
              "mmsn: expected a contiguous tensor of ", count, " elements");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.scalar_type(), "mmsn_write", [&] {
        scalar_t* p = t.mutable_data_ptr<scalar_t>();
        for (int64_t i = 0; i < count; ++i) p[i] = static_cast<scalar_t>(v[i]);
      });
}

Tensors3 sparsestmax_shares(const at::Tensor& mean_weight,
                            const at::Tensor& var_weight,
                            const at::Tensor& radius,
                            const at::Tensor& mean_fixed,
                            const at::Tensor& var_fixed) {
  const int64_t k = mean_weight.numel();
  TORCH_CHECK(k >= 2 && var_weight.numel() == k,
              "mmsn::sparsestmax_shares: expected two vectors of the same "
              "length >= 2, got ", mean_weight.sizes(), " and ",
              var_weight.sizes());
  const double r = as_doubles(radius).at(0);
  const auto opts = mean_weight.options();
  at::Tensor shares[2] = {at::empty({k}, opts), at::empty({k}, opts)};
  at::Tensor jac = at::empty({2, k, k}, opts);
  const at::Tensor* logits[2] = {&mean_weight, &var_weight};
  const at::Tensor* fixed[2] = {&mean_fixed, &var_fixed};
  std::vector<double> all_jac(2 * k * k, 0.0);
  for (int v = 0; v < 2; ++v) {
    const std::vector<double> logit = as_doubles(*logits[v]);
    std::vector<double> share(k, 0.0);
    if (is_fixed(*fixed[v])) {
      share[argmax_of(logit)] = 1.0;  // the stored one-hot vector
    } else {
      Matrix j;
      share = sparsestmax(logit, r, &j);
      std::copy(j.begin(), j.end(), all_jac.begin() + v * k * k);
    }
    write_doubles(shares[v], share.data(), k);
  }
  write_doubles(jac, all_jac.data(), 2 * k * k);
  return {shares[0], shares[1], jac};
}

std::tuple<at::Tensor, at::Tensor> sparsestmax_shares_backward(
    const at::Tensor& grad_mean_share, const at::Tensor& grad_var_share,
    const at::Tensor& jacobian) {
  const int64_t k = jacobian.size(-1);
  const std::vector<double> jac = as_doubles(jacobian);
  const at::Tensor* grads[2] = {&grad_mean_share, &grad_var_share};
  at::Tensor out[2];
  for (int v = 0; v < 2; ++v) {
    const std::vector<double> g = as_doubles(*grads[v]);
    std::vector<double> d(k, 0.0);  // J^T g
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t l = 0; l < k; ++l) d[l] += jac[v * k * k + i * k + l] * g[i];
    }
    out[v] = at::empty({k}, jacobian.options());
    write_doubles(out[v], d.data(), k);
  }
  return {out[0], out[1]};
}

void sparsestmax_freeze_(const at::Tensor& mean_weight,
                         const at::Tensor& var_weight,
                         const at::Tensor& mean_fixed,
                         const at::Tensor& var_fixed,
                         const std::optional<at::Tensor>& mean_grad,
                         const std::optional<at::Tensor>& var_grad,
                         const at::Tensor& mean_share,
                         const at::Tensor& var_share) {
  const at::Tensor* params[2] = {&mean_weight, &var_weight};
  const at::Tensor* flags[2] = {&mean_fixed, &var_fixed};
  const std::optional<at::Tensor>* grads[2] = {&mean_grad, &var_grad};
  const at::Tensor* shares[2] = {&mean_share, &var_share};
  for (int v = 0; v < 2; ++v) {
    const std::vector<double> share = as_doubles(*shares[v]);
    int64_t nonzero = 0;
    for (double s : share) nonzero += s > 0;
    if (!(is_fixed(*flags[v]) || nonzero == 1)) continue;
    std::vector<double> one_hot(share.size(), 0.0);
    one_hot[argmax_of(share)] = 1.0;
    write_doubles(*params[v], one_hot.data(), params[v]->numel());
    *flags[v]->mutable_data_ptr<int64_t>() = 1;
    // gradient accumulated before the freeze must not move it
    if (grads[v]->has_value() && (*grads[v])->defined()) {
      const std::vector<double> zeros((*grads[v])->numel(), 0.0);
      write_doubles(**grads[v], zeros.data(), zeros.size());
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mmsn, CPU, m) {
  m.impl("instance_moments", &instance_moments);
  m.impl("rows_affine", &rows_affine);
  m.impl("rows_grad_sums", &rows_grad_sums);
  m.impl("rows_grad_input", &rows_grad_input);
  m.impl("sn_affine", &sn_affine);
  m.impl("sn_forward_fixed", &sn_forward_fixed);
  m.impl("sn_backward", &sn_backward);
  m.impl("switchable_norm_train", &switchable_norm_train);
  m.impl("switchable_norm_eval", &switchable_norm_eval);
  m.impl("switchable_norm_backward", &switchable_norm_backward);
  m.impl("sparsestmax_shares", &sparsestmax_shares);
  m.impl("sparsestmax_shares_backward", &sparsestmax_shares_backward);
  m.impl("sparsestmax_freeze_", &sparsestmax_freeze_);
}

}  // namespace mmsn
