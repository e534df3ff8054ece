// Helpers every CPU kernel file shares: bf16 <-> float, scale and output access, the compile-time
// dispatch on group size / bit width, and the walk over tiles of activation rows.
//
// Included *inside* each ISA file's namespace (and the dispatcher's anonymous one), so every
// file gets its own internal copy compiled for its own target: no inline function is shared
// between files built for different ISAs. Include <cstdint>, <cstring>, <type_traits> and
// gemm_args.h before opening that namespace.

static inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does (NaN kept NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float load_scale(const GemmArgs& a, int64_t i) {
  return a.scales_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.scales)[i])
                       : static_cast<const float*>(a.scales)[i];
}

template <typename Args>  // GemmArgs or DenseArgs: y [M, N], bf16 or float32
static inline void store_y(const Args& a, int64_t m, int64_t n, float v) {
  if (a.y_bf16)
    static_cast<uint16_t*>(a.y)[m * a.N + n] = float_to_bf16(v);
  else
    static_cast<float*>(a.y)[m * a.N + n] = v;
}

// f(std::integral_constant<int, G>, std::bool_constant<3-bit>) for the runtime layout, so the
// kernels get compile-time loop bounds (ternary is stored, and passed, as 2-bit).
template <typename F>
static inline void with_layout(int64_t G, int64_t bits, F&& f) {
  auto with_g = [&](auto three) {
    if (G == 32)
      f(std::integral_constant<int, 32>{}, three);
    else if (G == 64)
      f(std::integral_constant<int, 64>{}, three);
    else
      f(std::integral_constant<int, 128>{}, three);
  };
  if (bits == 3)
    with_g(std::true_type{});
  else
    with_g(std::false_type{});
}

template <int R, int T, typename F>
static inline void tail_tile(int64_t rest, int64_t m0, F& f) {
  if constexpr (R < T) {
    if (rest == R)
      f(std::integral_constant<int, R>{}, m0);
    else
      tail_tile<R + 1, T>(rest, m0, f);
  }
}

// f(std::integral_constant<int, R>, m0) for the full tiles of T rows of x, then the one tail
// tile (each tile size is its own instantiation: R accumulators per output row in registers).
template <int T, typename F>
static inline void over_row_tiles(int64_t M, F&& f) {
  int64_t m0 = 0;
  for (; m0 + T <= M; m0 += T) f(std::integral_constant<int, T>{}, m0);
  tail_tile<1, T>(M - m0, m0, f);
}

// Output rows [n0, n1) for rows m0..m0+R-1 of x: dot(n, out) fills out[R], store_y writes it.
template <int R, typename Args, typename Dot>
static inline void store_tile(const Args& a, int64_t m0, int64_t n0, int64_t n1, Dot&& dot) {
  float out[R];
  for (int64_t n = n0; n < n1; ++n) {
    dot(n, out);
    for (int r = 0; r < R; ++r) store_y(a, m0 + r, n, out[r]);
  }
}

// Output rows per tile for R rows of x: with one or two rows, several output rows share each
// loaded x vector (gemm_simd.h's and isa_avx2int8.cpp's dot_rows take T of them at once).
template <int R>
constexpr int out_rows() {
  return R == 1 ? 4 : R == 2 ? 2 : 1;
}

// Output rows [n0, n1) for rows m0..m0+R-1 of x, T output rows at a time, then one at a time:
// dot(std::integral_constant<int, T or 1>, n, out) fills float out[T or 1][R].
template <int R, int T, typename Args, typename Dot>
static inline void store_out_tiles(const Args& a, int64_t m0, int64_t n0, int64_t n1, Dot&& dot) {
  int64_t n = n0;
  for (; n + T <= n1; n += T) {
    float out[T][R];
    dot(std::integral_constant<int, T>{}, n, out);
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) store_y(a, m0 + r, n + t, out[t][r]);
  }
  store_tile<R>(a, m0, n, n1, [&](int64_t nn, float* o) {
    dot(std::integral_constant<int, 1>{}, nn, reinterpret_cast<float(*)[R]>(o));
  });
}
