// nvila's CPU kernels for float32 activations (built at first use by nvila/quant/cpu_kernels.py): W4A16 GEMVs
// and GEMM, and W8A8 GEMVs. The file is compiled for AVX2 + FMA; the two functions marked AVX-512 are compiled
// for it alone (target attributes, GCC and clang), and Python calls their ops only where the CPU has it.
//
// The W4A16 ops read the checkpoint's own tensors, with no repacking:
//   x       float32 (M, K)         activations, contiguous
//   qweight uint8   (N, K/2)       two 4-bit codes per byte, even k in the low nibble
//   scales  float32 (N, K/gs)      W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k / gs
//   zeros   uint8   (N, K/gs)
//   bias    float32 (N,) or None
// and return y float32 (M, N) = x @ W^T + bias.
//
// nvila::w4a16_linear_f32: fp32 arithmetic throughout. A 32-byte load holds 64 codes; its 32-bit lane i,
//   nibble p is the code of k = 8i + p. Masking nibble p < 7 in place gives q * 16^p as an int32, which
//   converts to float exactly and meets x[k] * 16^-p (x pre-permuted and pre-scaled once per call, also
//   exact), so each product equals q * x[k]; nibble 7 is shifted down instead (its mask would set the
//   sign bit) and meets x[k] unscaled. Per group: y += s * (sum q x - z * sum x).
// nvila::w4a16_linear_f32_avx512: the same with 512-bit vectors (AVX-512 F/BW/DQ/VL; group size % 128 == 0):
//   the same exact products, summed in another order.
// nvila::w4a16_linear_dyn8: activations quantized to int8 per row and group (symmetric, amax / 127), then
//   u8 x s8 products with _mm256_maddubs_epi16 (codes <= 15, so no int16 saturation for gs <= 256).
// nvila::w4a16_linear_dyn16: the same with int16 activations (amax / 32767, relative rounding ~1e-5) and
//   16-bit lanes holding 4 codes each, multiplied with _mm256_madd_epi16 into int32 sums.
//
// nvila::w4a16_linear_dequant: for batches large enough that MKL's fp32 GEMM beats a GEMV per row, W is
//   dequantized one slab of rows at a time into a reused buffer and multiplied with at::mm.
// nvila::w4a16_dequantize(qweight, scales, zeros, gs) -> W float32 (N, K) (the reference, for tests).
//
// nvila::w8a8_linear_dyn8(x, qweight int8 (N, K) in [-127, 127], scales float32 (N,), bias) -> y (M, N):
//   the W8A8 checkpoint's own tensors, W[n, k] = q[n, k] * scales[n]. Each activation row is quantized
//   symmetrically, s = max(amax / 127, 1e-8), c = round(x / s) (ties to even, as torch.round), the same as
//   the CUDA path; y = float(sum c q) * s * scales[n] + bias[n]. Products go through _mm256_maddubs_epi16 as
//   |c| (u8) x sign(c) q (s8): pair sums stay within int16 (2 * 127 * 127), which a weight code of -128
//   would break, hence the contract on qweight.
// nvila::w8a8_linear_vnni(x, qweight int8 (N, K), scales, bias): the same result with AVX-512 VNNI (VPDPBUSD on
//   q + 128 as u8 against c as s8, less 128 * sum(c)), for any int8 code, -128 included.
//
// Rows of W are split over threads with at::parallel_for (torch's intra-op pool, torch.set_num_threads).
// For M > 1, each thread walks its rows in chunks that fit in L2 and applies every activation row to a
// chunk before moving on, so the weights stream from memory once; the fp32 W4 kernels also decode each
// weight vector once for 2 activation rows, with results equal bit for bit to those of the rows alone.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#define NVILA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define NVILA_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

constexpr int64_t kRows = 4;                // weight rows computed together (shares activation loads)
constexpr int64_t kChunkBytes = 192 * 1024; // weight bytes per chunk for M > 1 (fits in L2)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Prefetch the same cache line of the next block of R rows (contiguous with this one), once per 64 bytes.
// With weights streamed from DRAM this made the GEMVs 1.5-1.8x faster on one core (the hardware prefetchers
// alone leave the core waiting); 2 or 4 blocks ahead were no better. x86 prefetches never fault, so
// running past the last row is harmless.
template <int R>
inline void prefetch_next_block(const uint8_t* w, int64_t half, int64_t k) {
  for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * half + k / 2), _MM_HINT_T0);
}

void check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const at::Tensor& zeros, int64_t gs, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  const int64_t K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
              qweight.size(1) * 2 == K, "qweight must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(gs > 0 && gs % 64 == 0 && K % gs == 0, "group size must be a multiple of 64 dividing K");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.size(0) == N &&
              scales.size(1) == K / gs, "scales must be contiguous float32 (N, K/gs)");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.size(0) == N &&
              zeros.size(1) == K / gs, "zeros must be contiguous uint8 (N, K/gs)");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias must be contiguous float32 (N,)");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "CPU tensors only");
}

// Runs body(m, mc, n0, n1) over activation rows [m, m + mc) (mc <= mr; all of [0, M) in turn) and weight rows
// [n0, n1) (row_bytes each), split over threads.
template <typename Body>
void for_rows(int64_t M, int64_t N, int64_t row_bytes, int64_t mr, const Body& body) {
  const int64_t chunk = std::max<int64_t>(kRows, (kChunkBytes / row_bytes) / kRows * kRows);
  const int64_t grain = std::max<int64_t>(1, 65536 / (kRows * row_bytes));  // >= 64 KiB of weights per task
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n_end = std::min(N, b1 * kRows);
    for (int64_t c0 = b0 * kRows; c0 < n_end; c0 += chunk) {
      const int64_t c1 = std::min(n_end, c0 + chunk);
      for (int64_t m = 0; m < M; m += mr) body(m, std::min(mr, M - m), c0, c1);
    }
  });
}

// ------------------------------------------------------------------------------------------- fp32
// L = 8 (AVX2) or 16 (AVX-512) float lanes, blocks of B = 8L codes: xp[Bb + Lp + i] = x[Bb + 8i + p] * 16^-p
// (p < 7; p = 7 unscaled); xsum[g] = sum of x over group g. (xs: unused, the signature of the int preps.)
template <int L>
void prepare_f32(const float* x, int64_t K, int64_t gs, float* xp, float* /*xs*/, float* xsum) {
  constexpr int64_t B = 8 * L;
  for (int64_t b = 0; b < K / B; ++b)
    for (int p = 0; p < 8; ++p) {
      const float scale = p == 7 ? 1.0f : std::ldexp(1.0f, -4 * p);  // nibble 7 is shifted down, not masked
      for (int i = 0; i < L; ++i) xp[B * b + L * p + i] = x[B * b + 8 * i + p] * scale;
    }
  for (int64_t g = 0; g < K / gs; ++g) {
    float s = 0.0f;
    for (int64_t k = 0; k < gs; ++k) s += x[g * gs + k];
    xsum[g] = s;
  }
}

// The fp32 row kernel, written once for both vector widths: NAME<R, MR>(...) computes R consecutive weight rows
// against MR activation rows (x, xsum and out rows MR apart by K, G and N), decoding each weight vector once for
// the MR rows. Every (activation row, weight row) pair gets the same operations in the same order for any MR,
// so a row's outputs do not depend on the rows computed with it.
// ATTR: the target attribute (none for AVX2); PFX / SI: the intrinsics' prefix and integer suffix; VF / VI:
// the float and integer vector types; L: float lanes (a load of 4L bytes holds 8L codes: nibble p of 32-bit
// lane i is the code of k = 8i + p in its block, x prepared by prepare_f32<L>); HSUM: a horizontal sum.
// Blocks of 8L codes must tile a group, so gs % (8L) == 0. The next R rows are prefetched once per 64 bytes.
// Nibble P of the block in v: masking it in place (P < 7) keeps q * 16^P, which meets x pre-scaled by 16^-P;
// nibble 7 is shifted down (its mask would set the sign bit). Written out per P (constants, accumulators
// in registers): a loop over P with a pointer to the accumulator ran 13% slower.
#define NVILA_NIBBLE(PFX, SI, VF, VI, L, P, ACC)                                                           \
  {                                                                                                       \
    VF xv[MR];                                                                                            \
    _Pragma("GCC unroll 4") for (int m = 0; m < MR; ++m) xv[m] = PFX##_loadu_ps(xp + m * K + k + L * (P));                        \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {                                                 \
      const VI c = (P) == 7 ? PFX##_srli_epi32(v[r], 28) : PFX##_and_##SI(v[r], PFX##_set1_epi32(0xFu << (4 * (P)))); \
      const VF cf = PFX##_cvtepi32_ps(c);                                                                 \
      _Pragma("GCC unroll 4") for (int m = 0; m < MR; ++m) ACC[m][r] = PFX##_fmadd_ps(cf, xv[m], ACC[m][r]);                      \
    }                                                                                                     \
  }

#define NVILA_ROWS_F32(NAME, ATTR, PFX, SI, VF, VI, L, HSUM)                                              \
  template <int R, int MR>                                                                                \
  ATTR void NAME(const uint8_t* w, const float* sc, const uint8_t* zr, const float* xp, const float* /*xs*/, \
                 const float* xsum, int64_t K, int64_t gs, float* out, int64_t N) {                       \
    const int64_t G = K / gs, half = K / 2;                                                               \
    VF acc[MR][R], a0[MR][R], a1[MR][R];                                                                  \
    float zterm[MR][R];                                                                                   \
    for (int m = 0; m < MR; ++m)                                                                          \
      for (int r = 0; r < R; ++r) { acc[m][r] = PFX##_setzero_ps(); zterm[m][r] = 0.0f; }                 \
    for (int64_t g = 0; g < G; ++g) {                                                                     \
      for (int m = 0; m < MR; ++m)                                                                        \
        for (int r = 0; r < R; ++r) { a0[m][r] = PFX##_setzero_ps(); a1[m][r] = PFX##_setzero_ps(); }    \
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 8 * L) {                                            \
        VI v[R];                                                                                          \
        for (int r = 0; r < R; ++r) v[r] = PFX##_loadu_##SI(reinterpret_cast<const VI*>(w + r * half + k / 2)); \
        if ((k & 127) == 0) prefetch_next_block<R>(w, half, k);                                           \
        NVILA_NIBBLE(PFX, SI, VF, VI, L, 0, a0) NVILA_NIBBLE(PFX, SI, VF, VI, L, 1, a1)                  \
        NVILA_NIBBLE(PFX, SI, VF, VI, L, 2, a0) NVILA_NIBBLE(PFX, SI, VF, VI, L, 3, a1)                  \
        NVILA_NIBBLE(PFX, SI, VF, VI, L, 4, a0) NVILA_NIBBLE(PFX, SI, VF, VI, L, 5, a1)                  \
        NVILA_NIBBLE(PFX, SI, VF, VI, L, 6, a0) NVILA_NIBBLE(PFX, SI, VF, VI, L, 7, a1)                  \
      }                                                                                                   \
      for (int r = 0; r < R; ++r) {                                                                       \
        const float s = sc[r * G + g], z = static_cast<float>(zr[r * G + g]);                             \
        for (int m = 0; m < MR; ++m) {                                                                    \
          acc[m][r] = PFX##_fmadd_ps(PFX##_add_ps(a0[m][r], a1[m][r]), PFX##_set1_ps(s), acc[m][r]);      \
          zterm[m][r] += s * z * xsum[m * G + g];                                                         \
        }                                                                                                 \
      }                                                                                                   \
    }                                                                                                     \
    for (int m = 0; m < MR; ++m)                                                                          \
      for (int r = 0; r < R; ++r) out[m * N + r] = HSUM(acc[m][r]) - zterm[m][r];                         \
  }

NVILA_ROWS_F32(rows_f32, , _mm256, si256, __m256, __m256i, 8, hsum)
// AVX-512 F/BW/DQ/VL for this one function alone (Python calls it only where torch's CPU capability is AVX512).
NVILA_ROWS_F32(rows_f32_avx512, NVILA_AVX512, _mm512, si512, __m512, __m512i, 16, _mm512_reduce_add_ps)
#undef NVILA_ROWS_F32
#undef NVILA_NIBBLE

// ------------------------------------------------------------------------------------------- int8
// Per group g: xs[g] = amax / 127, codes c = round(x / xs[g]) in [-127, 127], stored permuted so that a
// 32-byte weight load pairs with them: xq[64b + j] = c[64b + 2j], xq[64b + 32 + j] = c[64b + 2j + 1];
// xsum[g] = xs[g] * sum(c) (the zero-point term uses the quantized activations too).
void prepare_dyn8(const float* x, int64_t K, int64_t gs, int8_t* xq, float* xs, float* xsum) {
  for (int64_t g = 0; g < K / gs; ++g) {
    float amax = 0.0f;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
    int32_t total = 0;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const int32_t c = static_cast<int32_t>(std::nearbyint(x[k] * inv));
      const int64_t b = k / 64, j = k % 64;
      xq[64 * b + (j % 2) * 32 + j / 2] = static_cast<int8_t>(c);
      total += c;
    }
    xs[g] = s;
    xsum[g] = s * static_cast<float>(total);
  }
}

template <int R>
void rows_dyn8(const uint8_t* w, const float* sc, const uint8_t* zr, const int8_t* xq, const float* xs,
               const float* xsum, int64_t K, int64_t gs, float* out) {
  const int64_t G = K / gs, half = K / 2;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  float zterm[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); zterm[r] = 0.0f; }
  for (int64_t g = 0; g < G; ++g) {
    __m256i a16[R];
    for (int r = 0; r < R; ++r) a16[r] = _mm256_setzero_si256();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) {
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k + 32));
      if ((k & 127) == 0) prefetch_next_block<R>(w, half, k);
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * half + k / 2));
        const __m256i lo = _mm256_and_si256(v, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo)));
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = sc[r * G + g];
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(a16[r], ones));
      acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(s * xs[g]), acc[r]);
      zterm[r] += s * static_cast<float>(zr[r * G + g]) * xsum[g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) - zterm[r];
}

// ------------------------------------------------------------------------------------------ int16
// Per group g: xs[g] = amax / 32767, codes c = round(x / xs[g]), stored so that nibble t of int16 lane l
// (k = 4l + t within a 64-block) pairs with them: xq[64b + 16t + l] = c[64b + 4l + t]; xsum as for int8.
void prepare_dyn16(const float* x, int64_t K, int64_t gs, int16_t* xq, float* xs, float* xsum) {
  for (int64_t g = 0; g < K / gs; ++g) {
    float amax = 0.0f;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float s = amax > 0.0f ? amax / 32767.0f : 1.0f, inv = 1.0f / s;
    int64_t total = 0;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const int32_t c = static_cast<int32_t>(std::nearbyint(x[k] * inv));
      const int64_t b = k / 64, j = k % 64;
      xq[64 * b + 16 * (j % 4) + j / 4] = static_cast<int16_t>(c);
      total += c;
    }
    xs[g] = s;
    xsum[g] = s * static_cast<float>(total);
  }
}

template <int R>
void rows_dyn16(const uint8_t* w, const float* sc, const uint8_t* zr, const int16_t* xq, const float* xs,
                const float* xsum, int64_t K, int64_t gs, float* out) {
  const int64_t G = K / gs, half = K / 2;
  const __m256i low = _mm256_set1_epi16(0x000F);
  __m256 acc[R];
  float zterm[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); zterm[r] = 0.0f; }
  for (int64_t g = 0; g < G; ++g) {
    __m256i a32[R];  // |sum| <= gs * 15 * 32767: no overflow below gs = 4096
    for (int r = 0; r < R; ++r) a32[r] = _mm256_setzero_si256();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) {
      const __m256i* xv = reinterpret_cast<const __m256i*>(xq + k);
      const __m256i x0 = _mm256_loadu_si256(xv), x1 = _mm256_loadu_si256(xv + 1);
      const __m256i x2 = _mm256_loadu_si256(xv + 2), x3 = _mm256_loadu_si256(xv + 3);
      if ((k & 127) == 0) prefetch_next_block<R>(w, half, k);
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * half + k / 2));
        const __m256i p0 = _mm256_madd_epi16(_mm256_and_si256(v, low), x0);
        const __m256i p1 = _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), x1);
        const __m256i p2 = _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), low), x2);
        const __m256i p3 = _mm256_madd_epi16(_mm256_srli_epi16(v, 12), x3);
        a32[r] = _mm256_add_epi32(a32[r], _mm256_add_epi32(_mm256_add_epi32(p0, p1), _mm256_add_epi32(p2, p3)));
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = sc[r * G + g];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32[r]), _mm256_set1_ps(s * xs[g]), acc[r]);
      zterm[r] += s * static_cast<float>(zr[r * G + g]) * xsum[g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) - zterm[r];
}

// ----------------------------------------------------------------------------------- W4 GEMV
// A W4 GEMV kernel is a policy P: P::A, the prepared activation element; P::prep(x_row, K, gs, act_row (K),
// xs_row (G), xsum_row (G)); P::rows<R, MR>(w, scales, zeros, act, xs, xsum, K, gs, out, N), R consecutive
// outputs of MR activation rows (rows K, G and N apart); P::kMR, the most activation rows one call takes.
template <int L, bool Avx512>
struct F32Kernel {
  using A = float;
  // 2 activation rows share each weight decode: 2 x 4 x 3 accumulators fit AVX-512's 32 registers. 4 rows
  // (with 2 weight rows, to fit) ran 1.1-1.2x slower at 4 rows (a Qwen2-1.5B layer: 5.61 against 5.10 ms
  // at 1 thread, 2.91 against 2.49 at 2).
  static constexpr int kMR = 2;
  static void prep(const float* x, int64_t K, int64_t gs, float* a, float* xs, float* xsum) {
    prepare_f32<L>(x, K, gs, a, xs, xsum);
  }
  template <int R, int MR>
  static void rows(const uint8_t* w, const float* sc, const uint8_t* zr, const float* a, const float* xs,
                   const float* xsum, int64_t K, int64_t gs, float* out, int64_t N) {
    if constexpr (Avx512)
      rows_f32_avx512<R, MR>(w, sc, zr, a, xs, xsum, K, gs, out, N);
    else
      rows_f32<R, MR>(w, sc, zr, a, xs, xsum, K, gs, out, N);
  }
};

template <typename T, void (*Prep)(const float*, int64_t, int64_t, T*, float*, float*), template <int> class Rows>
struct IntKernel {  // the int8 / int16 activation kernels: one activation row per call
  using A = T;
  static constexpr int kMR = 1;
  static void prep(const float* x, int64_t K, int64_t gs, T* a, float* xs, float* xsum) { Prep(x, K, gs, a, xs, xsum); }
  template <int R, int MR>
  static void rows(const uint8_t* w, const float* sc, const uint8_t* zr, const T* a, const float* xs,
                   const float* xsum, int64_t K, int64_t gs, float* out, int64_t /*N*/) {
    static_assert(MR == 1);
    Rows<R>::run(w, sc, zr, a, xs, xsum, K, gs, out);
  }
};
template <int R> struct Dyn8Rows { static constexpr auto run = rows_dyn8<R>; };
template <int R> struct Dyn16Rows { static constexpr auto run = rows_dyn16<R>; };

// Weight rows [n0, n1) of activation rows [m, m + MR), bias included.
template <typename P, int MR>
void w4_block(const uint8_t* w, const float* sc, const uint8_t* zr, const typename P::A* act, const float* xs,
              const float* xsum, const float* b, int64_t K, int64_t N, int64_t gs, int64_t m, int64_t n0, int64_t n1,
              float* out) {
  const int64_t G = K / gs;
  const typename P::A* a = act + m * K;
  float* o = out + m * N;
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows)
    P::template rows<kRows, MR>(w + n * (K / 2), sc + n * G, zr + n * G, a, xs + m * G, xsum + m * G, K, gs, o + n, N);
  for (; n < n1; ++n)
    P::template rows<1, MR>(w + n * (K / 2), sc + n * G, zr + n * G, a, xs + m * G, xsum + m * G, K, gs, o + n, N);
  if (b)
    for (int mm = 0; mm < MR; ++mm)
      for (n = n0; n < n1; ++n) o[mm * N + n] += b[n];
}

template <typename P>
at::Tensor w4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t gs, const std::optional<at::Tensor>& bias) {
  check_inputs(x, qweight, scales, zeros, gs, bias);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = K / gs;
  auto y = at::empty({M, N}, x.options());
  std::vector<typename P::A> act(M * K);
  std::vector<float> xs(M * G), xsum(M * G);
  const float* xd = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) P::prep(xd + m * K, K, gs, &act[m * K], &xs[m * G], &xsum[m * G]);
  });
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const uint8_t* zr = zeros.data_ptr<uint8_t>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  static_assert(P::kMR == 1 || P::kMR == 2);
  for_rows(M, N, K / 2, P::kMR, [&](int64_t m, int64_t mc, int64_t n0, int64_t n1) {  // mc <= P::kMR
    if constexpr (P::kMR == 2)
      if (mc == 2)
        return w4_block<P, 2>(w, sc, zr, act.data(), xs.data(), xsum.data(), b, K, N, gs, m, n0, n1, out);
    w4_block<P, 1>(w, sc, zr, act.data(), xs.data(), xsum.data(), b, K, N, gs, m, n0, n1, out);
  });
  return y;
}

at::Tensor w4a16_linear_f32(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t gs, const std::optional<at::Tensor>& bias) {
  return w4_gemv<F32Kernel<8, false>>(x, qweight, scales, zeros, gs, bias);
}

at::Tensor w4a16_linear_f32_avx512(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, int64_t gs, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(gs % 128 == 0, "the AVX-512 kernel needs a group size that is a multiple of 128");
  return w4_gemv<F32Kernel<16, true>>(x, qweight, scales, zeros, gs, bias);
}

at::Tensor w4a16_linear_dyn8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t gs, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(gs <= 256, "the int8-activation kernel needs a group size <= 256 (int16 partial sums)");
  return w4_gemv<IntKernel<int8_t, prepare_dyn8, Dyn8Rows>>(x, qweight, scales, zeros, gs, bias);
}

at::Tensor w4a16_linear_dyn16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, int64_t gs, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(gs <= 4096, "the int16-activation kernel needs a group size <= 4096 (int32 partial sums)");
  return w4_gemv<IntKernel<int16_t, prepare_dyn16, Dyn16Rows>>(x, qweight, scales, zeros, gs, bias);
}

// ------------------------------------------------------------------------------------ dequantize
// Rows [n0, n1) of W = (q - z) * s into out (row n at out + (n - n0) * K), k in order.
void dequantize_rows(const uint8_t* q, const float* sc, const uint8_t* zr, int64_t K, int64_t gs, int64_t n0,
                     int64_t n1, float* out) {
  const int64_t G = K / gs;
  const __m128i low = _mm_set1_epi8(0x0F);
  at::parallel_for(n0, n1, std::max<int64_t>(1, 65536 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const __m256 s = _mm256_set1_ps(sc[n * G + g]);
        const __m256 zs = _mm256_set1_ps(static_cast<float>(zr[n * G + g]) * sc[n * G + g]);
        const uint8_t* qb = q + n * (K / 2) + g * (gs / 2);
        float* o = out + (n - n0) * K + g * gs;
        for (int64_t j = 0; j < gs / 2; j += 16) {  // 16 bytes -> 32 weights in k order
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + j));
          const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
          const __m128i c[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // codes of k, k+16
          for (int h = 0; h < 2; ++h)
            for (int e = 0; e < 2; ++e) {
              const __m128i part = e ? _mm_unpackhi_epi64(c[h], c[h]) : c[h];
              const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
              _mm256_storeu_ps(o + 2 * j + 16 * h + 8 * e, _mm256_fmsub_ps(f, s, zs));
            }
        }
      }
  });
}

at::Tensor w4a16_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                            int64_t gs) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  check_inputs(at::empty({0, K}, scales.options()), qweight, scales, zeros, gs, std::nullopt);
  auto w = at::empty({N, K}, scales.options());
  dequantize_rows(qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(), K, gs, 0, N,
                  w.data_ptr<float>());
  return w;
}

// y = x @ W^T + bias for large M: W is dequantized a slab of rows at a time into one reused buffer of about
// 4 MiB (no (N, K) fp32 copy, whose first-touch page faults alone cost more than the GEMM at M <= 64),
// and each slab goes through at::mm (MKL's fp32 GEMM) into its columns of y.
at::Tensor w4a16_linear_dequant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& zeros, int64_t gs, const std::optional<at::Tensor>& bias) {
  check_inputs(x, qweight, scales, zeros, gs, bias);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  // 4 MiB slabs; at least 512 rows for large M, where MKL re-reads all of x once per slab
  const int64_t slab = std::min<int64_t>(N, std::max<int64_t>(M >= 256 ? 512 : 16, (1 << 20) / K / 16 * 16));
  auto y = at::empty({M, N}, x.options());
  auto buf = at::empty({slab, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += slab) {
    const int64_t rows = std::min(slab, N - n0);
    dequantize_rows(qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(), K, gs, n0,
                    n0 + rows, buf.data_ptr<float>());
    auto ys = y.narrow(1, n0, rows);
    at::mm_out(ys, x, buf.narrow(0, 0, rows).t());
  }
  if (bias) y.add_(*bias);
  return y;
}

// ------------------------------------------------------------------------------------------- W8A8
// One activation row: xs = max(amax / 127, 1e-8), c = round(x / xs) clamped to [-127, 127]; xa = |c|;
// *csum = sum of c over the first K - K % 64 entries (the part the vector loops cover).
void prepare_w8a8(const float* x, int64_t K, int8_t* xq, uint8_t* xa, float* xs, int32_t* csum) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = std::max(amax / 127.0f, 1e-8f);
  int32_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float c = std::min(127.0f, std::max(-127.0f, std::nearbyint(x[k] / s)));
    xq[k] = static_cast<int8_t>(c);
    xa[k] = static_cast<uint8_t>(std::fabs(c));
    if (k < K - K % 64) total += static_cast<int32_t>(c);
  }
  *xs = s;
  *csum = total;
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline int32_t w8a8_tail(const int8_t* w, const int8_t* xq, int64_t k, int64_t K) {
  int32_t total = 0;
  for (; k < K; ++k) total += static_cast<int32_t>(xq[k]) * w[k];
  return total;
}

// sum_k c[k] q[r, k] for R consecutive rows of q (K bytes each). Prefetches the rows two blocks ahead
// (measured a little faster than one on one core; both 1.3-1.6x faster than none).
template <int R>
void rows_w8a8(const int8_t* w, const int8_t* xq, const uint8_t* xa, int32_t /*csum*/, int64_t K, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (2 * R + r) * K + k), _MM_HINT_T0);
    const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
    const __m256i s1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k + 32));
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + k));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + k + 32));
    for (int r = 0; r < R; ++r) {
      const __m256i w0 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)), s0);
      const __m256i w1 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k + 32)), s1);
      acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, w0), ones),
                                                         _mm256_madd_epi16(_mm256_maddubs_epi16(a1, w1), ones)));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum_epi32(acc[r]) + w8a8_tail(w + r * K, xq, k, K);
}

// The same sum with AVX-512 VNNI (compiled for it here only; called where the CPU has it): VPDPBUSD takes
// u8 x s8, so each weight byte is offset to q + 128 (q ^ 0x80, in [0, 255] for any int8 q, -128 included)
// against the s8 codes c, and 128 * sum(c) comes off at the end.
template <int R>
NVILA_AVX512_VNNI void rows_w8a8_vnni(const int8_t* w, const int8_t* xq, const uint8_t* /*xa*/, int32_t csum, int64_t K, int32_t* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (2 * R + r) * K + k), _MM_HINT_T0);
    const __m512i c = _mm512_loadu_si512(xq + k);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_xor_si512(_mm512_loadu_si512(w + r * K + k), flip), c);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_epi32(acc[r]) - 128 * csum + w8a8_tail(w + r * K, xq, k, K);
}

using W8Rows = void (*)(const int8_t*, const int8_t*, const uint8_t*, int32_t, int64_t, int32_t*);

template <W8Rows RowsN, W8Rows Rows1>
at::Tensor w8a8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
              qweight.size(1) == K, "qweight must be contiguous int8 (N, K)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "scales must be contiguous float32 (N,)");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias must be contiguous float32 (N,)");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "CPU tensors only");
  auto y = at::empty({M, N}, x.options());
  std::vector<int8_t> xq(M * K);
  std::vector<uint8_t> xa(M * K);
  std::vector<float> xs(M);
  std::vector<int32_t> csum(M);
  const float* xd = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) prepare_w8a8(xd + m * K, K, &xq[m * K], &xa[m * K], &xs[m], &csum[m]);
  });
  const int8_t* w = qweight.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  for_rows(M, N, K, 1, [&](int64_t m, int64_t /*mc = 1*/, int64_t n0, int64_t n1) {
    float* o = out + m * N;
    const int8_t* q = &xq[m * K];
    const uint8_t* a = &xa[m * K];
    int32_t dot[kRows];
    int64_t n = n0;
    for (; n + kRows <= n1; n += kRows) {
      RowsN(w + n * K, q, a, csum[m], K, dot);
      for (int r = 0; r < kRows; ++r) o[n + r] = static_cast<float>(dot[r]) * xs[m] * sc[n + r];
    }
    for (; n < n1; ++n) {
      Rows1(w + n * K, q, a, csum[m], K, dot);
      o[n] = static_cast<float>(dot[0]) * xs[m] * sc[n];
    }
    if (b)
      for (n = n0; n < n1; ++n) o[n] += b[n];
  });
  return y;
}

at::Tensor w8a8_linear_dyn8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias) {
  return w8a8_gemv<rows_w8a8<kRows>, rows_w8a8<1>>(x, qweight, scales, bias);
}

at::Tensor w8a8_linear_vnni(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias) {
  return w8a8_gemv<rows_w8a8_vnni<kRows>, rows_w8a8_vnni<1>>(x, qweight, scales, bias);
}

}  // namespace

TORCH_LIBRARY(nvila, m) {
  m.def("w4a16_linear_f32(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("w4a16_linear_f32_avx512(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("w4a16_linear_dyn8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("w4a16_linear_dyn16(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("w4a16_linear_dequant(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  m.def("w4a16_dequantize(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("w8a8_linear_dyn8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("w8a8_linear_vnni(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(nvila, CPU, m) {
  m.impl("w4a16_linear_f32", &w4a16_linear_f32);
  m.impl("w4a16_linear_f32_avx512", &w4a16_linear_f32_avx512);
  m.impl("w4a16_linear_dyn8", &w4a16_linear_dyn8);
  m.impl("w4a16_linear_dyn16", &w4a16_linear_dyn16);
  m.impl("w4a16_linear_dequant", &w4a16_linear_dequant);
  m.impl("w4a16_dequantize", &w4a16_dequantize);
  m.impl("w8a8_linear_dyn8", &w8a8_linear_dyn8);
  m.impl("w8a8_linear_vnni", &w8a8_linear_vnni);
}
