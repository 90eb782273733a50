// Gradients of SN's layer operators (library.cpp), for every device: each
// forward calls the operator below autograd (so the device's kernel runs,
// whichever registered it) and saves what its backward operator needs.
// Written in C++ so that a layer call costs the host what BatchNorm's does.
#include <torch/library.h>

#include "autograd.h"

namespace mmsn {
namespace {

class SwitchableNormTrain
    : public torch::autograd::Function<SwitchableNormTrain> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
      const OptTensor& bias, const at::Tensor& mean_weight,
      const at::Tensor& var_weight, const OptTensor& running_mean,
      const OptTensor& running_var, const OptTensor& num_batches_tracked,
      const OptTensor& nonfinite, bool softmax,
      std::optional<double> momentum, bool moving_average, double eps,
      bool unbiased, bool update_stats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean_in, var_in] = train_op().call(
        x, weight, bias, mean_weight, var_weight, running_mean, running_var,
        num_batches_tracked, nonfinite, softmax, momentum, moving_average,
        eps, unbiased, update_stats);
    bump_versions({&running_mean, &running_var, &num_batches_tracked,
                   &nonfinite});
    save_layer(ctx, x, mean_in, var_in, weight, bias, mean_weight,
               var_weight, std::nullopt, std::nullopt, softmax,
               /*batch_stats=*/true, eps, unbiased);
    return {y, mean_in, var_in};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return layer_backward(ctx, grads, 10);
  }
};

class SwitchableNormEval
    : public torch::autograd::Function<SwitchableNormEval> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
      const OptTensor& bias, const at::Tensor& mean_weight,
      const at::Tensor& var_weight, const OptTensor& running_mean,
      const OptTensor& running_var, const OptTensor& nonfinite, bool softmax,
      double eps, bool unbiased) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean_in, var_in] =
        eval_op().call(x, weight, bias, mean_weight, var_weight, running_mean,
                       running_var, nonfinite, softmax, eps, unbiased);
    bump_versions({&nonfinite});
    save_layer(ctx, x, mean_in, var_in, weight, bias, mean_weight,
               var_weight, running_mean, running_var, softmax,
               /*batch_stats=*/false, eps, unbiased);
    return {y, mean_in, var_in};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return layer_backward(ctx, grads, 6);
  }
};

Tensors3 switchable_norm_train_autograd(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& nonfinite,
    bool softmax, std::optional<double> momentum, bool moving_average,
    double eps, bool unbiased, bool update_stats) {
  if (!records({&x, &mean_weight, &var_weight}, {&weight, &bias})) {
    Tensors3 out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = train_op().call(x, weight, bias, mean_weight, var_weight,
                            running_mean, running_var, num_batches_tracked,
                            nonfinite, softmax, momentum, moving_average, eps,
                            unbiased, update_stats);
    }
    bump_versions({&running_mean, &running_var, &num_batches_tracked,
                   &nonfinite});
    return out;
  }
  const auto out = SwitchableNormTrain::apply(
      x, weight, bias, mean_weight, var_weight, running_mean, running_var,
      num_batches_tracked, nonfinite, softmax, momentum, moving_average, eps,
      unbiased, update_stats);
  return {out[0], out[1], out[2]};
}

Tensors3 switchable_norm_eval_autograd(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& nonfinite, bool softmax, double eps, bool unbiased) {
  if (!records({&x, &mean_weight, &var_weight}, {&weight, &bias})) {
    Tensors3 out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = eval_op().call(x, weight, bias, mean_weight, var_weight,
                           running_mean, running_var, nonfinite, softmax, eps,
                           unbiased);
    }
    bump_versions({&nonfinite});
    return out;
  }
  const auto out = SwitchableNormEval::apply(
      x, weight, bias, mean_weight, var_weight, running_mean, running_var,
      nonfinite, softmax, eps, unbiased);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmsn, Autograd, m) {
  m.impl("switchable_norm_train", &switchable_norm_train_autograd);
  m.impl("switchable_norm_eval", &switchable_norm_eval_autograd);
}

}  // namespace mmsn
