/* trt-twotower plugin kernels: a plain C ABI.
 *
 * Every launcher takes device pointers, shapes, a dtype and a CUDA stream, enqueues its work on
 * that stream and returns 0 or one of the TT_ERR_* codes below (tt_error_string names them).
 * Shapes and semantics are defined by trt_twotower/fused_ops.py, which the GPU tests compare
 * the kernels with.
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
  TT_ERR_UNSUPPORTED = 2,      /* a dtype, head size or option the kernel does not handle */
  TT_ERR_WORKSPACE = 3,        /* the workspace given is smaller than *_workspace_bytes */
  TT_ERR_LAUNCH = 4            /* the CUDA launch failed (cudaGetLastError) */
};

const char* tt_error_string(int code);

/* Block-bidirectional cross-attention (flash-decoding style split over the keys).
 * q [B,S,Hq,D]; ctx_k, ctx_v [B,Hkv,Lmax,D] with ctx_len[b] valid rows (0 allowed);
 * blk_k, blk_v [B,Hkv,S,D]; out [B,S,Hq,D]. No mask: every block query sees the valid prefix
 * and the whole block. q/k/v/out share `dtype` (fp16 or bf16); fp32 accumulation.
 * D in {16, 32, 64, 128}; ctx_len is clamped to [0, Lmax]. `workspace` holds the per-split
 * partial results; its size depends on the current device's SM count. */
int64_t tt_block_cross_attention_workspace_bytes(int batch, int block, int q_heads,
                                                 int kv_heads, int head_dim, int max_context);
int tt_block_cross_attention(const void* q, const void* ctx_k, const void* ctx_v,
                             const int64_t* ctx_len, const void* blk_k, const void* blk_v,
                             void* out, void* workspace, int64_t workspace_bytes, int batch,
                             int block, int q_heads, int kv_heads, int head_dim, int max_context,
                             int dtype, tt_stream_t stream);

/* Confidence unmasking, one diffusion step (trt_twotower.fused_ops.confidence_unmask).
 * logits [B,S,V] (fp32, fp16 or bf16); block, next_block [B,S] int64 token ids; confidence [B,S]
 * fp32 (+inf at positions already committed); masked_count [B] int64, masked positions left
 * after the step. mask_token_id's logit counts as -1e12. temperature 0: greedy (first argmax);
 * temperature > 0: Gumbel-max sampling with policy.gumbel_noise's counter-based noise keyed by
 * seeds [B] int64 (device memory; may be NULL when greedy) and step_key. The confidence is the
 * untempered probability of the chosen token; the commit rule and its tie-breaking are
 * trt_twotower.policy.commit_step's. S <= 1024. `workspace` holds per-(position, vocabulary
 * chunk) partial results. */
int64_t tt_confidence_unmask_workspace_bytes(int batch, int block, int vocab);
int tt_confidence_unmask(const void* logits, const int64_t* block, int64_t* next_block,
                         float* confidence, int64_t* masked_count, const int64_t* seeds,
                         void* workspace, int64_t workspace_bytes, int batch, int block_size,
                         int vocab, int64_t mask_token_id, float threshold, int64_t steps_left,
                         float temperature, int64_t step_key, int dtype, tt_stream_t stream);

#ifdef __cplusplus
}
#endif
#endif
