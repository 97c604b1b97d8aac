/* One part read by the reader threads (_readpool.c); also built by the native pager (_pager.c),
 * which hands its jobs to the same pool. readpool.py mirrors it with ctypes. */
#ifndef SMOE_JOB_H
#define SMOE_JOB_H
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
    int32_t chain;           /* set by smoe_pool_run: jobs after this one read with it (one preadv) */
    /* the queue */
    struct smoe_job *next;
    void *call;
};

/* smoe_pool_run's signature (the pager gets its address from Python) */
typedef int64_t (*smoe_pool_run_fn)(void *pool, struct smoe_job *jobs, int64_t n, int32_t urgent);

#endif
