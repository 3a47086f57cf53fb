/* trt-twotower plugin kernels: a plain C ABI.
 *
 * Every launcher takes device pointers, shapes, a dtype and a CUDA stream, enqueues its work on
 * that stream and returns 0 or one of the TT_ERR_* codes below (tt_error_string names them).
 * Every precondition that can be seen on the host (null pointers, shapes, dtypes, pointer
 * alignment, workspace size) is checked before any CUDA call, so a refused launch touches
 * neither the device nor the stream. Shapes and semantics are defined by
 * trt_twotower/fused_ops.py, which the GPU tests compare the kernels with.
 */
#ifndef TWOTOWER_PLUGINS_H
#define TWOTOWER_PLUGINS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void* tt_stream_t; /* a cudaStream_t */

enum tt_dtype { TT_FLOAT32 = 0, TT_FLOAT16 = 1, TT_BFLOAT16 = 2 };

enum tt_error {
  TT_OK = 0,
  TT_ERR_INVALID_ARGUMENT = 1, /* null pointer, non-positive dimension, heads not divisible */
  TT_ERR_UNSUPPORTED = 2,      /* a dtype, head size or shape the kernel does not handle */
  TT_ERR_WORKSPACE = 3,        /* the workspace cannot hold even one split's partials */
  TT_ERR_LAUNCH = 4,           /* the CUDA launch failed (cudaGetLastError) */
  TT_ERR_MISALIGNED = 5        /* a pointer is not aligned as its argument's comment says */
};

const char* tt_error_string(int code);

/* Block-bidirectional cross-attention (flash-decoding style split over the keys).
 * q [B,S,Hq,D]; ctx_k, ctx_v [B,Hkv,Lmax,D] with ctx_len[b] valid rows (0 allowed);
 * blk_k, blk_v [B,Hkv,S,D]; out [B,S,Hq,D]. No mask: every block query sees the valid prefix
 * and the whole block. q/k/v/out share `dtype` (fp16 or bf16); fp32 accumulation.
 * D in {16, 32, 64, 128}; B <= 65535; ctx_len is clamped to [0, Lmax].
 * Alignment: ctx_k, ctx_v, blk_k, blk_v 16 bytes (cp.async); q 4 bytes; out 2 bytes; ctx_len
 * and workspace 8 bytes.
 * `workspace` holds the per-split partial results. A launch uses as many splits as
 * `workspace_bytes` holds, up to the number that fills the device; less than one split's
 * partials (B*Hq*S*(D+2)*4 bytes) is an error. *_workspace_bytes depends only on the shape,
 * never on the device, and grows with every dimension: full parallelism on up to 192 SMs for
 * that shape and every smaller one, so a size computed for a profile's maximum shapes serves
 * every launch within it. */
int64_t tt_block_cross_attention_workspace_bytes(int batch, int block, int q_heads,
                                                 int kv_heads, int head_dim, int max_context);
int tt_block_cross_attention(const void* q, const void* ctx_k, const void* ctx_v,
                             const int64_t* ctx_len, const void* blk_k, const void* blk_v,
                             void* out, void* workspace, int64_t workspace_bytes, int batch,
                             int block, int q_heads, int kv_heads, int head_dim, int max_context,
                             int dtype, tt_stream_t stream);

/* Confidence unmasking, one diffusion step (trt_twotower.fused_ops.confidence_unmask).
 * logits [B,S,V] (fp32, fp16 or bf16); block, next_block [B,S] int64 token ids; confidence [B,S]
 * fp32 (+inf at positions already committed); masked_count [B] int64, positions of next_block
 * holding the mask token. mask_token_id's logit counts as -1e12. temperature 0: greedy (first
 * argmax); temperature > 0: Gumbel-max sampling with policy.gumbel_noise's counter-based noise
 * keyed by seeds [B] int64 (device memory; may be NULL when greedy) and step_key. The
 * confidence is the untempered probability of the chosen token; the commit rule and its
 * tie-breaking are trt_twotower.policy.commit_step's. `threshold` (fp32) and `steps_left`
 * (int64) are device arrays of one value per row [B] (rows of different requests share a
 * step), read by the kernel, so a caller whose values live on the device (a TensorRT plugin)
 * needs no copy to the host; steps_left <= 1 commits every masked position (the last step).
 * Logits that are not a number: a NaN logit counts as -inf, so it never becomes the
 * prediction; a position with no finite logit but the mask token's therefore predicts the mask
 * token with confidence 1 (the definition's answer for an all -inf row) and stays masked. When
 * sampling finds no comparable score (+inf logits make every tempered score NaN) the greedy
 * token is taken, and a confidence that is NaN counts as 0: the prediction is always a token
 * id in [0, V) and the commit ranking a strict order.
 * S <= 1024, B*S <= 65535. Alignment: logits to its element size; block, next_block,
 * masked_count, seeds and steps_left 8 bytes; confidence, threshold and workspace 4 bytes.
 * `workspace` holds per-(position, vocabulary chunk) partial results; as for the attention,
 * a launch uses as many chunks as the workspace holds (at least B*S*32 bytes), and
 * *_workspace_bytes depends only on the shape and grows with every dimension. */
int64_t tt_confidence_unmask_workspace_bytes(int batch, int block, int vocab);
int tt_confidence_unmask(const void* logits, const int64_t* block, int64_t* next_block,
                         float* confidence, int64_t* masked_count, const int64_t* seeds,
                         void* workspace, int64_t workspace_bytes, int batch, int block_size,
                         int vocab, int64_t mask_token_id, const float* threshold,
                         const int64_t* steps_left, float temperature, int64_t step_key,
                         int dtype, tt_stream_t stream);

#ifdef __cplusplus
}
#endif
#endif
