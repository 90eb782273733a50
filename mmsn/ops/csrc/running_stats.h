// The BN branch's running statistics, moved by one training batch, and the
// count of batches that could not move them, all inside the kernel: no value
// travels to Python to decide anything (mmsn/ops/statistics.py's
// update_running_stats_ is the same rule for other devices).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace mmsn {
namespace {

// Slots of a layer's ``nonfinite`` counter (int64, shape (4,); slot 3 counts
// SyncSN batches pooled non-finite from other processes, in Python).
constexpr int64_t kNonFiniteInput = 0;     // training batch with NaN/Inf
constexpr int64_t kOverflowedStats = 1;    // finite batch, stats overflowed
constexpr int64_t kNonFiniteEval = 2;      // eval forward, non-finite stats

void count_nonfinite(const std::optional<at::Tensor>& nonfinite,
                     int64_t slot) {
  if (!nonfinite.has_value()) return;
  TORCH_CHECK(nonfinite->scalar_type() == at::kLong &&
                  nonfinite->numel() == 4 && nonfinite->is_contiguous(),
              "mmsn: the nonfinite counter must be a contiguous int64 tensor "
              "of 4 elements");
  nonfinite->mutable_data_ptr<int64_t>()[slot] += 1;
}

struct RunningStats {
  at::Tensor mean, var, num_batches_tracked;
  std::optional<double> momentum;  // none: cumulative average
  bool moving_average;
};

// running = lerp(running, batch, factor) with factor = momentum (moving
// average) or 1 / batches seen (cumulative; batch average, which pools the
// second moments so that the result is the variance of all batches).
void update_running_stats(const RunningStats& rs,
                          const std::vector<double>& batch_mean,
                          const std::vector<double>& batch_var) {
  const int64_t c = static_cast<int64_t>(batch_mean.size());
  TORCH_CHECK(rs.mean.numel() == c && rs.var.numel() == c &&
                  rs.mean.is_contiguous() && rs.var.is_contiguous() &&
                  rs.mean.scalar_type() == rs.var.scalar_type(),
              "mmsn: running statistics must be contiguous, of one dtype, "
              "with C = ", c, " elements");
  TORCH_CHECK(rs.num_batches_tracked.scalar_type() == at::kLong &&
                  rs.num_batches_tracked.numel() == 1,
              "mmsn: num_batches_tracked must be an int64 scalar");
  int64_t& seen = *rs.num_batches_tracked.mutable_data_ptr<int64_t>();
  seen += 1;
  const double factor = rs.moving_average && rs.momentum.has_value()
                            ? *rs.momentum
                            : 1.0 / static_cast<double>(seen);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rs.mean.scalar_type(), "mmsn_running", [&] {
        scalar_t* mean = rs.mean.mutable_data_ptr<scalar_t>();
        scalar_t* var = rs.var.mutable_data_ptr<scalar_t>();
        for (int64_t j = 0; j < c; ++j) {
          const double m = mean[j], v = var[j];
          const double new_mean = m + factor * (batch_mean[j] - m);
          double new_var;
          if (rs.moving_average) {
            new_var = v + factor * (batch_var[j] - v);
          } else {
            const double second = v + m * m;
            const double batch_second =
                batch_var[j] + batch_mean[j] * batch_mean[j];
            new_var = std::max(
                second + factor * (batch_second - second) -
                    new_mean * new_mean,
                0.0);
          }
          mean[j] = static_cast<scalar_t>(new_mean);
          var[j] = static_cast<scalar_t>(new_var);
        }
      });
}

}  // namespace
}  // namespace mmsn
