// The decoder layer's small CPU kernels and the greedy argmax (kernels/layer_ops_cpu.py builds and
// calls them). Their references: rms_norm_ref (kernels/rmsnorm.py), rotary_ref (kernels/rotary.py),
// silu_and_mul_ref (kernels/activation.py), store_kv_ref (kernels/kv_store.py) and torch.argmax.
//
// Tensors come as raw pointers with element strides; a dtype code names the element type (0 float32,
// 1 bfloat16, 2 float16, 3 float8_e4m3fn for a KV pool). Each kernel rounds where its reference
// rounds: the math in float32, cast to the tensor's dtype at the same points, every product rounded
// before it is added (built with -ffp-contract=off: no fused multiply-add). What can differ from the reference: the order of
// RMSNorm's sum of squares, and exp inside SiLU (a ~1 ulp polynomial, like torch's own vectorised
// exp, which it need not equal bit for bit). Rows go to torch's intra-op threads (at::parallel_for)
// in chunks of at least GRAIN elements, so a decode batch of a small model runs inline.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int64_t GRAIN = 1 << 15;  // elements per thread's chunk, at least
constexpr float INF = std::numeric_limits<float>::infinity();

inline v8 load(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

#if defined(__AVX2__)
inline bool any_lane(v8i mask) { return _mm256_movemask_ps((__m256)mask) != 0; }
#else
inline bool any_lane(v8i mask) {
  int32_t any = 0;
  for (int j = 0; j < 8; ++j) any |= mask[j];
  return any != 0;
}
#endif

// Rows per parallel chunk when each row holds `elems` elements.
inline int64_t grain(int64_t elems) { return std::max<int64_t>(1, GRAIN / std::max<int64_t>(elems, 1)); }

#if defined(__AVX2__) && defined(__FMA__)
inline v8 fma8(v8 a, v8 b, v8 c) { return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
inline v8 clamp8(v8 x, float lo, float hi) {
  return (v8)_mm256_max_ps(_mm256_min_ps((__m256)x, (__m256)splat(hi)), (__m256)splat(lo));
}
inline v8 round8(v8 x) { return (v8)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#else
inline v8 fma8(v8 a, v8 b, v8 c) { return a * b + c; }
inline v8 clamp8(v8 x, float lo, float hi) {
  x = x > splat(hi) ? splat(hi) : x;
  return x < splat(lo) ? splat(lo) : x;
}
inline v8 round8(v8 x) {  // half away from zero, then truncation
  return __builtin_convertvector(__builtin_convertvector(x + (x < splat(0.0f) ? splat(-0.5f) : splat(0.5f)), v8i), v8);
}
#endif

// e^x on 8 lanes, ~1 ulp: Cephes' polynomial on r = x - n ln2 (ln2 in two parts), scaled by 2^n in
// two halves so that every n of a finite result has a normal exponent field. +inf above 88.73,
// 0 below -87.34 (no denormals), NaN stays NaN. Its multiply-adds are fused on purpose: only the
// references' own arithmetic must round product by product.
inline v8 exp8(v8 x) {
  const v8i big = x > splat(88.7228394f), small = x < splat(-87.3365479f);
  const v8 c = clamp8(x, -87.0f, 88.0f);
  const v8 n = round8(c * splat(1.44269504088896341f));
  const v8 r = fma8(n, splat(2.12194440e-4f), fma8(n, splat(-0.693359375f), c));
  v8 y = splat(1.9875691500E-4f);
  y = fma8(y, r, splat(1.3981999507E-3f));
  y = fma8(y, r, splat(8.3334519073E-3f));
  y = fma8(y, r, splat(4.1665795894E-2f));
  y = fma8(y, r, splat(1.6666665459E-1f));
  y = fma8(y, r, splat(5.0000001201E-1f));
  y = fma8(y, r * r, r + splat(1.0f));
  const v8i ni = __builtin_convertvector(n, v8i), n1 = ni >> 1, n2 = ni - n1;
  const v8i e1 = (n1 + 127) << 23, e2 = (n2 + 127) << 23;
  v8 s1, s2;
  std::memcpy(&s1, &e1, sizeof s1);
  std::memcpy(&s2, &e2, sizeof s2);
  y = y * s1 * s2;
  y = big ? splat(INF) : y;
  return small ? splat(0.0f) : y;
}

template <typename T> inline float f32(T x) { return static_cast<float>(x); }
template <typename T> inline T cast(float x) { return static_cast<T>(x); }

// Calls body.template operator()<T>() for the element type of `dtype` (0, 1, 2); false for others.
template <typename Body> bool dispatch(int dtype, Body&& body) {
  switch (dtype) {
    case 0: body(float{}); return true;
    case 1: body(c10::BFloat16{}); return true;
    case 2: body(c10::Half{}); return true;
    default: return false;
  }
}

// out = w * T(r * rsqrt(mean(r^2) + eps)) with r = T(x + res) written to res_out (or r = x).
template <typename T>
void rms_norm(const T* x, int64_t sx, const T* res, int64_t sr, const T* w, T* out, T* res_out, int64_t rows,
              int64_t h, float eps) {
  at::parallel_for(0, rows, grain(h), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const T* src = x + t * sx;
      if (res != nullptr) {  // the new residual stream, in T, as the reference's (x + residual)
        T* r = res_out + t * h;
        const T* b = res + t * sr;
        for (int64_t i = 0; i < h; ++i) r[i] = cast<T>(f32(src[i]) + f32(b[i]));
        src = r;
      }
      float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 running sums: a vector of partial sums
      int64_t i = 0;
      for (; i + 8 <= h; i += 8) {
        for (int j = 0; j < 8; ++j) {
          const float v = f32(src[i + j]);
          lane[j] += v * v;
        }
      }
      for (; i < h; ++i) {
        const float v = f32(src[i]);
        lane[0] += v * v;
      }
      const float sum = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
      const float rstd = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
      T* o = out + t * h;
      for (int64_t k = 0; k < h; ++k) o[k] = cast<T>(f32(w[k]) * f32(cast<T>(f32(src[k]) * rstd)));
    }
  });
}

// Rotate-half of `heads` heads of one token: x1 = x[:half], x2 = x[half:] -> contiguous out.
template <typename T>
inline void rotate(const T* x, int64_t sh, int64_t heads, const float* cos, const float* sin, int64_t half, T* out) {
  for (int64_t hd = 0; hd < heads; ++hd) {
    const T* a = x + hd * sh;
    T* o = out + hd * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = f32(a[i]), x2 = f32(a[half + i]);
      o[i] = cast<T>(x1 * cos[i] - x2 * sin[i]);
      o[half + i] = cast<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

// 8 values of T from p, widened to float32 (float32 itself: one load).
template <typename T> inline v8 load8(const T* p) {
  float f[8];
  for (int j = 0; j < 8; ++j) f[j] = f32(p[j]);
  return load(f);
}
template <> inline v8 load8<float>(const float* p) { return load(p); }

// silu(g) = g / (1 + e^-g), rounded to T, times up, rounded to T: 8 columns into out.
template <typename T> inline void silu_mul8(v8 g, const T* up, T* out) {
  const v8 s = g / (splat(1.0f) + exp8(-g));
  if constexpr (std::is_same_v<T, float>) {
    store(out, s * load(up));
  } else {
    for (int j = 0; j < 8; ++j) out[j] = cast<T>(f32(cast<T>(s[j])) * f32(up[j]));
  }
}

// One row: silu(gate) * up over `inter` columns, the tail through a zero-padded vector.
template <typename T>
inline void silu_mul_row(const T* gate, const T* up, T* out, int64_t inter) {
  int64_t i = 0;
  for (; i + 8 <= inter; i += 8) silu_mul8(load8(gate + i), up + i, out + i);
  if (i < inter) {
    T g[8], u[8], o[8];
    for (int j = 0; j < 8; ++j) g[j] = u[j] = cast<T>(0.0f);
    for (int64_t j = 0; j < inter - i; ++j) {
      g[j] = gate[i + j];
      u[j] = up[i + j];
    }
    silu_mul8(load8(g), u, o);
    for (int64_t j = 0; j < inter - i; ++j) out[i + j] = o[j];
  }
}

// One token's (Hk, D) K or V tile into a pool slot: a copy, or fp8 = clamp(x / kv_scale, +-448).
template <typename S, typename P>
inline void put(const S* src, int64_t sh, P* dst, int64_t dh, int64_t heads, int64_t d, float kv_scale) {
  for (int64_t hd = 0; hd < heads; ++hd) {
    const S* a = src + hd * sh;
    P* o = dst + hd * dh;
    if constexpr (std::is_same_v<P, c10::Float8_e4m3fn>) {
      for (int64_t i = 0; i < d; ++i) {
        const float v = f32(a[i]) / kv_scale;  // NaN passes both comparisons, as through clamp
        o[i] = P(v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v));
      }
    } else {
      std::memcpy(o, a, sizeof(S) * d);
    }
  }
}

template <typename S, typename P>
void store_kv(const S* k, int64_t skt, int64_t skh, const S* v, int64_t svt, int64_t svh, P* kv, int64_t sb,
              int64_t skv, int64_t ss, int64_t sh, const int64_t* slots, int64_t sslot, int64_t t, int64_t hk,
              int64_t d, int64_t bs, float kv_scale) {
  at::parallel_for(0, t, grain(2 * hk * d), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t slot = slots[i * sslot];
      if (slot < 0) continue;  // padding
      P* page = kv + (slot / bs) * sb + (slot % bs) * ss;
      put(k + i * skt, skh, page, sh, hk, d, kv_scale);
      put(v + i * svt, svh, page + skv, sh, hk, d, kv_scale);
    }
  });
}

}  // namespace

// Every entry returns 0 when it wrote its outputs, -1000 for a dtype code it does not take, and
// where it says so -1 - i for the first bad index i (nothing is written then).

// x (rows, h), res (rows, h) or null, w (h,) -> out (rows, h), res_out (rows, h) contiguous.
extern "C" int tandem_rms_norm(const void* x, int64_t sx, const void* res, int64_t sr, const void* w, void* out,
                               void* res_out, int64_t rows, int64_t h, float eps, int dtype) {
  const bool ok = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    rms_norm(static_cast<const T*>(x), sx, static_cast<const T*>(res), sr, static_cast<const T*>(w),
             static_cast<T*>(out), static_cast<T*>(res_out), rows, h, eps);
  });
  return ok ? 0 : -1000;
}

// q (t, hq, d) and k (t, hk, d) at positions (t,) from cache (max_pos, d) float32 [cos | sin] ->
// contiguous q_out, k_out. -1 - i: position i is outside [0, max_pos).
extern "C" int tandem_rotary(const int64_t* pos, int64_t spos, const void* q, int64_t sqt, int64_t sqh, const void* k,
                             int64_t skt, int64_t skh, const float* cache, int64_t sc, int64_t max_pos, void* q_out,
                             void* k_out, int64_t t, int64_t hq, int64_t hk, int64_t d, int dtype) {
  for (int64_t i = 0; i < t; ++i) {
    if (pos[i * spos] < 0 || pos[i * spos] >= max_pos) return static_cast<int>(-1 - i);
  }
  const int64_t half = d / 2;
  const bool ok = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, t, grain((hq + hk) * d), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float* cs = cache + pos[i * spos] * sc;
        rotate(static_cast<const T*>(q) + i * sqt, sqh, hq, cs, cs + half, half, static_cast<T*>(q_out) + i * hq * d);
        rotate(static_cast<const T*>(k) + i * skt, skh, hk, cs, cs + half, half, static_cast<T*>(k_out) + i * hk * d);
      }
    });
  });
  return ok ? 0 : -1000;
}

// x (t, 2 * inter) [gate | up] -> out (t, inter) contiguous.
extern "C" int tandem_silu_and_mul(const void* x, int64_t sx, void* out, int64_t t, int64_t inter, int dtype) {
  const bool ok = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, t, grain(2 * inter), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const T* row = static_cast<const T*>(x) + i * sx;
        silu_mul_row(row, row + inter, static_cast<T*>(out) + i * inter, inter);
      }
    });
  });
  return ok ? 0 : -1000;
}

// k, v (t, hk, d) of dtype `dtype` into kv (num_blocks, 2, bs, hk, d) at slots (t,): a pool of the
// same dtype, or float8_e4m3fn (pool_dtype 3). -1 - i: slot i is >= num_blocks * bs.
extern "C" int tandem_store_kv(const void* k, int64_t skt, int64_t skh, const void* v, int64_t svt, int64_t svh,
                               void* kv, int64_t sb, int64_t skv, int64_t ss, int64_t sh, const int64_t* slots,
                               int64_t sslot, int64_t t, int64_t hk, int64_t d, int64_t bs, int64_t num_blocks,
                               int dtype, int pool_dtype, float kv_scale) {
  for (int64_t i = 0; i < t; ++i) {
    if (slots[i * sslot] >= num_blocks * bs) return static_cast<int>(-1 - i);
  }
  if (pool_dtype != 3 && pool_dtype != dtype) return -1000;
  const bool ok = dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* ks = static_cast<const S*>(k);
    const S* vs = static_cast<const S*>(v);
    if (pool_dtype == 3) {
      store_kv(ks, skt, skh, vs, svt, svh, static_cast<c10::Float8_e4m3fn*>(kv), sb, skv, ss, sh, slots, sslot, t,
               hk, d, bs, kv_scale);
    } else {
      store_kv(ks, skt, skh, vs, svt, svh, static_cast<S*>(kv), sb, skv, ss, sh, slots, sslot, t, hk, d, bs, 1.0f);
    }
  });
  return ok ? 0 : -1000;
}

// x (rows, cols) float32, cols >= 1 -> out (rows,) int64: torch.argmax's answer, the first maximal
// index, or the first NaN's where a row holds one.
extern "C" int tandem_argmax(const float* x, int64_t sx, int64_t rows, int64_t cols, int64_t* out) {
  at::parallel_for(0, rows, grain(cols), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = x + r * sx;
      v8 m0 = splat(-INF), m1 = m0;  // pass 1: the maximum (two chains), and whether any NaN
      v8i nan = v8i{0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 16 <= cols; i += 16) {
        const v8 a = load(row + i), b = load(row + i + 8);
        m0 = a > m0 ? a : m0;
        m1 = b > m1 ? b : m1;
        nan |= (a != a) | (b != b);
      }
      for (; i + 8 <= cols; i += 8) {
        const v8 a = load(row + i);
        m0 = a > m0 ? a : m0;
        nan |= a != a;
      }
      m0 = m1 > m0 ? m1 : m0;
      float best = -INF;
      bool any_nan = false;
      for (int j = 0; j < 8; ++j) {
        best = std::max(best, m0[j]);
        any_nan |= nan[j] != 0;
      }
      for (; i < cols; ++i) {
        best = row[i] > best ? row[i] : best;
        any_nan |= std::isnan(row[i]);
      }
      int64_t at = 0;  // pass 2: where it first occurs, skipping 8 at a time
      if (any_nan) {
        while (!std::isnan(row[at])) ++at;
      } else {
        for (; at + 8 <= cols && !any_lane(load(row + at) == splat(best)); at += 8) {
        }
        while (row[at] != best) ++at;
      }
      out[r] = at;
    }
  });
  return 0;
}

#ifdef TANDEM_PYFAST  // the same functions as Python fast calls (kernels/pyfast.h)
#include "pyfast.h"

TANDEM_FASTCALL(rms_norm)
TANDEM_FASTCALL(rotary)
TANDEM_FASTCALL(silu_and_mul)
TANDEM_FASTCALL(store_kv)
TANDEM_FASTCALL(argmax)
TANDEM_FASTCALL_MODULE(layer_ops_cpu, TANDEM_METHOD(rms_norm), TANDEM_METHOD(rotary), TANDEM_METHOD(silu_and_mul), TANDEM_METHOD(store_kv), TANDEM_METHOD(argmax))
#endif
