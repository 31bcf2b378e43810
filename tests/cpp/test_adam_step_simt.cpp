// Adam with the step count on the device (rowwise_adam_update's step_count,
// what a captured CUDA graph replays): adam_step_size_kernel
// (kernels/update_rows_cuda.cuh) computes the step size from the count, and
// adam_rows_kernel (kernels/optim_cuda.cuh) reads it, in the SIMT emulator,
// launched as csrc/cuda/optim.cu launches them. The result must equal the CPU
// rows updated with the host's coefficients of that step, bit for bit; a count
// below 1 must skip the update and report.
#include "tests/cpp/simt.h"
// clang-format off: the emulator must come first
#include "kernels/optim_cuda.cuh"
#include "kernels/update_rows_cuda.cuh"
// clang-format on

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

namespace {

using namespace engram;

template <typename T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const char* what, int64_t step) {
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(T)), 0) << what << " at step " << step;
}

template <typename T>
void device_count_equals_host_step(bool decoupled) {
  constexpr int64_t num_rows = 40, dim = 45;  // dim % 32 != 0: the lanes' tail
  const std::vector<int64_t> rows = {0, 3, 17, 39};
  const int64_t U = static_cast<int64_t>(rows.size());
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> dist(-1, 1);
  std::vector<T> weight(num_rows * dim), grads(U * dim);
  for (T& w : weight) w = static_cast<T>(dist(rng));
  for (T& g : grads) g = static_cast<T>(dist(rng));
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = decoupled ? 0.01 : 0.0;
  std::vector<T> want_w = weight, want_m(weight.size()), want_v(weight.size());
  std::vector<T> w = weight, m(weight.size()), v(weight.size());
  for (int64_t step = 1; step <= 4; ++step) {
    const auto host = optim::adam_coeffs<T>(lr, beta1, beta2, eps, wd, decoupled, step);
    for (int64_t u = 0; u < U; ++u) {
      const int64_t r = rows[u];
      optim::adam_row(&want_w[r * dim], &want_m[r * dim], &want_v[r * dim], grads.data() + u * dim, dim, host);
    }
    // The launcher: the step-size kernel, then the rows kernel with step-1 coefficients
    // whose step size the device value replaces.
    T step_size = 0;
    int skip = 0, claimed = 0;
    cuda::DeviceErrorRecord record{};
    const cuda::DeviceErrorSlot slot{&claimed, &record, 7};
    simt::launch(1, 1, [&] { cuda::adam_step_size_kernel<T>(&step, lr, beta1, beta2, &step_size, &skip, slot); });
    ASSERT_EQ(skip, 0);
    ASSERT_EQ(claimed, 0);
    EXPECT_EQ(step_size, host.neg_step_size) << "step " << step;
    const auto captured = optim::adam_coeffs<T>(lr, beta1, beta2, eps, wd, decoupled, 1);
    simt::launch(cuda_optim::blocks_for(U * cuda_optim::kWarp), cuda_optim::kThreads, [&] {
      cuda_optim::adam_rows_kernel<T>(w.data(), m.data(), v.data(), rows.data(), grads.data(), U, dim, captured,
                                      &skip, &step_size);
    });
    expect_same_bits(w, want_w, "weight", step);
    expect_same_bits(m, want_m, "exp_avg", step);
    expect_same_bits(v, want_v, "exp_avg_sq", step);
  }
}

TEST(AdamStepSimt, DeviceCountEqualsHostStepFloat) { device_count_equals_host_step<float>(false); }
TEST(AdamStepSimt, DeviceCountEqualsHostStepDoubleAdamW) { device_count_equals_host_step<double>(true); }

TEST(AdamStepSimt, CountBelowOneSkipsTheUpdateAndReports) {
  for (const int64_t bad : {int64_t(0), int64_t(-3)}) {
    float step_size = 123.f;
    int skip = 0, claimed = 0;
    cuda::DeviceErrorRecord record{};
    const cuda::DeviceErrorSlot slot{&claimed, &record, 7};
    simt::launch(1, 1, [&] { cuda::adam_step_size_kernel<float>(&bad, 0.1, 0.9, 0.999, &step_size, &skip, slot); });
    EXPECT_EQ(skip, 1);
    EXPECT_EQ(claimed, 1);
    EXPECT_EQ(record.kind, cuda::kAdamStepInvalid);
    EXPECT_EQ(record.value, bad);
    EXPECT_EQ(step_size, 123.f);  // not written
    std::vector<float> w(64, 1.f), m(64), v(64);
    const std::vector<int64_t> rows = {1};
    const std::vector<float> grads(32, 0.5f);
    const auto c = optim::adam_coeffs<float>(0.1, 0.9, 0.999, 1e-8, 0.0, false, 1);
    simt::launch(1, cuda_optim::kThreads, [&] {
      cuda_optim::adam_rows_kernel<float>(w.data(), m.data(), v.data(), rows.data(), grads.data(), 1, 32, c, &skip,
                                          &step_size);
    });
    EXPECT_EQ(w, std::vector<float>(64, 1.f));  // skipped: nothing written
  }
}

}  // namespace
