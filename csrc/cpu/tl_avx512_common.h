// Pieces the AVX-512 table-lookup kernels share (tl_avx512.cpp, tl_avx512vbmi.cpp), included inside
// each file's namespace after <immintrin.h> under its AVX-512 target (as kernel_common.h: no inline
// code shared between files built for different ISAs).

// vpermt2d indices of stage s of a 16 x 16 dword transpose (swap bit s of the vector with bit s of
// the dword): the vector with bit s clear keeps its dwords with bit s clear and takes the partner's.
struct TlTransposeIdx {
  alignas(64) int32_t keep0[4][16], keep1[4][16];
  constexpr TlTransposeIdx() : keep0(), keep1() {
    for (int s = 0; s < 4; ++s)
      for (int d = 0; d < 16; ++d) {
        const int b = 1 << s;
        keep0[s][d] = (d & b) ? 16 + (d ^ b) : d;
        keep1[s][d] = (d & b) ? 16 + d : (d ^ b);
      }
  }
};
static constexpr TlTransposeIdx kTlTransposeIdx;

// r[i] dword d -> r[d] dword i: 4 stages of 16 vpermt2d.
static inline void tl_transpose16_epi32(__m512i r[16]) {
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    const int b = 1 << s;
    const __m512i i0 = _mm512_load_si512(kTlTransposeIdx.keep0[s]), i1 = _mm512_load_si512(kTlTransposeIdx.keep1[s]);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      if ((i & b) == 0) {
        const __m512i A = r[i], B = r[i | b];
        r[i] = _mm512_permutex2var_epi32(A, i0, B);
        r[i | b] = _mm512_permutex2var_epi32(A, i1, B);
      }
  }
}

// s[n, g] of a tile's 16 rows (sidx[r] = n * NG), a block of 16 groups at a time: each row's 16
// scales loaded (masked past the last group: no byte outside the tensor is read) and widened to
// float32, then transposed once, so a group's 16 scales are one aligned load. A gather per group
// (vpgatherdd) cost ~28 % of the whole kernel on Zen 4 (2-bit, M = 1).
struct TlScaleCache {
  alignas(64) float v[16][16];
  int64_t g0 = -1;
  inline __m512 get(const TlArgs& a, const int32_t* sidx, int64_t g) {
    const int64_t b = g & ~int64_t{15};
    if (b != g0) {
      const int64_t cnt = a.NG - b < 16 ? a.NG - b : 16;
      const __mmask16 k = static_cast<__mmask16>((1u << cnt) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        if (a.scales_bf16) {
          const __m256i raw = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(a.scales) + sidx[i] + b);
          r[i] = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
        } else {
          r[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(k, static_cast<const float*>(a.scales) + sidx[i] + b));
        }
      }
      tl_transpose16_epi32(r);
      for (int d = 0; d < 16; ++d) _mm512_store_si512(v[d], r[d]);
      g0 = b;
    }
    return _mm512_load_ps(v[g - g0]);
  }
};

// The table entries (tl_build.h) on 16 lanes: one table of 16 int8 entries, rounded half to even
// (vcvtps2dq under the default MXCSR) and saturated, as tl_kernel.h states.
struct TlTableEntries512 {
  static inline void store_q(int8_t* d, __m512 e, float inv) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(e, _mm512_set1_ps(inv)))));
  }
  // x_a (la - 3/2) + x_b (lb - 3/2) as (x_a (la - 2) + x_b (lb - 2)) + (x_a + x_b) / 2: every product is
  // exact, so with or without an FMA each sum is rounded once (the rounding tl_kernel.h states)
  static inline void entries2(float xa, float xb, float inv, int8_t* d) {
    const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(kTlCoefA), _mm512_set1_ps(xa)),
                                   _mm512_mul_ps(_mm512_load_ps(kTlCoefB), _mm512_set1_ps(xb)));
    store_q(d, _mm512_add_ps(t, _mm512_set1_ps(0.5f * (xa + xb))), inv);
  }
  static inline void entries4(const float* x, float inv, int8_t* d) {
    __m512 e = _mm512_mul_ps(_mm512_load_ps(kTlSign[0]), _mm512_set1_ps(x[0]));
    for (int i = 1; i < 4; ++i) e = _mm512_add_ps(e, _mm512_mul_ps(_mm512_load_ps(kTlSign[i]), _mm512_set1_ps(x[i])));
    store_q(d, e, inv);
  }
};
