// bfloat16 convolution with float32 results for XLA's CPU backend (an XLA FFI custom call; klein_jax/models/cpu_conv.py
// builds and registers it). XLA's CPU convolution of bfloat16 operands runs no faster than float32 (Eigen converts
// them); this one multiplies them on the CPU's AVX512-BF16 dot-product units (VDPBF16PS: two bfloat16 products
// summed into a float32 lane, each addition rounded to float32), the work torch's oneDNN convolution does.
//
// A stride-1 "valid" convolution of an input already padded by the caller:
//   x (B, Hp, Wp, Cin) bfloat16, w (KH, KW, Cin / 2, Cout, 2) bfloat16 (HWIO with input-channel pairs innermost),
//   y (B, Hp - KH + 1, Wp - KW + 1, Cout) float32,
//   y[b, i, j, o] = sum over dy, dx, c of x[b, i + dy, j + dx, c] w[dy, dx, c, o].
// Cin must be even and Cout a multiple of 16 (the Python side checks). Per item (image row, 32 output channels) a
// register block of 12 output pixels x 32 channels (24 vector accumulators) runs over every tap and channel pair.
// KleinCpuConvolutionBias also takes a float32 bias (Cout) and returns bfloat16: y + bias rounded once (to nearest
// even), torch's order for a biased bfloat16 convolution, writing half the bytes and no float32 intermediate.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

#ifndef __AVX512BF16__
#error "cpu_conv.cc needs AVX512-BF16 (-march=native on a CPU that has it)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;   // float32 outputs per vector
constexpr int kPixels = 12;  // output pixels per register block

using klein::parallel_for;

struct Shape {
  int64_t batch, in_h, in_w, in_c, kh, kw, out_c;
  int64_t out_h() const { return in_h - kh + 1; }
  int64_t out_w() const { return in_w - kw + 1; }
};

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Where a block's results go: float32 as they are, or plus the bias and rounded to bfloat16.
struct FloatOut {
  float* y;
  void store(int64_t at, int64_t, __m512 v) const { _mm512_storeu_ps(y + at, v); }
};
struct RoundedOut {
  uint16_t* y;
  const float* bias;
  void store(int64_t at, int64_t channel, __m512 v) const {
    __m256bh rounded = _mm512_cvtneps_pbh(_mm512_add_ps(v, _mm512_loadu_ps(bias + channel)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + at), reinterpret_cast<__m256i&>(rounded));
  }
};

// P output pixels (consecutive in a row) x V vectors of 16 output channels. x points at the block's first pixel
// in the input's row `i + 0` (tap dy = dx = 0); w at the weights of output channel `o0`, pair 0, tap 0; `at` is the
// block's first output's offset and o0 its first channel.
template <int P, int V, typename Out>
void block(const uint16_t* x, const uint16_t* w, const Out& out, int64_t at, int64_t o0, const Shape& s) {
  __m512 acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_ps();
  const int64_t pairs = s.in_c / 2, row = s.in_w * s.in_c;
  for (int64_t dy = 0; dy < s.kh; ++dy) {
    for (int64_t dx = 0; dx < s.kw; ++dx) {
      const uint16_t* xt = x + dy * row + dx * s.in_c;
      const uint16_t* wt = w + (dy * s.kw + dx) * pairs * s.out_c * 2;
      for (int64_t c = 0; c < pairs; ++c) {
        __m512bh wv[V];
        for (int v = 0; v < V; ++v)
          wv[v] = (__m512bh)_mm512_loadu_si512(wt + (c * s.out_c + v * kLanes) * 2);
        for (int p = 0; p < P; ++p) {
          __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair_at(xt + p * s.in_c + 2 * c)));
          for (int v = 0; v < V; ++v) acc[p][v] = _mm512_dpbf16_ps(acc[p][v], a, wv[v]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) out.store(at + p * s.out_c + v * kLanes, o0 + v * kLanes, acc[p][v]);
}

template <int V, typename Out, int P = kPixels>
void tail(int pixels, const uint16_t* x, const uint16_t* w, const Out& out, int64_t at, int64_t o0, const Shape& s) {
  if constexpr (P > 0) {
    if (pixels == P) return block<P, V>(x, w, out, at, o0, s);
    tail<V, Out, P - 1>(pixels, x, w, out, at, o0, s);
  }
}

// One output row of one image for output channels [o0, o0 + 16 V); `at` is the row's first output's offset.
template <int V, typename Out>
void row(const uint16_t* x, const uint16_t* w, const Out& out, int64_t at, int64_t o0, const Shape& s) {
  const int64_t width = s.out_w();
  int64_t j = 0;
  for (; j + kPixels <= width; j += kPixels) block<kPixels, V>(x + j * s.in_c, w, out, at + j * s.out_c, o0, s);
  if (j < width) tail<V>(static_cast<int>(width - j), x + j * s.in_c, w, out, at + j * s.out_c, o0, s);
}

ffi::Error check(ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::BF16>& w, Shape& s) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 5 || wd[4] != 2 || xd[3] != 2 * wd[2] || wd[3] % kLanes)
    return ffi::Error::InvalidArgument("cpu_conv: expected x (B, Hp, Wp, Cin), w (KH, KW, Cin/2, Cout, 2)");
  s = Shape{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3]};
  if (s.out_h() < 1 || s.out_w() < 1) return ffi::Error::InvalidArgument("cpu_conv: kernel larger than input");
  return ffi::Error::Success();
}

template <typename Out>
void convolve(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::BF16>& w, const Out& out,
              const Shape& s) {
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  const int64_t wide = s.out_c / (2 * kLanes), blocks = wide + (s.out_c % (2 * kLanes) ? 1 : 0);
  parallel_for(pool, s.batch * s.out_h() * blocks, [&](int64_t item) {
    int64_t b = item / (s.out_h() * blocks), i = item / blocks % s.out_h(), o0 = item % blocks * 2 * kLanes;
    const uint16_t* xr = xp + (b * s.in_h + i) * s.in_w * s.in_c;
    int64_t at = (b * s.out_h() + i) * s.out_w() * s.out_c + o0;
    if (item % blocks < wide) {
      row<2>(xr, wp + 2 * o0, out, at, o0, s);
    } else {
      row<1>(xr, wp + 2 * o0, out, at, o0, s);  // the last 16 channels of a Cout that is an odd multiple of 16
    }
  });
}

ffi::Error Convolution(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (auto error = check(x, w, s); error.failure()) return error;
  convolve(pool, x, w, FloatOut{y->typed_data()}, s);
  return ffi::Error::Success();
}

ffi::Error ConvolutionBias(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::BF16> y) {
  Shape s;
  if (auto error = check(x, w, s); error.failure()) return error;
  if (bias.element_count() != static_cast<size_t>(s.out_c))
    return ffi::Error::InvalidArgument("cpu_conv: the bias must have Cout values");
  convolve(pool, x, w, RoundedOut{reinterpret_cast<uint16_t*>(y->typed_data()), bias.typed_data()}, s);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KleinCpuConvolution, Convolution,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KleinCpuConvolutionBias, ConvolutionBias,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
