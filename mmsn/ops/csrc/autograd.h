// The autograd Functions of SN's layer operators and what they are made of,
// for their kernels (autograd.cpp: SN's, ssn_autograd.cpp: SSN's, which mix
// with SparsestMax shares): each forward calls the operator below autograd
// (so the device's kernel runs, whichever registered it) and saves what
// its backward operator needs.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

#include <optional>
#include <tuple>

namespace mmsn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors5 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<Signature>();
}

const auto& train_op() {
  static const auto op = find_op<Tensors3(
      const at::Tensor&, const OptTensor&, const OptTensor&,
      const at::Tensor&, const at::Tensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, const OptTensor&, bool,
      std::optional<double>, bool, double, bool, bool)>(
      "mmsn::switchable_norm_train");
  return op;
}

const auto& eval_op() {
  static const auto op = find_op<Tensors3(
      const at::Tensor&, const OptTensor&, const OptTensor&,
      const at::Tensor&, const at::Tensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, bool, double, bool)>(
      "mmsn::switchable_norm_eval");
  return op;
}

const auto& backward_op() {
  static const auto op = find_op<Tensors5(
      const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const OptTensor&, const at::Tensor&,
      const at::Tensor&, const OptTensor&, const OptTensor&, bool, bool,
      double, bool, bool)>("mmsn::switchable_norm_backward");
  return op;
}

const auto& shares_op() {
  static const auto op = find_op<Tensors3(
      const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&)>("mmsn::sparsestmax_shares");
  return op;
}

const auto& shares_backward_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "mmsn::sparsestmax_shares_backward");
  return op;
}

const auto& freeze_op() {
  static const auto op = find_op<void(
      const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const OptTensor&, const OptTensor&,
      const at::Tensor&, const at::Tensor&)>("mmsn::sparsestmax_freeze_");
  return op;
}

void bump_versions(std::initializer_list<const OptTensor*> mutated) {
  for (const OptTensor* t : mutated) {
    if (t->has_value() && (*t)->defined()) {
      torch::autograd::impl::bump_version(**t);
    }
  }
}

void refuse_double_backward() {
  TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
              "SN's fast path is not differentiable twice (backward with "
              "create_graph=True); set MMSN_SN_PATH=composite before "
              "importing mmsn for second-order gradients");
}

// What both forwards save, and the backward they share.
void save_layer(AutogradContext* ctx, const at::Tensor& x,
                const at::Tensor& mean_in, const at::Tensor& var_in,
                const OptTensor& weight, const OptTensor& bias,
                const at::Tensor& mean_weight,
                const at::Tensor& var_weight, const OptTensor& running_mean,
                const OptTensor& running_var, bool softmax, bool batch_stats,
                double eps, bool unbiased,
                const at::Tensor& shares_jacobian = at::Tensor()) {
  // shares_jacobian: SSN's mean_weight and var_weight are its shares, and
  // the gradients go on through SparsestMax to the logits
  ctx->save_for_backward({x, mean_in, var_in, weight.value_or(at::Tensor()),
                          mean_weight, var_weight,
                          running_mean.value_or(at::Tensor()),
                          running_var.value_or(at::Tensor()),
                          shares_jacobian});
  ctx->saved_data["softmax"] = softmax;
  ctx->saved_data["batch_stats"] = batch_stats;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["unbiased"] = unbiased;
  // gradients only for the parameters that were given (affine=False: none)
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->mark_non_differentiable({mean_in, var_in});
  ctx->set_materialize_grads(false);  // no zeros for mean_in, var_in
}

OptTensor optional(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// Gradients of (x, weight, bias, mean_weight, var_weight), then one
// undefined gradient for each of the forward's other ``rest`` arguments.
variable_list layer_backward(AutogradContext* ctx,
                             const variable_list& grads, size_t rest) {
  refuse_double_backward();
  const auto saved = ctx->get_saved_variables();
  const at::Tensor& x = saved[0];
  at::Tensor dy = grads[0];
  if (!dy.defined()) dy = at::zeros_like(x);
  const bool need_dx = ctx->needs_input_grad(0);
  // below autograd: the backward operators have no Autograd kernel, and
  // its fallback would box every argument (64 -> 58 us for a tiny layer's
  // forward and backward without it)
  at::AutoDispatchBelowADInplaceOrView guard;
  auto [dx, d_weight, d_bias, d_mean_weight, d_var_weight] =
      backward_op().call(dy, x, saved[1], saved[2], optional(saved[3]),
                         saved[4], saved[5], optional(saved[6]),
                         optional(saved[7]),
                         ctx->saved_data["softmax"].toBool(),
                         ctx->saved_data["batch_stats"].toBool(),
                         ctx->saved_data["eps"].toDouble(),
                         ctx->saved_data["unbiased"].toBool(), need_dx);
  if (saved[8].defined()) {
    std::tie(d_mean_weight, d_var_weight) =
        shares_backward_op().call(d_mean_weight, d_var_weight, saved[8]);
  }
  variable_list out = {need_dx ? dx : at::Tensor(),
                       saved[3].defined() ? d_weight : at::Tensor(),
                       ctx->saved_data["has_bias"].toBool() ? d_bias
                                                            : at::Tensor(),
                       d_mean_weight, d_var_weight};
  out.resize(5 + rest);
  return out;
}

// Whether autograd has anything to record for these inputs: otherwise the
// operator runs without a graph node (an eval forward under no_grad, the
// fills of SNBatchAverageHook).
bool records(std::initializer_list<const at::Tensor*> tensors,
             std::initializer_list<const OptTensor*> optional) {
  if (!torch::autograd::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->requires_grad()) return true;
  }
  for (const OptTensor* t : optional) {
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) {
      return true;
    }
  }
  return false;
}

// The training and eval forwards without a graph node (below autograd).
Tensors3 train_without_graph(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean_weight, const at::Tensor& var_weight,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& nonfinite,
    bool softmax, std::optional<double> momentum, bool moving_average,
    double eps, bool unbiased, bool update_stats) {
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

Tensors3 eval_without_graph(const at::Tensor& x, const OptTensor& weight,
                            const OptTensor& bias,
                            const at::Tensor& mean_weight,
                            const at::Tensor& var_weight,
                            const OptTensor& running_mean,
                            const OptTensor& running_var,
                            const OptTensor& nonfinite, bool softmax,
                            double eps, bool unbiased) {
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

// The last three arguments of both Functions: for SSN, the shares the layer
// mixes with and their Jacobian with respect to the logits (mean_weight,
// var_weight), through which the gradients go on; for SN, none.
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
      bool unbiased, bool update_stats, const OptTensor& mean_share,
      const OptTensor& var_share, const OptTensor& shares_jacobian) {
    const at::Tensor& mixed_mean = mean_share.value_or(mean_weight);
    const at::Tensor& mixed_var = var_share.value_or(var_weight);
    auto [y, mean_in, var_in] = train_without_graph(
        x, weight, bias, mixed_mean, mixed_var, running_mean, running_var,
        num_batches_tracked, nonfinite, softmax, momentum, moving_average,
        eps, unbiased, update_stats);
    save_layer(ctx, x, mean_in, var_in, weight, bias, mixed_mean, mixed_var,
               std::nullopt, std::nullopt, softmax, /*batch_stats=*/true,
               eps, unbiased, shares_jacobian.value_or(at::Tensor()));
    return {y, mean_in, var_in};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return layer_backward(ctx, grads, 13);
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
      double eps, bool unbiased, const OptTensor& mean_share,
      const OptTensor& var_share, const OptTensor& shares_jacobian) {
    const at::Tensor& mixed_mean = mean_share.value_or(mean_weight);
    const at::Tensor& mixed_var = var_share.value_or(var_weight);
    auto [y, mean_in, var_in] =
        eval_without_graph(x, weight, bias, mixed_mean, mixed_var,
                           running_mean, running_var, nonfinite, softmax, eps,
                           unbiased);
    save_layer(ctx, x, mean_in, var_in, weight, bias, mixed_mean, mixed_var,
               running_mean, running_var, softmax, /*batch_stats=*/false, eps,
               unbiased, shares_jacobian.value_or(at::Tensor()));
    return {y, mean_in, var_in};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return layer_backward(ctx, grads, 9);
  }
};

}  // namespace
}  // namespace mmsn
