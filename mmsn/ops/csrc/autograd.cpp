// Gradients of the layer operators (library.cpp), for every device: each
// forward calls the operator below autograd (so the device's kernel runs,
// whichever registered it) and saves what its backward operator needs.
// Written in C++ so that a layer call costs the host what BatchNorm's does.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

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
                double eps, bool unbiased) {
  ctx->save_for_backward({x, mean_in, var_in, weight.value_or(at::Tensor()),
                          mean_weight, var_weight,
                          running_mean.value_or(at::Tensor()),
                          running_var.value_or(at::Tensor())});
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
  auto [dx, d_weight, d_bias, d_mean_weight, d_var_weight] =
      backward_op().call(dy, x, saved[1], saved[2], optional(saved[3]),
                         saved[4], saved[5], optional(saved[6]),
                         optional(saved[7]),
                         ctx->saved_data["softmax"].toBool(),
                         ctx->saved_data["batch_stats"].toBool(),
                         ctx->saved_data["eps"].toDouble(),
                         ctx->saved_data["unbiased"].toBool(), need_dx);
  variable_list out = {need_dx ? dx : at::Tensor(),
                       saved[3].defined() ? d_weight : at::Tensor(),
                       ctx->saved_data["has_bias"].toBool() ? d_bias
                                                            : at::Tensor(),
                       d_mean_weight, d_var_weight};
  out.resize(5 + rest);
  return out;
}

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

class SparsestmaxShares
    : public torch::autograd::Function<SparsestmaxShares> {
 public:
  static variable_list forward(AutogradContext* ctx,
                               const at::Tensor& mean_weight,
                               const at::Tensor& var_weight,
                               const at::Tensor& radius,
                               const at::Tensor& mean_fixed,
                               const at::Tensor& var_fixed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean_share, var_share, jacobian] =
        shares_op().call(mean_weight, var_weight, radius, mean_fixed,
                         var_fixed);
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
    auto [d_mean, d_var] = shares_backward_op().call(g_mean, g_var, jacobian);
    return {d_mean, d_var, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

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

Tensors3 sparsestmax_shares_autograd(const at::Tensor& mean_weight,
                                     const at::Tensor& var_weight,
                                     const at::Tensor& radius,
                                     const at::Tensor& mean_fixed,
                                     const at::Tensor& var_fixed) {
  if (!records({&mean_weight, &var_weight}, {})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return shares_op().call(mean_weight, var_weight, radius, mean_fixed,
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
  static const auto op = find_op<void(
      const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const OptTensor&, const OptTensor&,
      const at::Tensor&, const at::Tensor&)>("mmsn::sparsestmax_freeze_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(mean_weight, var_weight, mean_fixed, var_fixed, mean_grad,
            var_grad, mean_share, var_share);
  }
  for (const at::Tensor* t :
       {&mean_weight, &var_weight, &mean_fixed, &var_fixed}) {
    torch::autograd::impl::bump_version(*t);
  }
  bump_versions({&mean_grad, &var_grad});
}

}  // namespace

TORCH_LIBRARY_IMPL(mmsn, Autograd, m) {
  m.impl("sparsestmax_freeze_", &sparsestmax_freeze_autograd);
  m.impl("switchable_norm_train", &switchable_norm_train_autograd);
  m.impl("switchable_norm_eval", &switchable_norm_eval_autograd);
  m.impl("sparsestmax_shares", &sparsestmax_shares_autograd);
}

}  // namespace mmsn
