// The 3-bit kernels' hi-plane lane masks (isa_avx512bf16.cpp, isa_amx.cpp): mask i holds bits
// [i*Q, i*Q + Q) of the hi plane of each of a block's groups, group h's at bits h*Q (Q = G/4), so
// bit h*Q + j of mask i is bit 2 of code i*Q + j of group h. A block's planes are 16 contiguous
// bytes (32/Q groups of G/8 bytes): one 16-byte load and one byte shuffle give all four masks.
//
// Included inside each of those files' namespaces, after <immintrin.h> under their AVX-512 BW/VL
// target (like kernel_common.h: no inline code shared between files built for different ISAs).

template <int G>
struct HiShuffle {
  alignas(16) int8_t ctl[16];
  constexpr HiShuffle() : ctl() {
    constexpr int Q = G / 4, E = G / 8, QB = Q / 8;  // QB: bytes of one quarter of one plane
    for (int i = 0; i < 4; ++i)
      for (int t = 0; t < 4; ++t) ctl[i * 4 + t] = static_cast<int8_t>((t / QB) * E + i * QB + t % QB);
  }
};

template <int G>
static inline void hi_masks(const uint8_t* planes, int64_t groups, uint32_t masks[4]) {
  static constexpr HiShuffle<G> kShuffle;
  constexpr int V = 128 / G, E = G / 8;
  const __m128i raw = groups == V ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes))
                                  : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (groups * E)) - 1), planes);
  const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(kShuffle.ctl));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(masks), _mm_shuffle_epi8(raw, ctl));
}
