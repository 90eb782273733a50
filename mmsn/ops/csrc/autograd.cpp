// Autograd kernels of SN's layer operators (library.cpp), for every device,
// over the Functions of autograd.h. Written in C++ so that a layer call
// costs the host what BatchNorm's does.
#include <torch/library.h>

#include "autograd.h"

namespace mmsn {
namespace {

Tensors3 switchable_norm_train_autograd(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& nonfinite,
    bool softmax, std::optional<double> momentum, bool moving_average,
    double eps, bool unbiased, bool update_stats) {
  if (!records({&x, &mean_weight, &var_weight}, {&weight, &bias})) {
    return train_without_graph(x, weight, bias, mean_weight, var_weight,
                               running_mean, running_var,
                               num_batches_tracked, nonfinite, softmax,
                               momentum, moving_average, eps, unbiased,
                               update_stats);
  }
  const auto out = SwitchableNormTrain::apply(
      x, weight, bias, mean_weight, var_weight, running_mean, running_var,
      num_batches_tracked, nonfinite, softmax, momentum, moving_average, eps,
      unbiased, update_stats, std::nullopt, std::nullopt, std::nullopt);
  return {out[0], out[1], out[2]};
}

Tensors3 switchable_norm_eval_autograd(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& nonfinite, bool softmax, double eps, bool unbiased) {
  if (!records({&x, &mean_weight, &var_weight}, {&weight, &bias})) {
    return eval_without_graph(x, weight, bias, mean_weight, var_weight,
                              running_mean, running_var, nonfinite, softmax,
                              eps, unbiased);
  }
  const auto out = SwitchableNormEval::apply(
      x, weight, bias, mean_weight, var_weight, running_mean, running_var,
      nonfinite, softmax, eps, unbiased, std::nullopt, std::nullopt,
      std::nullopt);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmsn, Autograd, m) {
  m.impl("switchable_norm_train", &switchable_norm_train_autograd);
  m.impl("switchable_norm_eval", &switchable_norm_eval_autograd);
}

}  // namespace mmsn
