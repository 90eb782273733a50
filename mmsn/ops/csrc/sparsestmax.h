// SparsestMax (Shao et al., CVPR 2019) of one importance vector in double,
// with its Jacobian carried through every step, so that backward is one
// product with it. The formulation (and the path for tracing) is
// mmsn/ops/sparsestmax.py; this follows it step by step, including which
// side of each comparison counts, so that both give the same shares and
// the gradients autograd takes of the Python version.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace mmsn {
namespace {

// A K x K matrix, row-major.
using Matrix = std::vector<double>;

Matrix identity(int64_t k) {
  Matrix m(k * k, 0.0);
  for (int64_t i = 0; i < k; ++i) m[i * k + i] = 1.0;
  return m;
}

Matrix matmul(const Matrix& a, const Matrix& b, int64_t k) {
  Matrix out(k * k, 0.0);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t l = 0; l < k; ++l) {
      const double v = a[i * k + l];
      if (v == 0.0) continue;
      for (int64_t j = 0; j < k; ++j) out[i * k + j] += v * b[l * k + j];
    }
  }
  return out;
}

// Euclidean projection of v onto the simplex and its Jacobian: the support
// is the prefix of the descending sort where 1 + k v_(k) > sum_{j<=k} v_(j);
// p = relu(v - tau), tau = (sum of the prefix - 1) / k.
std::vector<double> sparsemax(const std::vector<double>& v, Matrix* jac) {
  const int64_t k = static_cast<int64_t>(v.size());
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return v[a] > v[b]; });
  double cumulative = 0, prefix = 0;
  int64_t size = 0;
  for (int64_t r = 0; r < k; ++r) {
    cumulative += v[order[r]];
    if (1.0 + (r + 1) * v[order[r]] > cumulative) size += 1;
  }
  for (int64_t r = 0; r < size; ++r) prefix += v[order[r]];
  const double tau = (prefix - 1.0) / size;
  std::vector<double> p(k);
  std::vector<bool> in_prefix(k, false);
  for (int64_t r = 0; r < size; ++r) in_prefix[order[r]] = true;
  jac->assign(k * k, 0.0);
  for (int64_t i = 0; i < k; ++i) {
    p[i] = std::max(v[i] - tau, 0.0);
    if (v[i] - tau > 0) {  // relu passes the gradient where positive
      for (int64_t j = 0; j < k; ++j) {
        (*jac)[i * k + j] =
            (i == j ? 1.0 : 0.0) - (in_prefix[j] ? 1.0 / size : 0.0);
      }
    }
  }
  return p;
}

// The uniform point of the support of p and the support's size.
std::vector<double> support_centre(const std::vector<double>& p,
                                   int64_t* size) {
  *size = 0;
  for (double x : p) *size += x > 0;
  std::vector<double> centre(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    centre[i] = (p[i] > 0 ? 1.0 : 0.0) / *size;
  }
  return centre;
}

// SparsestMax of v with radius r; ``jac`` receives dp/dv (K x K).
std::vector<double> sparsestmax(const std::vector<double>& v, double radius,
                                Matrix* jac) {
  const int64_t k = static_cast<int64_t>(v.size());
  double rad2 = radius * radius;
  Matrix j_point;
  std::vector<double> point = sparsemax(v, &j_point);
  int64_t size;
  std::vector<double> centre = support_centre(point, &size);
  bool done = size == 1;
  // Each round either finishes or shrinks the support by one.
  for (int64_t round = 0; round < k - 1 && !done; ++round) {
    // diff = (point - centre) - centre * sum(point - centre): the push
    // stays on the support's face (rounding leaves a component along 1)
    std::vector<double> diff(k);
    double total = 0;
    for (int64_t i = 0; i < k; ++i) total += point[i] - centre[i];
    double dist2 = 0;
    for (int64_t i = 0; i < k; ++i) {
      diff[i] = point[i] - centre[i] - centre[i] * total;
      dist2 += diff[i] * diff[i];
    }
    if (dist2 >= rad2 || dist2 == 0) break;  // settled
    Matrix j_diff = identity(k);             // (I - centre 1^T)
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t l = 0; l < k; ++l) j_diff[i * k + l] -= centre[i];
    }
    j_diff = matmul(j_diff, j_point, k);
    // pushed = centre + diff * sqrt(rad2 / dist2); rad2 and the centre are
    // constant where the support is, so d pushed = s (I - d d^T) d diff
    const double s = std::sqrt(rad2 / dist2);
    std::vector<double> pushed(k);
    Matrix j_push(k * k);
    bool left = false;
    for (int64_t i = 0; i < k; ++i) {
      pushed[i] = centre[i] + diff[i] * s;
      left = left || pushed[i] < 0;
      for (int64_t l = 0; l < k; ++l) {
        j_push[i * k + l] =
            s * ((i == l ? 1.0 : 0.0) - diff[i] * diff[l] / dist2);
      }
    }
    j_push = matmul(j_push, j_diff, k);
    if (!left) {
      point = pushed;
      j_point = j_push;
      break;
    }
    Matrix j_proj;
    std::vector<double> projected = sparsemax(pushed, &j_proj);
    int64_t new_size;
    std::vector<double> new_centre = support_centre(projected, &new_size);
    double moved = 0;
    for (int64_t i = 0; i < k; ++i) {
      moved += (new_centre[i] - centre[i]) * (new_centre[i] - centre[i]);
    }
    point = projected;
    j_point = matmul(j_proj, j_push, k);
    rad2 -= moved;
    centre = new_centre;
    done = new_size == 1;
  }
  // clamp to [0, 1]; its gradient passes inside the closed interval
  for (int64_t i = 0; i < k; ++i) {
    if (point[i] < 0 || point[i] > 1) {
      for (int64_t l = 0; l < k; ++l) j_point[i * k + l] = 0.0;
    }
    point[i] = std::min(std::max(point[i], 0.0), 1.0);
  }
  *jac = j_point;
  return point;
}

}  // namespace
}  // namespace mmsn
