// ctxkv/kvcache.h: the decoder's cache, KVCache, and where a slot lives. Shared by both programs
// (in the CUDA program mem, ring, running and scratch are on the GPU; kept is on the host).
// Its life -- allocation, the prefill's fill and eviction, a decode step's slot -- is in
// ctxkv/decode.h; which tokens a policy keeps, in ctxkv/kvpolicy.h.
#ifndef CTXKV_KVCACHE_H
#define CTXKV_KVCACHE_H
#include "kvpolicy.h"
#ifdef __CUDACC__
#define KV_HOST_DEVICE __host__ __device__ inline
#else
#define KV_HOST_DEVICE static inline
#endif

// Per layer and token the cache holds exactly what the layer's variant needs to attend later
// (its cache_write; sizes: attn_kv_elements), in fp32 in both programs, so the byte counts are
// the same (a bf16 cache would be --kv-report's bf16 figure). Under an eviction policy a slot
// holds the token the policy put there: slots and positions part, and each selection unit of a
// slot may hold a different position (snapkv).
typedef struct {
    int batch;          // sequences decoded together (B); all have the same length
    int capacity;       // slots each sequence has per layer (kv_policy_slots)
    int positions;      // tokens each sequence can be fed in all (prompt + new)
    int len;            // slots filled
    int pos;            // tokens fed so far: the position of the next one
    int write_slot, n_attend; // this decode step: the new token's slot, and the slots it attends over
    KVPolicy policy;
    size_t per_token;   // floats per token per cached layer (attn_kv_elements of layers 1..)
    int first_layer;    // first layer with a per-token cache (1 when layer 0 is ctxkv)
    float *mem;         // (L − first_layer, B, capacity, per_token)
    int ring_len;       // ctxkv: contexts kept, min(positions, (M−1)·I+1); context s at s % ring_len
    float *ring;        // (B, ring_len, d_c)
    float *running;     // (B, d_c) c_{pos−1}, the input of the next ContextBlock step
    size_t bytes;       // bytes of mem + ring + running
    int *kept;          // host (L − first_layer, B, units, budget): the prompt position of each slot after
                        // a compressing prefill (bookkeeping for tests, not part of bytes); NULL otherwise
    float *scratch;     // per (sequence, head): scores, MLA's latents, ctxkv's slot keys/values
} KVCache;

KV_HOST_DEVICE float *kv_slot(const KVCache *kv, int l, int b, int slot) {
    return kv->mem + (((size_t)(l - kv->first_layer) * kv->batch + b) * kv->capacity + slot) * kv->per_token;
}
// floats from a sequence's slot to the next sequence's, in one layer
static size_t kv_seq_stride(const KVCache *kv) { return (size_t)kv->capacity * kv->per_token; }
#endif
