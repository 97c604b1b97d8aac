/* The token memo's per-token steps (token_memo.py), in C: a decoded token's later layers ranked
 * from its kept decodes, the guesses that pay chosen, its picks read from the gates' use counts
 * and scored, and its latest decode kept. Python keeps the memo itself (a dict of token ->
 * [KEEP, layers, n_used] int16 arrays, -1 for none) and hands these functions its arrays; they
 * run on the gate thread between decodes, hold the GIL (ctypes.PyDLL) and never wait.
 *
 * Layers here are the memo's own indices (its paged layers in order); ``layers`` maps them to the
 * residency's rows.
 */
#include <stdint.h>
#include <string.h>

/* Per memo layer, its experts by how often the token's kept decodes picked them, 2 per decode
 * and 1 more for the latest (ties: the lower expert first), ``max_rank`` of them, -1 past the
 * last expert picked. ``work``: n_expert int32 zeros, left zero. */
void smoe_memo_orders(const int16_t *kept, int32_t keep, int32_t n_layer, int32_t n_used, int32_t n_expert,
                      int32_t max_rank, int32_t *order, int32_t *work) {
    int32_t cand[512];
    for (int32_t l = 0; l < n_layer; l++) {
        int32_t n = 0;
        for (int32_t k = 0; k < keep; k++) {
            const int16_t *row = kept + ((int64_t)k * n_layer + l) * n_used;
            for (int32_t j = 0; j < n_used; j++) {
                int32_t e = row[j];
                if (e < 0 || e >= n_expert)
                    continue;
                if (work[e] == 0) {
                    if (n == (int32_t)(sizeof cand / sizeof cand[0]))
                        continue; /* more than keep * n_used: not a memo's row */
                    cand[n++] = e;
                }
                work[e] += k == 0 ? 3 : 2;
            }
        }
        /* insertion sort: score down, expert up */
        for (int32_t i = 1; i < n; i++) {
            int32_t e = cand[i], j = i - 1;
            while (j >= 0 && (work[cand[j]] < work[e] || (work[cand[j]] == work[e] && cand[j] > e))) {
                cand[j + 1] = cand[j];
                j--;
            }
            cand[j + 1] = e;
        }
        int32_t *out = order + (int64_t)l * max_rank;
        for (int32_t r = 0; r < max_rank; r++)
            out[r] = r < n ? cand[r] : -1;
        for (int32_t i = 0; i < n; i++)
            work[cand[i]] = 0;
    }
}

/* The guesses of memo layers 1.. (the first is the token guess's) whose chance of use (``p_used``,
 * [n_layer, max_rank]: per layer and rank) reaches ``bar``, the nearer layer first and by rank:
 * each protected (where ``protect`` is given), and listed where it is not resident and its chance
 * also reaches ``bar + ahead`` beyond the first of them (layer index 1). How many were listed. */
int32_t smoe_memo_select(const int32_t *order, int32_t n_layer, int32_t max_rank, int32_t n_expert,
                         const int64_t *layers, const double *p_used, double bar, double ahead,
                         const uint8_t *resident, uint8_t *protect, int32_t *out_layer, int32_t *out_expert,
                         double *out_p) {
    int32_t n = 0;
    for (int32_t l = 1; l < n_layer; l++) {
        const int32_t *o = order + (int64_t)l * max_rank;
        int64_t row = layers[l] * n_expert;
        double need = l == 1 ? bar : bar + ahead;
        for (int32_t r = 0; r < max_rank; r++) {
            int32_t e = o[r];
            if (e < 0)
                continue;
            double p = p_used[(int64_t)l * max_rank + r];
            if (p < bar)
                continue;
            if (protect)
                protect[row + e] = 1;
            if (!resident[row + e] && p >= need) {
                out_layer[n] = (int32_t)layers[l];
                out_expert[n] = e;
                out_p[n] = p;
                n++;
            }
        }
    }
    return n;
}

/* What each memo layer picked since ``uses0`` (its rows of the gates' use counts then): its first
 * ``n_used`` experts by number into ``row`` (-1 past them). Where ``order`` is given (the guess,
 * [n_layer, max_rank]), each gated layer's ranks are scored: ``scored`` +1 for every guess,
 * ``hits`` +1 for one the layer picked. How many layers were gated (0: none, nothing is scored). */
int32_t smoe_memo_score(const uint32_t *uses, const uint32_t *uses0, const int64_t *layers, int32_t n_layer,
                        int32_t n_expert, int32_t n_used, const int32_t *order, int32_t max_rank, int64_t *hits,
                        int64_t *scored, int16_t *row) {
    int32_t gated = 0;
    for (int32_t l = 0; l < n_layer; l++) {
        const uint32_t *now = uses + layers[l] * n_expert, *then = uses0 + (int64_t)l * n_expert;
        int16_t *out = row + (int64_t)l * n_used;
        int32_t n = 0;
        for (int32_t e = 0; e < n_expert; e++) {
            if (now[e] > then[e]) {
                if (n < n_used)
                    out[n] = (int16_t)e;
                n++;
            }
        }
        for (int32_t j = n; j < n_used; j++)
            out[j] = -1;
        if (!n)
            continue;
        gated++;
        if (!order)
            continue;
        const int32_t *o = order + (int64_t)l * max_rank;
        for (int32_t r = 0; r < max_rank; r++) {
            int32_t e = o[r];
            if (e < 0)
                continue;
            scored[(int64_t)l * max_rank + r]++;
            hits[(int64_t)l * max_rank + r] += now[e] > then[e];
        }
    }
    return gated;
}

/* ``row`` ([n_layer, n_used]) becomes the latest of a token's kept decodes ([keep, n_layer,
 * n_used]), the others moved one back (the oldest dropped); a layer of ``row`` that was not gated
 * (all -1) keeps what the decode before had. */
void smoe_memo_push(int16_t *kept, int32_t keep, int32_t n_layer, int32_t n_used, const int16_t *row) {
    int64_t size = (int64_t)n_layer * n_used;
    if (keep > 1)
        memmove(kept + size, kept, (size_t)((keep - 1) * size) * sizeof *kept);
    for (int32_t l = 0; l < n_layer; l++) {
        const int16_t *src = row + (int64_t)l * n_used;
        int ungated = 1;
        for (int32_t j = 0; j < n_used; j++)
            ungated &= src[j] < 0;
        if (ungated && keep > 1)
            continue; /* the moved copy of the decode before stays */
        memcpy(kept + (int64_t)l * n_used, src, (size_t)n_used * sizeof *kept);
    }
}
