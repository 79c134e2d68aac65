// Paged attention on CPU that reads the KV pool in place (kernels/paged_attention_cpu.py builds and
// calls it; kernels/paged_attention.py is its reference and documents the layout).
//
// One work item is a sequence b, a range of its KV heads and a tile of its query rows. A KV head's
// rows are its G = Hq / Hk query heads at consecutive positions, row = position * G + head, so one
// pass over the sequence's pages serves all G heads. A decode (or any query of up to TILE_ROWS / Hq
// positions) takes all Hk heads in one item, so each page is read whole, once; a prefill chunk is
// tiles of TILE_ROWS rows, one KV head each. Per item, chunks of pages (CHUNK_KEYS keys):
//
//     Q (R, D) . K_page (bs, D)^T -> S (R, keys)    the chunk's pages' scores side by side; masked
//                                                   where a page crosses a row's diagonal or window
//     m_new = max(m, max S);  P = exp(S - m_new)    online softmax: one update per chunk
//     O = O * exp(m - m_new) + P . V_page           page by page; out = O / l at the end
//
// Pages are addressed through the block table and the pool's strides; nothing is gathered, and no
// slot past a sequence's length is read. Non-float32 pools (bfloat16, float16, float8_e4m3fn) are
// converted page by page into a small float32 scratch; fp8's kv_scale is folded into the score
// scale and the output. Threads: at::parallel_for over torch's intra-op pool; items are handed out
// dynamically, largest first, so one long prefill tile and many short decodes share the threads.
// Vectors are GCC/clang vector extensions (8 floats): AVX2 where built with -mavx2, split otherwise.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int TILE_ROWS = 192;  // query rows per item: Q, O (R x D) and S (R x CHUNK_KEYS) fit in L2
constexpr int TRANSPOSE_ROWS = 12;  // tiles of this many rows compute scores from a transposed page
constexpr int CHUNK_KEYS = 64;  // keys (whole pages) per online-softmax update
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Lane shuffles of two vectors (indices 0-7: a's lanes, 8-15: b's): clang's and gcc's spellings.
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

inline v8 load(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// The 8 lane sums of a[0..7] as one vector: {sum(a[0]), ..., sum(a[7])}.
inline v8 hsum8(const v8* a) {
  v8 u[4];
  for (int i = 0; i < 4; ++i) {  // u[i] = {a[2i] lo+hi (4 lanes), a[2i+1] lo+hi (4 lanes)}
    u[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           SHUFFLE(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  v8 w[2];
  for (int i = 0; i < 2; ++i) {  // w[i] = {a[4i] (2 lanes), a[4i+1], a[4i+2], a[4i+3]}
    w[i] = SHUFFLE(u[2 * i], u[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           SHUFFLE(u[2 * i], u[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return SHUFFLE(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         SHUFFLE(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

// exp(x) for x <= 0 (scores minus their running max), -inf -> 0; Cephes' polynomial, ~1 ulp.
inline v8 exp_neg(v8 x) {
  const auto tiny = x < splat(-87.3f);  // exp < 2^-126 (and -inf): 0
  x = tiny ? splat(-87.3f) : x;
  v8 n = x * splat(1.44269504088896341f);
  n = n - splat(0.5f);  // n <= 0: truncating n - 0.5 toward zero rounds n to the nearest integer
  v8i ni = __builtin_convertvector(n, v8i);
  n = __builtin_convertvector(ni, v8);
  x = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8 y = splat(1.9875691500E-4f);
  y = y * x + splat(1.3981999507E-3f);
  y = y * x + splat(8.3334519073E-3f);
  y = y * x + splat(4.1665795894E-2f);
  y = y * x + splat(1.6666665459E-1f);
  y = y * x + splat(5.0000001201E-1f);
  y = y * x * x + x + splat(1.0f);
  v8i e = (ni + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &e, sizeof scale);
  return tiny ? splat(0.0f) : y * scale;
}

struct Args {
  const float* q; int64_t q_st, q_sh;          // q (T, Hq, D), float32 here (the launcher converts)
  const void* kv; int kv_type;                 // 0 float32, 1 bfloat16, 2 float16, 3 float8_e4m3fn
  int64_t kv_sb, kv_sk, kv_ss, kv_sh;          // pool strides: block, K/V, slot, head (elements)
  const int32_t* tables; int64_t tables_sb;    // (B, max_blocks)
  const int32_t* qsl; const int32_t* lens;     // (B+1,), (B,)
  float* out;                                  // (T, Hq, D) contiguous float32
  int64_t B, Hq, Hk, D, bs, window;            // window 0: none
  float scale, kv_scale;                       // kv_scale 1 for non-fp8 pools
};

// Rows [row0, row0 + rows) of sequence b (row = position * G + head in group) for KV heads
// [h0, h0 + nh): a decode or a short query takes all heads at once (each page read whole, once),
// a long prefill chunk one head per item.
struct Item { int32_t b, h0, nh, row0, rows; int64_t cost; };

// One thread's buffers: Q and O tiles (tile, D), S (tile, chunk * bs), m, l, corr (tile),
// converted K and V pages (chunk * Hk * bs, D), one transposed page (D, bs rounded up to 16), and
// each chunk's V pages: pointer and row stride.
// Each thread keeps its buffers across calls (grown, never shrunk, never cleared: every item writes
// what it reads), so a call allocates and zeroes nothing.
struct Scratch {
  std::vector<float> buf;
  std::vector<const float*> v;
  std::vector<int64_t> vld;
  int64_t chunk = 0;
  float *Q, *O, *S, *m, *l, *corr, *kbuf, *vbuf, *kt;
  void fit(int64_t tile, int64_t D, int64_t bs, int64_t Hk, int64_t chunk_) {
    chunk = chunk_;
    if (static_cast<int64_t>(v.size()) < chunk * Hk) { v.resize(chunk * Hk); vld.resize(chunk * Hk); }
    const int64_t sw = chunk * bs, pages = chunk * Hk * bs * D, kt_cols = (bs + 15) / 16 * 16;
    const size_t need = 2 * tile * D + tile * sw + 3 * tile + 2 * pages + D * kt_cols;
    if (buf.size() < need) buf.resize(need);
    Q = buf.data(); O = Q + tile * D; S = O + tile * D; m = S + tile * sw; l = m + tile; corr = l + tile;
    kbuf = corr + tile; vbuf = kbuf + pages; kt = vbuf + pages;
  }
};

float fp8_e4m3_to_float(uint8_t x) {
  const int sign = x >> 7, exp = (x >> 3) & 15, man = x & 7;
  float v;
  if (exp == 15 && man == 7) v = std::numeric_limits<float>::quiet_NaN();
  else if (exp == 0) v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  else v = std::ldexp(1.0f + man / 8.0f, exp - 7);
  return sign ? -v : v;
}

struct Fp8Table {
  float v[256];
  Fp8Table() { for (int i = 0; i < 256; ++i) v[i] = fp8_e4m3_to_float(static_cast<uint8_t>(i)); }
};
const Fp8Table FP8;

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 31, man = h & 1023;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else v = std::ldexp(static_cast<float>(man | 1024), static_cast<int>(exp) - 25);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

// Rows [0, n) of head h of one K or V page as float32 rows of stride *ld: the pool itself for a
// float32 pool with unit head-dim stride, else converted into `scratch` (n x D).
const float* page_rows(const Args& a, int64_t block, int which, int64_t h, int64_t n, float* scratch, int64_t* ld) {
  const int64_t base = block * a.kv_sb + which * a.kv_sk + h * a.kv_sh;
  if (a.kv_type == 0) {
    *ld = a.kv_ss;
    return static_cast<const float*>(a.kv) + base;
  }
  *ld = a.D;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t off = base + t * a.kv_ss;
    float* dst = scratch + t * a.D;
    if (a.kv_type == 1) {
      const uint16_t* src = static_cast<const uint16_t*>(a.kv) + off;
      for (int64_t d = 0; d < a.D; ++d) {
        const uint32_t bits = static_cast<uint32_t>(src[d]) << 16;
        std::memcpy(dst + d, &bits, 4);
      }
    } else if (a.kv_type == 2) {
      const uint16_t* src = static_cast<const uint16_t*>(a.kv) + off;
      for (int64_t d = 0; d < a.D; ++d) dst[d] = half_to_float(src[d]);
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(a.kv) + off;
      for (int64_t d = 0; d < a.D; ++d) dst[d] = FP8.v[src[d]];
    }
  }
  return scratch;
}

// One row's scores, eight keys per step (an odd last row of `scores`: a decode with one query head
// per KV head, or an odd group).
template <int NV>
void scores1(const float* q, int64_t D, const float* K, int64_t ld, int64_t n, float* S) {
  const int64_t nv = NV ? NV : D / 8;
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    v8 acc[8] = {};
    const float* k0 = K + t * ld;
    for (int64_t i = 0; i < nv; ++i) {
      const v8 a = load(q + 8 * i);
      for (int j = 0; j < 8; ++j) acc[j] += a * load(k0 + j * ld + 8 * i);
    }
    store(S + t, hsum8(acc));
  }
  for (; t < n; ++t) {
    v8 acc = {};
    for (int64_t i = 0; i < nv; ++i) acc += load(q + 8 * i) * load(K + t * ld + 8 * i);
    float s = 0;
    for (int j = 0; j < 8; ++j) s += acc[j];
    S[t] = s;
  }
}

// S (R, bs) = Q (R, D) . K (n, D)^T for keys [0, n); Q rows are D apart, K rows ld apart, D % 8 == 0.
// Two rows by four keys per step: 8 accumulators, reduced together by hsum8; an odd last row by scores1.
template <int NV>
void scores(const float* Q, int64_t R, int64_t D, const float* K, int64_t ld, int64_t n, float* S, int64_t bs) {
  const int64_t nv = NV ? NV : D / 8;  // NV: D / 8 known at compile time (0: not)
  if (R % 2) scores1<NV>(Q + (R - 1) * D, D, K, ld, n, S + (R - 1) * bs);
  for (int64_t r = 0; r + 1 < R; r += 2) {
    const float* q0 = Q + r * D;
    const float* q1 = q0 + D;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      v8 acc[8] = {};
      const float* k0 = K + t * ld;
      for (int64_t i = 0; i < nv; ++i) {
        const v8 a0 = load(q0 + 8 * i), a1 = load(q1 + 8 * i);
        for (int j = 0; j < 4; ++j) {
          const v8 kj = load(k0 + j * ld + 8 * i);
          acc[j] += a0 * kj;
          acc[4 + j] += a1 * kj;
        }
      }
      const v8 s = hsum8(acc);
      for (int j = 0; j < 4; ++j) S[r * bs + t + j] = s[j];
      for (int j = 0; j < 4; ++j) S[(r + 1) * bs + t + j] = s[4 + j];
    }
    for (; t < n; ++t) {
      v8 acc0 = {}, acc1 = {};
      const float* kt = K + t * ld;
      for (int64_t i = 0; i < nv; ++i) {
        const v8 kv = load(kt + 8 * i);
        acc0 += load(q0 + 8 * i) * kv;
        acc1 += load(q1 + 8 * i) * kv;
      }
      float s0 = 0, s1 = 0;
      for (int j = 0; j < 8; ++j) { s0 += acc0[j]; s1 += acc1[j]; }
      S[r * bs + t] = s0;
      S[(r + 1) * bs + t] = s1;
    }
  }
}

// The same S from K transposed into Kt (D, ldt): six rows by 16 keys per step, no reductions across
// lanes. For tiles of many rows (prefill chunks), where the transpose is paid once for all of them.
template <int NV, int RB>
inline void scores_t_rows(const float* Q, int64_t D, const float* Kt, int64_t ldt, int64_t nk, float* S, int64_t bs) {
  for (int64_t t = 0; t < nk; t += 16) {  // nk: keys rounded up to 16 (Kt is zero-padded)
    v8 acc[RB][2] = {};
    const int64_t dd = NV ? 8 * NV : D;
    for (int64_t d = 0; d < dd; ++d) {
      const v8 k0 = load(Kt + d * ldt + t), k1 = load(Kt + d * ldt + t + 8);
      for (int r = 0; r < RB; ++r) {
        const v8 x = splat(Q[r * D + d]);
        acc[r][0] += x * k0;
        acc[r][1] += x * k1;
      }
    }
    for (int r = 0; r < RB; ++r) { store(S + r * bs + t, acc[r][0]); store(S + r * bs + t + 8, acc[r][1]); }
  }
}

template <int NV>
void scores_t(const float* Q, int64_t R, int64_t D, const float* K, int64_t ld, int64_t n, float* S, int64_t bs,
              float* Kt) {
  const int64_t nk = (n + 15) / 16 * 16, ldt = nk;
  for (int64_t d = 0; d < D; ++d) std::fill(Kt + d * ldt + n, Kt + d * ldt + nk, 0.0f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < D; ++d) Kt[d * ldt + t] = K[t * ld + d];
  int64_t r = 0;
  for (; r + 6 <= R; r += 6) scores_t_rows<NV, 6>(Q + r * D, D, Kt, ldt, nk, S + r * bs, bs);
  switch (R - r) {
    case 5: scores_t_rows<NV, 5>(Q + r * D, D, Kt, ldt, nk, S + r * bs, bs); break;
    case 4: scores_t_rows<NV, 4>(Q + r * D, D, Kt, ldt, nk, S + r * bs, bs); break;
    case 3: scores_t_rows<NV, 3>(Q + r * D, D, Kt, ldt, nk, S + r * bs, bs); break;
    case 2: scores_t_rows<NV, 2>(Q + r * D, D, Kt, ldt, nk, S + r * bs, bs); break;
    case 1: scores_t_rows<NV, 1>(Q + r * D, D, Kt, ldt, nk, S + r * bs, bs); break;
    default: break;
  }
}

// O rows r0, r1 (D each) = O * corr + P rows (n) . V (n, D): two rows by four vectors per step.
// (An odd last row takes accumulate1.)
template <int NV>
inline void accumulate2(float* o0, float* o1, int64_t D, float c0, float c1, const float* p0, const float* p1,
                        const float* V, int64_t ld, int64_t n) {
  const int64_t nv = NV ? NV : D / 8;  // NV: D / 8 known at compile time (0: not)
  int64_t i = 0;
  for (; i + 4 <= nv; i += 4) {
    v8 a[4], b[4];
    for (int j = 0; j < 4; ++j) { a[j] = load(o0 + 8 * (i + j)) * c0; b[j] = load(o1 + 8 * (i + j)) * c1; }
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = V + t * ld + 8 * i;
      const v8 x = splat(p0[t]), y = splat(p1[t]);
      for (int j = 0; j < 4; ++j) {
        const v8 v = load(vt + 8 * j);
        a[j] += x * v;
        b[j] += y * v;
      }
    }
    for (int j = 0; j < 4; ++j) { store(o1 + 8 * (i + j), b[j]); store(o0 + 8 * (i + j), a[j]); }
  }
  // Fewer than four vectors left (head_dim 16, 24, 40, ...): the keys split two ways, so four FMA
  // chains run at once instead of two that each wait on the FMA latency every key.
  for (; (NV == 0 || NV % 4 != 0) && i < nv; ++i) {  // (never for the unrolled sizes)
    v8 a = load(o0 + 8 * i) * c0, b = load(o1 + 8 * i) * c1, a1 = {}, b1 = {};
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
      const v8 v = load(V + t * ld + 8 * i), w = load(V + (t + 1) * ld + 8 * i);
      a += splat(p0[t]) * v;
      b += splat(p1[t]) * v;
      a1 += splat(p0[t + 1]) * w;
      b1 += splat(p1[t + 1]) * w;
    }
    if (t < n) {
      const v8 v = load(V + t * ld + 8 * i);
      a += splat(p0[t]) * v;
      b += splat(p1[t]) * v;
    }
    store(o1 + 8 * i, b + b1);
    store(o0 + 8 * i, a + a1);
  }
}

// O row (D) = O * c + p (n) . V (n, D), the row in registers eight vectors at a time.
template <int NV>
inline void accumulate1(float* o, int64_t D, float c, const float* p, const float* V, int64_t ld, int64_t n) {
  const int64_t nv = NV ? NV : D / 8;
  int64_t i = 0;
  for (; i + 8 <= nv; i += 8) {
    v8 a[8];
    for (int j = 0; j < 8; ++j) a[j] = load(o + 8 * (i + j)) * c;
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = V + t * ld + 8 * i;
      const v8 x = splat(p[t]);
      for (int j = 0; j < 8; ++j) a[j] += x * load(vt + 8 * j);
    }
    for (int j = 0; j < 8; ++j) store(o + 8 * (i + j), a[j]);
  }
  // Fewer than eight vectors left (head_dim 16 to 56, ...): the keys split four ways, so four FMA
  // chains run at once; one chain waits on the FMA latency every key.
  for (; (NV == 0 || NV % 8 != 0) && i < nv; ++i) {
    const float* v = V + 8 * i;
    v8 acc[4] = {load(o + 8 * i) * c};
    int64_t t = 0;
    for (; t + 4 <= n; t += 4)
      for (int j = 0; j < 4; ++j) acc[j] += splat(p[t + j]) * load(v + (t + j) * ld);
    for (; t < n; ++t) acc[0] += splat(p[t]) * load(v + t * ld);
    store(o + 8 * i, (acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
}

template <int NV>
void run_item(const Args& a, const Item& it, Scratch& w) {
  const int64_t G = a.Hq / a.Hk, D = a.D, bs = a.bs, R = it.rows, nh = it.nh, sw = w.chunk * bs;
  const int64_t start = a.qsl[it.b], q_len = a.qsl[it.b + 1] - start, len = a.lens[it.b];
  const int64_t first_pos = len - q_len;               // position of the sequence's first query row
  const int64_t p_lo = first_pos + it.row0 / G;         // positions of the tile's first and last rows
  const int64_t p_hi = first_pos + (it.row0 + R - 1) / G;
  const float qs = a.scale * a.kv_scale;
  float *Q = w.Q, *O = w.O, *S = w.S, *m = w.m, *l = w.l, *corr = w.corr;
  for (int64_t hh = 0; hh < nh; ++hh) {                 // Q tile (nh * R, D), pre-scaled
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = it.row0 + r, hq = (it.h0 + hh) * G + row % G;
      const float* src = a.q + (start + row / G) * a.q_st + hq * a.q_sh;
      float* dst = Q + (hh * R + r) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * qs;
    }
  }
  std::fill(O, O + nh * R * D, 0.0f);
  std::fill(m, m + nh * R, NEG_INF);
  std::fill(l, l + nh * R, 0.0f);
  const int64_t k_lo = a.window > 0 ? std::max<int64_t>(0, p_lo - a.window + 1) : 0;
  const int32_t* table = a.tables + it.b * a.tables_sb;
  // Chunks of w.chunk pages: their scores side by side in S (nh * R, sw), one softmax update each.
  for (int64_t j0 = k_lo / bs; j0 <= p_hi / bs; j0 += w.chunk) {
    const int64_t k0 = j0 * bs, n = std::min(sw, p_hi + 1 - k0);  // keys [k0, k0 + n)
    const int64_t pages = (n + bs - 1) / bs;
    for (int64_t pi = 0; pi < pages; ++pi) {
      const int64_t np = std::min(bs, n - pi * bs), block = table[j0 + pi];
      for (int64_t hh = 0; hh < nh; ++hh) {
        const int64_t slot = pi * nh + hh;
        int64_t kld;
        const float* K = page_rows(a, block, 0, it.h0 + hh, np, w.kbuf + slot * bs * D, &kld);
        const float* Qh = Q + hh * R * D;
        float* Sh = S + hh * R * sw + pi * bs;
        if (R >= TRANSPOSE_ROWS && bs % 16 == 0) scores_t<NV>(Qh, R, D, K, kld, np, Sh, sw, w.kt);
        else scores<NV>(Qh, R, D, K, kld, np, Sh, sw);
        w.v[slot] = page_rows(a, block, 1, it.h0 + hh, np, w.vbuf + slot * bs * D, &w.vld[slot]);
      }
    }
    // Every row sees every key of the chunk unless it crosses a row's diagonal or window edge.
    const bool masked = k0 + n - 1 > p_lo || (a.window > 0 && p_hi - k0 >= a.window);
    for (int64_t i = 0; i < nh * R; ++i) {              // online softmax: P = exp(S - m) in place
      float* s = S + i * sw;
      if (masked) {
        const int64_t pos = first_pos + (it.row0 + i % R) / G;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t k = k0 + t;
          if (k > pos || (a.window > 0 && pos - k >= a.window)) s[t] = NEG_INF;
        }
      }
      float mx = m[i];
      int64_t t = 0;
      if (n >= 8) {
        v8 vm = load(s);
        for (t = 8; t + 8 <= n; t += 8) { const v8 x = load(s + t); vm = vm > x ? vm : x; }
        for (int j = 0; j < 8; ++j) mx = std::max(mx, vm[j]);
      }
      for (; t < n; ++t) mx = std::max(mx, s[t]);
      if (mx == NEG_INF) {                               // no key of this chunk is visible to the row
        corr[i] = 1.0f;
        std::fill(s, s + n, 0.0f);
        continue;
      }
      corr[i] = m[i] == NEG_INF ? 0.0f : std::exp(m[i] - mx);
      m[i] = mx;
      v8 vsum = {};
      for (t = 0; t + 8 <= n; t += 8) {
        const v8 e = exp_neg(load(s + t) - splat(mx));
        store(s + t, e);
        vsum += e;
      }
      float sum = 0.0f;
      for (int j = 0; j < 8; ++j) sum += vsum[j];
      for (; t < n; ++t) { s[t] = s[t] == NEG_INF ? 0.0f : std::exp(s[t] - mx); sum += s[t]; }
      l[i] = l[i] * corr[i] + sum;
    }
    for (int64_t hh = 0; hh < nh; ++hh) {               // O = O * corr + P . V, page by page
      for (int64_t r = hh * R; r < (hh + 1) * R; r += 2) {
        const bool one = r + 1 == (hh + 1) * R;  // an odd last row
        for (int64_t pi = 0; pi < pages; ++pi) {
          const int64_t np = std::min(bs, n - pi * bs), slot = pi * nh + hh;
          if (one) {
            accumulate1<NV>(O + r * D, D, pi ? 1.0f : corr[r], S + r * sw + pi * bs, w.v[slot], w.vld[slot], np);
          } else {
            accumulate2<NV>(O + r * D, O + (r + 1) * D, D, pi ? 1.0f : corr[r], pi ? 1.0f : corr[r + 1],
                            S + r * sw + pi * bs, S + (r + 1) * sw + pi * bs, w.v[slot], w.vld[slot], np);
          }
        }
      }
    }
  }
  for (int64_t hh = 0; hh < nh; ++hh) {                 // out = O / l (times kv_scale for fp8 V)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = it.row0 + r, hq = (it.h0 + hh) * G + row % G, i = hh * R + r;
      float* dst = a.out + ((start + row / G) * a.Hq + hq) * D;
      // a division per element, not a product with a rounded 1 / l: that rounding would scale the
      // whole row alike, an error that adds up coherently in the next projection
      for (int64_t d = 0; d < D; ++d) dst[d] = O[i * D + d] / l[i];
      if (a.kv_scale != 1.0f) for (int64_t d = 0; d < D; ++d) dst[d] *= a.kv_scale;
    }
  }
}

}  // namespace

// Returns 0 when it wrote out; nothing is written otherwise:
//   -1 - b      sequence b has q_len < 1, seq_len < q_len, or query rows outside [0, T)
//   -1 - B - b  a block of sequence b's table it would read is outside [0, num_blocks), or the table
//               has fewer than ceil(seq_len / bs) columns
//   -1000       D is not a multiple of 8, or Hq not a multiple of Hk
extern "C" int tandem_paged_attention(
    const float* q, int64_t q_st, int64_t q_sh, const void* kv, int kv_type, int64_t kv_sb, int64_t kv_sk,
    int64_t kv_ss, int64_t kv_sh, const int32_t* tables, int64_t tables_sb, const int32_t* qsl,
    const int32_t* lens, float* out, int64_t B, int64_t T, int64_t Hq, int64_t Hk, int64_t D, int64_t bs,
    int64_t num_blocks, int64_t max_blocks, int64_t window, float scale, float kv_scale) {
  if (D % 8 != 0 || Hk < 1 || Hq % Hk != 0) return -1000;
  const Args a{q, q_st, q_sh, kv, kv_type, kv_sb, kv_sk, kv_ss, kv_sh, tables, tables_sb, qsl, lens, out,
               B, Hq, Hk, D, bs, window, scale, kv_scale};
  const int64_t G = Hq / Hk;
  const int64_t tile = std::max<int64_t>(Hq, TILE_ROWS / G * G);  // whole positions per tile, all heads
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q_len = qsl[b + 1] - qsl[b], len = lens[b];
    if (q_len < 1 || len < q_len || qsl[b] < 0 || qsl[b + 1] > T) return static_cast<int>(-1 - b);
    const int64_t first_page = window > 0 ? std::max<int64_t>(0, len - q_len - window + 1) / bs : 0;
    const int64_t pages = (len + bs - 1) / bs;
    if (pages > max_blocks) return static_cast<int>(-1 - B - b);
    for (int64_t j = first_page; j < pages; ++j) {
      const int32_t block = tables[b * tables_sb + j];
      if (block < 0 || block >= num_blocks) return static_cast<int>(-1 - B - b);
    }
    const bool all_heads = q_len * Hq <= tile;
    const int64_t step = all_heads ? q_len * G : tile / G * G;
    for (int64_t row0 = 0; row0 < q_len * G; row0 += step) {
      const int64_t rows = std::min(step, q_len * G - row0);
      const int64_t last = len - q_len + (row0 + rows - 1) / G + 1;  // keys the tile reads (at most)
      const int64_t keys = window > 0 ? std::min(last, window + rows / G) : last;
      for (int64_t h = 0; h < Hk; h += all_heads ? Hk : 1) {
        const int64_t nh = all_heads ? Hk : 1;
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(nh),
                         static_cast<int32_t>(row0), static_cast<int32_t>(rows), keys * nh * (rows + 8)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  const int64_t chunk = std::max<int64_t>(1, CHUNK_KEYS / bs);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    thread_local Scratch w;
    w.fit(tile, D, bs, Hk, chunk);
    for (int64_t i = next++; i < n_items; i = next++) {
      if (D == 64) run_item<8>(a, items[i], w);  // the common head sizes, unrolled
      else if (D == 128) run_item<16>(a, items[i], w);
      else run_item<0>(a, items[i], w);
    }
  });
  return 0;
}

#ifdef TANDEM_PYFAST  // the same functions as Python fast calls (kernels/pyfast.h)
#include "pyfast.h"

TANDEM_FASTCALL(paged_attention)
TANDEM_FASTCALL_MODULE(paged_attention_cpu, TANDEM_METHOD(paged_attention))
#endif
