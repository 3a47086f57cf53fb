// Block-bidirectional cross-attention: the S queries of a diffusion block attend, without a
// mask, over a row's valid context-cache prefix followed by the block's own keys/values.
//
// Flash-decoding layout: the virtual key sequence [ctx_k[:P] | blk_k] is split into chunks, one
// CTA per (row group, kv head, chunk, batch row). A row is one (block position, query head of
// the kv head's GQA group) pair, so a CTA of up to 8 warps x 16 rows serves up to 128 query
// rows with every K/V tile it stages (nano-30b-a3b: 16 heads x 16 positions = 2 row groups,
// which read the same tiles back to back from L2). Each tile of keys is copied to shared
// memory with cp.async (double buffered); scores Q.K^T and the value product P.V run on tensor
// cores (mma.sync m16n8k16, fp32 accumulation) with an online softmax per row, and each CTA
// writes a partial (max, sum, unnormalised values). A second kernel merges the partials. The
// concatenation of prefix and block is never materialised.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace tt {
namespace {

constexpr int kMaxWarps = 8;
constexpr int kRowsPerWarp = 16;  // the M of one mma tile

// Keys per shared-memory tile, and CTAs an SM holds (the launch bounds' promise, so a wave is
// that many per SM). Measured on an H100: D = 128 runs best with 64-key tiles at one CTA of
// 8 warps per SM, D = 16 with 32-key tiles and two CTAs per SM (bench/results).
template <int D> struct Tuning {
  static constexpr int kKeyTile = D >= 64 ? 64 : 32;
  static constexpr int kCtasPerSm = D >= 64 ? 1 : 2;
};

int ctas_per_sm(int head_dim) {
  return head_dim >= 64 ? Tuning<64>::kCtasPerSm : Tuning<16>::kCtasPerSm;
}
int key_tile(int head_dim) {
  return head_dim >= 64 ? Tuning<64>::kKeyTile : Tuning<16>::kKeyTile;
}
constexpr int kMaxSplits = 128;
constexpr int kMinKeysPerSplit = 256;
constexpr float kLog2e = 1.4426950408889634f;

struct Shape {
  int batch, block, q_heads, kv_heads, max_context;
};

int warps_for(const Shape& s) {
  const int rows = s.block * (s.q_heads / s.kv_heads);
  const int warps = (rows + kRowsPerWarp - 1) / kRowsPerWarp;
  return warps < kMaxWarps ? warps : kMaxWarps;
}

int row_groups(const Shape& s) {
  const int rows_per_cta = warps_for(s) * kRowsPerWarp;
  return (s.block * (s.q_heads / s.kv_heads) + rows_per_cta - 1) / rows_per_cta;
}

// Splits worth having at all: each at least kMinKeysPerSplit keys, so the partials stay small
// next to the K/V they summarise.
int64_t max_splits(const Shape& s) {
  const int64_t by_length = (static_cast<int64_t>(s.max_context) + s.block + kMinKeysPerSplit -
                             1) / kMinKeysPerSplit;
  return std::min<int64_t>(by_length, kMaxSplits);
}

// Partials of one split: (max, sum) and D unnormalised values per query row.
int64_t split_bytes(const Shape& s, int head_dim) {
  return static_cast<int64_t>(s.batch) * s.q_heads * s.block * (head_dim + 2) *
         static_cast<int64_t>(sizeof(float));
}

// As many chunks as fit in one wave of CTAs (a partial second wave would leave most SMs idle),
// at most max_splits, and no more than `workspace_bytes` holds.
int choose_splits(const Shape& s, int head_dim, int64_t workspace_bytes) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t ctas = static_cast<int64_t>(s.batch) * s.kv_heads * row_groups(s);
  int64_t splits = static_cast<int64_t>(sms) * ctas_per_sm(head_dim) / ctas;
  splits = std::min(splits, max_splits(s));
  splits = std::min(splits, workspace_bytes / split_bytes(s, head_dim));
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

int chunk_keys(const Shape& s, int splits, int head_dim) {
  const int tile = key_tile(head_dim);
  const int per_split = (s.max_context + s.block + splits - 1) / splits;
  return (per_split + tile - 1) / tile * tile;
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c += a (16x16, row major) * b (16x8, column major), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

// 16-byte global->shared copy; copies zeros when `valid` is false.
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

struct Args {
  const void *q, *ctx_k, *ctx_v, *blk_k, *blk_v;
  const int64_t* ctx_len;
  float *part_ml, *part_acc;
  Shape shape;
  int splits, chunk, groups;
};

// Stages keys [tile, tile + kKeyTile) of the virtual sequence into k_tile / v_tile
// ([kKeyTile][D + 8], the padding keeps ldmatrix free of bank conflicts).
template <typename T, int D>
__device__ __forceinline__ void stage_tile(const Args& a, T* k_tile, T* v_tile, int tile,
                                           int key_end, int prefix, int64_t head_base) {
  constexpr int kStride = D + 8, kVectors = D / 8, kKeyTile = Tuning<D>::kKeyTile;
  const T* ctx_k = static_cast<const T*>(a.ctx_k);
  const T* ctx_v = static_cast<const T*>(a.ctx_v);
  const T* blk_k = static_cast<const T*>(a.blk_k);
  const T* blk_v = static_cast<const T*>(a.blk_v);
  for (int i = threadIdx.x; i < kKeyTile * kVectors; i += blockDim.x) {
    const int j = i / kVectors, c = (i % kVectors) * 8, key = tile + j;
    const bool valid = key < key_end;
    int64_t at = 0;
    const T *k_src = blk_k, *v_src = blk_v;
    if (valid && key < prefix) {
      at = (head_base * a.shape.max_context + key) * D + c;
      k_src = ctx_k;
      v_src = ctx_v;
    } else if (valid) {
      at = (head_base * a.shape.block + (key - prefix)) * D + c;
    }
    copy16(k_tile + j * kStride + c, k_src + at, valid);
    copy16(v_tile + j * kStride + c, v_src + at, valid);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * 32, Tuning<D>::kCtasPerSm)
partial_attention(Args a) {
  constexpr int kKeyTile = Tuning<D>::kKeyTile;
  constexpr int kStride = D + 8, kKSteps = D / 16, kDTiles = D / 8, kNTiles = kKeyTile / 8;
  constexpr int kTileElems = kKeyTile * kStride;
  extern __shared__ uint4 shared_raw[];
  T* shared = reinterpret_cast<T*>(shared_raw);  // [stage][K | V][kKeyTile][kStride]

  const Shape& sh = a.shape;
  const int group = blockIdx.x % a.groups, kv_head = blockIdx.x / a.groups;
  const int split = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int heads_per_kv = sh.q_heads / sh.kv_heads;
  const int rows = sh.block * heads_per_kv;
  const int prefix = static_cast<int>(min(max(a.ctx_len[b], int64_t{0}),
                                           static_cast<int64_t>(sh.max_context)));
  const int key_begin = split * a.chunk;
  const int key_end = min(prefix + sh.block, key_begin + a.chunk);
  const int n_tiles = key_end > key_begin ? (key_end - key_begin + kKeyTile - 1) / kKeyTile : 0;
  const int64_t head_base = static_cast<int64_t>(b) * sh.kv_heads + kv_head;
  const int row0 = (group * (blockDim.x / 32) + warp) * kRowsPerWarp;
  const bool active = row0 < rows;
  const float scale = rsqrtf(static_cast<float>(D)) * kLog2e;  // scores in log2 units

  // Query fragments (A operand) of this warp's 16 rows: row r <-> (position r / G, head).
  const int r_lo = row0 + lane / 4, r_hi = r_lo + 8;
  uint32_t qf[kKSteps][4];
  const T* q = static_cast<const T*>(a.q);
  auto q_word = [&](int r, int d) -> uint32_t {
    if (r >= rows) return 0u;
    const int s = r / heads_per_kv, head = kv_head * heads_per_kv + r % heads_per_kv;
    const int64_t at = ((static_cast<int64_t>(b) * sh.block + s) * sh.q_heads + head) * D + d;
    return *reinterpret_cast<const uint32_t*>(q + at);
  };
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    const int d = kk * 16 + (lane % 4) * 2;
    qf[kk][0] = q_word(r_lo, d);
    qf[kk][1] = q_word(r_hi, d);
    qf[kk][2] = q_word(r_lo, d + 8);
    qf[kk][3] = q_word(r_hi, d + 8);
  }

  float acc[kDTiles][4];
#pragma unroll
  for (int t = 0; t < kDTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  if (n_tiles > 0) {
    stage_tile<T, D>(a, shared, shared + kTileElems, key_begin, key_end, prefix, head_base);
    copy_commit();
  }
  for (int t = 0; t < n_tiles; ++t) {
    const int tile = key_begin + t * kKeyTile;
    if (t + 1 < n_tiles) {
      T* next = shared + ((t + 1) & 1) * 2 * kTileElems;
      stage_tile<T, D>(a, next, next + kTileElems, tile + kKeyTile, key_end, prefix, head_base);
      copy_commit();
      copy_wait<1>();
    } else {
      copy_wait<0>();
    }
    __syncthreads();
    const T* k_tile = shared + (t & 1) * 2 * kTileElems;
    const T* v_tile = k_tile + kTileElems;
    if (active) {
      float sc[kNTiles][4];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int n2 = 0; n2 < kNTiles / 2; ++n2) {
          uint32_t kb[4];
          const int key = n2 * 16 + lane % 8 + (lane / 16) * 8;
          ldmatrix_x4(kb, k_tile + key * kStride + kk * 16 + ((lane / 8) & 1) * 8);
          mma<T>(sc[2 * n2], qf[kk], kb[0], kb[1]);
          mma<T>(sc[2 * n2 + 1], qf[kk], kb[2], kb[3]);
        }
      }
      // Online softmax: each thread holds columns of rows r_lo (c 0,1) and r_hi (c 2,3); the
      // four threads of a quad share a row.
      float tile_lo = -INFINITY, tile_hi = -INFINITY;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int key = tile + n * 8 + (lane % 4) * 2 + (c & 1);
          sc[n][c] = key < key_end ? sc[n][c] * scale : -INFINITY;
        }
        tile_lo = fmaxf(tile_lo, fmaxf(sc[n][0], sc[n][1]));
        tile_hi = fmaxf(tile_hi, fmaxf(sc[n][2], sc[n][3]));
      }
#pragma unroll
      for (int offset = 1; offset < 4; offset <<= 1) {
        tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffffu, tile_lo, offset));
        tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffffu, tile_hi, offset));
      }
      const float new_lo = fmaxf(m_lo, tile_lo), new_hi = fmaxf(m_hi, tile_hi);
      const float alpha_lo = exp2f(m_lo - new_lo), alpha_hi = exp2f(m_hi - new_hi);
      m_lo = new_lo;
      m_hi = new_hi;
      l_lo *= alpha_lo;
      l_hi *= alpha_hi;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        acc[d][0] *= alpha_lo;
        acc[d][1] *= alpha_lo;
        acc[d][2] *= alpha_hi;
        acc[d][3] *= alpha_hi;
      }
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        sc[n][0] = exp2f(sc[n][0] - m_lo);
        sc[n][1] = exp2f(sc[n][1] - m_lo);
        sc[n][2] = exp2f(sc[n][2] - m_hi);
        sc[n][3] = exp2f(sc[n][3] - m_hi);
        l_lo += sc[n][0] + sc[n][1];
        l_hi += sc[n][2] + sc[n][3];
      }
      // P (the score accumulators, re-packed as A fragments) times V.
#pragma unroll
      for (int kt = 0; kt < kKeyTile / 16; ++kt) {
        const uint32_t pa[4] = {pack2<T>(sc[2 * kt][0], sc[2 * kt][1]),
                                pack2<T>(sc[2 * kt][2], sc[2 * kt][3]),
                                pack2<T>(sc[2 * kt + 1][0], sc[2 * kt + 1][1]),
                                pack2<T>(sc[2 * kt + 1][2], sc[2 * kt + 1][3])};
#pragma unroll
        for (int d2 = 0; d2 < D / 16; ++d2) {
          uint32_t vb[4];
          const int key = kt * 16 + lane % 8 + ((lane / 8) & 1) * 8;
          ldmatrix_x4_trans(vb, v_tile + key * kStride + d2 * 16 + (lane / 16) * 8);
          mma<T>(acc[2 * d2], pa, vb[0], vb[1]);
          mma<T>(acc[2 * d2 + 1], pa, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();
  }
  if (!active) return;

#pragma unroll
  for (int offset = 1; offset < 4; offset <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, offset);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, offset);
  }
  const int col = (lane % 4) * 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r_hi : r_lo;
    if (r >= rows) continue;
    const int s = r / heads_per_kv, head = kv_head * heads_per_kv + r % heads_per_kv;
    const int64_t slot =
        ((static_cast<int64_t>(b) * sh.q_heads + head) * sh.block + s) * a.splits + split;
    if (lane % 4 == 0) {
      a.part_ml[slot * 2] = half ? m_hi : m_lo;
      a.part_ml[slot * 2 + 1] = half ? l_hi : l_lo;
    }
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const float2 v = half ? make_float2(acc[d][2], acc[d][3]) : make_float2(acc[d][0], acc[d][1]);
      *reinterpret_cast<float2*>(a.part_acc + slot * D + d * 8 + col) = v;
    }
  }
}

// One CTA per (b, head, s), one thread per channel: the splits' partials, weighted by
// 2^(max_i - max), give the softmax-normalised output.
template <typename T, int D>
__global__ void merge_partials(const float* __restrict__ part_ml,
                               const float* __restrict__ part_acc, T* __restrict__ out,
                               int block, int q_heads, int splits) {
  const int64_t index = blockIdx.x;  // (b * q_heads + head) * block + s
  const int s = static_cast<int>(index % block);
  const int head = static_cast<int>((index / block) % q_heads);
  const int64_t b = index / (static_cast<int64_t>(block) * q_heads);
  const int d = threadIdx.x;
  float total_max = -INFINITY;
  for (int i = 0; i < splits; ++i) total_max = fmaxf(total_max, part_ml[(index * splits + i) * 2]);
  float num = 0.f, den = 0.f;
  for (int i = 0; i < splits; ++i) {
    const int64_t slot = index * splits + i;
    const float mi = part_ml[slot * 2];
    if (mi == -INFINITY) continue;
    const float w = exp2f(mi - total_max);
    num += w * part_acc[slot * D + d];
    den += w * part_ml[slot * 2 + 1];
  }
  out[((b * block + s) * q_heads + head) * D + d] = from_float<T>(num / den);
}

template <typename T, int D>
int launch(const Args& base, void* out, cudaStream_t stream) {
  Args a = base;
  const Shape& s = a.shape;
  const int warps = warps_for(s);
  const size_t shared = 2u * 2u * Tuning<D>::kKeyTile * (D + 8) * sizeof(T);
  if (cudaFuncSetAttribute(partial_attention<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shared)) != cudaSuccess)
    return TT_ERR_LAUNCH;
  partial_attention<T, D><<<dim3(a.groups * s.kv_heads, a.splits, s.batch), warps * 32, shared,
                            stream>>>(a);
  const int64_t rows = static_cast<int64_t>(s.batch) * s.q_heads * s.block;
  merge_partials<T, D><<<static_cast<unsigned>(rows), D, 0, stream>>>(
      a.part_ml, a.part_acc, static_cast<T*>(out), s.block, s.q_heads, a.splits);
  return launch_status();
}

template <typename T>
int dispatch_head_dim(int head_dim, const Args& a, void* out, cudaStream_t stream) {
  switch (head_dim) {
    case 16: return launch<T, 16>(a, out, stream);
    case 32: return launch<T, 32>(a, out, stream);
    case 64: return launch<T, 64>(a, out, stream);
    case 128: return launch<T, 128>(a, out, stream);
    default: return TT_ERR_UNSUPPORTED;
  }
}

// Enough for this shape and every smaller one on a GPU of up to kWorkspaceSms SMs: one wave holds
// at most kWorkspaceSms * ctas_per_sm CTAs of kMaxWarps * kRowsPerWarp rows, so a launch never
// keeps more row-splits than that, unless one split per row is already more. Both terms grow
// with every dimension, so the size for a profile's maximum shapes covers the whole profile.
int64_t workspace_bytes(const Shape& s, int head_dim) {
  const int64_t rows = static_cast<int64_t>(s.batch) * s.q_heads * s.block;
  const int64_t wave =
      static_cast<int64_t>(kWorkspaceSms) * ctas_per_sm(head_dim) * kMaxWarps * kRowsPerWarp;
  const int64_t row_splits = std::min(rows * max_splits(s), std::max(rows, wave));
  return row_splits * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

bool supported_head_dim(int head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

// Grid limits: batch rows are gridDim.z, and the merge launches one CTA per query row.
bool supported_grid(const Shape& s) {
  return s.batch <= kMaxGridYZ &&
         static_cast<int64_t>(s.batch) * s.q_heads * s.block <= INT_MAX;
}

// cp.async moves 16-byte vectors of K/V; q is read as pairs of elements, ctx_len as int64 and
// the partials are written as float2.
bool aligned_operands(const void* q, const void* ctx_k, const void* ctx_v,
                      const int64_t* ctx_len, const void* blk_k, const void* blk_v,
                      const void* out, const void* workspace) {
  return aligned(ctx_k, 16) && aligned(ctx_v, 16) && aligned(blk_k, 16) && aligned(blk_v, 16) &&
         aligned(q, 4) && aligned(out, 2) && aligned(ctx_len, 8) && aligned(workspace, 8);
}

bool valid_shape(const Shape& s) {
  return s.batch > 0 && s.block > 0 && s.q_heads > 0 && s.kv_heads > 0 && s.max_context >= 0 &&
         s.q_heads % s.kv_heads == 0;
}

}  // namespace
}  // namespace tt

extern "C" int64_t tt_block_cross_attention_workspace_bytes(int batch, int block, int q_heads,
                                                            int kv_heads, int head_dim,
                                                            int max_context) {
  const tt::Shape s{batch, block, q_heads, kv_heads, max_context};
  if (!tt::valid_shape(s) || head_dim <= 0) return -1;
  return tt::workspace_bytes(s, head_dim);
}

extern "C" int tt_block_cross_attention(const void* q, const void* ctx_k, const void* ctx_v,
                                        const int64_t* ctx_len, const void* blk_k,
                                        const void* blk_v, void* out, void* workspace,
                                        int64_t workspace_bytes, int batch, int block,
                                        int q_heads, int kv_heads, int head_dim,
                                        int max_context, int dtype, tt_stream_t stream) {
  const tt::Shape s{batch, block, q_heads, kv_heads, max_context};
  if (!q || !ctx_k || !ctx_v || !ctx_len || !blk_k || !blk_v || !out || !workspace ||
      !tt::valid_shape(s))
    return TT_ERR_INVALID_ARGUMENT;
  if ((dtype != TT_FLOAT16 && dtype != TT_BFLOAT16) || !tt::supported_head_dim(head_dim) ||
      !tt::supported_grid(s))
    return TT_ERR_UNSUPPORTED;
  if (!tt::aligned_operands(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, out, workspace))
    return TT_ERR_MISALIGNED;
  if (workspace_bytes < tt::split_bytes(s, head_dim)) return TT_ERR_WORKSPACE;
  tt::Args a{};
  a.q = q;
  a.ctx_k = ctx_k;
  a.ctx_v = ctx_v;
  a.blk_k = blk_k;
  a.blk_v = blk_v;
  a.ctx_len = ctx_len;
  a.shape = s;
  a.splits = tt::choose_splits(s, head_dim, workspace_bytes);
  a.chunk = tt::chunk_keys(s, a.splits, head_dim);
  a.groups = tt::row_groups(s);
  a.part_ml = static_cast<float*>(workspace);
  a.part_acc = a.part_ml + static_cast<int64_t>(batch) * q_heads * block * a.splits * 2;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dtype == TT_FLOAT16 ? tt::dispatch_head_dim<__half>(head_dim, a, out, st)
                             : tt::dispatch_head_dim<__nv_bfloat16>(head_dim, a, out, st);
}
