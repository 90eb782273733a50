// The operators of mmsn._C (kernels: cpu_kernels.cpp for CPU tensors,
// autograd.cpp and ssn_autograd.cpp for their gradients; mmsn/ops/
// library.py adds the CUDA and other devices' kernels and the shapes for
// torch.compile).
//
// Row passes and whole-layer kernels over prepared (N, C, L) rows, which
// mmsn/ops/backends/compiled.py calls:
//   instance_moments, rows_affine, rows_grad_sums, rows_grad_input,
//   sn_affine, sn_forward_fixed, sn_backward
// The layer operators, one per pass of an SN or SSN layer:
//   switchable_norm_train     training forward; moves the running statistics
//   switchable_norm_eval      forward with the running statistics
//   switchable_norm_backward  gradients of x, gamma, beta, the importance
//                             weights (logits with softmax, else shares)
//   sparsestmax_shares        SSN's shares of both vectors and the Jacobian
//   sparsestmax_shares_backward
//   sparsestmax_freeze_       stores shares that came out one-hot
//   sparse_switchable_norm_train
//                             SSN's training forward in one call: the three
//                             above, then switchable_norm_train with the
//                             shares (ssn_autograd.cpp; one graph node)
//   sparse_switchable_norm_eval
//                             SSN's eval forward in one call
#include <Python.h>
#include <torch/library.h>

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

  m.def("switchable_norm_train(Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean_weight, Tensor var_weight, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor(d!)? nonfinite, bool softmax, float? momentum, "
        "bool moving_average, float eps, bool unbiased, bool update_stats) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("switchable_norm_eval(Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean_weight, Tensor var_weight, Tensor? running_mean, "
        "Tensor? running_var, Tensor(a!)? nonfinite, bool softmax, "
        "float eps, bool unbiased) -> (Tensor, Tensor, Tensor)");
  m.def("switchable_norm_backward(Tensor grad_y, Tensor x, Tensor mean_in, "
        "Tensor var_in, Tensor? weight, Tensor mean_weight, "
        "Tensor var_weight, Tensor? running_mean, Tensor? running_var, "
        "bool softmax, bool batch_stats, float eps, bool unbiased, "
        "bool need_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sparsestmax_shares(Tensor mean_weight, Tensor var_weight, "
        "Tensor radius, Tensor mean_fixed, Tensor var_fixed) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("sparsestmax_shares_backward(Tensor grad_mean_share, "
        "Tensor grad_var_share, Tensor jacobian) -> (Tensor, Tensor)");
  m.def("sparsestmax_freeze_(Tensor(a!) mean_weight, Tensor(b!) var_weight, "
        "Tensor(c!) mean_fixed, Tensor(d!) var_fixed, Tensor(e!)? mean_grad, "
        "Tensor(f!)? var_grad, Tensor mean_share, Tensor var_share) -> ()");
  m.def("sparse_switchable_norm_train(Tensor x, Tensor? weight, "
        "Tensor? bias, Tensor(a!) mean_weight, Tensor(b!) var_weight, "
        "Tensor radius, Tensor(c!) mean_fixed, Tensor(d!) var_fixed, "
        "Tensor(e!)? mean_grad, Tensor(f!)? var_grad, "
        "Tensor(g!)? running_mean, Tensor(h!)? running_var, "
        "Tensor(i!)? num_batches_tracked, Tensor(j!)? nonfinite, "
        "float? momentum, bool moving_average, float eps, bool unbiased, "
        "bool update_stats) -> (Tensor, Tensor, Tensor)");
  m.def("sparse_switchable_norm_eval(Tensor x, Tensor? weight, "
        "Tensor? bias, Tensor mean_weight, Tensor var_weight, "
        "Tensor radius, Tensor mean_fixed, Tensor var_fixed, "
        "Tensor? running_mean, Tensor? running_var, Tensor(a!)? nonfinite, "
        "float eps, bool unbiased) -> (Tensor, Tensor, Tensor)");
}

// Importing mmsn._C runs the registrations; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                               nullptr};
  return PyModule_Create(&module);
}
