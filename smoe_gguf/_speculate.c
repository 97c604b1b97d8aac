/* Speculation at a decoded token's top-k gates, without entering Python.
 *
 * The method is speculate.py's (Speculator._guess_token and LookaheadStats): at the gate of layer
 * L, the router input x_L (the second source of ffn_moe_logits-L) times each guessed layer's
 * plain projection (its router scaled by the norm ratio) gives that layer's guessed logits; where
 * its route fit has a map, the map of [those logits, L's own logits, 1] takes their place, and
 * where the fit takes samples, those features are kept until the guessed layer's gate computes
 * its own logits, and the sample goes to Python (spec_native.py hands it to route_fit). Experts are ranked by the
 * layer's selection score; the first n_guess above the threshold form the guess set, and those
 * whose chance of use by rank (p_used, counted by the scoring below and re-estimated by Python)
 * reaches the cost model's bar are protected; the ones neither resident nor in flight are listed
 * for Python to prefetch (a guess for a layer beyond the next one only where its chance also
 * reaches bar_ahead more), the only reason this path enters Python. Guesses are scored against
 * the picks of the layer they guessed, into the same counters speculate.py reports.
 *
 * Called on the thread that runs llama_decode, inside the gate callback (_gatecb.c), only while
 * Python's observers are paused. Offsets into struct ggml_tensor come from Python (ggml_abi.py).
 */
#include "_speculate.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static inline const char *name_of(const struct smoe_spec *s, const void *t) {
    return (const char *)t + s->off_name;
}

static inline const void *src_of(const struct smoe_spec *s, const void *t, int i) {
    return ((const void *const *)((const char *)t + s->off_src))[i];
}

/* The first tensor named `want` among the sources of `from`, breadth first, `depth` levels up
   (speculate._find_up); NULL if none. */
static const void *find_up(const struct smoe_spec *s, const void *from, const char *want, int depth) {
    const void *frontier[64], *next[64];
    int n = 1, m;
    frontier[0] = from;
    for (int d = 0; d <= depth && n > 0; d++) {
        m = 0;
        for (int i = 0; i < n; i++) {
            const void *t = frontier[i];
            if (strcmp(name_of(s, t), want) == 0) return t;
            for (int k = 0; k < s->n_src && m < 64; k++) {
                const void *u = src_of(s, t, k);
                if (u == NULL) continue;
                int dup = 0;
                for (int j = 0; j < m && !dup; j++) dup = next[j] == u;
                if (!dup) next[m++] = u;
            }
        }
        memcpy(frontier, next, (size_t)m * sizeof next[0]);
        n = m;
    }
    return NULL;
}

/* Read x_L (one token's row) into s->x: 1, or 0 where the graph is not as expected. */
static int router_input(struct smoe_spec *s, const void *topk, int32_t layer) {
    char want[64];
    snprintf(want, sizeof want, "ffn_moe_logits-%d", (int)layer);
    const void *logits = (const void *)(intptr_t)s->logits_at[layer];
    if ((const void *)(intptr_t)s->node_at[layer] != topk || logits == NULL || strcmp(name_of(s, logits), want) != 0) {
        logits = find_up(s, topk, want, s->search_depth);
        s->node_at[layer] = (int64_t)(intptr_t)topk;
        s->logits_at[layer] = (int64_t)(intptr_t)logits;
        if (logits == NULL) return 0;
    }
    const void *x = src_of(s, logits, 1);
    if (x == NULL) return 0;
    const int64_t *ne = (const int64_t *)((const char *)x + s->off_ne);
    const size_t *nb = (const size_t *)((const char *)x + s->off_nb);
    if (*(const int32_t *)x != 0 || nb[0] != 4 || ne[0] != s->n_embd || ne[1] != 1) return 0;  /* F32, one row */
    s->tensor_get(x, s->x, 0, (size_t)s->n_embd * 4);
    return 1;
}

/* Score the guesses pending for `layer` against one token's picks. */
static void score(struct smoe_spec *s, int32_t layer, const int32_t *picked, int32_t n_used) {
    const int32_t E = s->n_expert, R = s->max_rank, G = s->n_guess;
    int32_t n_actual = 0;
    for (int32_t c = 0; c < n_used; c++) {
        int32_t e = picked[c];
        if (e >= 0 && e < E && !s->seen[e]) {
            s->seen[e] = 1;
            n_actual++;
        }
    }
    for (int32_t a = 0; a < s->lookahead; a++) {
        int64_t slot = (int64_t)a * s->n_layer + layer;
        if (!s->pend_valid[slot]) continue;
        s->pend_valid[slot] = 0;
        const int32_t *order = s->pend_order + slot * R;
        const float *p = s->pend_p + slot * G;
        int64_t cum[R + 1];
        cum[0] = 0;
        for (int32_t r = 0; r < R; r++) {
            int hit = s->seen[order[r]] != 0;
            s->rank_hits[a][(int64_t)layer * R + r] += hit;
            cum[r + 1] = cum[r] + hit;
        }
        s->scored[a][layer]++;
        int32_t m = 0;
        for (int32_t r = 0; r < G; r++) m += p[r] >= s->threshold;
        int64_t *pl = s->per_layer[a] + (int64_t)layer * 3;
        pl[0] += cum[m];
        pl[1] += m;
        pl[2] += n_actual;
        for (int32_t t = 0; t < s->n_sweep; t++) {
            int32_t ms = 0;
            for (int32_t r = 0; r < G; r++) ms += p[r] >= s->sweep[t];
            int64_t *bt = s->by_threshold[a] + (int64_t)t * 3;
            bt[0] += cum[ms];
            bt[1] += ms;
            bt[2] += n_actual;
        }
        s->waiting[a]++;
    }
    for (int32_t c = 0; c < n_used; c++) {
        if (picked[c] >= 0 && picked[c] < E) s->seen[picked[c]] = 0;
    }
}

/* out[E] = b + x @ m (m: rows of `stride` floats). */
static void matvec(const struct smoe_spec *s, const float *m, int64_t stride, const float *b, float *out) {
    const int32_t E = s->n_expert;
    for (int32_t e = 0; e < E; e++) out[e] = b[e];
    for (int32_t i = 0; i < s->n_embd; i++) {
        const float xi = s->x[i];
        const float *row = m + (int64_t)i * stride;
        for (int32_t e = 0; e < E; e++) out[e] += xi * row[e];
    }
}

/* out[E] = feat[2E + 1] @ w (the fitted map: the last row is the constant's). */
static void fitted(const struct smoe_spec *s, const float *feat, const float *w, float *out) {
    const int32_t E = s->n_expert;
    const float *last = w + (int64_t)2 * E * E;
    for (int32_t e = 0; e < E; e++) out[e] = last[e];
    for (int32_t j = 0; j < 2 * E; j++) {
        const float fj = feat[j];
        const float *row = w + (int64_t)j * E;
        for (int32_t e = 0; e < E; e++) out[e] += fj * row[e];
    }
}

/* Layer `target`'s experts by selection rank from its guessed `logits` into order[max_rank],
   their router probabilities into p_out[n_guess] (speculate.Speculator._ranked). */
static void rank(struct smoe_spec *s, int32_t target, const float *logits, int32_t *order, float *p_out) {
    const int32_t E = s->n_expert, R = s->max_rank;
    float *p = s->work + E, *score_ = s->work + 2 * E;
    float mx = logits[0];
    for (int32_t e = 1; e < E; e++) mx = logits[e] > mx ? logits[e] : mx;
    float sum = 0.0f;
    for (int32_t e = 0; e < E; e++) sum += (p[e] = expf(logits[e] - mx));
    for (int32_t e = 0; e < E; e++) p[e] /= sum;
    const float *sel = (const float *)(intptr_t)s->sel_bias[target];
    const float *sc = p;
    if (sel != NULL) {
        for (int32_t e = 0; e < E; e++) score_[e] = (s->sigmoid ? 1.0f / (1.0f + expf(-logits[e])) : p[e]) + sel[e];
        sc = score_;
    }
    /* the first R by score, ties to the lower index (a stable sort's order) */
    for (int32_t r = 0; r < R; r++) {
        int32_t best = -1;
        for (int32_t e = 0; e < E; e++) {
            if (s->seen[e]) continue;
            if (best < 0 || sc[e] > sc[best]) best = e;
        }
        s->seen[best] = 1;
        order[r] = best;
    }
    for (int32_t r = 0; r < R; r++) s->seen[order[r]] = 0;
    for (int32_t r = 0; r < s->n_guess; r++) p_out[r] = p[order[r]];
}

/* The fits' samples that waited for this layer's own logits. */
static void take_samples(struct smoe_spec *s, int32_t layer, const float *own) {
    const int32_t E = s->n_expert, F = 2 * E + 1;
    for (int32_t a = 0; a < s->lookahead; a++) {
        int64_t pend = (int64_t)a * s->n_layer + layer;
        if (!s->feat_valid[pend]) continue;
        s->feat_valid[pend] = 0;
        if (own == NULL) continue;
        if (s->n_samples >= s->sample_cap) continue;  /* a few tokens' room: Python takes them before each token */
        float *row = s->samples + (int64_t)s->n_samples * (F + E);
        memcpy(row, s->pend_feat + pend * F, (size_t)F * sizeof(float));
        memcpy(row + F, own, (size_t)E * sizeof(float));
        s->sample_pair[2 * s->n_samples] = s->feat_src[pend];
        s->sample_pair[2 * s->n_samples + 1] = layer;
        s->n_samples++;
    }
}

int32_t smoe_spec_gate(struct smoe_spec *s, const void *topk, int32_t layer, const int32_t *picked, int32_t n_used) {
    const int32_t E = s->n_expert, R = s->max_rank, G = s->n_guess, F = 2 * E + 1;
    s->pf_n = 0;
    if (layer < 0 || layer >= s->n_layer) return 0;
    if (layer <= s->last_layer) {  /* a new pass over the layers: what is left of the last one is stale */
        memset(s->protect, 0, (size_t)s->n_layer * (size_t)E);
        smoe_spec_reset(s);
    }
    s->last_layer = layer;
    score(s, layer, picked, n_used);

    int guessing = 0, sampling = 0;
    for (int32_t a = 0; a < s->lookahead; a++) {
        int64_t slot = (int64_t)layer * s->lookahead + a;
        guessing |= s->target[slot] >= 0 && s->matrix[slot] != 0;
        sampling |= s->feat_valid[(int64_t)a * s->n_layer + layer];
    }
    if (!guessing && !sampling) return 0;
    if (!router_input(s, topk, layer)) {
        s->unlocated++;
        take_samples(s, layer, NULL);
        return 0;
    }
    float *logits = s->work, *own = s->work + 3 * E;
    const float *own_m = (const float *)(intptr_t)s->own_matrix[layer];
    if (own_m != NULL) matvec(s, own_m, s->own_stride[layer], (const float *)(intptr_t)s->own_bias[layer], own);
    take_samples(s, layer, own_m != NULL ? own : NULL);
    if (!guessing) return 0;

    const int full = s->ledger[0] + s->max_leaf_cost > s->ledger[1];
    const double bar = full ? s->bar_full : s->bar_free;
    for (int32_t a = 0; a < s->lookahead; a++) {
        int64_t slot = (int64_t)layer * s->lookahead + a;
        int32_t t = s->target[slot];
        if (t < 0 || s->matrix[slot] == 0) continue;
        int64_t pend = (int64_t)a * s->n_layer + t;
        matvec(s, (const float *)(intptr_t)s->matrix[slot], s->stride[slot], (const float *)(intptr_t)s->bias[slot], logits);
        if (own_m != NULL && (s->wanted[slot] || s->fit[slot] != 0)) {
            float *feat = s->pend_feat + pend * F;  /* [plain, own, 1] */
            memcpy(feat, logits, (size_t)E * sizeof(float));
            memcpy(feat + E, own, (size_t)E * sizeof(float));
            feat[2 * E] = 1.0f;
            if (s->wanted[slot]) {
                s->feat_valid[pend] = 1;
                s->feat_src[pend] = layer;
            }
            if (s->fit[slot] != 0) fitted(s, feat, (const float *)(intptr_t)s->fit[slot], logits);
        }
        int32_t *order = s->pend_order + pend * R;
        float *p = s->pend_p + pend * G;
        rank(s, t, logits, order, p);
        s->pend_valid[pend] = 1;
        const double *pu = s->p_used + pend * R;
        uint8_t *prot = s->protect + (int64_t)t * E;
        memset(prot, 0, (size_t)E);  /* the newest guess for a layer replaces an older one */
        for (int32_t r = 0; r < G; r++) {
            if (p[r] < s->threshold) continue;
            if (pu[r] < bar) {
                s->skipped++;
                continue;
            }
            int32_t e = order[r];
            int64_t k = (int64_t)t * E + e;
            prot[e] = 1;
            s->protected_leaves++;
            if (__atomic_load_n(&s->resident[k], __ATOMIC_ACQUIRE)) continue;
            if (a > 0 && pu[r] < bar + s->bar_ahead) continue;  /* guessed again, better, at the next layer */
            if (s->in_flight != NULL && __atomic_load_n(&s->in_flight[k], __ATOMIC_ACQUIRE)) continue;
            /* insert by chance of use, most likely first (equal chances keep their order) */
            int32_t i = s->pf_n++;
            while (i > 0 && s->pf_prio[i - 1] < pu[r]) {
                s->pf_layer[i] = s->pf_layer[i - 1];
                s->pf_expert[i] = s->pf_expert[i - 1];
                s->pf_prio[i] = s->pf_prio[i - 1];
                i--;
            }
            s->pf_layer[i] = t;
            s->pf_expert[i] = e;
            s->pf_prio[i] = pu[r];
        }
    }
    s->guesses++;
    return s->pf_n;
}

void smoe_spec_reset(struct smoe_spec *s) {
    memset(s->pend_valid, 0, (size_t)s->lookahead * (size_t)s->n_layer);
    memset(s->feat_valid, 0, (size_t)s->lookahead * (size_t)s->n_layer);
    s->last_layer = -1;
}

size_t smoe_spec_sizeof(void) { return sizeof(struct smoe_spec); }
