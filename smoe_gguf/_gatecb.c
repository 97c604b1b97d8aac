/* The router gate's hot path in C: llama.cpp's cb_eval, asked for every graph node.
 *
 * smoe_gguf/gate.py owns the state (a struct smoe_gate it allocates with ctypes, and numpy arrays
 * it points to). For every node the scheduler asks whether we want to see it: we answer from
 * a name-prefix table without entering Python. When a gated node has been computed:
 *   - a top-k node (kind 0) whose selected leaves are all resident is a hit: we stamp each
 *     leaf's last use and use count in the shared arrays (what the eviction policies read) and
 *     return, still without entering Python;
 *   - with native speculation on (_speculate.c), a decoded token's gate guesses the next layers
 *     here too; the native pager queues the prefetches it chose (without it, Python does);
 *   - anything else (a miss, or another kind of node) calls the Python hook, which makes the
 *     leaves resident (or reads the node) before the graph goes on. With every_gate set, every
 *     top-k gate calls it (a trace records all accesses; speculation reads the router input).
 * With gating off (every leaf resident under a budget that holds them all) every ask answers
 * false, so llama.cpp computes the graph in one piece exactly as it does without a callback.
 *
 * Offsets into struct ggml_tensor come from Python (ggml_abi.py, version-checked), so this file
 * does not include ggml headers. It is built as a Python extension only so that pip compiles
 * it; it is loaded with ctypes.
 */
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_pager.h"
#include "_speculate.h"

#define SMOE_MAX_PREFIX 4
#define SMOE_PREFIX_LEN 32
#define KIND_OBSERVE 2  /* a top-k gate: Python calls the observers only */
#define KIND_SERVE 3    /* a top-k gate whose observers were called: Python serves it only */
#define KIND_PREFETCH 4 /* native speculation listed leaves for Python to prefetch (spec->pf_*) */

typedef void (*tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);
typedef int32_t (*slow_fn)(void *tensor, int32_t kind, int32_t layer, int32_t n_tokens);

struct smoe_gate {
    int32_t gating;          /* 0: answer false to every ask (no graph splits) */
    int32_t n_prefix;
    int32_t prefix_len[SMOE_MAX_PREFIX];
    int32_t kind[SMOE_MAX_PREFIX];  /* 0: top-k ids (fast path), other: always Python */
    char prefix[SMOE_MAX_PREFIX][SMOE_PREFIX_LEN];
    int64_t off_ne, off_nb, off_name;
    int32_t n_layer, n_expert;
    uint8_t *resident;       /* [n_layer * n_expert]: 1 when the leaf is in the X-Slot */
    uint64_t *last_use;      /* [n_layer * n_expert]: clock of the last access */
    uint32_t *uses;          /* [n_layer * n_expert]: number of gates that selected the leaf */
    uint64_t *clock;         /* [1]: +1 per top-k gate (shared with Python's ticks) */
    double *freq;            /* [n_layer * n_expert]: lfru's score as of the last use (policy.py) */
    double half_life;        /* of that score, in gates */
    double token_weight;     /* added to it per token beyond the first that picks a leaf in one gate */
    uint64_t fast_hits;      /* leaf hits served here (distinct per gate) */
    uint64_t fast_gates;     /* top-k gates served here */
    int32_t *ids;            /* scratch for the ids, ids_cap int32s */
    int64_t ids_cap;
    int32_t ids_rows, ids_cols;  /* shape of the last ids read: [n_tokens, n_used] */
    int64_t ids_row_stride;      /* in int32s */
    tensor_get_fn tensor_get;
    slow_fn slow;
    int32_t failed;          /* set when the Python hook returned 0 (failed, or lost an exception): read by Gate.check */
    int32_t every_gate;      /* 1: every top-k gate goes to Python (tracing, speculation) */
    uint8_t *node_wanted;    /* [n_layer]: nodes of other kinds are asked for only in layers
                                where this is set (NULL: always). Python sets it at a top-k gate
                                that left work for that layer's later node (down parts in
                                flight); the scheduler asks for a node only after the earlier
                                nodes' callbacks have returned, so the flag is set in time. */
    struct smoe_pager *pager;  /* serves misses natively where it can (NULL, or disabled: Python) */
    struct smoe_spec *spec;    /* guesses a decoded token's gates while Python's observers are
                                  paused (NULL, or disabled: not at all) */
};

/* The Python path: a 0 stops the graph and marks the gate failed, whether the hook recorded its
   error or ctypes dropped one raised before the hook's first line (a signal handler's). */
static bool call_slow(struct smoe_gate *g, void *t, int32_t kind, int32_t layer, int32_t n_tokens) {
    if (g->slow(t, kind, layer, n_tokens) != 0) return true;
    g->failed = 1;
    return false;
}

static int match(const struct smoe_gate *g, const char *name) {
    for (int i = 0; i < g->n_prefix; i++) {
        if (memcmp(name, g->prefix[i], (size_t)g->prefix_len[i]) == 0) return i;
    }
    return -1;
}

bool smoe_gate_cb(void *t, bool ask, void *user_data) {
    struct smoe_gate *g = (struct smoe_gate *)user_data;
    const char *name = (const char *)t + g->off_name;
    if (ask) {
        if (!g->gating) return false;
        int k = match(g, name);
        if (k < 0) return false;
        if (g->kind[k] == 0 || g->node_wanted == NULL) return true;
        int32_t layer = (int32_t)atoi(name + g->prefix_len[k]);
        return layer < 0 || layer >= g->n_layer || g->node_wanted[layer];
    }

    int i = match(g, name);
    if (i < 0) return true;
    int32_t layer = (int32_t)atoi(name + g->prefix_len[i]);
    const int64_t *ne = (const int64_t *)((const char *)t + g->off_ne);
    const size_t *nb = (const size_t *)((const char *)t + g->off_nb);
    if (g->kind[i] != 0) return call_slow(g, t, g->kind[i], layer, (int32_t)ne[1]);

    int64_t n_used = ne[0], n_tokens = ne[1];
    if (n_tokens == 0) return true;  /* last layer of a micro-batch that outputs no logits */
    /* the node is a strided view of the argsort: rows are nb[1] bytes apart */
    size_t nbytes = (size_t)((n_tokens - 1) * (int64_t)nb[1] + n_used * 4);
    if ((int64_t)(nbytes / 4 + 1) > g->ids_cap || layer < 0 || layer >= g->n_layer) {
        return call_slow(g, t, -1, layer, (int32_t)n_tokens);  /* Python reads it itself */
    }
    g->tensor_get(t, g->ids, 0, nbytes);
    g->ids_rows = (int32_t)n_tokens;
    g->ids_cols = (int32_t)n_used;
    g->ids_row_stride = (int64_t)(nb[1] / 4);
    struct smoe_pager *pg = g->pager != NULL && g->pager->enabled ? g->pager : NULL;
    /* native speculation first, as the observers come first: its prefetches queue behind this
       gate's misses */
    if (n_tokens == 1 && !g->every_gate && g->spec != NULL && g->spec->enabled) {
        struct smoe_spec *s = g->spec;
        int32_t n_pf = smoe_spec_gate(s, t, layer, g->ids, (int32_t)n_used);
        if (n_pf > 0 && pg != NULL && pg->pf != NULL) {  /* queued in C, read by the pool */
            uint64_t queued = (uint64_t)smoe_pager_prefetch(pg, layer, g->ids, (int32_t)n_used, s->pf_layer,
                                                            s->pf_expert, s->pf_prio, n_pf);
            s->prefetched += queued;
            pg->pf_queued += queued;
        } else if (n_pf > 0 && !call_slow(g, t, KIND_PREFETCH, layer, 1))
            return false;
    }
    if (g->every_gate && pg == NULL) return call_slow(g, t, 0, layer, (int32_t)n_tokens);

    int64_t base = (int64_t)layer * g->n_expert;
    for (int64_t r = 0; r < n_tokens; r++) {
        const int32_t *row = g->ids + r * g->ids_row_stride;
        for (int64_t c = 0; c < n_used; c++) {
            int32_t e = row[c];
            if (e < 0 || e >= g->n_expert || !__atomic_load_n(&g->resident[base + e], __ATOMIC_ACQUIRE)) {
                /* a miss: the native pager, else Python. Observers first: what they prefetch
                   for the next layers is read while this gate's misses are (behind them). */
                if (pg == NULL) return call_slow(g, t, 0, layer, (int32_t)n_tokens);
                if (g->every_gate && !call_slow(g, t, KIND_OBSERVE, layer, (int32_t)n_tokens)) return false;
                if (!smoe_pager_serve(pg, layer, g->ids, n_tokens, n_used, g->ids_row_stride, &g->fast_hits))
                    return call_slow(g, t, KIND_SERVE, layer, (int32_t)n_tokens);
                g->fast_gates++;
                return true;
            }
        }
    }
    uint64_t now = __atomic_add_fetch(g->clock, 1, __ATOMIC_RELAXED);  /* native prefetches' landings read it */
    uint64_t hits = 0;
    for (int64_t r = 0; r < n_tokens; r++) {
        const int32_t *row = g->ids + r * g->ids_row_stride;
        for (int64_t c = 0; c < n_used; c++) {
            int64_t k = base + row[c];
            if (g->last_use[k] != now) {
                smoe_stamp_use(g->freq, g->last_use, g->uses, k, now, g->half_life);
                hits++;
            } else {  /* another token of the gate picked it */
                g->freq[k] += g->token_weight;
            }
        }
    }
    g->fast_hits += hits;
    g->fast_gates++;
    if (pg != NULL) memset(pg->protect + base, 0, (size_t)g->n_expert);  /* served: its guesses are spent */
    return g->every_gate ? call_slow(g, t, KIND_OBSERVE, layer, (int32_t)n_tokens) : true;
}

size_t smoe_gate_sizeof(void) { return sizeof(struct smoe_gate); }

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_gatecb", "ctypes-loaded gate callback", -1, NULL};

PyMODINIT_FUNC PyInit__gatecb(void) { return PyModule_Create(&moduledef); }
