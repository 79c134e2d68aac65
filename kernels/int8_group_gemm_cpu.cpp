// Grouped 8-bit weight GEMM on CPU: out (M, N) = x (M, K) @ dequant(W).T, with W (N, K) uint8 codes
// and one (float32 scale, uint8 zero point) per row and group of G inputs: w = (q - z) * s
// (kernels/int8_group_gemm_cpu.py builds and calls it; kernels/wna16_gemm.py's wna16_ref is its
// reference and documents the layout).
//
// Work items are tiles of TILE_N weight rows, handed to torch's intra-op threads. x is first copied
// once into a zero-padded float32 buffer (M, K8), K8 = K rounded up to 8, so every vector load of x
// is whole. Per tile:
//
//     decode (M <= FUSED_M)   codes -> (q - z) as floats in registers, 4 rows at a time, used at
//                             once; each group's partial sums are multiplied by its scale once.
//                             Every weight byte is read once per call, nothing is written back
//     batch  (M > FUSED_M)    the tile's rows -> float32 weights (q - z) * s in a scratch
//                             (TILE_N, K8) once, then out[m, n] = x[m] . scratch[n] in blocks of
//                             MR x NR dot products, so each converted row serves all M rows of x
//
// (q - z) is exact in int32 and float32; the batch path rounds (q - z) * s as the reference does,
// the decode path rounds s * partial sum instead. G is a multiple of 8, so each 8-wide vector lies inside
// one group; the last vector of a row (K not a multiple of 8) reads its bytes through a zeroed copy
// and zeroes its lanes past K.
// Vectors are GCC/clang vector extensions (8 floats): AVX2 where built with -mavx2, split otherwise.

#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

constexpr int64_t TILE_N = 16;  // weight rows per work item: a (16, K8) float32 scratch stays in L2
constexpr int64_t FUSED_M = 4;  // up to this many rows of x, weights are used straight from registers
constexpr int ROWS = 4;         // weight rows converted side by side (fused path, scratch NR)
constexpr int MR = 3;           // rows of x per block of dot products (batch path): 3 x 4 accumulators

inline v8 load(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8i splat_i(int32_t x) { return v8i{x, x, x, x, x, x, x, x}; }

// 8 codes at p -> (q - z) as float32 (exact).
inline v8 codes(const uint8_t* p, int32_t z) {
#if defined(__AVX2__)
  const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
                                     _mm256_set1_epi32(z));
  return reinterpret_cast<v8>(_mm256_cvtepi32_ps(q));
#else
  v8u8 b;
  std::memcpy(&b, p, 8);
  return __builtin_convertvector(__builtin_convertvector(b, v8i) - splat_i(z), v8);
#endif
}

// 8 codes at p -> float32 weights (q - z) * s, rounded as the reference rounds them.
inline v8 weights(const uint8_t* p, int32_t z, float s) { return codes(p, z) * splat(s); }

// The row's last ``len`` (< 8) codes at p, as weights; the lanes past them are zero.
inline v8 tail_weights(const uint8_t* p, int64_t len, int32_t z, float s) {
  uint8_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, static_cast<size_t>(len));
  v8 w = weights(tmp, z, s);
  for (int64_t l = len; l < 8; ++l) w[l] = 0.f;
  return w;
}

inline float hsum(v8 v) {
  float lanes[8];
  std::memcpy(lanes, &v, sizeof v);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

struct Args {
  const float* x;  // (M, K8) float32, zero-padded, contiguous
  const uint8_t* q; int64_t q_sn;                      // (N, K) codes, unit last stride
  const float* scales; int64_t s_sn;                   // (N, ceil(K / G)) float32
  const uint8_t* zeros; int64_t z_sn;                  // (N, ceil(K / G)) uint8 zero points
  float* out; int64_t o_sm;                            // (M, N) float32
  int64_t M, N, K, K8, G;
};

// acc[i][j] += s[j] * (x row i . (codes of row j - z[j])) over one group's VPG whole vectors from
// column k (VPG = 0: ``vectors`` at run time); the rows' codes start at q[j]. The scale multiplies
// the group's partial sums once instead of every weight (one float op per 8 weights fewer).
template <int M_, int NR, int VPG>
inline void group_dots(const Args& a, const uint8_t* const* q, const float* s, const int32_t* z, int64_t k,
                       int64_t vectors, v8 (&acc)[M_][NR]) {
  const int64_t nv = VPG > 0 ? VPG : vectors;
  v8 part[M_][NR];
  for (int i = 0; i < M_; ++i)
    for (int j = 0; j < NR; ++j) part[i][j] = splat(0.f);
  for (int64_t v = 0; v < nv; ++v, k += 8) {
    v8 xv[M_];
    for (int i = 0; i < M_; ++i) xv[i] = load(a.x + i * a.K8 + k);
    for (int j = 0; j < NR; ++j) {
      const v8 w = codes(q[j] + k, z[j]);
      for (int i = 0; i < M_; ++i) part[i][j] += w * xv[i];
    }
  }
  for (int j = 0; j < NR; ++j) {
    const v8 sj = splat(s[j]);
    for (int i = 0; i < M_; ++i) acc[i][j] += part[i][j] * sj;
  }
}

// Decode: rows n0 .. n0 + NR of out for all M (<= FUSED_M) rows of x, weights converted in registers.
// Whole groups run with their vector count VPG known at compile time (0: any G); the last group
// of a row may be short (G not dividing K) and end in a partial vector (K not a multiple of 8).
template <int M_, int NR, int VPG>
void fused_rows(const Args& a, int64_t n0) {
  v8 acc[M_][NR];
  for (int i = 0; i < M_; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = splat(0.f);
  const uint8_t* q[NR];
  for (int j = 0; j < NR; ++j) q[j] = a.q + (n0 + j) * a.q_sn;
  const float* sp[NR];
  const uint8_t* zp[NR];
  for (int j = 0; j < NR; ++j) {
    sp[j] = a.scales + (n0 + j) * a.s_sn;
    zp[j] = a.zeros + (n0 + j) * a.z_sn;
  }
  float s[NR];
  int32_t z[NR];
  const int64_t whole = a.K / a.G;
  for (int64_t g = 0; g < whole; ++g) {
    for (int j = 0; j < NR; ++j) {
      s[j] = sp[j][g];
      z[j] = zp[j][g];
    }
    group_dots<M_, NR, VPG>(a, q, s, z, g * a.G, a.G / 8, acc);
  }
  const int64_t k0 = whole * a.G;
  if (k0 < a.K) {  // the short last group
    for (int j = 0; j < NR; ++j) {
      s[j] = sp[j][whole];
      z[j] = zp[j][whole];
    }
    const int64_t vectors = (a.K - k0) / 8, k = k0 + vectors * 8;
    group_dots<M_, NR, 0>(a, q, s, z, k0, vectors, acc);
    if (k < a.K) {  // x is zero-padded past K
      for (int j = 0; j < NR; ++j) {
        const v8 w = tail_weights(q[j] + k, a.K - k, z[j], s[j]);
        for (int i = 0; i < M_; ++i) acc[i][j] += w * load(a.x + i * a.K8 + k);
      }
    }
  }
  for (int i = 0; i < M_; ++i)
    for (int j = 0; j < NR; ++j) a.out[i * a.o_sm + n0 + j] = hsum(acc[i][j]);
}

template <int M_, int VPG>
void fused_tile_g(const Args& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) fused_rows<M_, ROWS, VPG>(a, n);
  for (; n < n1; ++n) fused_rows<M_, 1, VPG>(a, n);
}

template <int M_>
void fused_tile(const Args& a, int64_t n0, int64_t n1) {
  switch (a.G) {  // GGUF Q6_K (16), Q8_0 (32), GPTQ / compressed-tensors (32, 64, 128)
    case 16: fused_tile_g<M_, 2>(a, n0, n1); break;
    case 32: fused_tile_g<M_, 4>(a, n0, n1); break;
    case 64: fused_tile_g<M_, 8>(a, n0, n1); break;
    case 128: fused_tile_g<M_, 16>(a, n0, n1); break;
    default: fused_tile_g<M_, 0>(a, n0, n1); break;
  }
}

// Rows n0 .. n1 of W -> scratch (n1 - n0, K8) float32, zero weights past K.
void convert_tile(const Args& a, int64_t n0, int64_t n1, float* scratch) {
  const int64_t groups = (a.K + a.G - 1) / a.G;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = scratch + (n - n0) * a.K8;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = a.scales[n * a.s_sn + g];
      const int32_t z = a.zeros[n * a.z_sn + g];
      const int64_t k_end = std::min(a.K, (g + 1) * a.G);
      int64_t k = g * a.G;
      for (; k + 8 <= k_end; k += 8) {
        const v8 w = weights(a.q + n * a.q_sn + k, z, s);
        std::memcpy(row + k, &w, sizeof w);
      }
      if (k < k_end) {
        const v8 w = tail_weights(a.q + n * a.q_sn + k, k_end - k, z, s);
        std::memcpy(row + k, &w, sizeof w);
      }
    }
  }
}

// out[m0 .. m0 + MB, n0 .. n0 + NB] = x rows . scratch rows (scratch row 0 is weight row n_base).
template <int MB, int NB>
void dot_block(const Args& a, const float* scratch, int64_t m0, int64_t n0, int64_t n_base) {
  v8 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = splat(0.f);
  const float* xr = a.x + m0 * a.K8;
  const float* wr = scratch + (n0 - n_base) * a.K8;
  for (int64_t k = 0; k < a.K8; k += 8) {
    v8 xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = load(xr + i * a.K8 + k);
    for (int j = 0; j < NB; ++j) {
      const v8 w = load(wr + j * a.K8 + k);
      for (int i = 0; i < MB; ++i) acc[i][j] += w * xv[i];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) a.out[(m0 + i) * a.o_sm + n0 + j] = hsum(acc[i][j]);
}

template <int MB>
void dot_rows(const Args& a, const float* scratch, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) dot_block<MB, ROWS>(a, scratch, m0, n, n0);
  for (; n < n1; ++n) dot_block<MB, 1>(a, scratch, m0, n, n0);
}

void batch_tile(const Args& a, int64_t n0, int64_t n1, float* scratch) {
  convert_tile(a, n0, n1, scratch);
  int64_t m = 0;
  for (; m + MR <= a.M; m += MR) dot_rows<MR>(a, scratch, m, n0, n1);
  if (a.M - m == 2) dot_rows<2>(a, scratch, m, n0, n1);
  if (a.M - m == 1) dot_rows<1>(a, scratch, m, n0, n1);
}

}  // namespace

// x (M, K) float32 with strides (x_sm, x_sk); q (N, K) uint8 with row stride q_sn; scales (N, groups)
// float32 and zeros (N, groups) uint8 with row strides; out (M, N) float32 with row stride o_sm.
// Returns 0, or -1 when G is not a positive multiple of 8 or a size is not positive (the launcher
// checks all of that first, so -1 is a launcher bug).
extern "C" int tandem_int8_group_gemm(
    const float* x, int64_t x_sm, int64_t x_sk, const uint8_t* q, int64_t q_sn, const float* scales,
    int64_t s_sn, const uint8_t* zeros, int64_t z_sn, float* out, int64_t o_sm, int64_t M, int64_t N,
    int64_t K, int64_t G) {
  if (G < 8 || G % 8 != 0 || M < 1 || N < 1 || K < 1) return -1;
  const int64_t K8 = (K + 7) / 8 * 8;
  std::vector<float> xp(static_cast<size_t>(M * K8), 0.f);  // (M, K8): x, zero-padded
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[m * K8 + k] = x[m * x_sm + k * x_sk];
  const Args a{xp.data(), q, q_sn, scales, s_sn, zeros, z_sn, out, o_sm, M, N, K, K8, G};
  const int64_t tiles = (N + TILE_N - 1) / TILE_N;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch;
    if (M > FUSED_M) scratch.resize(static_cast<size_t>(TILE_N * K8));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE_N, n1 = std::min(N, n0 + TILE_N);
      switch (M > FUSED_M ? 0 : M) {
        case 1: fused_tile<1>(a, n0, n1); break;
        case 2: fused_tile<2>(a, n0, n1); break;
        case 3: fused_tile<3>(a, n0, n1); break;
        case 4: fused_tile<4>(a, n0, n1); break;
        default: batch_tile(a, n0, n1, scratch.data()); break;
      }
    }
  });
  return 0;
}

#ifdef TANDEM_PYFAST  // the same functions as Python fast calls (kernels/pyfast.h)
#include "pyfast.h"

TANDEM_FASTCALL(int8_group_gemm)
TANDEM_FASTCALL_MODULE(int8_group_gemm_cpu, TANDEM_METHOD(int8_group_gemm))
#endif
