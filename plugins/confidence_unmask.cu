// Confidence unmasking: one mask-diffusion step fused after the denoiser's logits.
//
// Kernel 1, one CTA per block position: a single pass over the V logits with an online softmax
// keeps (max, argmax, sum of exp) per thread, merged across the CTA; the mask token counts as
// -1e12 (it can never be predicted). The position's confidence is the argmax's probability,
// 1 / sum(exp(x - max)). Kernel 2, one CTA per row: the commit rule of
// trt_twotower.policy.commit_step, with the same tie-breaking (argmax: lowest token id;
// commit order: higher confidence first, then the earlier position).
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace tt {
namespace {

constexpr int kThreads = 256;
constexpr float kMaskLogit = -1e12f;

struct Best {
  float max;
  float sum;
  int64_t index;
};

__device__ __forceinline__ Best merge(Best a, Best b) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  const float m = fmaxf(a.max, b.max);
  Best out;
  out.max = m;
  out.sum = a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m);
  out.index = a.max > b.max ? a.index : (b.max > a.max ? b.index : min(a.index, b.index));
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
position_argmax(const T* __restrict__ logits, int vocab, int64_t mask_token_id,
                int64_t* __restrict__ pred, float* __restrict__ prob) {
  const int64_t position = blockIdx.x;
  const T* row = logits + position * vocab;
  Best best{-INFINITY, 0.f, 0};
  for (int v = threadIdx.x; v < vocab; v += kThreads) {
    const float x = v == mask_token_id ? kMaskLogit : to_float(row[v]);
    if (x > best.max) {
      best.sum = best.sum * __expf(best.max - x) + 1.f;
      best.max = x;
      best.index = v;
    } else {
      best.sum += __expf(x - best.max);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best other;
    other.max = __shfl_xor_sync(0xffffffffu, best.max, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, best.sum, offset);
    other.index = __shfl_xor_sync(0xffffffffu, best.index, offset);
    best = merge(best, other);
  }
  __shared__ Best warps[kThreads / 32];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    Best total = warps[0];
    for (int w = 1; w < kThreads / 32; ++w) total = merge(total, warps[w]);
    pred[position] = total.index;
    prob[position] = 1.f / total.sum;
  }
}

__global__ void commit_rule(const int64_t* __restrict__ block, const int64_t* __restrict__ pred,
                            const float* __restrict__ prob, int64_t* __restrict__ next_block,
                            float* __restrict__ confidence, int64_t* __restrict__ masked_count,
                            int width, int64_t mask_token_id, float threshold,
                            int64_t steps_left) {
  extern __shared__ float conf[];
  int* masked = reinterpret_cast<int*>(conf + width);
  __shared__ int n_masked, n_above;
  const int b = blockIdx.x, i = threadIdx.x;
  const int64_t at = static_cast<int64_t>(b) * width + i;
  if (i == 0) n_masked = n_above = 0;
  __syncthreads();
  if (i < width) {
    masked[i] = block[at] == mask_token_id;
    conf[i] = masked[i] ? prob[at] : INFINITY;
    if (masked[i]) {
      atomicAdd(&n_masked, 1);
      if (conf[i] > threshold) atomicAdd(&n_above, 1);
    }
  }
  __syncthreads();
  if (i >= width) return;
  const int n = n_masked;
  int commits = n;
  if (steps_left > 1) {
    const int k = n_above > 0 ? n_above : 1;
    const int min_commit = static_cast<int>((n + steps_left - 1) / steps_left);
    commits = min(max(k, min_commit), n);
  }
  int rank = 0;
  for (int j = 0; j < width; ++j)
    if (masked[j] && (conf[j] > conf[i] || (conf[j] == conf[i] && j < i))) ++rank;
  const bool commit = masked[i] && rank < commits;
  next_block[at] = commit ? pred[at] : block[at];
  confidence[at] = conf[i];
  if (i == 0) masked_count[b] = n - commits;
}

}  // namespace
}  // namespace tt

extern "C" int64_t tt_confidence_unmask_workspace_bytes(int batch, int block) {
  if (batch <= 0 || block <= 0) return -1;
  return static_cast<int64_t>(batch) * block * (sizeof(int64_t) + sizeof(float));
}

extern "C" int tt_confidence_unmask(const void* logits, const int64_t* block,
                                    int64_t* next_block, float* confidence,
                                    int64_t* masked_count, void* workspace,
                                    int64_t workspace_bytes, int batch, int block_size,
                                    int vocab, int64_t mask_token_id, float threshold,
                                    int64_t steps_left, float temperature, int dtype,
                                    tt_stream_t stream) {
  if (!logits || !block || !next_block || !confidence || !masked_count || !workspace ||
      batch <= 0 || block_size <= 0 || block_size > 1024 || vocab <= 0 || mask_token_id < 0 ||
      mask_token_id >= vocab || steps_left < 1)
    return TT_ERR_INVALID_ARGUMENT;
  if (temperature > 0.f) return TT_ERR_UNSUPPORTED;  // sampling runs unfused (trt_twotower.policy)
  if (workspace_bytes < tt_confidence_unmask_workspace_bytes(batch, block_size))
    return TT_ERR_WORKSPACE;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int positions = batch * block_size;
  int64_t* pred = static_cast<int64_t*>(workspace);
  float* prob = reinterpret_cast<float*>(pred + positions);
  if (dtype == TT_FLOAT32)
    tt::position_argmax<float><<<positions, tt::kThreads, 0, s>>>(
        static_cast<const float*>(logits), vocab, mask_token_id, pred, prob);
  else if (dtype == TT_BFLOAT16)
    tt::position_argmax<__nv_bfloat16><<<positions, tt::kThreads, 0, s>>>(
        static_cast<const __nv_bfloat16*>(logits), vocab, mask_token_id, pred, prob);
  else
    return TT_ERR_UNSUPPORTED;
  const size_t shared = static_cast<size_t>(block_size) * (sizeof(float) + sizeof(int));
  const int threads = (block_size + 31) / 32 * 32;
  tt::commit_rule<<<batch, threads, shared, s>>>(block, pred, prob, next_block, confidence,
                                                 masked_count, block_size, mask_token_id,
                                                 threshold, steps_left);
  return tt::launch_status();
}

extern "C" const char* tt_error_string(int code) {
  switch (code) {
    case TT_OK: return "ok";
    case TT_ERR_INVALID_ARGUMENT: return "invalid argument";
    case TT_ERR_UNSUPPORTED: return "unsupported dtype, head size or option";
    case TT_ERR_WORKSPACE: return "workspace too small";
    case TT_ERR_LAUNCH: return "CUDA launch failed";
    default: return "unknown error";
  }
}
