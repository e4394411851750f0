// Matmuls for decoding on a CPU: y = x W^T (+ bias) for a few rows x (M, K) and a weight W (N, K) stored in
// bfloat16 or int8 (one float32 scale per output row). At batch 1 such a matmul reads each weight once and does
// two flops per weight read, so its speed is the rate at which the weight streams from memory. oneDNN's bf16
// kernel and fbgemm's int8 one are built for large M: at M = 1 they take ~100 us for a block's 0.3-1.2 MB weight
// (3-10 GB/s). Here every weight row is read once, straight from its nn.Linear layout: four rows at a time, 16
// columns per AVX-512 instruction, products summed in float32 (a bf16 or int8 weight times a float32 input is
// exact in float32, as in oneDNN), the output rounded once. Rows of the output are split over torch's threads.
//
// Built at run time by gpt/native.py with torch's C++ extension builder; x86-64 with AVX512F/BW/VL only (the
// Python side checks the CPU before building and falls back to torch's kernels everywhere else).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kRows = 4;  // weight rows per block: four independent accumulators
constexpr int64_t kAhead = 4;  // blocks prefetched ahead (a hint: 2 to 8 measured alike)

inline __m512 widen(__m256i bf16) {  // 16 bfloat16 -> 16 float32 (exact: the bf16 bits are a float's top half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}
inline __m512 load(const at::BFloat16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load(const at::BFloat16* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load(const int8_t* p, __mmask16 m) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p))); }
inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// Rows [n0, n0 + rows) of W (rows <= kRows) times MM rows of X starting at row m0: the block's weights are loaded
// and widened once for all MM inputs (MM * kRows accumulators: at most 16 of the 32 vector registers).
template <int MM, typename T, typename Out>
inline void block(const float* X, int64_t m0, const T* w, int64_t n0, int64_t rows, int64_t K, const Out& out) {
  const int64_t full = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K & 15)) - 1u);
  const float* x = X + m0 * K;
  __m512 acc[MM][kRows];
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_setzero_ps();
  if (rows == kRows) {
    for (int64_t k = 0; k < full; k += 16) {
      __m512 wv[kRows];
      for (int r = 0; r < kRows; ++r) wv[r] = load(w + r * K + k);
      for (int i = 0; i < MM; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * K + k);
        for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
      }
    }
    if (tail) {
      __m512 wv[kRows];
      for (int r = 0; r < kRows; ++r) wv[r] = load(w + r * K + full, tail);
      for (int i = 0; i < MM; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + i * K + full);
        for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
      }
    }
  } else {  // the last, partial block
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < full; k += 16) {
        const __m512 wv = load(w + r * K + k);
        for (int i = 0; i < MM; ++i) acc[i][r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i * K + k), acc[i][r]);
      }
      if (tail) {
        const __m512 wv = load(w + r * K + full, tail);
        for (int i = 0; i < MM; ++i)
          acc[i][r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + i * K + full), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MM; ++i)
    for (int64_t r = 0; r < rows; ++r) out(m0 + i, n0 + r, _mm512_reduce_add_ps(acc[i][r]));
}

// out(m, n, dot) is called once per output element with the float32 dot product of row m of X and row n of W.
template <typename T, typename Out>
void matmul(const float* X, int64_t M, const T* W, int64_t N, int64_t K, const Out& out) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      const T* w = W + n0 * K;
      if (b + kAhead < b1) {  // ask for a later block's weights now: more of the stream in flight than the
        const int64_t ahead = n0 + kAhead * kRows;  // hardware prefetcher keeps
        const char* next = reinterpret_cast<const char*>(W + ahead * K);
        const int64_t bytes = std::min(kRows, N - ahead) * K * int64_t(sizeof(T));
        if (M <= 4) {
          for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(next + i, _MM_HINT_T0);
        } else {  // many inputs: X itself fills L1 (16 rows of 384 floats: 24 KB), the stream waits in L2
          for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(next + i, _MM_HINT_T1);
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // inputs four at a time; the block's weights stay in L1 meanwhile
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: block<1>(X, m0, w, n0, rows, K, out); break;
          case 2: block<2>(X, m0, w, n0, rows, K, out); break;
          case 3: block<3>(X, m0, w, n0, rows, K, out); break;
          default: block<4>(X, m0, w, n0, rows, K, out); break;
        }
      }
    }
  });
}

void check(const torch::Tensor& x, const torch::Tensor& w, at::ScalarType wtype) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "decode kernels run on the CPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (M, K) and weight (N, K) expected, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.scalar_type() == wtype && w.is_contiguous(), "a contiguous ", wtype, " weight expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 input expected");
}

// The input as contiguous float32 rows: a float32 x as it is, a bf16 one widened into `buf` (no tensor ops: a decode
// step makes 25 of these calls, and each dispatched conversion costs microseconds).
const float* as_float(const torch::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.data_ptr<float>();
  const torch::Tensor c = x.contiguous();
  buf.resize(c.numel());
  if (c.scalar_type() == at::kFloat) {
    std::copy(c.data_ptr<float>(), c.data_ptr<float>() + c.numel(), buf.begin());
  } else {
    const at::BFloat16* p = c.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < c.numel(); ++i) buf[i] = static_cast<float>(p[i]);
  }
  return buf.data();
}

// A float32 or bf16 (N,) vector, read element by element (a bias or the int8 scales); absent: 0.
struct Vec {
  const float* f = nullptr;
  const at::BFloat16* b = nullptr;
  Vec(const c10::optional<torch::Tensor>& t, int64_t n) {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous(), "a contiguous (", n, ",) vector expected, got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, "a float32 or bf16 vector expected");
    if (t->scalar_type() == at::kFloat) f = t->data_ptr<float>(); else b = t->data_ptr<at::BFloat16>();
  }
  bool present() const { return f || b; }
  float operator[](int64_t i) const { return f ? f[i] : (b ? static_cast<float>(b[i]) : 0.f); }
};

}  // namespace

namespace {

// y = x W^T + bias for a weight W (N, K) of element type T (at::ScalarType wtype), in dtype `out` (float32, or bf16:
// the float32 result rounded once).
template <typename T>
torch::Tensor linear_of(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                        at::ScalarType wtype, at::ScalarType out) {
  check(x, weight, wtype);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  std::vector<float> buf;
  const float* X = as_float(x, buf);
  const Vec B(bias, N);
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(out));
  const T* W = weight.data_ptr<T>();
  if (out == at::kBFloat16) {
    at::BFloat16* Y = y.data_ptr<at::BFloat16>();
    matmul(X, M, W, N, K, [&](int64_t m, int64_t n, float s) { Y[m * N + n] = at::BFloat16(s + B[n]); });
  } else {
    float* Y = y.data_ptr<float>();
    matmul(X, M, W, N, K, [&](int64_t m, int64_t n, float s) { Y[m * N + n] = s + B[n]; });
  }
  return y;
}

}  // namespace

// x (M, K) float32 or bfloat16, weight (N, K) bfloat16, bias (N,) or None -> (M, N) in x's dtype.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  return linear_of<at::BFloat16>(x, weight, bias, at::kBFloat16, x.scalar_type());
}

// x (M, K) float32 or bfloat16, weight (N, K) float32, bias (N,) or None -> (M, N) float32.
torch::Tensor linear_f32(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  return linear_of<float>(x, weight, bias, at::kFloat, at::kFloat);
}

// x (M, K) float32 or bfloat16, weight (N, K) int8, scales (N,) float32, bias (N,) or None -> (M, N) float32:
// x (weight * scales[:, None])^T + bias.
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias) {
  check(x, weight, at::kChar);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  std::vector<float> buf;
  const float* X = as_float(x, buf);
  const Vec B(bias, N), S(scales, N);
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  float* Y = y.data_ptr<float>();
  matmul(X, M, weight.data_ptr<int8_t>(), N, K, [&](int64_t m, int64_t n, float d) { Y[m * N + n] = d * S[n] + B[n]; });
  return y;
}

namespace {

inline __m512 load_f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f(const at::BFloat16* p) { return load(p); }
inline void store_f(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_f(at::BFloat16* p, __m512 v) {  // round to nearest even, as at::BFloat16(float) does
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(tmp[i]);
}

// One new token per row, row b's at position pos[b]: its keys and values written into the cache, its queries
// attending over that row's keys 0 .. pos[b]. T: the activations' type, C: the cache's.
template <typename T, typename C>
void attend_rows(const T* qkv, int64_t B, int64_t H, int64_t Hkv, int64_t D, C* kc, C* vc, int64_t row_stride,
                int64_t head_stride, const int64_t* positions, T* y) {
  const int64_t width = (H + 2 * Hkv) * D, group = H / Hkv;
  for (int64_t b = 0; b < B; ++b)  // the new keys and values, into the cache (converted to its type)
    for (int64_t g = 0, pos = positions[b]; g < Hkv; ++g)
      for (int64_t d = 0; d < D; ++d) {
        kc[b * row_stride + g * head_stride + pos * D + d] = C(static_cast<float>(qkv[b * width + (H + g) * D + d]));
        vc[b * row_stride + g * head_stride + pos * D + d] = C(static_cast<float>(qkv[b * width + (H + Hkv + g) * D + d]));
      }
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    std::vector<__m512> q(D / 16), acc(D / 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group, pos = positions[b];
      p.resize(pos + 1);
      const T* qp = qkv + b * width + h * D;
      for (int64_t c = 0; c < D / 16; ++c) q[c] = _mm512_mul_ps(load_f(qp + 16 * c), _mm512_set1_ps(scale));
      const C* K = kc + b * row_stride + g * head_stride;
      const C* V = vc + b * row_stride + g * head_stride;
      float best = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        __m512 s = _mm512_setzero_ps();
        for (int64_t c = 0; c < D / 16; ++c) s = _mm512_fmadd_ps(q[c], load_f(K + j * D + 16 * c), s);
        p[j] = _mm512_reduce_add_ps(s);
        best = std::max(best, p[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j <= pos; ++j) total += (p[j] = std::exp(p[j] - best));
      for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t j = 0; j <= pos; ++j) {
        const __m512 w = _mm512_set1_ps(p[j]);
        for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_fmadd_ps(w, load_f(V + j * D + 16 * c), acc[c]);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / total);
      for (int64_t c = 0; c < D / 16; ++c) store_f(y + b * H * D + h * D + 16 * c, _mm512_mul_ps(acc[c], inv));
    }
  });
}

}  // namespace

// qkv (B, (H + 2 Hkv) D): c_attn's output for one new token per row; k_cache, v_cache (B, Hkv, L, D) (a layer of the
// KV cache); every row holding `pos` positions, or with `lens` (B,) int64, row b holding lens[b] (rows that joined a
// running batch at different times) -> the new tokens' attention output (B, H D), after writing their keys and
// values at those positions.
torch::Tensor attend_new(const torch::Tensor& qkv, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                         int64_t n_head, int64_t position, const c10::optional<torch::Tensor>& lens) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && k_cache.dim() == 4, "qkv (B, W) and a (B, Hkv, L, D) cache expected");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
              k_cache.scalar_type() == v_cache.scalar_type(), "keys and values of one shape and type expected");
  const int64_t B = qkv.size(0), Hkv = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == B && n_head % Hkv == 0 && qkv.size(1) == (n_head + 2 * Hkv) * D && D % 16 == 0,
              "shapes do not fit: qkv ", qkv.sizes(), ", cache ", k_cache.sizes(), ", ", n_head, " heads");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == D, "a cache with contiguous positions expected");
  std::vector<int64_t> pos(B);
  if (lens.has_value() && lens->defined()) {
    TORCH_CHECK(lens->dim() == 1 && lens->size(0) == B && lens->scalar_type() == at::kLong && lens->device().is_cpu(),
                "lens: a (", B, ",) int64 CPU tensor expected, got ", lens->sizes());
    const torch::Tensor t = lens->contiguous();
    std::copy(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + B, pos.begin());
  } else {
    std::fill(pos.begin(), pos.end(), position);
  }
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(0 <= pos[b] && pos[b] < L, "position ", pos[b], " outside the cache");
  torch::Tensor y = torch::empty({B, n_head * D}, qkv.options());
  const int64_t rs = k_cache.stride(0), hs = k_cache.stride(1);
  auto run = [&](auto* q, auto* kc, auto* vc) {
    attend_rows(q, B, n_head, Hkv, D, kc, vc, rs, hs, pos.data(), static_cast<decltype(q)>(y.data_ptr()));
  };
  const bool qb = qkv.scalar_type() == at::kBFloat16, cb = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK((qb || qkv.scalar_type() == at::kFloat) && (cb || k_cache.scalar_type() == at::kFloat), "float32 or bf16 expected");
  if (qb && cb) run(qkv.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  else if (qb) run(qkv.data_ptr<at::BFloat16>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else if (cb) run(qkv.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  else run(qkv.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  return y;
}

// The k largest entries of each row of x (B, V) float32 -> (values (B, k) descending, their indices (B, k)), and
// whether every row was free of NaN (torch.topk ranks NaN above everything; a row holding one is left to it).
// One pass per row: 16 entries at a time are compared with the k-th best so far, and the few that beat it are
// inserted into the sorted list. Among equal values the lower index comes first.
std::tuple<torch::Tensor, torch::Tensor, bool> topk(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "a contiguous (B, V) float32 CPU tensor expected");
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(0 < k && k <= V, "k = ", k, " outside 1 .. ", V);
  torch::Tensor vals = torch::empty({B, k}, x.options()), idx = torch::empty({B, k}, x.options().dtype(at::kLong));
  std::atomic<bool> finite{true};
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = x.data_ptr<float>() + b * V;
      float* v = vals.data_ptr<float>() + b * k;
      int64_t* ix = idx.data_ptr<int64_t>() + b * k;
      bool nan = false;
      auto insert = [&](int64_t n, float value, int64_t i) {  // into v[0 .. n) sorted descending, after equal values
        int64_t j = n;
        while (j > 0 && v[j - 1] < value) {
          if (j < k) { v[j] = v[j - 1]; ix[j] = ix[j - 1]; }
          --j;
        }
        if (j < k) { v[j] = value; ix[j] = i; }
      };
      for (int64_t i = 0; i < k; ++i) {
        nan |= std::isnan(row[i]);
        insert(i, row[i], i);
      }
      int64_t i = k;
      __mmask16 unordered = 0;
      for (; i + 16 <= V; i += 16) {
        const __m512 x16 = _mm512_loadu_ps(row + i);
        unordered |= _mm512_cmp_ps_mask(x16, x16, _CMP_UNORD_Q);
        __mmask16 hit = _mm512_cmp_ps_mask(x16, _mm512_set1_ps(v[k - 1]), _CMP_GT_OQ);
        while (hit) {
          const int bit = __builtin_ctz(hit);
          hit &= hit - 1;
          if (row[i + bit] > v[k - 1]) insert(k, row[i + bit], i + bit);
        }
      }
      for (; i < V; ++i) {
        nan |= std::isnan(row[i]);
        if (row[i] > v[k - 1]) insert(k, row[i], i);
      }
      if (nan || unordered) finite = false;
    }
  });
  return {vals, idx, finite.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x (M, K) @ bf16 weight (N, K)^T + bias");
  m.def("linear_f32", &linear_f32, "x (M, K) @ float32 weight (N, K)^T + bias");
  m.def("linear_int8", &linear_int8, "x (M, K) @ (int8 weight (N, K) * scales)^T + bias");
  m.def("topk", &topk, "the k largest entries of each row, descending, and whether no row held a NaN");
  m.def("attend_new", &attend_new, "one new token per row: keys and values cached, attention over each row's positions 0 .. pos");
}
