// Opt-in int8 dense layers for AVX2 (GSQ_CPU_DENSE=int8): lm_head and the layers a checkpoint
// keeps in bf16, with their weights rounded to int8 per output row when the model loads and the
// activations to int8 per block of 32 (llama.cpp's Q8_0 blocks) on every call.
//
// Why it exists: at 2 bits SmolLM2's lm_head (49152 x 576, tied to the embedding) is 57 MB of
// bf16 per token, twice the bytes of all its 2-bit linears together; in int8 it is half that,
// and integer dot products cost less than widening bf16 to float32 (gsq::cpu_dense).
//
// Per block of 32 weights of one output row and one row of x, both int8 in [-127, 127]:
// vpsignb moves x's sign onto w (and zeroes w where x is 0), so vpmaddubsw multiplies |x| (u8)
// by w * sign(x) (s8) and sums neighbouring pairs into int16; each pair is at most
// 2 * 127 * 127 = 32258, so int16 holds it without saturating. vpmaddwd with ones sums pairs of
// those into int32 lanes (exact), which are converted and scaled by the block's x scale xa
// once, into float32 lane accumulators; the row's weight scale multiplies the final sum.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

namespace gsq_dense_int8_avx2 {

#include "kernel_common.h"

constexpr int kBlock = 32;
// Software prefetch distance. Without it the hardware prefetcher does not run far enough ahead
// and loads and arithmetic take turns: on a 2-core AVX2 EPYC, lm_head (49152 x 576) at M = 1 took
// 5.0 ms from DRAM against 2.3 ms from cache and 2.9 ms for the loads alone; prefetching 9 KiB
// ahead (one line per 64 bytes read) brought it to 3.35 ms (a standalone loop, 2026-12-04).
constexpr int64_t kPrefetchBytes = 9216;

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// T output rows x R rows of x: each block of x is loaded (and its |x| taken) once for T output
// rows, each block of weights loaded once for R rows of x.
template <int R, int T>
static inline void dot_rows(const DenseInt8Args& a, int64_t n, int64_t m0, float out[T][R]) {
  const int64_t NB = a.Kp / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    __m256i x[R], ax[R];
    __m256 xs[R];
    for (int r = 0; r < R; ++r) {
      x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + r) * a.Kp + b * kBlock));
      ax[r] = _mm256_abs_epi8(x[r]);
      xs[r] = _mm256_set1_ps(a.xa[(m0 + r) * NB + b]);
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* wp = a.wq + (n + t) * a.Kp + b * kBlock;
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchBytes), _MM_HINT_T0);  // never faults
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      for (int r = 0; r < R; ++r) {
        const __m256i pairs = _mm256_maddubs_epi16(ax[r], _mm256_sign_epi8(w, x[r]));
        const __m256i quads = _mm256_madd_epi16(pairs, ones);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(quads), xs[r], acc[t][r]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) out[t][r] = hsum(acc[t][r]) * a.ws[n + t];
}

// Output rows [n0, n1) for all rows of x, in tiles of up to 2 rows of x (with one row of x, 4 output
// rows per tile; with two, 2: out_rows).
static void rows_entry(const DenseInt8Args& a, int64_t n0, int64_t n1) {
  over_row_tiles<2>(a.M, [&](auto r, int64_t m0) {
    constexpr int R = decltype(r)::value;
    store_out_tiles<R, out_rows<R>()>(a, m0, n0, n1, [&](auto t, int64_t n, float(*out)[R]) {
      dot_rows<R, decltype(t)::value>(a, n, m0, out);
    });
  });
}

}  // namespace gsq_dense_int8_avx2

#pragma GCC pop_options

DenseInt8RowsFn gsq_dense_int8_rows_avx2 = &gsq_dense_int8_avx2::rows_entry;
