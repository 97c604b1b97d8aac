/* Speculation at a decoded token's gates, in C (_speculate.c). spec_native.py owns the struct
   and mirrors it; speculate.py holds the method. */
#ifndef SMOE_SPECULATE_H
#define SMOE_SPECULATE_H
#include <stddef.h>
#include <stdint.h>

#define SMOE_SPEC_MAX_LOOKAHEAD 4
#define SMOE_SPEC_SWEEP 5

typedef void (*smoe_tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);

struct smoe_spec {
    int32_t enabled;             /* 1: single-token top-k gates are guessed here, not in Python */
    int32_t n_layer, n_expert, n_embd, lookahead, n_guess, max_rank, n_sweep;
    int32_t sigmoid;             /* the selection scores sigmoid(logits), not the softmax */
    int32_t n_src, search_depth; /* ggml's sources per tensor; nodes between top-k and its logits */
    int64_t off_ne, off_nb, off_src, off_name;  /* into struct ggml_tensor (type is at 0) */
    double threshold;            /* a guess's least router probability */
    double sweep[SMOE_SPEC_SWEEP];  /* thresholds whose precision and recall are counted */
    double bar_free, bar_full;   /* the cost model's bar with room left, and with the budget full */
    double bar_ahead;            /* added to the bar to prefetch a guess of lookahead 2 or more */
    int64_t max_leaf_cost;
    int64_t *ledger;             /* the residency's: [0] bytes charged, [1] the budget */
    uint8_t *resident, *protect, *in_flight;  /* [n_layer * n_expert]; in_flight may be NULL */
    int32_t *target;             /* [n_layer * lookahead]: the layer guessed at lookahead a + 1, or -1 */
    int64_t *matrix;             /* ... the plain projection: address of float32 rows [n_embd] of
                                    `stride` floats (row i: x[i]'s weights), 0: none */
    int64_t *stride;             /* ... floats from one row of the matrix to the next */
    int64_t *bias;               /* ... address of float32 [n_expert] */
    int64_t *fit;                /* ... address of a fitted map, float32 [2 * n_expert + 1, n_expert]
                                    from [plain logits, the gated layer's own logits, 1]; 0: plain */
    uint8_t *wanted;             /* ... 1: the pair's fit takes samples (route_fit) */
    int64_t *own_matrix, *own_stride, *own_bias;  /* [n_layer]: each layer's own router, as above */
    int64_t *sel_bias;           /* [n_layer]: address of float32 [n_expert] added for selection, 0: none */
    double *p_used;              /* [lookahead * n_layer * max_rank]: a guess's chance of use by rank */
    /* scoring, into speculate.LookaheadStats' arrays (one per lookahead) */
    int64_t *rank_hits[SMOE_SPEC_MAX_LOOKAHEAD];    /* [n_layer * max_rank] */
    int64_t *scored[SMOE_SPEC_MAX_LOOKAHEAD];       /* [n_layer] */
    int64_t *per_layer[SMOE_SPEC_MAX_LOOKAHEAD];    /* [n_layer * 3]: true positives, guessed, actual */
    int64_t *by_threshold[SMOE_SPEC_MAX_LOOKAHEAD]; /* [n_sweep * 3] */
    int64_t waiting[SMOE_SPEC_MAX_LOOKAHEAD];       /* scored since Python last re-estimated p_used */
    /* guesses not scored yet, per lookahead and guessed layer */
    int32_t *pend_order;         /* [lookahead * n_layer * max_rank] */
    float *pend_p;               /* [lookahead * n_layer * n_guess] */
    uint8_t *pend_valid;         /* [lookahead * n_layer] */
    float *pend_feat;            /* [lookahead * n_layer * (2 * n_expert + 1)]: a fit's features */
    uint8_t *feat_valid;         /* [lookahead * n_layer]: features wait for the guessed layer's logits */
    int32_t *feat_src;           /* [lookahead * n_layer]: the layer whose gate computed them */
    /* the fits' samples for Python: the pair (gated layer, guessed layer), features, then the
       guessed layer's own logits */
    float *samples;              /* [sample_cap * (3 * n_expert + 1)] */
    int32_t *sample_pair;        /* [sample_cap * 2] */
    int32_t sample_cap, n_samples;
    int32_t last_layer;          /* -1: a new pass over the layers begins */
    int64_t *node_at, *logits_at;  /* [n_layer]: the top-k node last seen, its ffn_moe_logits node */
    float *x;                    /* scratch [n_embd] */
    float *work;                 /* scratch [4 * n_expert] */
    uint8_t *seen;               /* scratch [n_expert], zero between calls */
    /* the prefetches for Python (Residency.prefetch), most likely first */
    int32_t *pf_layer, *pf_expert;  /* [lookahead * n_guess] */
    double *pf_prio;
    int32_t pf_n;
    uint64_t guesses, protected_leaves, skipped, unlocated, prefetched;  /* counters, read and zeroed by Python */
    smoe_tensor_get_fn tensor_get;
};

/* One decoded token's top-k gate of `layer` (node `topk`, picks `picked[n_used]`): score the
   guesses made for this layer, guess the layers ahead and protect the likely ones. Returns the
   number of prefetches listed in pf_* for Python to queue. */
int32_t smoe_spec_gate(struct smoe_spec *s, const void *topk, int32_t layer, const int32_t *picked, int32_t n_used);

/* Drop the guesses not scored yet (not their protection: Python clears that). */
void smoe_spec_reset(struct smoe_spec *s);

#endif
