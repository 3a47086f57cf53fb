// Block-bidirectional cross-attention: the S queries of a diffusion block attend, without a
// mask, over a row's valid context-cache prefix followed by the block's own keys/values.
//
// Flash-decoding layout: the virtual key sequence [ctx_k[:P] | blk_k] is split into chunks,
// one CTA per (chunk, kv head, row group, batch row); each CTA streams its chunk's keys through
// shared memory once for all the query heads of that kv head (GQA) and all block positions in
// its row group, keeping an online softmax per query row in registers, and writes a partial
// (max, sum, weighted values). A second kernel merges the partials. The concatenation is
// never materialised.
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace tt {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 8;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kKeyTile = 32;
constexpr int kMaxSplits = 64;

int row_groups(int block, int q_heads, int kv_heads) {
  const int rows = block * (q_heads / kv_heads);
  return (rows + kRowsPerCta - 1) / kRowsPerCta;
}

int choose_splits(int batch, int kv_heads, int groups, int total_keys) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int ctas = batch * kv_heads * groups;
  int splits = (2 * sms + ctas - 1) / ctas;
  const int by_length = (total_keys + 255) / 256;  // at least 256 keys per split
  splits = splits < by_length ? splits : by_length;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  return splits > 0 ? splits : 1;
}

// Partials: [B, Hq, S, splits] of (max, sum) and [B, Hq, S, splits, D] of weighted values.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
partial_attention(const T* __restrict__ q, const T* __restrict__ ctx_k,
                  const T* __restrict__ ctx_v, const int64_t* __restrict__ ctx_len,
                  const T* __restrict__ blk_k, const T* __restrict__ blk_v,
                  float* __restrict__ part_ml, float* __restrict__ part_acc, int block,
                  int q_heads, int kv_heads, int max_context, int splits, int chunk) {
  constexpr int kPerLane = D >= 32 ? D / 32 : 1;
  constexpr int kLanes = D >= 32 ? 32 : D;
  __shared__ float tile_k[kKeyTile][D];
  __shared__ float tile_v[kKeyTile][D];

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y % kv_heads;
  const int group = blockIdx.y / kv_heads;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int heads_per_kv = q_heads / kv_heads;
  const int rows = block * heads_per_kv;
  const int prefix = static_cast<int>(ctx_len[b]);
  const int total = prefix + block;
  const int key_begin = split * chunk;
  const int key_end = min(total, key_begin + chunk);
  const float scale = rsqrtf(static_cast<float>(D));

  float qv[kRowsPerWarp][kPerLane];
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = group * kRowsPerCta + warp * kRowsPerWarp + r;
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      acc[r][e] = 0.f;
      qv[r][e] = 0.f;
      const int d = lane + e * 32;
      if (row < rows && lane < kLanes) {
        const int s = row / heads_per_kv;
        const int head = kv_head * heads_per_kv + row % heads_per_kv;
        qv[r][e] = to_float(q[((static_cast<int64_t>(b) * block + s) * q_heads + head) * D + d]) *
                   scale;
      }
    }
  }

  for (int tile = key_begin; tile < key_end; tile += kKeyTile) {
    __syncthreads();
    for (int i = threadIdx.x; i < kKeyTile * D; i += kThreads) {
      const int j = i / D, d = i % D, key = tile + j;
      float kval = 0.f, vval = 0.f;
      if (key < key_end) {
        const int64_t base = static_cast<int64_t>(b) * kv_heads + kv_head;
        if (key < prefix) {
          const int64_t at = (base * max_context + key) * D + d;
          kval = to_float(ctx_k[at]);
          vval = to_float(ctx_v[at]);
        } else {
          const int64_t at = (base * block + (key - prefix)) * D + d;
          kval = to_float(blk_k[at]);
          vval = to_float(blk_v[at]);
        }
      }
      tile_k[j][d] = kval;
      tile_v[j][d] = vval;
    }
    __syncthreads();
    const int valid = min(kKeyTile, key_end - tile);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float scores[kKeyTile];
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kKeyTile; ++j) {
        float partial = 0.f;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e)
          if (lane < kLanes) partial += qv[r][e] * tile_k[j][lane + e * 32];
        const float score = j < valid ? warp_sum(partial) : -INFINITY;
        scores[j] = score;
        tile_max = fmaxf(tile_max, score);
      }
      const float new_max = fmaxf(m[r], tile_max);
      const float rescale = m[r] == -INFINITY ? 0.f : __expf(m[r] - new_max);
      l[r] *= rescale;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[r][e] *= rescale;
#pragma unroll
      for (int j = 0; j < kKeyTile; ++j) {
        const float p = j < valid ? __expf(scores[j] - new_max) : 0.f;
        l[r] += p;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e)
          if (lane < kLanes) acc[r][e] += p * tile_v[j][lane + e * 32];
      }
      m[r] = new_max;
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = group * kRowsPerCta + warp * kRowsPerWarp + r;
    if (row >= rows) continue;
    const int s = row / heads_per_kv;
    const int head = kv_head * heads_per_kv + row % heads_per_kv;
    const int64_t slot = ((static_cast<int64_t>(b) * q_heads + head) * block + s) * splits + split;
    if (lane == 0) {
      part_ml[slot * 2] = m[r];
      part_ml[slot * 2 + 1] = l[r];
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e)
      if (lane < kLanes) part_acc[slot * D + lane + e * 32] = acc[r][e];
  }
}

template <typename T, int D>
__global__ void merge_partials(const float* __restrict__ part_ml,
                               const float* __restrict__ part_acc, T* __restrict__ out,
                               int block, int q_heads, int splits) {
  // One CTA per (b, head, s); thread d of D combines the splits for one channel.
  const int index = blockIdx.x;  // ((b * q_heads + head) * block + s)
  const int s = index % block;
  const int head = (index / block) % q_heads;
  const int b = index / (block * q_heads);
  float total_max = -INFINITY;
  for (int i = 0; i < splits; ++i) total_max = fmaxf(total_max, part_ml[(index * splits + i) * 2]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int i = 0; i < splits; ++i) {
      const int64_t slot = static_cast<int64_t>(index) * splits + i;
      const float mi = part_ml[slot * 2];
      if (mi == -INFINITY) continue;
      const float w = __expf(mi - total_max);
      num += w * part_acc[slot * D + d];
      den += w * part_ml[slot * 2 + 1];
    }
    out[((static_cast<int64_t>(b) * block + s) * q_heads + head) * D + d] = from_float<T>(num / den);
  }
}

template <typename T, int D>
int launch(const void* q, const void* ctx_k, const void* ctx_v, const int64_t* ctx_len,
           const void* blk_k, const void* blk_v, void* out, void* workspace, int batch,
           int block, int q_heads, int kv_heads, int max_context, cudaStream_t stream) {
  const int groups = row_groups(block, q_heads, kv_heads);
  const int splits = choose_splits(batch, kv_heads, groups, max_context + block);
  int chunk = (max_context + block + splits - 1) / splits;
  chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
  float* part_ml = static_cast<float*>(workspace);
  float* part_acc = part_ml + static_cast<int64_t>(batch) * q_heads * block * splits * 2;
  partial_attention<T, D><<<dim3(splits, kv_heads * groups, batch), kThreads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(ctx_k), static_cast<const T*>(ctx_v),
      ctx_len, static_cast<const T*>(blk_k), static_cast<const T*>(blk_v), part_ml, part_acc,
      block, q_heads, kv_heads, max_context, splits, chunk);
  merge_partials<T, D><<<batch * q_heads * block, D < 128 ? D : 128, 0, stream>>>(
      part_ml, part_acc, static_cast<T*>(out), block, q_heads, splits);
  return launch_status();
}

template <typename T>
int dispatch_head_dim(int head_dim, const void* q, const void* ctx_k, const void* ctx_v,
                      const int64_t* ctx_len, const void* blk_k, const void* blk_v, void* out,
                      void* workspace, int batch, int block, int q_heads, int kv_heads,
                      int max_context, cudaStream_t stream) {
  switch (head_dim) {
    case 16: return launch<T, 16>(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, out, workspace, batch,
                                  block, q_heads, kv_heads, max_context, stream);
    case 32: return launch<T, 32>(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, out, workspace, batch,
                                  block, q_heads, kv_heads, max_context, stream);
    case 64: return launch<T, 64>(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, out, workspace, batch,
                                  block, q_heads, kv_heads, max_context, stream);
    case 128: return launch<T, 128>(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, out, workspace,
                                    batch, block, q_heads, kv_heads, max_context, stream);
    default: return TT_ERR_UNSUPPORTED;
  }
}

}  // namespace
}  // namespace tt

extern "C" int64_t tt_block_cross_attention_workspace_bytes(int batch, int block, int q_heads,
                                                            int kv_heads, int head_dim,
                                                            int max_context) {
  if (batch <= 0 || block <= 0 || q_heads <= 0 || kv_heads <= 0 || head_dim <= 0) return -1;
  const int groups = tt::row_groups(block, q_heads, kv_heads);
  const int splits = tt::choose_splits(batch, kv_heads, groups, max_context + block);
  return static_cast<int64_t>(batch) * q_heads * block * splits * (head_dim + 2) * 4;
}

extern "C" int tt_block_cross_attention(const void* q, const void* ctx_k, const void* ctx_v,
                                        const int64_t* ctx_len, const void* blk_k,
                                        const void* blk_v, void* out, void* workspace,
                                        int64_t workspace_bytes, int batch, int block,
                                        int q_heads, int kv_heads, int head_dim,
                                        int max_context, int dtype, tt_stream_t stream) {
  if (!q || !ctx_k || !ctx_v || !ctx_len || !blk_k || !blk_v || !out || !workspace ||
      batch <= 0 || block <= 0 || q_heads <= 0 || kv_heads <= 0 || max_context < 0 ||
      q_heads % kv_heads != 0)
    return TT_ERR_INVALID_ARGUMENT;
  if (workspace_bytes < tt_block_cross_attention_workspace_bytes(batch, block, q_heads, kv_heads,
                                                                 head_dim, max_context))
    return TT_ERR_WORKSPACE;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == TT_FLOAT16)
    return tt::dispatch_head_dim<__half>(head_dim, q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, out,
                                         workspace, batch, block, q_heads, kv_heads, max_context,
                                         s);
  if (dtype == TT_BFLOAT16)
    return tt::dispatch_head_dim<__nv_bfloat16>(head_dim, q, ctx_k, ctx_v, ctx_len, blk_k, blk_v,
                                                out, workspace, batch, block, q_heads, kv_heads,
                                                max_context, s);
  return TT_ERR_UNSUPPORTED;
}
