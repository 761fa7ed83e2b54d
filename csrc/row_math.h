// Row primitives for the CPU kernels, vectorized by the compiler on any target (SSE/AVX on x86,
// NEON/SVE on aarch64) through `#pragma omp simd` (-fopenmp-simd: no OpenMP runtime) rather than
// architecture-specific intrinsics or flags; exp of float is a branch-free polynomial.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#if __cplusplus >= 202002L
#include <bit>
#endif

namespace beyond_cls {

// std::bit_cast where the standard library has it (C++20); torch releases before C++20 build
// extensions with -std=c++17, where the compiler builtin (GCC >= 11, Clang >= 9) or memcpy serves.
template <typename To, typename From>
inline To bit_cast(const From& from) noexcept {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
#if defined(__cpp_lib_bit_cast)
  return std::bit_cast<To>(from);
#elif defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
  return __builtin_bit_cast(To, from);
#else
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
#endif
#else
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
#endif
}

// e^x for x <= 0 (shifted logits) within ~2 ulp; x < -87.3 (results below FLT_MIN) and -inf give 0.
// Also exact to ~2 ulp for small positive x (up to 88: the AbMILP forward's lazy rescale uses x <= 8).
// Cody-Waite range reduction and a degree-6 polynomial (Cephes coefficients).
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  const float keep = static_cast<float>(x >= -87.3f);
  x = x < -87.3f ? -87.3f : x;
  constexpr float kShifter = 12582912.0f;  // 1.5·2^23: adding it rounds to the nearest integer
  const float shifted = x * 1.44269504088896341f + kShifter;
  const float n = shifted - kShifter;
  const int32_t ni = bit_cast<int32_t>(shifted) - bit_cast<int32_t>(kShifter);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return bit_cast<float>(bit_cast<int32_t>(p) + (ni << 23)) * keep;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
T max_of(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// x[j] <- x[j]·scale + bias[j] (bias may be null), in place.
template <typename T>
void scale_add(T* x, int64_t n, T scale, const T* bias) {
  if (bias == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = x[j] * scale + bias[j];
  }
}

// x[j] <- e^(x[j] - ref) in place (ref >= every x[j]); returns (Σ e, Σ e·(x - ref)), where keys at
// -inf contribute exactly 0 to both (0·log 0 = 0).
template <typename T>
inline std::pair<T, T> exp_shift_sums_impl(T* x, int64_t n, T ref) {
  constexpr T kFloor = std::numeric_limits<T>::lowest() / 4;  // finite stand-in for -inf shifts
  T z = 0, t = 0;
#pragma omp simd reduction(+ : z, t)
  for (int64_t j = 0; j < n; ++j) {
    const T shifted = x[j] - ref;
    const T e = exp_nonpositive(shifted);
    x[j] = e;
    z += e;
    t += e * (shifted > kFloor ? shifted : T(0));
  }
  return {z, t};
}

// The float row pass, compiled once per x86 ISA level and picked at load time (GCC/Clang function
// multiversioning); other targets compile it once for their baseline.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define BEYOND_CLS_ISA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef BEYOND_CLS_ISA_CLONES
#define BEYOND_CLS_ISA_CLONES
#endif

template <typename T>
void scale_in_place(T* x, int64_t n, T factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

}  // namespace beyond_cls

namespace beyond_cls {

BEYOND_CLS_ISA_CLONES inline std::pair<float, float> exp_shift_sums(float* x, int64_t n, float ref) {
  return exp_shift_sums_impl(x, n, ref);
}

inline std::pair<double, double> exp_shift_sums(double* x, int64_t n, double ref) {
  return exp_shift_sums_impl(x, n, ref);
}

}  // namespace beyond_cls
