/* One part read by the reader threads (_readpool.c); also built by the native pager (_pager.c),
 * which hands its jobs to the same pool. readpool.py mirrors it with ctypes. */
#ifndef SMOE_JOB_H
#define SMOE_JOB_H
#include <pthread.h>
#include <stdint.h>

#define SMOE_SHORT (-1)
#define SMOE_MISMATCH (-2)

struct smoe_job {
    int32_t fd;
    int32_t direct;          /* 1: fd was opened with O_DIRECT (block-aligned reads only) */
    int64_t offset;          /* the part's file offset */
    int64_t length;          /* its bytes */
    void *dest;              /* where they go */
    const uint8_t *sha256;   /* the 32-byte digest they must have, or NULL */
    /* results */
    int32_t status;
    int32_t in_place;        /* 1: the aligned head was read straight into dest */
    int64_t bytes_read;      /* bytes that came off the disk */
    double read_seconds;
    double hash_seconds;
    uint64_t xxh64;          /* with check_xxh64: the XXH64 (seed 0) the bytes must have */
    int32_t check_xxh64;     /* 1: check xxh64 instead of sha256 */
    int32_t chain;           /* set by smoe_pool_start: jobs after this one read with it (one preadv) */
    /* the queue */
    struct smoe_job *next;
    void *call;
};

/* Jobs started together and waited for together (smoe_pool_start, smoe_pool_finish); zeroed by
   its owner before its first start. A call with `on_done` is never finished: the worker that ends
   its last job calls on_done(call) instead, outside the pool's lock, and touches the call no more. */
struct smoe_call {
    int64_t remaining;       /* jobs started and not done */
    int64_t failed;          /* jobs done whose status is not 0 */
    int32_t started;         /* `done` is initialized */
    pthread_cond_t done;
    void (*on_done)(struct smoe_call *call);
    struct smoe_job *own;    /* SMOE_URGENT_LAST: the entry kept off the queue for the caller to read */
};

/* smoe_pool_start's `urgent`: urgent, and the caller calls smoe_pool_finish next (it reads the last entry
   itself, which is never queued) */
#define SMOE_URGENT_LAST 2

/* smoe_pool_start's and smoe_pool_finish's signatures (the pager gets their addresses from Python) */
typedef void (*smoe_pool_start_fn)(void *pool, struct smoe_call *call, struct smoe_job *jobs, int64_t n,
                                   int32_t urgent);
typedef int64_t (*smoe_pool_finish_fn)(void *pool, struct smoe_call *call);
/* smoe_pool_cancel's and smoe_pool_promote's */
typedef int32_t (*smoe_pool_cancel_fn)(void *pool, struct smoe_call *call);
typedef void (*smoe_pool_promote_fn)(void *pool, struct smoe_call *call);

#endif
