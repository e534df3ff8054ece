// Small float helpers for the quantizer's CPU ops, in plain arithmetic so loops over them
// vectorize (std::exp/std::log calls would not without libmvec and -ffast-math).
#pragma once

#include <cstdint>
#include <cstring>

namespace gsq_q {

// Wellons' "lowbias32" 32-bit integer hash.
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Uniform in (0, 1), never 0 or 1: 24 bits of two hash rounds keyed by a 64-bit key.
inline float uniform(uint32_t key_lo, uint32_t key_hi, uint32_t i) {
  const uint32_t h = lowbias32(lowbias32(i ^ key_lo) + key_hi);
  return (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Natural log of a positive normal float: exponent + 2 atanh((m-1)/(m+1)) series on the
// mantissa m in [1, 2); absolute error < 2e-6.
inline float log_approx(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  const float e = static_cast<float>(static_cast<int32_t>(b >> 23) - 127);
  const float m = bits_to_float((b & 0x007fffffU) | 0x3f800000U);
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float s = 2.0f + t2 * (2.0f / 3 + t2 * (2.0f / 5 + t2 * (2.0f / 7 + t2 * (2.0f / 9 + t2 * (2.0f / 11)))));
  return e * 0.6931471805599453f + t * s;
}

// e^x, x clamped to [-87, 88] (0 at or below -87). x log2(e) = n + f with f in [-0.5, 0.5]; 2^f by a degree-6
// Taylor polynomial in f ln2 (relative error < 3e-7), 2^n by the exponent bits.
inline float exp_approx(float x) {
  // Written as selects and integer arithmetic only, no branches, so loops over it vectorize.
  const float under = x <= -87.0f ? 0.0f : 1.0f;
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float y = x * 1.4426950408889634f;
  const float yh = y + 0.5f;
  const int32_t t = static_cast<int32_t>(yh);
  const int32_t ni = t - static_cast<int32_t>(yh < 0.0f);   // floor(y + 0.5) as the formula above
  const float n = static_cast<float>(ni);
  const float r = (y - n) * 0.6931471805599453f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return under * (p * scale);
}

}  // namespace gsq_q
