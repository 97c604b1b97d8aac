/* The native pager: a router gate's misses served in C, without Python and without the GIL.
 *
 * The gate (_gatecb.c) calls smoe_pager_serve() for a top-k node whose selected leaves are not all
 * resident. With the residency's own tables (pager.py points the struct at the numpy arrays that
 * residency.py, policy.py and the store keep, and at the X-Slot's per-expert flags) it:
 *   1. finds the misses; a miss whose shard is not open yet, whose prefetch failed, or a layer
 *      that is not paged, sends the whole gate to Python, before anything has changed. A miss
 *      that a prefetch has queued is taken from the I/O threads (it is already charged) and read
 *      with the others; one being read is waited for after them (the flight table, below);
 *   2. picks victims among resident leaves that are not pinned, predicted (protect), in flight or
 *      selected at this gate, with the residency's policy (the same scores as policy.py: lru,
 *      lfru, least-stale), until the misses fit the budget; if they cannot, Python serves the gate
 *      (it may cancel prefetches, drop predictions or wait for a landing);
 *   3. evicts them: each victim's pages move to a miss's slices where both are page-aligned
 *      (mremap, no release and no fault; the emptied slice stays mapped, and is mapped afresh
 *      to merge with its neighbours only where the slices that may each be a mapping of their own
 *      could pass the kernel's bound: merge_emptied), else are released (a fresh anonymous
 *      mapping; a boundary page that a resident neighbour slice still uses stays);
 *   4. charges the misses and hands all their parts to the reader threads at once, urgent, and
 *      waits for exactly those; XXH64 is checked by the readers on a part's first read;
 *   5. on success stamps the gate's leaves (clock, last use, use count), as the C hit path does;
 *      on a failed read gives the misses' pages and charge back and lets Python serve the gate
 *      again, which reads them once more and raises the part's name if the failure persists.
 * Evictions, and prefetches taken or waited for, are logged for Python (prefetch accounting);
 * counters are read and zeroed by Python. The in-flight table has a byte per leaf
 * (SMOE_FLIGHT_*): the gate takes a queued prefetch with a compare-and-swap that the I/O thread's
 * start of the same read (smoe_flight_start) loses, and waits on the flight signal for a
 * prefetch being read.
 * Native prefetches (smoe_pager_prefetch: speculation in C chose them at a gate) never enter Python
 * either: each is charged and given room at once, its leaf's flight byte set to NATIVE, and its
 * parts handed to the reader pool as a background call whose last read calls pf_landed on the
 * reader thread (the leaf resident, its landing logged for Python's books, its byte cleared). A
 * gate that needs one moves its reads ahead of the background queue and waits for it; a gate that
 * needs the room queued ones hold cancels the least likely one not yet started, else waits for one
 * to land, before it hands the gate to Python. A failed one stays FAILED (the gate goes to Python)
 * until smoe_pager_take_landings reaps it on the gate's thread.
 * Everything else runs on the thread that calls llama_decode; the reader threads and Python's I/O
 * threads touch other leaves only: a prefetch's leaf is in flight (never picked here) until it
 * has landed, and its X-Slot flags are changed under the shared lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "_pager.h"

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#ifndef MAP_NORESERVE
#define MAP_NORESERVE 0
#endif

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int map_anon(struct smoe_pager *p, uintptr_t lo, uintptr_t hi) {
    void *got = mmap((void *)lo, hi - lo, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
                     -1, 0);
    if (got != (void *)lo) return -1;
#ifdef MADV_NOHUGEPAGE
    if (p->thp_advise) (void)madvise((void *)lo, hi - lo, MADV_NOHUGEPAGE);
#endif
    return 0;
}

static inline int64_t slot_of(const struct smoe_pager *p, int32_t layer, int32_t part) {
    return (int64_t)layer * p->n_parts + part;
}

static inline uint8_t *flag_of(const struct smoe_pager *p, int64_t slot, int32_t e) {
    return (uint8_t *)(uintptr_t)p->t_flags[slot] + e;
}

static inline uintptr_t slice_addr(const struct smoe_pager *p, int64_t slot, int32_t e) {
    return (uintptr_t)p->t_addr[slot] + (uintptr_t)e * (uintptr_t)p->t_slice[slot];
}

/* Release slice e of a tensor (lock held): every page it touches that no resident neighbour
   touches (xslot.py's _free_span). */
static int release_slice(struct smoe_pager *p, int64_t slot, int32_t e) {
    uint8_t *flags = (uint8_t *)(uintptr_t)p->t_flags[slot];
    if (!flags[e]) return 0;
    flags[e] = 0;
    uintptr_t page = (uintptr_t)p->page, base = (uintptr_t)p->t_addr[slot], s = (uintptr_t)p->t_slice[slot];
    uintptr_t start = base + (uintptr_t)e * s, end = start + s;
    uintptr_t lo = start & ~(page - 1), hi = (end + page - 1) & ~(page - 1);
    if (lo < start) {  /* the first page holds the tail of earlier slices */
        int64_t first = lo > base ? (int64_t)((lo - base) / s) : 0;
        for (int64_t k = first; k < e; k++)
            if (flags[k]) { lo += page; break; }
    }
    if (end < hi) {  /* the last page holds the head of later slices */
        int64_t last = (int64_t)((hi - 1 - base) / s);
        if (last > p->t_nexp[slot] - 1) last = p->t_nexp[slot] - 1;
        for (int64_t k = e + 1; k <= last; k++)
            if (flags[k]) { hi -= page; break; }
    }
    return lo < hi ? map_anon(p, lo, hi) : 0;
}

/* Whether leaf (layer, e)'s pages can move to leaf (to_layer, to_e): the same parts, of the same
   page-aligned sizes. */
static int movable(const struct smoe_pager *p, int32_t layer, int32_t to_layer) {
    if (!p->can_move || p->layer_parts[layer] != p->layer_parts[to_layer]) return 0;
    for (int32_t i = 0; i < p->layer_parts[layer]; i++) {
        int64_t a = slot_of(p, layer, i), b = slot_of(p, to_layer, i);
        if (p->t_slice[a] != p->t_slice[b] || p->t_slice[a] % p->page || p->t_addr[a] % p->page ||
            p->t_addr[b] % p->page)
            return 0;
    }
    return 1;
}

/* Evict leaf (layer, e); with to_layer >= 0 its pages go to leaf (to_layer, to_e) where they can
   (that slice's flags are then set; the caller claims the others). Lock held. */
static void evict_leaf(struct smoe_pager *p, int32_t layer, int32_t e, int32_t to_layer, int32_t to_e) {
    int move = to_layer >= 0 && movable(p, layer, to_layer);
    for (int32_t i = 0; i < p->layer_parts[layer]; i++) {
        int64_t src = slot_of(p, layer, i);
        int moved = 0;
#ifdef __linux__
        int64_t dst = move ? slot_of(p, to_layer, i) : 0;
        if (move && p->can_move && *flag_of(p, src, e) && !*flag_of(p, dst, to_e)) {
            uintptr_t from = slice_addr(p, src, e), to = slice_addr(p, dst, to_e);
            size_t size = (size_t)p->t_slice[src];
            if (mremap((void *)from, size, size, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, (void *)to) == (void *)to) {
                *flag_of(p, src, e) = 0;
                *flag_of(p, dst, to_e) = 1;
                if (p->merge_emptied) (void)map_anon(p, from, from + size);  /* merges with its neighbours */
                p->moved_bytes += size;
                moved = 1;
            } else if (errno == EINVAL) {
                p->can_move = 0;  /* a kernel without MREMAP_DONTUNMAP */
            }
        }
#endif
        if (!moved) (void)release_slice(p, src, e);
    }
    (void)move;
    (void)to_e;
}

/* A leaf's eviction key under the policy (policy.py's scores): the smallest goes first; ties go
   to the least recently used, then the lowest index. */
struct order {
    double now;
    int32_t layer;
    int32_t policy;  /* p->policy, or least-stale for lfru while a prompt is gated (policy.py) */
};

static struct order order_at(const struct smoe_pager *p, double now, int32_t layer) {
    int32_t policy = p->policy == SMOE_POLICY_LFRU && *p->scan ? SMOE_POLICY_LEAST_STALE : p->policy;
    return (struct order){now, layer, policy};
}

static double key_of(const struct smoe_pager *p, int64_t k, const struct order *o) {
    int32_t n = p->n_layer;
    switch (o->policy) {
    case SMOE_POLICY_LFRU:
        return smoe_lfru_at(p->freq[k], p->last_use[k], o->now, p->half_life);
    case SMOE_POLICY_LEAST_STALE:
        return -(double)((((int32_t)(k / p->n_expert) - o->layer - 1) % n + n) % n);
    default:
        return 0.0;
    }
}

static void log_eviction(struct smoe_pager *p, int64_t k) {
    if (p->log_n < p->log_cap) {
        p->log[2 * p->log_n] = k;
        p->log[2 * p->log_n + 1] = (int64_t)p->last_use[k];
        p->log_n++;
    }
}

static void release_leaf(struct smoe_pager *p, int32_t layer, int32_t e) {
    for (int32_t i = 0; i < p->layer_parts[layer]; i++) (void)release_slice(p, slot_of(p, layer, i), e);
}

/* Victims until `over` bytes are free, in policy order, never a marked leaf (mark[]: those in use),
   pinned, predicted, in flight or unpaged; each is marked. Returns how many, or -1 (marks of the
   victims cleared) if not enough can go. Nothing else changes. */
static int32_t choose_victims(struct smoe_pager *p, int64_t over, const struct order *ord, int32_t *victim,
                              int32_t cap) {
    const int32_t E = p->n_expert;
    const int64_t n_all = (int64_t)p->n_layer * E;
    uint8_t *mark = p->mark;
    int32_t n = 0;
    while (over > 0) {
        int64_t best = -1;
        double best_key = 0.0;
        for (int64_t k = 0; k < n_all; k++) {
            if (!__atomic_load_n(&p->resident[k], __ATOMIC_ACQUIRE) || mark[k] || p->pinned[k] || p->protect[k] || p->cost[k / E] <= 0) continue;
            if (__atomic_load_n(&p->in_flight[k], __ATOMIC_ACQUIRE)) continue;
            double key = key_of(p, k, ord);
            if (best < 0 || key < best_key || (key == best_key && p->last_use[k] < p->last_use[best])) {
                best = k;
                best_key = key;
            }
        }
        if (best < 0 || n == cap) {
            for (int32_t i = 0; i < n; i++) mark[victim[i]] = 0;
            return -1;
        }
        mark[best] = 1;
        victim[n++] = (int32_t)best;  /* flat index < 2^31: n_layer * n_expert is checked in Python */
        over -= p->cost[best / E];
    }
    return n;
}

/* Evict the victims (lock held): the first n_into give their pages to leaves into[] of into_layer. */
static void evict_victims(struct smoe_pager *p, const int32_t *victim, int32_t n, int32_t into_layer,
                          const int32_t *into, int32_t n_into, uint64_t now) {
    const int32_t E = p->n_expert;
    for (int32_t j = 0; j < n; j++) {
        int64_t k = victim[j];
        int32_t vl = (int32_t)(k / E), ve = (int32_t)(k % E);
        p->mark[k] = 0;
        __atomic_store_n(&p->resident[k], 0, __ATOMIC_RELEASE);
        log_eviction(p, k);
        evict_leaf(p, vl, ve, j < n_into ? into_layer : -1, j < n_into ? into[j] : 0);
        p->ledger[0] -= p->cost[vl];
        p->evicted_at[k] = now;
        p->evictions++;
    }
}

static void log_flight(struct smoe_pager *p, int64_t k, int64_t event, int64_t waited_ns) {
    if (p->flight_log_n < p->flight_log_cap) {
        int64_t *t = p->flight_log + 3 * p->flight_log_n++;
        t[0] = k;
        t[1] = event;
        t[2] = waited_ns;
    }
}

static inline int flying(uint8_t f) { return f == SMOE_FLIGHT_LOADING || f == SMOE_FLIGHT_NATIVE; }

/* Wait until leaf k's flight byte is no longer LOADING or NATIVE (its I/O thread stores the change
   under the flight mutex and broadcasts); the byte then. */
static uint8_t wait_landing(struct smoe_pager *p, int64_t k) {
    uint8_t f = __atomic_load_n(&p->in_flight[k], __ATOMIC_ACQUIRE);
    if (!flying(f)) return f;
    pthread_mutex_lock(&p->flight->mutex);
    while (flying(f = __atomic_load_n(&p->in_flight[k], __ATOMIC_ACQUIRE)))
        pthread_cond_wait(&p->flight->cond, &p->flight->mutex);
    pthread_mutex_unlock(&p->flight->mutex);
    return f;
}

/* Queue leaf (layer, e)'s parts as jobs[*n_jobs] on, its slices claimed (lock held). */
static void add_jobs(struct smoe_pager *p, int32_t layer, int32_t e, struct smoe_job *jobs, int64_t *n_jobs) {
    int64_t k = (int64_t)layer * p->n_expert + e;
    for (int32_t part = 0; part < p->layer_parts[layer]; part++) {
        int64_t slot = slot_of(p, layer, part), pid = k * p->n_parts + part;
        *flag_of(p, slot, e) = 1;
        struct smoe_job *j = &jobs[(*n_jobs)++];
        memset(j, 0, sizeof *j);
        j->fd = p->fd[k];
        j->direct = p->direct[k];
        j->offset = p->offset[pid];
        j->length = p->t_slice[slot];
        j->dest = (void *)slice_addr(p, slot, e);
        j->check_xxh64 = p->check[pid] ? 1 : 0;
        j->xxh64 = p->xxh64[pid];
    }
}

/* ------------------------------------------------------------------ native prefetches */

/* Log a native prefetch's end (leaf k, SMOE_LANDED_*, the clock then) for Python; flight mutex
   held. Its room was owed since it was queued (landings_owed). */
static void log_landing(struct smoe_pager *p, int64_t k, int64_t what, uint64_t now) {
    int64_t *t = p->landings + 3 * p->landings_n++;
    t[0] = k;
    t[1] = what;
    t[2] = (int64_t)now;
}

/* A native prefetch's reads are over (a reader thread, outside the pool's lock): a likely leaf
   counts as just used (as Residency._landed does), the leaf is resident, its landing is logged and
   its flight byte cleared (or FAILED: the gate thread reaps it, smoe_pager_take_landings). */
static void pf_landed(struct smoe_call *call) {
    struct smoe_prefetch *f = (struct smoe_prefetch *)call;
    struct smoe_pager *p = f->pager;
    const int64_t k = f->leaf;
    const int32_t layer = (int32_t)(k / p->n_expert), n = p->layer_parts[layer];
    const struct smoe_job *jobs = p->pf_jobs + k * p->n_parts;
    const int failed = call->failed != 0;
    call->failed = 0;
    const uint64_t now = __atomic_load_n(p->clock, __ATOMIC_RELAXED);
    if (!failed) {
        for (int32_t part = 0; part < n; part++)
            if (jobs[part].check_xxh64 && !p->check_always) p->check[k * p->n_parts + part] = 0;
        if (f->prio >= SMOE_HOLD_BELOW) {  /* its lfru score is carried to now, not raised */
            p->freq[k] = smoe_lfru_at(p->freq[k], p->last_use[k], (double)now, p->half_life);
            p->last_use[k] = now;
        }
        __atomic_store_n(&p->resident[k], 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_lock(&p->flight->mutex);
    struct smoe_pf_counts *c = &p->pf_counts;
    for (int32_t part = 0; part < n; part++) {
        c->part_reads++;
        c->bytes_read += (uint64_t)jobs[part].bytes_read;
        c->in_place_reads += (uint64_t)jobs[part].in_place;
        c->checked_parts += (uint64_t)(jobs[part].check_xxh64 && !failed);
        c->read_seconds += jobs[part].read_seconds;
        c->hash_seconds += jobs[part].hash_seconds;
    }
    c->landed += !failed;
    c->failed += failed;
    log_landing(p, k, failed ? SMOE_LANDED_FAILED : SMOE_LANDED, now);
    __atomic_store_n(&p->in_flight[k], failed ? SMOE_FLIGHT_FAILED : 0, __ATOMIC_RELEASE);
    p->pf_flying--;
    pthread_cond_broadcast(&p->flight->cond);
    pthread_mutex_unlock(&p->flight->mutex);
}

/* Allocate the native prefetches' records: 0, or -1 (none: prefetches stay Python's). */
int32_t smoe_pager_prefetch_init(struct smoe_pager *p, void *cancel, void *promote) {
    const int64_t n_all = (int64_t)p->n_layer * p->n_expert;
    p->pf = calloc((size_t)n_all, sizeof *p->pf);
    p->pf_jobs = calloc((size_t)(n_all * p->n_parts), sizeof *p->pf_jobs);
    p->pf_also = calloc((size_t)n_all, sizeof *p->pf_also);
    p->landings_cap = n_all;
    p->landings = calloc((size_t)(3 * n_all), sizeof *p->landings);
    if (p->pf == NULL || p->pf_jobs == NULL || p->pf_also == NULL || p->landings == NULL) {
        smoe_pager_prefetch_free(p);
        return -1;
    }
    for (int64_t k = 0; k < n_all; k++) {
        p->pf[k].call.on_done = pf_landed;
        p->pf[k].pager = p;
        p->pf[k].leaf = k;
    }
    p->cancel = (smoe_pool_cancel_fn)cancel;
    p->promote = (smoe_pool_promote_fn)promote;
    return 0;
}

/* Leaf k's native prefetch, if in flight: its reads jump the queue, and it is waited for (gate
   thread). Its flight byte then: 0 (landed, or not in flight) or FAILED. */
uint8_t smoe_pager_await_leaf(struct smoe_pager *p, int64_t k) {
    if (p->pf == NULL || __atomic_load_n(&p->in_flight[k], __ATOMIC_ACQUIRE) != SMOE_FLIGHT_NATIVE) return 0;
    p->promote(p->pool, &p->pf[k].call);
    return wait_landing(p, k);
}

/* Wait until no native prefetch is in flight (the thread that calls llama_decode, between gates). */
void smoe_pager_wait_all(struct smoe_pager *p) {
    if (p->pf == NULL) return;
    pthread_mutex_lock(&p->flight->mutex);
    while (p->pf_flying > 0) pthread_cond_wait(&p->flight->cond, &p->flight->mutex);
    pthread_mutex_unlock(&p->flight->mutex);
}

/* Free the records (every prefetch landed: smoe_pager_wait_all first). */
void smoe_pager_prefetch_free(struct smoe_pager *p) {
    free(p->pf);
    free(p->pf_jobs);
    free(p->pf_also);
    free(p->landings);
    p->pf = NULL;
    p->pf_jobs = NULL;
    p->pf_also = NULL;
    p->landings = NULL;
    p->landings_cap = p->landings_n = p->landings_owed = 0;
}

/* Give a native prefetch that will not land (cancelled, failed) its pages and charge back, and
   clear its flight byte (gate thread). */
static void pf_drop(struct smoe_pager *p, int64_t k) {
    const int32_t layer = (int32_t)(k / p->n_expert), e = (int32_t)(k % p->n_expert);
    pthread_mutex_lock(p->lock);
    release_leaf(p, layer, e);
    pthread_mutex_unlock(p->lock);
    p->ledger[0] -= p->cost[layer];
    smoe_flight_store(p->flight, &p->in_flight[k], 0);
}

/* Room for a gate held by native prefetches (gate thread): cancel the least likely one not yet
   started, among those not marked (mark[]: the gate's own leaves), else wait for one to land.
   1 if one was cancelled or landed, 0 if none is in flight but the marked ones. */
int32_t smoe_pager_cancel_or_wait(struct smoe_pager *p) {
    if (p->pf == NULL) return 0;
    const int64_t n_all = (int64_t)p->n_layer * p->n_expert;
    int64_t *cand = p->pf_also;
    int64_t n = 0;
    for (int64_t k = 0; k < n_all; k++)
        if (__atomic_load_n(&p->in_flight[k], __ATOMIC_ACQUIRE) == SMOE_FLIGHT_NATIVE && !p->mark[k]) cand[n++] = k;
    if (n == 0) return 0;
    for (int64_t left = n; left > 0; left--) {  /* least likely first */
        int64_t at = 0;
        for (int64_t i = 1; i < left; i++)
            if (p->pf[cand[i]].prio < p->pf[cand[at]].prio) at = i;
        int64_t k = cand[at];
        cand[at] = cand[left - 1];
        if (p->cancel(p->pool, &p->pf[k].call)) {
            pf_drop(p, k);
            pthread_mutex_lock(&p->flight->mutex);
            p->pf_flying--;
            log_landing(p, k, SMOE_LANDED_CANCELLED, 0);
            pthread_mutex_unlock(&p->flight->mutex);
            return 1;
        }
    }
    pthread_mutex_lock(&p->flight->mutex);  /* all of them are being read: wait for one */
    const uint64_t seen = p->pf_counts.landed + p->pf_counts.failed;
    while (p->pf_flying > 0 && p->pf_counts.landed + p->pf_counts.failed == seen)
        pthread_cond_wait(&p->flight->cond, &p->flight->mutex);
    pthread_mutex_unlock(&p->flight->mutex);
    return 1;
}

/* Python's share of the native prefetches since the last call (gate thread, between gates): up to
   `cap` landings copied to out[3 * cap] (failed ones are reaped here: pages and charge back; a part
   not checked yet stays so) and the reads' counts, zeroed. Returns how many. */
int64_t smoe_pager_take_landings(struct smoe_pager *p, int64_t *out, int64_t cap, struct smoe_pf_counts *counts) {
    if (p->pf == NULL) return 0;
    pthread_mutex_lock(&p->flight->mutex);
    int64_t n = p->landings_n < cap ? p->landings_n : cap;
    memcpy(out, p->landings, (size_t)(3 * n) * sizeof *out);
    memmove(p->landings, p->landings + 3 * n, (size_t)(3 * (p->landings_n - n)) * sizeof *out);
    p->landings_n -= n;
    *counts = p->pf_counts;
    memset(&p->pf_counts, 0, sizeof p->pf_counts);
    pthread_mutex_unlock(&p->flight->mutex);
    counts->landed = counts->failed = 0;  /* counted from the landings */
    p->landings_owed -= n;
    for (int64_t i = 0; i < n; i++)
        if (out[3 * i + 1] == SMOE_LANDED_FAILED) pf_drop(p, out[3 * i]);
    return n;
}

int32_t smoe_pager_prefetch(struct smoe_pager *p, int32_t layer, const int32_t *in_use, int32_t n_in_use,
                            const int32_t *pf_layer, const int32_t *pf_expert, const double *prio, int32_t n) {
    if (p->pf == NULL || !p->enabled) return 0;
    const int32_t E = p->n_expert;
    int32_t queued = 0;
    for (int32_t i = 0; i < n; i++) {
        const int32_t l = pf_layer[i], e = pf_expert[i];
        if (l < 0 || l >= p->n_layer || e < 0 || e >= E || p->cost[l] <= 0) continue;
        const int64_t k = (int64_t)l * E + e;
        if (p->fd[k] < 0 || __atomic_load_n(&p->resident[k], __ATOMIC_ACQUIRE) ||
            __atomic_load_n(&p->in_flight[k], __ATOMIC_ACQUIRE))
            continue;
        if (p->landings_owed >= p->landings_cap ||
            !smoe_pager_make_room(p, layer, in_use, n_in_use, p->pf_also, queued, p->cost[l], l, e))
            break;
        p->ledger[0] += p->cost[l];
        if ((uint64_t)p->ledger[0] > p->peak) p->peak = (uint64_t)p->ledger[0];
        p->landings_owed++;
        __atomic_store_n(&p->in_flight[k], SMOE_FLIGHT_NATIVE, __ATOMIC_RELEASE);
        pthread_mutex_lock(&p->flight->mutex);
        p->pf_flying++;
        pthread_mutex_unlock(&p->flight->mutex);
        struct smoe_prefetch *f = &p->pf[k];
        struct smoe_job *jobs = p->pf_jobs + k * p->n_parts;
        int64_t n_jobs = 0;
        f->prio = prio[i];
        f->call.remaining = f->call.failed = 0;
        pthread_mutex_lock(p->lock);
        add_jobs(p, l, e, jobs, &n_jobs);
        pthread_mutex_unlock(p->lock);
        p->pf_also[queued++] = k;
        p->start(p->pool, &f->call, jobs, n_jobs, 0);
    }
    return queued;
}

int smoe_pager_serve(struct smoe_pager *p, int32_t layer, const int32_t *ids, int64_t rows, int64_t cols,
                     int64_t row_stride, uint64_t *gate_hits) {
    const int32_t E = p->n_expert;
    if (!p->enabled || layer < 0 || layer >= p->n_layer || p->cost[layer] <= 0) return 0;
    if (p->log_n >= p->log_cap - E || p->flight_log_n > p->flight_log_cap - E) return 0;  /* Python drains the logs first */
    const int64_t base = (int64_t)layer * E, cost = p->cost[layer];
    int32_t *wanted = p->scratch, *miss = p->scratch + E, *victim = p->scratch + 2 * E;
    int32_t *queued = p->scratch + 3 * E, *loading = p->scratch + 4 * E;
    int32_t n_w = 0, n_miss = 0, n_victim = 0, n_queued = 0, n_taken = 0, n_loading = 0;
    uint8_t *mark = p->mark;  /* all zero between calls; the wanted leaves are marked: never victims */
    int ok = 0;

    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) {
            int32_t e = ids[r * row_stride + c];
            if (e < 0 || e >= E) goto out;
            if (!mark[base + e]) {
                mark[base + e] = 1;
                wanted[n_w++] = e;
            }
        }
    }
    for (int32_t i = 0; i < n_w; i++) {
        int64_t k = base + wanted[i];
        /* in flight first: a prefetch sets resident before it leaves the flight (release) */
        uint8_t f = __atomic_load_n(&p->in_flight[k], __ATOMIC_ACQUIRE);
        if (f != 0 && !p->serve_flights) goto out;
        if (f == SMOE_FLIGHT_NATIVE) {  /* a native prefetch: its reads jump the queue, then it is waited for */
            p->promote(p->pool, &p->pf[k].call);
            loading[n_loading++] = wanted[i];
            continue;
        }
        if (f == SMOE_FLIGHT_LOADING) {
            loading[n_loading++] = wanted[i];
            continue;
        }
        if (f != 0 && f != SMOE_FLIGHT_QUEUED) goto out;  /* failed, or down parts: Python's */
        if (f == 0 && __atomic_load_n(&p->resident[k], __ATOMIC_ACQUIRE)) continue;
        if (p->fd[k] < 0) goto out;
        if (f == SMOE_FLIGHT_QUEUED)
            queued[n_queued++] = wanted[i];
        else
            miss[n_miss++] = wanted[i];
    }
    if ((int64_t)(n_miss + n_queued) * p->n_parts > p->jobs_cap) goto out;
    uint64_t t0 = now_ns();

    /* victims, chosen before anything else changes; the layer is being served: its guesses
       are spent (as Python does) */
    memset(p->protect + base, 0, (size_t)E);
    const uint64_t now = *p->clock + 1;
    struct order ord = order_at(p, (double)now, layer);
    /* native prefetches that hold the room are cancelled, or landed (evictable), first */
    while ((n_victim = choose_victims(p, p->ledger[0] + (int64_t)n_miss * cost - p->ledger[1], &ord, victim, E)) < 0) {
        if (!smoe_pager_cancel_or_wait(p)) {  /* Python may cancel its prefetches or drop predictions */
            n_victim = 0;
            goto out;
        }
    }
    /* queued prefetches are taken (already charged; read here with the misses) unless an I/O
       thread started one meanwhile: that one is waited for */
    for (int32_t i = 0; i < n_queued; i++) {
        uint8_t expect = SMOE_FLIGHT_QUEUED;
        if (__atomic_compare_exchange_n(&p->in_flight[base + queued[i]], &expect, SMOE_FLIGHT_TAKEN, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            queued[n_taken++] = queued[i];
        else
            loading[n_loading++] = queued[i];
    }

    /* evict, charge, claim */
    __atomic_store_n(p->clock, now, __ATOMIC_RELAXED);  /* prefetches' landings read it */
    for (int32_t i = 0; i < n_miss; i++) {
        int64_t k = base + miss[i];
        if (p->evicted_at[k] && now - p->evicted_at[k] <= p->regret_window) p->regrets++;
    }
    /* reads go ahead of every prefetch, each leaf's as soon as it has its room: the taken
       prefetches' at once (already charged); each miss's once its victim has given up its pages
       (victims beyond the misses first), so that one leaf's read runs while the next one's
       pages move, and the pages resident never exceed the ledger */
    struct smoe_call call;
    memset(&call, 0, sizeof call);
    int64_t n_jobs = 0;
    pthread_mutex_lock(p->lock);
    for (int32_t i = 0; i < n_taken; i++) add_jobs(p, layer, queued[i], p->jobs, &n_jobs);
    /* the last start is SMOE_URGENT_LAST: this thread finishes the call next and reads an entry itself */
    p->start(p->pool, &call, p->jobs, n_jobs, n_miss ? 1 : SMOE_URGENT_LAST);
    if (n_victim > n_miss) evict_victims(p, victim + n_miss, n_victim - n_miss, layer, NULL, 0, now);
    for (int32_t i = 0; i < n_miss; i++) {
        int64_t first = n_jobs;
        if (i < n_victim) evict_victims(p, victim + i, 1, layer, miss + i, 1, now);
        p->ledger[0] += cost;
        add_jobs(p, layer, miss[i], p->jobs, &n_jobs);
        p->start(p->pool, &call, p->jobs + first, n_jobs - first, i + 1 < n_miss ? 1 : SMOE_URGENT_LAST);
    }
    pthread_mutex_unlock(p->lock);
    if ((uint64_t)p->ledger[0] > p->peak) p->peak = (uint64_t)p->ledger[0];
    int64_t failed = p->finish(p->pool, &call);
    p->batches += n_jobs > 0;
    for (int64_t i = 0; i < n_jobs; i++) {
        struct smoe_job *j = &p->jobs[i];
        p->part_reads++;
        p->bytes_read += (uint64_t)j->bytes_read;
        p->in_place_reads += (uint64_t)j->in_place;
        p->read_seconds += j->read_seconds;
        p->hash_seconds += j->hash_seconds;
    }
    if (failed) {  /* give the misses back; Python reads them again and names a lasting failure */
        pthread_mutex_lock(p->lock);
        for (int32_t i = 0; i < n_miss; i++) release_leaf(p, layer, miss[i]);
        for (int32_t i = 0; i < n_taken; i++) release_leaf(p, layer, queued[i]);
        p->ledger[0] -= (int64_t)(n_miss + n_taken) * cost;
        pthread_mutex_unlock(p->lock);
        for (int32_t i = 0; i < n_taken; i++) {
            __atomic_store_n(&p->in_flight[base + queued[i]], 0, __ATOMIC_RELEASE);
            log_flight(p, base + queued[i], SMOE_EVENT_TAKEN, 0);
        }
        goto out;
    }
    int64_t ji = 0;
    for (int32_t i = 0; i < n_miss + n_taken; i++) {
        int64_t k = base + (i < n_miss ? miss[i] : queued[i - n_miss]);
        for (int32_t part = 0; part < p->layer_parts[layer]; part++, ji++) {
            if (p->jobs[ji].check_xxh64) {
                p->checked_parts++;
                if (!p->check_always) p->check[k * p->n_parts + part] = 0;
            }
        }
        __atomic_store_n(&p->resident[k], 1, __ATOMIC_RELEASE);
        if (i >= n_miss) {
            __atomic_store_n(&p->in_flight[k], 0, __ATOMIC_RELEASE);
            log_flight(p, k, SMOE_EVENT_TAKEN, 0);
        }
    }
    p->loaded += (uint64_t)(n_miss + n_taken);
    /* prefetches being read: wait for their landing (a failed one sends the gate to Python) */
    int landed = 1;
    for (int32_t i = 0; i < n_loading; i++) {
        int64_t k = base + loading[i];
        uint64_t tw = now_ns();
        if (wait_landing(p, k) != 0 || !__atomic_load_n(&p->resident[k], __ATOMIC_ACQUIRE)) {
            landed = 0;
            continue;
        }
        log_flight(p, k, SMOE_EVENT_LATE, (int64_t)(now_ns() - tw));
    }
    if (!landed) goto out;
    for (int32_t i = 0; i < n_w; i++) {
        smoe_stamp_use(p->freq, p->last_use, p->uses, base + wanted[i], now, p->half_life);
    }
    if (rows > 1) {  /* each token after the first that picked a leaf: mark 2 once its first is seen */
        for (int64_t r = 0; r < rows; r++) {
            for (int64_t c = 0; c < cols; c++) {
                int64_t k = base + ids[r * row_stride + c];
                if (mark[k] == 2)
                    p->freq[k] += p->token_weight;
                else
                    mark[k] = 2;
            }
        }
    }
    int32_t n_missed = n_miss + n_taken + n_loading;
    uint64_t hits = (uint64_t)(n_w - n_missed);
    *gate_hits += hits;
    p->gates++;
    p->hits += hits;
    p->misses += (uint64_t)n_missed;
    p->layer_misses[layer] += (uint64_t)n_missed;
    uint64_t dt = now_ns() - t0;
    p->stall_ns += dt;
    p->layer_stall_ns[layer] += dt;
    ok = 1;

out:
    for (int32_t i = 0; i < n_w; i++) mark[base + wanted[i]] = 0;
    p->fallbacks += !ok;
    return ok;
}

/* Mark (or unmark) the n_in_use experts of `layer` and the n_also leaves `also` (flat indices),
   ignoring any out of range: choose_victims passes over marked leaves. */
static void set_marks(struct smoe_pager *p, int32_t layer, const int32_t *in_use, int32_t n_in_use,
                      const int64_t *also, int32_t n_also, uint8_t value) {
    const int32_t E = p->n_expert;
    const int64_t n_all = (int64_t)p->n_layer * E;
    for (int32_t i = 0; i < n_in_use; i++)
        if (in_use[i] >= 0 && in_use[i] < E) p->mark[(int64_t)layer * E + in_use[i]] = value;
    for (int32_t i = 0; i < n_also; i++)
        if (also[i] >= 0 && also[i] < n_all) p->mark[also[i]] = value;
}

/* Room for `need` more bytes, for a prefetch of leaf (into_layer, into_e) (into_layer < 0: for
   nothing), evicting in policy order but never one of the n_in_use experts of `layer` that the
   node being gated reads, one of the n_also leaves `also` (flat indices: the same call's earlier
   prefetches, landed or not), nor a pinned, predicted or in-flight leaf. The first victim's pages go
   to the prefetched leaf's slices where they can (claimed: the caller fills them or releases
   them). Returns 1, or 0 with nothing changed if not enough can go. The thread that calls
   llama_decode, between gates or in a gate's observer; the evictions are logged and counted as
   the gate's are. */
int32_t smoe_pager_make_room(struct smoe_pager *p, int32_t layer, const int32_t *in_use, int32_t n_in_use,
                             const int64_t *also, int32_t n_also, int64_t need, int32_t into_layer, int32_t into_e) {
    const int32_t E = p->n_expert;
    int64_t over = p->ledger[0] + need - p->ledger[1];
    if (over <= 0) return 1;
    if (p->log_n >= p->log_cap - E || layer < 0 || layer >= p->n_layer) return 0;
    int32_t *victim = p->scratch + 2 * E;
    set_marks(p, layer, in_use, n_in_use, also, n_also, 1);
    struct order ord = order_at(p, (double)*p->clock, layer);
    int32_t n = choose_victims(p, over, &ord, victim, E);
    set_marks(p, layer, in_use, n_in_use, also, n_also, 0);
    if (n < 0) return 0;
    pthread_mutex_lock(p->lock);
    evict_victims(p, victim, n, into_layer, &into_e, into_layer >= 0 ? 1 : 0, *p->clock);
    pthread_mutex_unlock(p->lock);
    return 1;
}

size_t smoe_pager_sizeof(void) { return sizeof(struct smoe_pager); }

/* The X-Slot's lock, shared by Python (xslot.py, through ctypes: the GIL is released while it
   waits) and the pager. */
pthread_mutex_t *smoe_lock_new(void) {
    pthread_mutex_t *m = malloc(sizeof *m);
    if (m != NULL) pthread_mutex_init(m, NULL);
    return m;
}

void smoe_lock_acquire(pthread_mutex_t *m) { pthread_mutex_lock(m); }

void smoe_lock_release(pthread_mutex_t *m) { pthread_mutex_unlock(m); }

void smoe_lock_free(pthread_mutex_t *m) {
    if (m == NULL) return;
    pthread_mutex_destroy(m);
    free(m);
}

/* The in-flight table's signal (fetcher.py's Flight): a release store (Python's writes to the
   table go through here, so that "resident" is seen before "no longer in flight") that wakes a
   gate waiting for a landing, and the I/O thread's start of a queued prefetch, which fails if the
   gate took it. */
struct smoe_flight *smoe_flight_new(void) {
    struct smoe_flight *f = malloc(sizeof *f);
    if (f == NULL) return NULL;
    pthread_mutex_init(&f->mutex, NULL);
    pthread_cond_init(&f->cond, NULL);
    return f;
}

void smoe_flight_free(struct smoe_flight *f) {
    if (f == NULL) return;
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->mutex);
    free(f);
}

void smoe_flight_store(struct smoe_flight *f, uint8_t *flag, uint8_t value) {
    pthread_mutex_lock(&f->mutex);
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->mutex);
}

int32_t smoe_flight_start(uint8_t *flag) {
    uint8_t expect = SMOE_FLIGHT_QUEUED;
    return __atomic_compare_exchange_n(flag, &expect, SMOE_FLIGHT_LOADING, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
