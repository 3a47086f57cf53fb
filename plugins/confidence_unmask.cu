// Confidence unmasking: one mask-diffusion step fused after the denoiser's logits.
//
// The vocabulary of each block position is split into chunks so that batch 1 still fills the
// GPU. Kernel `vocab_stats`, one CTA per (chunk, position): a single pass over the chunk's
// logits keeps an online softmax (max, sum of exp, first argmax) of the logits with the mask
// token at -1e12 (policy.suppress_mask), and with temperature > 0 also the (max, sum) of the
// tempered logits. Only when sampling, kernel `tempered_argmax` makes a second pass: the
// Gumbel-max draw argmax(log_softmax(x / T) + g), with g re-computed from policy's
// counter-based hash. Kernel `commit_rule`, one CTA per row: merges the chunks, takes the
// untempered probability of the chosen token as its confidence, and applies
// policy.commit_step's rule (most confident first, ties to the earlier position).
//
// Degenerate logits (twotower_plugins.h): NaN counts as -inf and -inf adds nothing to a sum, so
// a row of NaN or -inf predicts the mask token (its -1e12 is the only finite logit) instead of
// leaving an argmax at its initial value; a draw that finds no comparable score falls back to
// the greedy token, and a NaN confidence counts as 0. The predicted id is always in [0, V).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace tt {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunks = 64;
constexpr int kMinChunkElems = 2048;
constexpr int kCtasPerSm = 4;  // vocab_stats CTAs wanted per SM
constexpr float kMaskLogit = -1e12f;
constexpr double kGumbelUMin = 1e-10;
// Above every value gumbel() can return (u <= 1 - 2^-25 gives at most 17.33): a token whose
// tempered log-probability plus this cannot beat the best so far needs no noise computed.
constexpr float kGumbelBound = 17.5f;

// What one chunk of one position leaves for the merge (8 words, one 32-byte line).
struct Partial {
  float max, sum;            // untempered online softmax
  float tmax, tsum;          // tempered online softmax (temperature > 0)
  float best;                // tempered score of the sampled token (temperature > 0)
  int index;                 // untempered argmax, or the sampled token
  int pad[2];
};

struct Softmax {
  float max, sum;
  int index;
};

__device__ __forceinline__ Softmax merge(Softmax a, Softmax b) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  const float m = fmaxf(a.max, b.max);
  const int index = a.max > b.max ? a.index : (b.max > a.max ? b.index : min(a.index, b.index));
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m), index};
}

// x == -inf adds nothing: skipping it keeps an all -inf stretch at sum 0 instead of the NaN
// of exp(-inf - -inf).
__device__ __forceinline__ void push(Softmax& s, float x, int v) {
  if (x == -INFINITY) return;
  if (x > s.max) {
    s.sum = s.sum * __expf(s.max - x) + 1.f;
    s.max = x;
    s.index = v;
  } else {
    s.sum += __expf(x - s.max);
  }
}

// Best (score, lowest index) pair.
__device__ __forceinline__ void keep_best(float& best, int& index, float x, int v) {
  if (x > best || (x == best && v < index)) {
    best = x;
    index = v;
  }
}

// The 32-bit finaliser of MurmurHash3, as policy._fmix32.
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// policy.gumbel_noise for one (seed, step_key, position, token): fp64, then fp32.
__device__ __forceinline__ float gumbel(uint32_t row_key, uint32_t token) {
  const uint32_t h = fmix32(row_key ^ token);
  const double u = fmax((static_cast<double>(h >> 8) + 0.5) / 16777216.0, kGumbelUMin);
  return static_cast<float>(-log(-log(u)));
}

// The logit the policy sees for token v: the mask token's replaced, a NaN counted as -inf.
template <typename T>
__device__ __forceinline__ float logit(T raw, int v, int64_t mask_token_id) {
  const float x = to_float(raw);
  return v == mask_token_id ? kMaskLogit : (isnan(x) ? -INFINITY : x);
}

// Loads element v of a row as a float (see logit), 8 at a time where aligned.
template <typename T> struct Row {
  const T* data;
  int64_t mask_token_id;
  __device__ __forceinline__ float at(int v) const { return logit(data[v], v, mask_token_id); }
};

// Calls f(x, v) for every v in [begin, end) that this thread owns, in ascending order per
// thread; 16-byte loads when the row is aligned (the usual case: V a multiple of 8).
template <typename T, typename F>
__device__ __forceinline__ void for_each(const Row<T>& row, int begin, int end, bool vectorised,
                                         F f) {
  constexpr int kPerVector = 16 / sizeof(T);
  if (vectorised) {
    // kUnroll 16-byte loads in flight per thread before any is used; the elements a thread
    // owns are still visited in ascending order.
    constexpr int kUnroll = 4, kStep = kThreads * kPerVector;
    int base = begin + threadIdx.x * kPerVector;
    for (; base + (kUnroll - 1) * kStep < end; base += kUnroll * kStep) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        raw[u] = *reinterpret_cast<const uint4*>(row.data + base + u * kStep);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const T* values = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int i = 0; i < kPerVector; ++i) {
          const int v = base + u * kStep + i;
          f(logit(values[i], v, row.mask_token_id), v);
        }
      }
    }
    for (; base < end; base += kStep) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row.data + base);
      const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) {
        const int v = base + i;
        f(logit(values[i], v, row.mask_token_id), v);
      }
    }
  } else {
    for (int v = begin + threadIdx.x; v < end; v += kThreads) f(row.at(v), v);
  }
}

template <typename T> __device__ __forceinline__ T shuffle(T x, int offset) {
  return __shfl_xor_sync(0xffffffffu, x, offset);
}

__device__ __forceinline__ Softmax shuffle_value(Softmax s, int offset) {
  return {shuffle(s.max, offset), shuffle(s.sum, offset), shuffle(s.index, offset)};
}

struct Best {
  float score;
  int index;
};
__device__ __forceinline__ Best shuffle_value(Best b, int offset) {
  return {shuffle(b.score, offset), shuffle(b.index, offset)};
}

// Merges a per-thread value across the CTA with `op`; every thread gets the result.
template <typename V, typename Op>
__device__ __forceinline__ V cta_reduce(V value, Op op, V* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, shuffle_value(value, offset));
  const int warp = threadIdx.x / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[warp] = value;
  __syncthreads();
  V total = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) total = op(total, scratch[w]);
  return total;
}

struct Params {
  const void* logits;
  const int64_t* seeds;
  const float* threshold;     // per row [B], on the device, read by commit_rule
  const int64_t* steps_left;
  Partial* partials;
  int vocab, chunk, chunks;
  int64_t mask_token_id, step_key;
  float inv_temperature;
  bool vectorised;
};

template <typename T, bool kTempered>
__global__ void __launch_bounds__(kThreads) vocab_stats(Params p) {
  const int chunk = blockIdx.x, position = blockIdx.y;
  const Row<T> row{static_cast<const T*>(p.logits) + static_cast<int64_t>(position) * p.vocab,
                   p.mask_token_id};
  const int begin = chunk * p.chunk, end = min(p.vocab, begin + p.chunk);
  Softmax plain{-INFINITY, 0.f, 0}, tempered{-INFINITY, 0.f, 0};
  for_each(row, begin, end, p.vectorised, [&](float x, int v) {
    push(plain, x, v);
    if (kTempered) push(tempered, x * p.inv_temperature, v);
  });
  __shared__ Softmax scratch[kThreads / 32];
  plain = cta_reduce(plain, merge, scratch);
  if (kTempered) tempered = cta_reduce(tempered, merge, scratch);
  if (threadIdx.x == 0) {
    Partial& out = p.partials[static_cast<int64_t>(position) * p.chunks + chunk];
    out = Partial{plain.max, plain.sum, tempered.max, tempered.sum, -INFINITY, plain.index, {0, 0}};
  }
}

// Second pass when sampling: argmax over the chunk of log_softmax(x / T) + gumbel, the
// tempered log-normaliser coming from all chunks' stats of this position.
template <typename T>
__global__ void __launch_bounds__(kThreads) tempered_argmax(Params p, int block) {
  const int chunk = blockIdx.x, position = blockIdx.y;
  const Partial* stats = p.partials + static_cast<int64_t>(position) * p.chunks;
  Softmax total{-INFINITY, 0.f, 0};
  for (int c = 0; c < p.chunks; ++c) total = merge(total, Softmax{stats[c].tmax, stats[c].tsum, 0});
  const float log_sum = logf(total.sum);
  const Row<T> row{static_cast<const T*>(p.logits) + static_cast<int64_t>(position) * p.vocab,
                   p.mask_token_id};
  const int b = position / block, s = position % block;
  uint32_t key = fmix32(static_cast<uint32_t>(p.seeds[b]));
  key = fmix32(key ^ static_cast<uint32_t>(p.step_key));
  key = fmix32(key ^ static_cast<uint32_t>(s));
  Best best{-INFINITY, 0x7fffffff};
  const int begin = chunk * p.chunk, end = min(p.vocab, begin + p.chunk);
  for_each(row, begin, end, p.vectorised, [&](float x, int v) {
    const float log_prob = (x * p.inv_temperature - total.max) - log_sum;
    if (log_prob + kGumbelBound < best.score) return;  // fp32 rounding is monotonic: exact
    keep_best(best.score, best.index, log_prob + gumbel(key, v), v);
  });
  __shared__ Best scratch[kThreads / 32];
  best = cta_reduce(best, [](Best a, Best c) {
    keep_best(a.score, a.index, c.score, c.index);
    return a;
  }, scratch);
  if (threadIdx.x == 0) {
    Partial& out = p.partials[static_cast<int64_t>(position) * p.chunks + chunk];
    out.best = best.score;
    out.index = best.index;
  }
}

struct Prediction {
  int token;
  float prob;
};

// One position's chunks merged: the drawn token, or the greedy one when no draw found a score
// above -inf (+inf logits make them all NaN), and its untempered probability, NaN counted as 0.
template <typename T>
__device__ Prediction predict(const Params& p, bool tempered, int64_t at) {
  const Partial* parts = p.partials + at * p.chunks;
  Softmax plain{-INFINITY, 0.f, 0};
  Best sampled{-INFINITY, 0x7fffffff};
  for (int c = 0; c < p.chunks; ++c) {
    plain = merge(plain, Softmax{parts[c].max, parts[c].sum, parts[c].index});
    if (tempered) keep_best(sampled.score, sampled.index, parts[c].best, parts[c].index);
  }
  const int token = tempered && sampled.score > -INFINITY ? sampled.index : plain.index;
  const Row<T> row{static_cast<const T*>(p.logits) + at * p.vocab, p.mask_token_id};
  const float prob = expf((row.at(token) - plain.max) - logf(plain.sum));
  return {token, isnan(prob) ? 0.f : prob};
}

// policy.commit_counts for one row: the last step commits every masked position.
__device__ __forceinline__ int commit_count(int n_masked, int n_above, int64_t steps_left) {
  if (steps_left <= 1) return n_masked;
  const int k = n_above > 0 ? n_above : 1;
  const int min_commit = static_cast<int>((n_masked + steps_left - 1) / steps_left);
  return min(max(k, min_commit), n_masked);
}

// One CTA per row, one thread per block position.
template <typename T>
__global__ void commit_rule(Params p, bool tempered, const int64_t* __restrict__ block,
                            int64_t* __restrict__ next_block, float* __restrict__ confidence,
                            int64_t* __restrict__ masked_count, int width) {
  extern __shared__ float conf[];
  int* masked = reinterpret_cast<int*>(conf + width);
  __shared__ int n_masked, n_above, n_left;
  const int b = blockIdx.x, i = threadIdx.x;
  const int64_t at = static_cast<int64_t>(b) * width + i;
  if (i == 0) n_masked = n_above = n_left = 0;
  __syncthreads();
  int64_t pred = 0;
  if (i < width) {
    const Prediction guess = predict<T>(p, tempered, at);
    pred = guess.token;
    masked[i] = block[at] == p.mask_token_id;
    conf[i] = masked[i] ? guess.prob : INFINITY;
    if (masked[i]) {
      atomicAdd(&n_masked, 1);
      if (conf[i] > p.threshold[b]) atomicAdd(&n_above, 1);
    }
  }
  __syncthreads();
  if (i < width) {
    const int commits = commit_count(n_masked, n_above, p.steps_left[b]);
    int rank = 0;
    for (int j = 0; j < width; ++j)
      if (masked[j] && (conf[j] > conf[i] || (conf[j] == conf[i] && j < i))) ++rank;
    const int64_t next = masked[i] && rank < commits ? pred : block[at];
    next_block[at] = next;
    confidence[at] = conf[i];
    if (next == p.mask_token_id) atomicAdd(&n_left, 1);
  }
  __syncthreads();
  if (i == 0) masked_count[b] = n_left;
}

// Chunks worth having for one position: each at least kMinChunkElems long.
int64_t max_chunks(int vocab) {
  return std::min((vocab + kMinChunkElems - 1) / kMinChunkElems, kMaxChunks);
}

// Chunks per position: enough CTAs for kCtasPerSm per SM, at most max_chunks, and no more than
// `workspace_bytes` holds.
int choose_chunks(int64_t positions, int vocab, int64_t workspace_bytes) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  int64_t chunks = (static_cast<int64_t>(kCtasPerSm) * sms + positions - 1) / positions;
  chunks = std::min(chunks, max_chunks(vocab));
  chunks = std::min(chunks, workspace_bytes / (positions * static_cast<int64_t>(sizeof(Partial))));
  return static_cast<int>(std::max<int64_t>(chunks, 1));
}

// Enough for this many positions and vocabulary, and every smaller problem, on a GPU of up to
// kWorkspaceSms SMs: ceil(kCtasPerSm * sms / positions) chunks of `positions` partials are at
// most kCtasPerSm * sms + positions. Both terms grow with every dimension.
int64_t workspace_bytes(int64_t positions, int vocab) {
  const int64_t partials = std::min(positions * max_chunks(vocab),
                                    positions + int64_t{kCtasPerSm} * kWorkspaceSms);
  return partials * static_cast<int64_t>(sizeof(Partial));
}

// Each pointer as its loads and stores need it (twotower_plugins.h).
bool aligned_operands(const void* logits, int dtype, const int64_t* block,
                      const int64_t* next_block, const float* confidence,
                      const int64_t* masked_count, const int64_t* seeds, const void* workspace,
                      const float* threshold, const int64_t* steps_left) {
  const uintptr_t element = dtype == TT_FLOAT32 ? sizeof(float) : sizeof(__half);
  return aligned(logits, element) && aligned(block, 8) && aligned(next_block, 8) &&
         aligned(masked_count, 8) && aligned(seeds, 8) && aligned(steps_left, 8) &&
         aligned(confidence, 4) && aligned(threshold, 4) && aligned(workspace, alignof(Partial));
}

template <typename T>
int launch(Params p, const int64_t* block, int64_t* next_block, float* confidence,
           int64_t* masked_count, int batch, int width, bool tempered, cudaStream_t stream) {
  p.vectorised = p.vocab % (16 / sizeof(T)) == 0 &&
                 reinterpret_cast<uintptr_t>(p.logits) % 16 == 0;
  const dim3 grid(p.chunks, batch * width);
  if (tempered) {
    vocab_stats<T, true><<<grid, kThreads, 0, stream>>>(p);
    tempered_argmax<T><<<grid, kThreads, 0, stream>>>(p, width);
  } else {
    vocab_stats<T, false><<<grid, kThreads, 0, stream>>>(p);
  }
  const size_t shared = static_cast<size_t>(width) * (sizeof(float) + sizeof(int));
  commit_rule<T><<<batch, (width + 31) / 32 * 32, shared, stream>>>(
      p, tempered, block, next_block, confidence, masked_count, width);
  return launch_status();
}

}  // namespace
}  // namespace tt

extern "C" int64_t tt_confidence_unmask_workspace_bytes(int batch, int block, int vocab) {
  if (batch <= 0 || block <= 0 || vocab <= 0) return -1;
  return tt::workspace_bytes(static_cast<int64_t>(batch) * block, vocab);
}

extern "C" int tt_confidence_unmask(const void* logits, const int64_t* block,
                                    int64_t* next_block, float* confidence,
                                    int64_t* masked_count, const int64_t* seeds, void* workspace,
                                    int64_t workspace_bytes, int batch, int block_size,
                                    int vocab, int64_t mask_token_id, const float* threshold,
                                    const int64_t* steps_left, float temperature,
                                    int64_t step_key, int dtype, tt_stream_t stream) {
  const bool tempered = temperature > 0.f;
  if (!logits || !block || !next_block || !confidence || !masked_count || !workspace ||
      !threshold || !steps_left || (tempered && !seeds) || batch <= 0 || block_size <= 0 ||
      vocab <= 0 || mask_token_id < 0 || mask_token_id >= vocab || !(temperature >= 0.f))
    return TT_ERR_INVALID_ARGUMENT;
  const int64_t positions = static_cast<int64_t>(batch) * block_size;
  if ((dtype != TT_FLOAT32 && dtype != TT_BFLOAT16 && dtype != TT_FLOAT16) ||
      block_size > 1024 || positions > tt::kMaxGridYZ)
    return TT_ERR_UNSUPPORTED;
  if (!tt::aligned_operands(logits, dtype, block, next_block, confidence, masked_count, seeds,
                            workspace, threshold, steps_left))
    return TT_ERR_MISALIGNED;
  if (workspace_bytes < positions * static_cast<int64_t>(sizeof(tt::Partial)))
    return TT_ERR_WORKSPACE;
  tt::Params p{};
  p.logits = logits;
  p.seeds = seeds;
  p.threshold = threshold;
  p.steps_left = steps_left;
  p.partials = static_cast<tt::Partial*>(workspace);
  p.vocab = vocab;
  p.chunks = tt::choose_chunks(positions, vocab, workspace_bytes);
  // Chunk boundaries on multiples of 8 elements keep the 16-byte loads aligned.
  p.chunk = ((vocab + p.chunks - 1) / p.chunks + 7) / 8 * 8;
  p.mask_token_id = mask_token_id;
  p.step_key = step_key;
  // torch divides by a scalar temperature on CUDA as a multiplication by its fp32 reciprocal.
  p.inv_temperature = tempered ? 1.f / temperature : 0.f;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case TT_FLOAT32:
      return tt::launch<float>(p, block, next_block, confidence, masked_count, batch, block_size,
                               tempered, s);
    case TT_FLOAT16:
      return tt::launch<__half>(p, block, next_block, confidence, masked_count, batch,
                                block_size, tempered, s);
    default:
      return tt::launch<__nv_bfloat16>(p, block, next_block, confidence, masked_count, batch,
                                       block_size, tempered, s);
  }
}

extern "C" const char* tt_error_string(int code) {
  switch (code) {
    case TT_OK: return "ok";
    case TT_ERR_INVALID_ARGUMENT: return "invalid argument";
    case TT_ERR_UNSUPPORTED: return "unsupported dtype, head size or shape";
    case TT_ERR_WORKSPACE: return "workspace too small";
    case TT_ERR_LAUNCH: return "CUDA launch failed";
    case TT_ERR_MISALIGNED:
      return "misaligned pointer: each argument's alignment is in twotower_plugins.h";
    default: return "unknown error";
  }
}
