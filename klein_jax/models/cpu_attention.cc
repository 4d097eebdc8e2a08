// Fused float32 softmax attention for XLA's CPU backend (an XLA FFI custom call; klein_jax/models/cpu_attention.py
// builds and registers it). The same function as klein_jax.models.attention.chunked_attention: logits in float32,
// keys past n[b] masked (with the `causal` attribute also the keys after the query's position), the scale applied
// inside the exponential after the row's maximum, the unnormalised weights times the values, divided by the
// weights' sum. What XLA cannot do is keep a block of queries' logits in the core's cache from the product through
// the softmax to the values' product: here each block of queries runs all three while its logits stay in L2, and K
// arrives packed once per head in the layout the product's inner loop reads.
//
// Layouts are jax's (B, S, heads, Dh), row-major, so no transposes run around the call. Query head h reads key/value
// head h / (H / K). Dh must be a multiple of 16 (every klein attention: 64, 128; the Python side checks).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // 16 floats; aligned(4): unaligned loads/stores
typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));

constexpr int kLanes = 16;
constexpr int kKeyTile = 32;  // keys per packed tile of K^T: two vectors per query row in the logits' kernel
constexpr int kRows = 8;      // query rows per register block of the logits (8 x 2 vector accumulators)
constexpr int kValueRows = 6;  // query rows per register block of the values' product (6 x 4 accumulators)
constexpr int kNarrowValueRows = 12;  // the same for head_dim 32 (12 x 2 accumulators): V streamed half as often
constexpr int kSumRun = 128;  // keys summed in registers before a partial sum joins the total (accuracy)
constexpr float kFill = -0.7f * 3.40282347e38f;  // a masked key's logit: jax's XLA attention's

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
inline v16 splat(float x) { return v16{} + x; }

// exp(x) for x <= 0 to about 1 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial of r, times 2^n.
// Below -87.3 (2^-126) the result is 0 (jax's would be a denormal of at most 1e-38 of the row's largest weight).
inline v16 exp_nonpositive(v16 x) {
  const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v16 shifted = x * 1.44269504088896341f + magic;
  v16 n = shifted - magic;
  v16 r = x - n * 0.693359375f;  // ln2 in two parts (Cody-Waite)
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i16 exponent = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 result = p * reinterpret_cast<v16>(exponent);
  return x < splat(-87.3f) ? splat(0.0f) : result;
}

using klein::parallel_for;

struct Shape {
  int64_t batch, queries, heads, keys, kv_heads, head_dim;
  int64_t key_tiles() const { return (keys + kKeyTile - 1) / kKeyTile; }
};

// rows[0..15] transposed in registers: four rounds of swapping the off-diagonal b x b blocks (b = 8, 4, 2, 1).
inline void transpose16(v16 rows[kLanes]) {
  for (int b = 8; b >= 1; b /= 2) {
    i16 low, high;  // __builtin_shuffle of two vectors: indices 0-15 the first, 16-31 the second
    for (int p = 0; p < kLanes; ++p) {
      low[p] = (p & b) ? kLanes + p - b : p;
      high[p] = (p & b) ? kLanes + p : p + b;
    }
    for (int i = 0; i < kLanes; ++i) {
      if (i & b) continue;
      v16 a = rows[i], c = rows[i + b];
      rows[i] = __builtin_shuffle(a, c, low);
      rows[i + b] = __builtin_shuffle(a, c, high);
    }
  }
}

// K (B, Skv, K, Dh) -> per (b, kv head): tiles of 32 keys, each Dh rows of 32 floats (K^T, zero past Skv), written
// as 16 x 16 blocks transposed in registers.
void pack_keys(const float* k, float* packed, const Shape& s, int64_t bk) {
  int64_t b = bk / s.kv_heads, kh = bk % s.kv_heads;
  float* out = packed + bk * s.key_tiles() * s.head_dim * kKeyTile;
  for (int64_t first = 0; first < s.key_tiles() * kKeyTile; first += kLanes) {  // 16 keys: half a tile
    float* half = out + first / kKeyTile * s.head_dim * kKeyTile + first % kKeyTile;
    for (int64_t d = 0; d < s.head_dim; d += kLanes) {
      v16 rows[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        int64_t j = first + i;
        rows[i] = j < s.keys ? load(k + ((b * s.keys + j) * s.kv_heads + kh) * s.head_dim + d) : v16{};
      }
      transpose16(rows);
      for (int i = 0; i < kLanes; ++i) store(half + (d + i) * kKeyTile, rows[i]);
    }
  }
}

// V (B, Skv, K, Dh) -> per (b, kv head): column blocks of 32 (the last zero-padded), each Skv rows of 32 floats,
// so that the values' product streams through memory in order.
void pack_values(const float* v, float* packed, const Shape& s, int64_t bk) {
  int64_t b = bk / s.kv_heads, kh = bk % s.kv_heads, blocks = (s.head_dim + kKeyTile - 1) / kKeyTile;
  float* out = packed + bk * blocks * s.keys * kKeyTile;
  for (int64_t j = 0; j < s.keys; ++j) {
    const float* row = v + ((b * s.keys + j) * s.kv_heads + kh) * s.head_dim;
    for (int64_t c = 0; c < s.head_dim; c += kLanes)  // head_dim is a multiple of 16: whole vectors
      store(out + (c / kKeyTile * s.keys + j) * kKeyTile + c % kKeyTile, load(row + c));
    if (s.head_dim % kKeyTile) store(out + ((blocks - 1) * s.keys + j) * kKeyTile + kLanes, v16{});
  }
}

// logits[r][t*32 .. t*32+31] = q_r . k_j for R rows of queries (row stride q_stride) and key tiles [0, tiles);
// row_max[r]: the largest logit of the first `full_tiles` tiles (the rest may hold padding keys), saving the
// softmax a pass over the row.
template <int R>
void logits_block(const float* q, int64_t q_stride, const float* packed, int64_t tiles, int64_t full_tiles,
                  int64_t head_dim, float* logits, int64_t logits_stride, float* row_max) {
  v16 best[R];
  for (int r = 0; r < R; ++r) best[r] = splat(-INFINITY);
  for (int64_t t = 0; t < tiles; ++t) {
    const float* tile = packed + t * head_dim * kKeyTile;
    v16 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v16{};
    for (int64_t d = 0; d < head_dim; ++d) {
      v16 k0 = load(tile + d * kKeyTile), k1 = load(tile + d * kKeyTile + kLanes);
      for (int r = 0; r < R; ++r) {
        float qv = q[r * q_stride + d];
        acc[r][0] += qv * k0;
        acc[r][1] += qv * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(logits + r * logits_stride + t * kKeyTile, acc[r][0]);
      store(logits + r * logits_stride + t * kKeyTile + kLanes, acc[r][1]);
      if (t < full_tiles) {
        v16 larger = acc[r][0] > acc[r][1] ? acc[r][0] : acc[r][1];
        best[r] = best[r] > larger ? best[r] : larger;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float m = -INFINITY;
    for (int l = 0; l < kLanes; ++l) m = std::max(m, best[r][l]);
    row_max[r] = m;
  }
}

// out[r][column .. column + 16 C) = sum_j weights[r][j] v_j[column ..] / sums[r] for R rows over keys [0, active);
// v: the packed values from `column` on (blocks of 32 columns, `keys` rows of 32 floats each).
template <int R, int C>
void values_block(const float* weights, int64_t weights_stride, const float* v, int64_t keys, int64_t active,
                  int64_t column, const float* sums, float* out, int64_t out_stride) {
  const float* lanes[C];  // where vector c of key 0 lies
  for (int c = 0; c < C; ++c) lanes[c] = v + (c / 2) * keys * kKeyTile + (c % 2) * kLanes;
  v16 total[R][C];  // the sums of each run of kSumRun keys' products: a float32 error like XLA's blocked dots'
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) total[r][c] = v16{};
  for (int64_t start = 0; start < active; start += kSumRun) {
    v16 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = v16{};
    for (int64_t j = start, end = std::min(active, start + kSumRun); j < end; ++j) {
      v16 vj[C];
      for (int c = 0; c < C; ++c) vj[c] = load(lanes[c] + j * kKeyTile);
      for (int r = 0; r < R; ++r) {
        float w = weights[r * weights_stride + j];
        for (int c = 0; c < C; ++c) acc[r][c] += w * vj[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) total[r][c] += acc[r][c];
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store(out + r * out_stride + column + c * kLanes, total[r][c] / sums[r]);
}

// All head_dim columns for R rows: 64 at a time (6 x 4 accumulators), then 32, then 16.
template <int R>
void values_rows(const float* weights, int64_t weights_stride, const float* v, int64_t keys, int64_t active,
                 int64_t head_dim, const float* sums, float* out, int64_t out_stride) {
  int64_t column = 0;
  for (; column + 4 * kLanes <= head_dim; column += 4 * kLanes)
    values_block<R, 4>(weights, weights_stride, v + column * keys, keys, active, column, sums, out, out_stride);
  if (column + 2 * kLanes <= head_dim) {
    values_block<R, 2>(weights, weights_stride, v + column * keys, keys, active, column, sums, out, out_stride);
    column += 2 * kLanes;
  }
  if (column < head_dim)
    values_block<R, 1>(weights, weights_stride, v + column * keys, keys, active, column, sums, out, out_stride);
}

// A partial block (rows < R) goes to the matching instantiation.
template <int R>
void logits_rows(const float* q, int64_t q_stride, const float* packed, int64_t tiles, int64_t full_tiles,
                 int64_t head_dim, float* logits, int64_t logits_stride, int rows, float* row_max) {
  if constexpr (R > 1) {
    if (rows < R)
      return logits_rows<R - 1>(q, q_stride, packed, tiles, full_tiles, head_dim, logits, logits_stride, rows,
                                row_max);
  }
  logits_block<R>(q, q_stride, packed, tiles, full_tiles, head_dim, logits, logits_stride, row_max);
}

template <int R>
void values_dispatch(const float* weights, int64_t weights_stride, const float* v, int64_t keys, int64_t active,
                     int64_t head_dim, const float* sums, float* out, int64_t out_stride, int rows) {
  if constexpr (R > 1) {
    if (rows < R)
      return values_dispatch<R - 1>(weights, weights_stride, v, keys, active, head_dim, sums, out, out_stride, rows);
  }
  values_rows<R>(weights, weights_stride, v, keys, active, head_dim, sums, out, out_stride);
}

// Softmax of one row of logits over [0, active) in place (unnormalised weights); returns the weights' sum.
// known_max: the largest logit before `from` (the logits' kernel found it).
float softmax_row(float* row, int64_t active, float scale, float known_max, int64_t from) {
  v16 vmax = splat(known_max);
  int64_t j = from;
  for (; j + kLanes <= active; j += kLanes) vmax = vmax > load(row + j) ? vmax : load(row + j);
  float m = known_max;
  for (int l = 0; l < kLanes; ++l) m = std::max(m, vmax[l]);
  for (; j < active; ++j) m = std::max(m, row[j]);
  v16 vsum{}, run{};  // per lane, runs of kSumRun / 16 weights summed before joining the total (accuracy)
  j = 0;
  for (; j + kLanes <= active; j += kLanes) {
    v16 w = exp_nonpositive((load(row + j) - m) * scale);
    store(row + j, w);
    run += w;
    if ((j / kLanes + 1) % (kSumRun / kLanes) == 0) {
      vsum += run;
      run = v16{};
    }
  }
  vsum += run;
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += vsum[l];
  if (j < active) {  // the tail through one padded vector
    alignas(64) float tail[kLanes];
    for (int l = 0; l < kLanes; ++l) tail[l] = j + l < active ? row[j + l] : m;
    v16 w = exp_nonpositive((load(tail) - m) * scale);
    for (int l = 0; j + l < active; ++l) {
      row[j + l] = w[l];
      sum += w[l];
    }
  }
  return sum;
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out,
                     int32_t causal) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("q, k, v must be (B, S, heads, Dh)");
  Shape s{qd[0], qd[1], qd[2], kd[1], kd[2], qd[3]};
  if (s.head_dim % kLanes || kd[3] != s.head_dim || s.heads % s.kv_heads || kd[0] != s.batch)
    return ffi::Error::InvalidArgument("attention shapes do not match (Dh a multiple of 16, K dividing H)");
  const int64_t tiles = s.key_tiles(), padded = tiles * kKeyTile;
  const int64_t block = std::clamp<int64_t>((1 << 17) / padded / kRows * kRows, kRows, 64);  // logits ~512 KiB
  const int64_t blocks = (s.queries + block - 1) / block, group = s.heads / s.kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* n = lengths.typed_data();
  float* op = out->typed_data();

  const int64_t column_blocks = (s.head_dim + kKeyTile - 1) / kKeyTile;
  // Reused across calls (grown, never zero-filled again): a fresh allocation per call cost page faults.
  // (Workers see the caller's buffers through these pointers: a thread_local named in a lambda is the worker's own.)
  thread_local std::vector<float> keys_buffer, values_buffer;
  keys_buffer.resize(std::max(keys_buffer.size(), size_t(s.batch * s.kv_heads * tiles * s.head_dim * kKeyTile)));
  values_buffer.resize(
      std::max(values_buffer.size(), size_t(s.batch * s.kv_heads * column_blocks * s.keys * kKeyTile)));
  float *packed = keys_buffer.data(), *packed_values = values_buffer.data();
  parallel_for(pool, 2 * s.batch * s.kv_heads, [&](int64_t item) {
    int64_t bk = item / 2;
    if (item % 2) {
      pack_values(vp, packed_values, s, bk);
    } else {
      pack_keys(kp, packed, s, bk);
    }
  });

  const int64_t q_stride = s.heads * s.head_dim;
  parallel_for(pool, s.batch * s.heads * blocks, [&](int64_t item) {
    thread_local std::vector<float> logits;
    logits.resize(block * padded);
    int64_t b = item / (s.heads * blocks), h = item / blocks % s.heads, first = item % blocks * block;
    int64_t rows = std::min(block, s.queries - first), kh = h / group;
    int64_t length = std::clamp<int64_t>(n[b], 0, s.keys);
    // A row with no key weighs every key alike (all logits kFill), as jax's XLA attention does.
    int64_t active = length > 0 ? length : s.keys;
    // causal: query `row` also sees only keys [0, row] (top-left aligned, as jax's is_causal), so its keys are
    // [0, min(active, row + 1)); a row's weights past that are zeros up to the block's last row's count.
    auto row_active = [&](int64_t row) { return causal && length > 0 ? std::min(active, row + 1) : active; };
    const int64_t block_active = row_active(first + rows - 1);
    const float* q0 = qp + (b * s.queries + first) * q_stride + h * s.head_dim;
    const float* pk = packed + (b * s.kv_heads + kh) * tiles * s.head_dim * kKeyTile;
    const float* v0 = packed_values + (b * s.kv_heads + kh) * column_blocks * s.keys * kKeyTile;
    float* o0 = op + (b * s.queries + first) * q_stride + h * s.head_dim;
    thread_local std::vector<float> sums;
    sums.resize(block);
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {  // the block's logits and softmax weights
      int r = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
      float* lg = logits.data() + r0 * padded;
      float row_max[kRows];
      // tiles any row of these r needs; tiles whole and attended by all of them (the row maximum's)
      int64_t active_tiles = (row_active(first + r0 + r - 1) + kKeyTile - 1) / kKeyTile;
      int64_t full_tiles = length > 0 ? row_active(first + r0) / kKeyTile : 0;
      if (length > 0) {
        logits_rows<kRows>(q0 + r0 * q_stride, q_stride, pk, active_tiles, full_tiles, s.head_dim, lg, padded, r,
                           row_max);
      } else {
        for (int i = 0; i < r; ++i) std::fill(lg + i * padded, lg + i * padded + active, kFill);
        std::fill(row_max, row_max + r, -INFINITY);
      }
      for (int i = 0; i < r; ++i) {
        int64_t own = row_active(first + r0 + i);
        sums[r0 + i] = softmax_row(lg + i * padded, own, scale, row_max[i], full_tiles * kKeyTile);
        std::fill(lg + i * padded + own, lg + i * padded + block_active, 0.0f);
      }
    }
    const bool narrow = s.head_dim == 2 * kLanes;
    const int64_t value_rows = narrow ? kNarrowValueRows : kValueRows;
    for (int64_t r0 = 0; r0 < rows; r0 += value_rows) {  // then the values' product
      int r = static_cast<int>(std::min<int64_t>(value_rows, rows - r0));
      const float* weights = logits.data() + r0 * padded;
      int64_t keys_used = row_active(first + r0 + r - 1);
      if (narrow) {  // one 32-column block per row
        values_dispatch<kNarrowValueRows>(weights, padded, v0, s.keys, keys_used, s.head_dim, sums.data() + r0,
                                          o0 + r0 * q_stride, q_stride, r);
      } else {
        values_dispatch<kValueRows>(weights, padded, v0, s.keys, keys_used, s.head_dim, sums.data() + r0,
                                    o0 + r0 * q_stride, q_stride, r);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KleinCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("causal"));
