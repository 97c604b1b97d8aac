/* The native pager: a gate's misses served in C (see _pager.c). pager.py mirrors the struct. */
#ifndef SMOE_PAGER_H
#define SMOE_PAGER_H
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#include "_smoe_job.h"

#define SMOE_POLICY_LRU 0
#define SMOE_POLICY_LFRU 1
#define SMOE_POLICY_LEAST_STALE 2

/* A leaf's byte in the in-flight table (fetcher.py's Flight writes them): */
#define SMOE_FLIGHT_QUEUED 1   /* a prefetch not started: the gate may take it (-> TAKEN) */
#define SMOE_FLIGHT_LOADING 2  /* a prefetch being read: the gate waits for it (-> 0 or FAILED) */
#define SMOE_FLIGHT_TAKEN 3    /* taken by the gate, which reads it: the I/O thread skips it */
#define SMOE_FLIGHT_FAILED 4   /* its read failed: off limits until Python reaps it */
#define SMOE_FLIGHT_OTHER 5    /* down parts (pipelining: Python only) */
#define SMOE_FLIGHT_NATIVE 6   /* a native prefetch, queued or being read (smoe_pager_prefetch): the
                                  gate promotes it to urgent and waits (-> 0 or FAILED) */

#define SMOE_EVENT_TAKEN 0     /* flight log: the gate took a queued prefetch and read it */
#define SMOE_EVENT_LATE 1      /* ... waited for a prefetch being read */

#define SMOE_LANDED 0           /* landings log: a native prefetch is resident */
#define SMOE_LANDED_FAILED 1    /* ... its read failed (reaped by smoe_pager_take_landings) */
#define SMOE_LANDED_CANCELLED 2 /* ... a gate cancelled it before its read started */

#define SMOE_HOLD_BELOW 0.5     /* fetcher.py's HOLD_BELOW: a landed prefetch this likely counts as just used */

/* A native prefetch: leaf `leaf`'s parts read on the pool's background queue; the worker that
   reads its last part calls pf_landed (call.on_done). One per leaf: a leaf is in flight once. */
struct smoe_prefetch {
    struct smoe_call call;     /* first: on_done gets it */
    struct smoe_pager *pager;
    int64_t leaf;
    double prio;
};

/* What the native prefetches' reads did, for Python (smoe_pager_take_landings; flight mutex) */
struct smoe_pf_counts {
    uint64_t part_reads, in_place_reads, bytes_read, checked_parts, landed, failed;
    double read_seconds, hash_seconds;
};

/* Where the gate waits for a loading prefetch: a change of a flight byte away from LOADING is
   stored under the mutex and broadcast (smoe_flight_store). */
struct smoe_flight {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
};

struct smoe_pager {
    int32_t enabled;           /* 0: every miss goes to Python */
    int32_t policy;            /* SMOE_POLICY_* */
    double half_life;          /* lfru: in gates (the access state's) */
    double token_weight;       /* lfru: per token beyond the first that picks a leaf in one gate */
    int32_t n_layer, n_expert, n_parts;  /* n_parts: the most parts a leaf has */
    int32_t can_move;          /* evicted pages may move to the incoming slice (mremap) */
    int32_t check_always;      /* 1: check every read; 0: a part's first read only */
    int32_t thp_advise;        /* 1: madvise(MADV_NOHUGEPAGE) each fresh mapping */
    int32_t merge_emptied;     /* 1: a slice whose pages moved out is mapped afresh, merging with its
                                  neighbours; 0: it stays a mapping of its own (every slice may be one) */
    int64_t page;
    int64_t *ledger;           /* [0] bytes charged (resident and in flight), [1] the budget */
    int64_t *cost;             /* [n_layer] bytes charged per leaf; 0: the layer is not paged */
    uint8_t *resident, *pinned, *protect, *in_flight;  /* [n_layer * n_expert] */
    uint64_t *last_use;
    uint32_t *uses;
    double *freq;              /* lfru's score as of the last use (policy.py) */
    uint64_t *clock;
    uint8_t *scan;             /* [1] 1 while a prompt is gated: lfru goes in least-stale's order */
    uint64_t *evicted_at;      /* [n_layer * n_expert] clock of the last eviction */
    uint64_t regret_window;    /* a miss this many gates after its eviction is a regret */
    int32_t *fd;               /* [n_layer * n_expert] the leaf's shard; -1: not open (Python reads) */
    uint8_t *direct;           /* [n_layer * n_expert] 1: fd was opened with O_DIRECT */
    int32_t *layer_parts;      /* [n_layer] parts per leaf */
    int64_t *t_addr;           /* [n_layer * n_parts] address of the tensor that holds the part */
    int64_t *t_slice;          /* ... bytes of one expert's slice of it */
    int64_t *t_nexp;           /* ... experts in it */
    int64_t *t_flags;          /* ... address of the X-Slot's resident flags (one byte per expert) */
    int64_t *offset;           /* [n_layer * n_expert * n_parts] the part's offset in its shard */
    uint64_t *xxh64;           /* ... its XXH64 */
    uint8_t *check;            /* ... 1: check its XXH64 when it is next read */
    void *pool;                /* the reader threads (readpool.py) */
    smoe_pool_start_fn start;  /* smoe_pool_start, smoe_pool_finish */
    smoe_pool_finish_fn finish;
    pthread_mutex_t *lock;     /* the X-Slot's lock (smoe_lock_new) */
    int64_t *log;              /* evictions Python has not seen yet: (leaf, last use) pairs */
    int64_t log_cap, log_n;    /* in pairs */
    struct smoe_job *jobs;     /* scratch: [jobs_cap] */
    int64_t jobs_cap;
    int32_t *scratch;          /* [3 * n_expert] */
    uint8_t *mark;             /* [n_layer * n_expert] zeroed scratch */
    /* counters, read and zeroed by Python */
    uint64_t gates, hits, misses, loaded, evictions, regrets, moved_bytes, fallbacks, peak;
    uint64_t stall_ns, part_reads, in_place_reads, bytes_read, checked_parts, batches;
    double read_seconds, hash_seconds;
    uint64_t *layer_misses;    /* [n_layer] */
    uint64_t *layer_stall_ns;  /* [n_layer] */
    struct smoe_flight *flight;  /* signals the in_flight table's changes */
    int64_t *flight_log;       /* prefetches the gates took or waited for: (leaf, SMOE_EVENT_*, ns waited) */
    int64_t flight_log_cap, flight_log_n;  /* in triples */
    int32_t serve_flights;     /* 0: a miss in flight sends the gate to Python (the comparisons' control) */
    /* native prefetches (smoe_pager_prefetch; smoe_pager_prefetch_init allocates, NULL: none) */
    smoe_pool_cancel_fn cancel;  /* smoe_pool_cancel, smoe_pool_promote */
    smoe_pool_promote_fn promote;
    struct smoe_prefetch *pf;  /* [n_layer * n_expert] */
    struct smoe_job *pf_jobs;  /* [n_layer * n_expert * n_parts] */
    int64_t *pf_also;          /* scratch [n_layer * n_expert]: one call's earlier prefetches */
    int64_t pf_flying;         /* queued or being read (flight mutex) */
    int64_t *landings;         /* (leaf, SMOE_LANDED_*, clock at landing) triples for Python (flight mutex) */
    int64_t landings_cap, landings_n;  /* in triples */
    int64_t landings_owed;     /* prefetches queued whose landing Python has not taken: at most landings_cap */
    uint64_t pf_queued;        /* queued by speculation in C (_gatecb.c), read and zeroed by Python */
    struct smoe_pf_counts pf_counts;   /* flight mutex */
};

/* lfru's score of a leaf at clock `now`: its score as of its last use, decayed since
   (policy.py's AccessState.decayed). */
static inline double smoe_lfru_at(double freq, uint64_t last_use, double now, double half_life) {
    return freq * exp2(-(now - (double)last_use) / half_life);
}

/* Stamp leaf k as used at `now` (policy.py's AccessState.record): the C gate's hits, the pager's
   gates. */
static inline void smoe_stamp_use(double *freq, uint64_t *last_use, uint32_t *uses, int64_t k, uint64_t now,
                                  double half_life) {
    freq[k] = smoe_lfru_at(freq[k], last_use[k], (double)now, half_life) + 1.0;
    last_use[k] = now;
    uses[k]++;
}

/* 1: the gate's leaves are resident (the caller stamps nothing: done here); 0: Python must serve it */
int smoe_pager_serve(struct smoe_pager *p, int32_t layer, const int32_t *ids, int64_t rows, int64_t cols,
                     int64_t row_stride, uint64_t *gate_hits);

/* Room for `need` more bytes (see _pager.c). */
int32_t smoe_pager_make_room(struct smoe_pager *p, int32_t layer, const int32_t *in_use, int32_t n_in_use,
                             const int64_t *also, int32_t n_also, int64_t need, int32_t into_layer, int32_t into_e);

/* The flight byte `flag` set to `value` under the flight mutex, waking the gates that wait. */
void smoe_flight_store(struct smoe_flight *f, uint8_t *flag, uint8_t value);

/* Native prefetches (_pager.c): records for each leaf, and what frees room they hold. */
int32_t smoe_pager_prefetch_init(struct smoe_pager *p, void *cancel, void *promote);
void smoe_pager_prefetch_free(struct smoe_pager *p);
int32_t smoe_pager_cancel_or_wait(struct smoe_pager *p);
uint8_t smoe_pager_await_leaf(struct smoe_pager *p, int64_t k);

/* Prefetch leaves (pf_layer[i], pf_expert[i]), likeliest first, on the pool's background queue,
   each charged and given room now as smoe_pager_make_room does (for the gate of `layer` that reads
   in_use[n_in_use]); stops at the first that does not fit. Returns how many were queued. */
int32_t smoe_pager_prefetch(struct smoe_pager *p, int32_t layer, const int32_t *in_use, int32_t n_in_use,
                            const int32_t *pf_layer, const int32_t *pf_expert, const double *prio, int32_t n);

#endif
