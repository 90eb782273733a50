// Gradients of SSN's operators (library.cpp), for every device: the
// shares, the freeze, and SSN's forwards in one call each (the shares, in
// training the freeze, then SN's operator with the shares: one graph node,
// whose backward carries the shares' gradients on to the logits).
#include <torch/library.h>

#include "autograd.h"

namespace mmsn {
namespace {

Tensors3 shares_without_graph(const at::Tensor& mean_weight,
                              const at::Tensor& var_weight,
                              const at::Tensor& radius,
                              const at::Tensor& mean_fixed,
                              const at::Tensor& var_fixed) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return shares_op().call(mean_weight, var_weight, radius, mean_fixed,
                          var_fixed);
}

class SparsestmaxShares
    : public torch::autograd::Function<SparsestmaxShares> {
 public:
  static variable_list forward(AutogradContext* ctx,
                               const at::Tensor& mean_weight,
                               const at::Tensor& var_weight,
                               const at::Tensor& radius,
                               const at::Tensor& mean_fixed,
                               const at::Tensor& var_fixed) {
    auto [mean_share, var_share, jacobian] = shares_without_graph(
        mean_weight, var_weight, radius, mean_fixed, var_fixed);
    ctx->save_for_backward({jacobian});
    ctx->mark_non_differentiable({jacobian});
    ctx->set_materialize_grads(false);
    return {mean_share, var_share, jacobian};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward();
    const at::Tensor jacobian = ctx->get_saved_variables()[0];
    at::Tensor g_mean = grads[0], g_var = grads[1];
    if (!g_mean.defined()) g_mean = at::zeros({jacobian.size(-1)},
                                              jacobian.options());
    if (!g_var.defined()) g_var = at::zeros_like(g_mean);
    at::AutoDispatchBelowADInplaceOrView guard;  // as in layer_backward
    auto [d_mean, d_var] = shares_backward_op().call(g_mean, g_var, jacobian);
    return {d_mean, d_var, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensors3 sparsestmax_shares_autograd(const at::Tensor& mean_weight,
                                     const at::Tensor& var_weight,
                                     const at::Tensor& radius,
                                     const at::Tensor& mean_fixed,
                                     const at::Tensor& var_fixed) {
  if (!records({&mean_weight, &var_weight}, {})) {
    return shares_without_graph(mean_weight, var_weight, radius, mean_fixed,
                                var_fixed);
  }
  const auto out = SparsestmaxShares::apply(mean_weight, var_weight, radius,
                                            mean_fixed, var_fixed);
  return {out[0], out[1], out[2]};
}

// Stores one-hot shares into the parameters: bookkeeping of SSN's forward,
// outside the graph (as an optimizer step is).
void sparsestmax_freeze_autograd(const at::Tensor& mean_weight,
                                 const at::Tensor& var_weight,
                                 const at::Tensor& mean_fixed,
                                 const at::Tensor& var_fixed,
                                 const OptTensor& mean_grad,
                                 const OptTensor& var_grad,
                                 const at::Tensor& mean_share,
                                 const at::Tensor& var_share) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    freeze_op().call(mean_weight, var_weight, mean_fixed, var_fixed,
                     mean_grad, var_grad, mean_share, var_share);
  }
  for (const at::Tensor* t :
       {&mean_weight, &var_weight, &mean_fixed, &var_fixed}) {
    torch::autograd::impl::bump_version(*t);
  }
  bump_versions({&mean_grad, &var_grad});
}

// The shares of SSN's logits and their Jacobian, after storing the shares
// that came out one-hot (no graph).
Tensors3 frozen_shares(const at::Tensor& mean_weight,
                       const at::Tensor& var_weight, const at::Tensor& radius,
                       const at::Tensor& mean_fixed,
                       const at::Tensor& var_fixed, const OptTensor& mean_grad,
                       const OptTensor& var_grad) {
  const Tensors3 shares = shares_without_graph(mean_weight, var_weight,
                                              radius, mean_fixed, var_fixed);
  sparsestmax_freeze_autograd(mean_weight, var_weight, mean_fixed, var_fixed,
                              mean_grad, var_grad, std::get<0>(shares),
                              std::get<1>(shares));
  return shares;
}

#define MMSN_SSN_TRAIN_PARAMS                                                 \
  const at::Tensor &x, const OptTensor &weight, const OptTensor &bias,        \
      const at::Tensor &mean_weight, const at::Tensor &var_weight,            \
      const at::Tensor &radius, const at::Tensor &mean_fixed,                 \
      const at::Tensor &var_fixed, const OptTensor &mean_grad,                \
      const OptTensor &var_grad, const OptTensor &running_mean,               \
      const OptTensor &running_var, const OptTensor &num_batches_tracked,     \
      const OptTensor &nonfinite, std::optional<double> momentum,             \
      bool moving_average, double eps, bool unbiased, bool update_stats

Tensors3 sparse_train_without_graph(MMSN_SSN_TRAIN_PARAMS) {
  auto [mean_share, var_share, jacobian] =
      frozen_shares(mean_weight, var_weight, radius, mean_fixed, var_fixed,
                    mean_grad, var_grad);
  return train_without_graph(x, weight, bias, mean_share, var_share,
                             running_mean, running_var, num_batches_tracked,
                             nonfinite, /*softmax=*/false, momentum,
                             moving_average, eps, unbiased, update_stats);
}

Tensors3 sparse_switchable_norm_train_autograd(MMSN_SSN_TRAIN_PARAMS) {
  if (!records({&x, &mean_weight, &var_weight}, {&weight, &bias})) {
    return sparse_train_without_graph(
        x, weight, bias, mean_weight, var_weight, radius, mean_fixed,
        var_fixed, mean_grad, var_grad, running_mean, running_var,
        num_batches_tracked, nonfinite, momentum, moving_average, eps,
        unbiased, update_stats);
  }
  auto [mean_share, var_share, jacobian] =
      frozen_shares(mean_weight, var_weight, radius, mean_fixed, var_fixed,
                    mean_grad, var_grad);
  const auto out = SwitchableNormTrain::apply(
      x, weight, bias, mean_weight, var_weight, running_mean, running_var,
      num_batches_tracked, nonfinite, /*softmax=*/false, momentum,
      moving_average, eps, unbiased, update_stats, mean_share, var_share,
      jacobian);
  return {out[0], out[1], out[2]};
}
#undef MMSN_SSN_TRAIN_PARAMS

#define MMSN_SSN_EVAL_PARAMS                                               \
  const at::Tensor &x, const OptTensor &weight, const OptTensor &bias,     \
      const at::Tensor &mean_weight, const at::Tensor &var_weight,         \
      const at::Tensor &radius, const at::Tensor &mean_fixed,              \
      const at::Tensor &var_fixed, const OptTensor &running_mean,          \
      const OptTensor &running_var, const OptTensor &nonfinite, double eps, \
      bool unbiased

Tensors3 sparse_eval_without_graph(MMSN_SSN_EVAL_PARAMS) {
  const Tensors3 shares = shares_without_graph(mean_weight, var_weight,
                                              radius, mean_fixed, var_fixed);
  return eval_without_graph(x, weight, bias, std::get<0>(shares),
                            std::get<1>(shares), running_mean, running_var,
                            nonfinite, /*softmax=*/false, eps, unbiased);
}

Tensors3 sparse_switchable_norm_eval_autograd(MMSN_SSN_EVAL_PARAMS) {
  if (!records({&x, &mean_weight, &var_weight}, {&weight, &bias})) {
    return sparse_eval_without_graph(x, weight, bias, mean_weight,
                                     var_weight, radius, mean_fixed,
                                     var_fixed, running_mean, running_var,
                                     nonfinite, eps, unbiased);
  }
  const Tensors3 shares = shares_without_graph(mean_weight, var_weight,
                                              radius, mean_fixed, var_fixed);
  const auto out = SwitchableNormEval::apply(
      x, weight, bias, mean_weight, var_weight, running_mean, running_var,
      nonfinite, /*softmax=*/false, eps, unbiased, std::get<0>(shares),
      std::get<1>(shares), std::get<2>(shares));
  return {out[0], out[1], out[2]};
}
#undef MMSN_SSN_EVAL_PARAMS

}  // namespace

// Below autograd (inference mode, the meta device) the same calls, without
// a graph.
TORCH_LIBRARY_IMPL(mmsn, CompositeExplicitAutograd, m) {
  m.impl("sparse_switchable_norm_train", &sparse_train_without_graph);
  m.impl("sparse_switchable_norm_eval", &sparse_eval_without_graph);
}

TORCH_LIBRARY_IMPL(mmsn, Autograd, m) {
  m.impl("sparse_switchable_norm_train",
         &sparse_switchable_norm_train_autograd);
  m.impl("sparse_switchable_norm_eval",
         &sparse_switchable_norm_eval_autograd);
  m.impl("sparsestmax_freeze_", &sparsestmax_freeze_autograd);
  m.impl("sparsestmax_shares", &sparsestmax_shares_autograd);
}

}  // namespace mmsn
