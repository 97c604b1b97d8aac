/* Leaf part reads on a pool of native threads: many parts at once, straight into their place.
 *
 * smoe_gguf/readpool.py drives it with ctypes. A caller hands smoe_pool_run() an array of jobs
 * (one per part: a file descriptor, a file range, where its bytes go, the sha256 they must have
 * or none) and a class: urgent (a gate waiting for them) or background (prefetch). The call
 * queues them, wakes the workers and blocks until every job of the call is done; ctypes releases
 * the GIL meanwhile, so Python threads and llama.cpp run on. The native pager instead starts a
 * call's jobs in several batches (smoe_pool_start: each leaf's reads as soon as its room is made)
 * and then waits for all of them (smoe_pool_finish). Workers take urgent jobs before any
 * background one, so a gate's reads jump the queue of prefetches. A pool of n workers (the reads
 * the disk takes at once) runs n + 1 threads, and background jobs occupy at most n of them: one
 * thread is always free for an urgent job, which therefore never waits behind a prefetch read
 * already under way (with one worker, a gate's read would otherwise wait for a whole part).
 * Background jobs also hold at most n x SMOE_BACKGROUND_BYTES in flight (one entry always may
 * start; while no urgent job is queued or read, as many as smoe_pool_set_background_entries
 * allows, bytes aside): a disk serves the bytes it is asked for at once side by side, so with n
 * whole-leaf prefetches of MiBs under way a gate's own read would get a fraction of the disk,
 * while small parts need several reads at once to keep the disk busy at all.
 * Queuing wakes one worker per queued entry, not all of them; and a caller waiting for its call
 * reads the call's urgent jobs that no worker has taken yet itself. A caller that finishes the
 * call next (SMOE_URGENT_LAST: smoe_pool_run, the pager's gate) keeps the last entry off the queue
 * and reads it itself: a gate with one miss reads it on its own thread, with no worker to wake,
 * none able to take it (not even one awake already), and no wake-up back.
 *
 * A worker reads a part in place when it can: on a descriptor opened with O_DIRECT, the
 * block-aligned head of a part whose destination and file offset are block-aligned is read
 * straight into the destination, and only an unaligned tail (or a misaligned part, whole) goes
 * through the worker's bounce buffer. Without O_DIRECT (tmpfs, macOS F_NOCACHE) it reads into
 * the destination directly. Where bytes reach the destination by a copy (a buffered read, a
 * bounce), its pages are populated first: one call instead of a fault per page. An in-place
 * O_DIRECT read pins the destination's pages itself, faulting in only those not present, so it
 * skips that walk (pages the pager moved in are all present). Jobs of one call that follow each
 * other on disk (a leaf's parts: one file, each part where the last one ends) are chained and
 * read by one worker with one preadv, each part into its own destination: one request of the
 * whole leaf instead of a request per part, which a disk serves faster (and one wake-up, one
 * syscall). On O_DIRECT only parts read whole in place are chained (block-aligned offsets,
 * lengths and destinations); a chain whose preadv comes back short or failed is read again part
 * by part, as unchained jobs are. A part with an expected digest is hashed by the worker after the read, off
 * the caller's thread: XXH64 (the pack's fast check, ~10 GB/s) where the job gives one, else
 * sha256, with OpenSSL's SHA256 where the process can load libcrypto (CommonCrypto on macOS),
 * else the portable implementation below.
 *
 * Each job reports a status (0, an errno, SMOE_SHORT for a file that ends early,
 * SMOE_MISMATCH for a wrong digest), the bytes that came off the disk and its read and hash
 * times. Built as a Python extension only so that pip compiles it; also compiled standalone, with
 * sanitizers, by `make sanitize` (tests/native/readpool_stress.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_smoe_job.h"

#ifdef __APPLE__
#include <CommonCrypto/CommonDigest.h>
#else
#include <dlfcn.h>
#endif

#define SMOE_BLOCK 4096
#define SMOE_MAX_WORKERS 64
#define SMOE_MAX_CHAIN 16  /* parts one preadv reads at most */
#define SMOE_BACKGROUND_BYTES (512 << 10)  /* per worker: half a worker's 1 MiB read */

/* struct smoe_job: _smoe_job.h (shared with the native pager in _pager.c) */

typedef unsigned char *(*sha256_fn)(const unsigned char *d, size_t n, unsigned char *md);

/* A thread's buffer for reads that cannot land in place (grown as needed). */
struct bounce {
    void *buf;
    size_t cap;
};

struct smoe_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;
    struct smoe_job *head[2], *tail[2];  /* 0: urgent, 1: background */
    int32_t n_workers;                   /* jobs at once: the io depth */
    int64_t background_cap;              /* bytes background entries may read at once: n_workers x SMOE_BACKGROUND_BYTES */
    int64_t background_bytes;            /* ... being read now */
    int32_t background_entries;          /* entries that may run at once whatever their bytes while no
                                            urgent job is queued or read (>= 1; smoe_pool_set_background_entries) */
    int32_t urgent_busy;                 /* threads inside an urgent entry, workers and callers */
    int32_t n_threads;                   /* n_workers + 1: the last one is kept for urgent jobs */
    int32_t closing;
    int32_t held;                        /* 1: background jobs do not start, 2: no job does (smoe_pool_hold) */
    int32_t busy;                        /* threads inside a read */
    int32_t busy_background, peak_background;  /* threads inside a background job: now, at most */
    pthread_t workers[SMOE_MAX_WORKERS + 1];
    sha256_fn sha256;                    /* NULL: the portable one */
    int64_t urgent_jobs, background_jobs;
    int64_t chains, chained_jobs;        /* chains read with one preadv, and their jobs */
    int64_t caller_jobs;                 /* urgent jobs read by the thread waiting for them */
    int64_t idle_wakes;                  /* times a worker woke and found nothing it could start */
    struct bounce caller_bounce;         /* the bounce buffer of such a thread ... */
    int32_t caller_bounce_busy;          /* ... while one uses it (another then makes its own) */
};

/* ------------------------------------------------------------------ sha256 (portable) */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const uint8_t *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

/* The portable SHA-256 (FIPS 180-4), used where no library digest is available. */
unsigned char *smoe_sha256_portable(const unsigned char *d, size_t n, unsigned char *md) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t full = n / 64 * 64;
    for (size_t i = 0; i < full; i += 64) sha256_block(h, d + i);
    uint8_t last[128] = {0};
    size_t rest = n - full;
    if (rest) memcpy(last, d + full, rest);
    last[rest] = 0x80;
    size_t tail = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)n * 8;
    for (int i = 0; i < 8; i++) last[tail - 1 - i] = (uint8_t)(bits >> (8 * i));
    sha256_block(h, last);
    if (tail == 128) sha256_block(h, last + 64);
    for (int i = 0; i < 8; i++) {
        md[4 * i] = (uint8_t)(h[i] >> 24); md[4 * i + 1] = (uint8_t)(h[i] >> 16);
        md[4 * i + 2] = (uint8_t)(h[i] >> 8); md[4 * i + 3] = (uint8_t)h[i];
    }
    return md;
}

/* ------------------------------------------------------------------ XXH64 */

#define XXP1 0x9E3779B185EBCA87ULL
#define XXP2 0xC2B2AE3D27D4EB4FULL
#define XXP3 0x165667B19E3779F9ULL
#define XXP4 0x85EBCA77C2B2AE63ULL
#define XXP5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t read64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t read32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t xx_round(uint64_t acc, uint64_t input) {
    acc += input * XXP2;
    return rotl64(acc, 31) * XXP1;
}

static inline uint64_t xx_merge(uint64_t acc, uint64_t val) {
    acc ^= xx_round(0, val);
    return acc * XXP1 + XXP4;
}

/* XXH64 of n bytes (the reference algorithm, xxhash.com). */
uint64_t smoe_xxh64(const void *data, size_t n, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)data, *end = p + n;
    uint64_t h;
    if (n >= 32) {
        uint64_t v1 = seed + XXP1 + XXP2, v2 = seed + XXP2, v3 = seed, v4 = seed - XXP1;
        const uint8_t *limit = end - 32;
        do {
            v1 = xx_round(v1, read64(p));
            v2 = xx_round(v2, read64(p + 8));
            v3 = xx_round(v3, read64(p + 16));
            v4 = xx_round(v4, read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xx_merge(h, v1);
        h = xx_merge(h, v2);
        h = xx_merge(h, v3);
        h = xx_merge(h, v4);
    } else {
        h = seed + XXP5;
    }
    h += (uint64_t)n;
    while (p + 8 <= end) {
        h ^= xx_round(0, read64(p));
        h = rotl64(h, 27) * XXP1 + XXP4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)read32(p) * XXP1;
        h = rotl64(h, 23) * XXP2 + XXP3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * XXP5;
        h = rotl64(h, 11) * XXP1;
        p++;
    }
    h ^= h >> 33;
    h *= XXP2;
    h ^= h >> 29;
    h *= XXP3;
    h ^= h >> 32;
    return h;
}

#ifdef __APPLE__
static unsigned char *cc_sha256(const unsigned char *d, size_t n, unsigned char *md) {
    CC_SHA256_CTX c;
    CC_SHA256_Init(&c);
    while (n > 0) {
        CC_LONG chunk = n > (1u << 30) ? (1u << 30) : (CC_LONG)n;
        CC_SHA256_Update(&c, d, chunk);
        d += chunk;
        n -= chunk;
    }
    CC_SHA256_Final(md, &c);
    return md;
}
#endif

static sha256_fn library_sha256(void) {
#ifdef __APPLE__
    return cc_sha256;
#else
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) continue;
        sha256_fn f = (sha256_fn)dlsym(lib, "SHA256");
        if (f != NULL) return f;  /* the library stays loaded for the process */
        dlclose(lib);
    }
    return NULL;
#endif
}

/* ------------------------------------------------------------------ reading */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Read up to n bytes at offset; returns the bytes read (fewer at end of file) or -errno. With
   direct, a read that ends off a block boundary is the end of the file (asking again there would
   be an unaligned O_DIRECT read). */
static int64_t read_full(int fd, void *buf, int64_t n, int64_t offset, int direct) {
    int64_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, (size_t)(n - got), (off_t)(offset + got));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -(int64_t)errno;
        }
        if (r == 0) break;
        got += r;
        if (direct && got % SMOE_BLOCK != 0) break;
    }
    return got;
}

static void *bounce_get(struct bounce *b, size_t size) {
    if (b->cap < size) {
        free(b->buf);
        b->cap = 0;
        size_t cap = size < ((size_t)1 << 20) ? ((size_t)1 << 20) : size;
        if (posix_memalign(&b->buf, SMOE_BLOCK, cap) != 0) {
            b->buf = NULL;
            return NULL;
        }
        b->cap = cap;
    }
    return b->buf;
}

static void populate(void *dest, int64_t length) {
#if defined(__linux__)
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)dest & ~(uintptr_t)(page - 1);
    uintptr_t hi = ((uintptr_t)dest + (uintptr_t)length + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1);
    (void)madvise((void *)lo, hi - lo, 23 /* MADV_POPULATE_WRITE; refused by kernels before 5.14 */);
#else
    (void)dest;
    (void)length;
#endif
}

/* Bounce read of [start, start + span) and copy of the part's bytes at head. */
static int32_t read_bounced(struct smoe_job *j, struct bounce *b, int64_t start, int64_t span, int64_t head,
                            int64_t want, char *dest) {
    void *buf = bounce_get(b, (size_t)span);
    if (buf == NULL) return ENOMEM;
    int64_t got = read_full(j->fd, buf, span, start, 1);
    if (got < 0) return (int32_t)-got;
    j->bytes_read += got;
    if (got < head + want) return SMOE_SHORT;
    populate(dest, want);
    memcpy(dest, (char *)buf + head, (size_t)want);
    return 0;
}

static int32_t read_job(struct smoe_job *j, struct bounce *b) {
    if (j->length <= 0) return j->length == 0 ? 0 : EINVAL;
    if (!j->direct) {
        populate(j->dest, j->length);
        int64_t got = read_full(j->fd, j->dest, j->length, j->offset, 0);
        if (got < 0) return (int32_t)-got;
        j->bytes_read += got;
        return got < j->length ? SMOE_SHORT : 0;
    }
    int64_t start = j->offset - j->offset % SMOE_BLOCK;
    int64_t head = j->offset - start;
    if (head == 0 && (uintptr_t)j->dest % SMOE_BLOCK == 0) {
        int64_t aligned = j->length - j->length % SMOE_BLOCK;
        if (aligned > 0) {
            int64_t got = read_full(j->fd, j->dest, aligned, j->offset, 1);
            if (got < 0) return (int32_t)-got;
            j->bytes_read += got;
            if (got < aligned) return SMOE_SHORT;
            j->in_place = 1;
        }
        int64_t tail = j->length - aligned;
        if (tail == 0) return 0;
        return read_bounced(j, b, j->offset + aligned, SMOE_BLOCK, 0, tail, (char *)j->dest + aligned);
    }
    int64_t span = (head + j->length + SMOE_BLOCK - 1) / SMOE_BLOCK * SMOE_BLOCK;
    return read_bounced(j, b, start, span, head, j->length, (char *)j->dest);
}

/* Check a read job's digest, if it has one (status stays 0, or becomes SMOE_MISMATCH). */
static void check_job(struct smoe_pool *p, struct smoe_job *j) {
    double t1 = now_seconds();
    j->hash_seconds = 0.0;
    if (j->status == 0 && j->check_xxh64) {
        if (smoe_xxh64(j->dest, (size_t)j->length, 0) != j->xxh64) j->status = SMOE_MISMATCH;
        j->hash_seconds = now_seconds() - t1;
    } else if (j->status == 0 && j->sha256 != NULL) {
        unsigned char md[32];
        (p->sha256 ? p->sha256 : smoe_sha256_portable)((const unsigned char *)j->dest, (size_t)j->length, md);
        if (memcmp(md, j->sha256, 32) != 0) j->status = SMOE_MISMATCH;
        j->hash_seconds = now_seconds() - t1;
    }
}

static void run_job(struct smoe_pool *p, struct smoe_job *j, struct bounce *b) {
    double t0 = now_seconds();
    j->bytes_read = 0;
    j->in_place = 0;
    j->status = read_job(j, b);
    j->read_seconds = now_seconds() - t0;
    check_job(p, j);
}

/* Whether job b continues job a on disk so that one preadv reads both (see the top). */
static int continues(const struct smoe_job *a, const struct smoe_job *b) {
    if (a->fd != b->fd || a->direct != b->direct || a->length <= 0 || b->length <= 0 ||
        a->offset + a->length != b->offset)
        return 0;
    if (!a->direct) return 1;
    return a->offset % SMOE_BLOCK == 0 && a->length % SMOE_BLOCK == 0 && b->length % SMOE_BLOCK == 0 &&
           (uintptr_t)a->dest % SMOE_BLOCK == 0 && (uintptr_t)b->dest % SMOE_BLOCK == 0;
}

/* A chain of n jobs (j[0].chain == n - 1): one preadv into every destination, then each part's
   digest; the read's time is shared out by bytes. Short or failed: each job is read on its own. */
static void run_chain(struct smoe_pool *p, struct smoe_job *j, int32_t n, struct bounce *b) {
    struct iovec iov[SMOE_MAX_CHAIN];
    int64_t total = 0;
    double t0 = now_seconds();
    for (int32_t i = 0; i < n; i++) {
        if (!j[i].direct) populate(j[i].dest, j[i].length);
        iov[i].iov_base = j[i].dest;
        iov[i].iov_len = (size_t)j[i].length;
        total += j[i].length;
    }
    ssize_t got;
    do got = preadv(j[0].fd, iov, n, (off_t)j[0].offset);
    while (got < 0 && errno == EINTR);
    double spent = now_seconds() - t0;
    if (got != total) {  /* the end of the file, an error: part by part, naming the part it is */
        for (int32_t i = 0; i < n; i++) run_job(p, &j[i], b);
        return;
    }
    for (int32_t i = 0; i < n; i++) {
        j[i].bytes_read = j[i].length;
        j[i].in_place = j[i].direct;
        j[i].status = 0;
        j[i].read_seconds = spent * (double)j[i].length / (double)total;
        check_job(p, &j[i]);
    }
}

/* Read one queued entry (a job, or a chain of them) with the lock released, then count it against
   its call: the chain, the failures, the jobs done. Lock held on entry and on return; returns the
   jobs the call still waits for. */
static int64_t run_entry(struct smoe_pool *p, struct smoe_job *j, struct bounce *b) {
    int32_t n = 1 + j->chain;
    pthread_mutex_unlock(&p->lock);
    if (n > 1) run_chain(p, j, n, b);
    else run_job(p, j, b);
    pthread_mutex_lock(&p->lock);
    if (n > 1) {
        p->chains++;
        p->chained_jobs += n;
    }
    struct smoe_call *c = (struct smoe_call *)j->call;
    for (int32_t i = 0; i < n; i++) c->failed += j[i].status != 0;
    return c->remaining -= n;
}

/* Bytes of a queued entry (a job, or the chain it heads). */
static int64_t entry_bytes(const struct smoe_job *j) {
    int64_t n = 0;
    for (int32_t i = 0; i <= j->chain; i++) n += j[i].length;
    return n;
}

/* Whether a worker may start the first background entry now (lock held). */
static int background_may_start(const struct smoe_pool *p) {
    if (p->head[1] == NULL || p->held || p->busy_background >= p->n_workers) return 0;
    if (p->busy_background == 0) return 1;
    if (p->busy_background < p->background_entries && p->urgent_busy == 0 && p->head[0] == NULL) return 1;
    return p->background_bytes + entry_bytes(p->head[1]) <= p->background_cap;
}

/* An urgent entry is done (lock held): once none is queued or being read, a background entry
   beyond the byte cap may start (smoe_pool_set_background_entries), so a waiting worker is woken. */
static void end_urgent(struct smoe_pool *p) {
    if (--p->urgent_busy == 0 && p->head[0] == NULL && p->head[1] != NULL && p->background_entries > 1)
        pthread_cond_signal(&p->work);
}

static void *worker(void *arg) {
    struct smoe_pool *p = (struct smoe_pool *)arg;
    struct bounce b = {NULL, 0};
    pthread_mutex_lock(&p->lock);
    for (;;) {
        int waited = 0;
        while (!p->closing && (p->head[0] == NULL || p->held > 1) && !background_may_start(p)) {
            p->idle_wakes += waited;
            pthread_cond_wait(&p->work, &p->lock);
            waited = 1;
        }
        if (p->closing) break;
        int q = p->head[0] != NULL && p->held < 2 ? 0 : 1;
        struct smoe_job *j = p->head[q];
        p->head[q] = j->next;
        if (p->head[q] == NULL) p->tail[q] = NULL;
        p->busy++;
        const int64_t bytes = q == 1 ? entry_bytes(j) : 0;
        p->background_bytes += bytes;
        if (q == 1 && ++p->busy_background > p->peak_background) p->peak_background = p->busy_background;
        struct smoe_call *c = (struct smoe_call *)j->call;
        if (q == 0) p->urgent_busy++;
        int64_t left = run_entry(p, j, &b);
        p->busy--;
        if (q == 0) end_urgent(p);
        if (q == 1) {  /* this thread takes the next background job itself; another may fit beside it */
            p->busy_background--;
            p->background_bytes -= bytes;
            if (p->head[1] != NULL) pthread_cond_signal(&p->work);
        }
        if (left == 0) {
            if (c->on_done != NULL) {  /* a background call nobody waits for: its owner's hook */
                void (*done)(struct smoe_call *) = c->on_done;
                pthread_mutex_unlock(&p->lock);
                done(c);
                pthread_mutex_lock(&p->lock);
            } else {
                pthread_cond_signal(&c->done);
            }
        }
    }
    pthread_mutex_unlock(&p->lock);
    free(b.buf);
    return NULL;
}

/* ------------------------------------------------------------------ the API */

/* A pool of n_workers (1..SMOE_MAX_WORKERS) reads at once, on n_workers + 1 threads (the last
   kept for urgent jobs); use_library: 0 forces the portable sha256. */
struct smoe_pool *smoe_pool_new(int32_t n_workers, int32_t use_library) {
    if (n_workers < 1) n_workers = 1;
    if (n_workers > SMOE_MAX_WORKERS) n_workers = SMOE_MAX_WORKERS;
    struct smoe_pool *p = (struct smoe_pool *)calloc(1, sizeof *p);
    if (p == NULL) return NULL;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    p->sha256 = use_library ? library_sha256() : NULL;
    for (int32_t i = 0; i <= n_workers; i++) {
        if (pthread_create(&p->workers[i], NULL, worker, p) != 0) break;
        p->n_threads++;
    }
    pthread_mutex_lock(&p->lock);  /* the workers read it under the lock */
    p->n_workers = p->n_threads > 1 ? p->n_threads - 1 : p->n_threads;  /* without its spare: as many as run */
    p->background_cap = (int64_t)p->n_workers * SMOE_BACKGROUND_BYTES;
    p->background_entries = 1;
    pthread_mutex_unlock(&p->lock);
    if (p->n_threads == 0) {
        pthread_cond_destroy(&p->work);
        pthread_mutex_destroy(&p->lock);
        free(p);
        return NULL;
    }
    return p;
}

int32_t smoe_pool_workers(const struct smoe_pool *p) { return p->n_workers; }

/* Bytes background entries may read at once (one entry always may start). */
int64_t smoe_pool_background_cap(const struct smoe_pool *p) { return p->background_cap; }

/* Let up to n background entries (1..n_workers) run at once whatever their bytes while no urgent
   job is queued or being read (beyond them, or while one is, the byte cap applies); returns the
   number set. Entries already running are not stopped. */
int32_t smoe_pool_set_background_entries(struct smoe_pool *p, int32_t n) {
    pthread_mutex_lock(&p->lock);
    if (n < 1) n = 1;
    if (n > p->n_workers) n = p->n_workers;
    p->background_entries = n;
    if (p->head[1] != NULL) pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Threads, the spare for urgent jobs included. */
int32_t smoe_pool_threads(const struct smoe_pool *p) { return p->n_threads; }

/* The most background jobs that ran at once since the pool started. */
int32_t smoe_pool_peak_background(struct smoe_pool *p) {
    pthread_mutex_lock(&p->lock);
    int32_t peak = p->peak_background;
    pthread_mutex_unlock(&p->lock);
    return peak;
}

/* Chains read with one preadv since the pool started. */
int64_t smoe_pool_chains(struct smoe_pool *p) {
    pthread_mutex_lock(&p->lock);
    int64_t n = p->chains;
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Times a worker woke and found nothing it could start, since the pool started. */
int64_t smoe_pool_idle_wakes(struct smoe_pool *p) {
    pthread_mutex_lock(&p->lock);
    int64_t n = p->idle_wakes;
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Urgent jobs read by the thread that waited for them (smoe_pool_finish) since the pool started. */
int64_t smoe_pool_caller_jobs(struct smoe_pool *p) {
    pthread_mutex_lock(&p->lock);
    int64_t n = p->caller_jobs;
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* 1 when digests use a library (OpenSSL, CommonCrypto), 0 for the portable implementation. */
int32_t smoe_pool_library_sha256(const struct smoe_pool *p) { return p->sha256 != NULL; }

/* Queue n jobs as part of `call` (urgent: ahead of every background job) and return at once;
   a call may be started several times before it is finished. The jobs must stay put until then.
   urgent = SMOE_URGENT_LAST: urgent, and the caller finishes the call next (smoe_pool_finish),
   where it reads the entries no worker has taken: one worker fewer is woken. */
void smoe_pool_start(struct smoe_pool *p, struct smoe_call *call, struct smoe_job *jobs, int64_t n, int32_t urgent) {
    if (n <= 0) return;
    if (!call->started && call->on_done == NULL) {
        pthread_cond_init(&call->done, NULL);
        call->started = 1;
    }
    int q = urgent ? 0 : 1;
    for (int64_t i = 0; i < n; i++) {
        jobs[i].next = NULL;
        jobs[i].call = call;
        jobs[i].status = 0;
        jobs[i].chain = 0;
    }
    for (int64_t i = 0; i < n; i += 1 + jobs[i].chain)
        while (i + 1 + jobs[i].chain < n && jobs[i].chain + 1 < SMOE_MAX_CHAIN &&
               continues(&jobs[i + jobs[i].chain], &jobs[i + 1 + jobs[i].chain]))
            jobs[i].chain++;
    pthread_mutex_lock(&p->lock);
    call->remaining += n;
    int32_t entries = 0;
    for (int64_t i = 0; i < n; i += 1 + jobs[i].chain) {  /* a chain is queued as its first job */
        if (urgent == SMOE_URGENT_LAST && call->own == NULL && i + 1 + jobs[i].chain >= n) {
            call->own = &jobs[i];  /* the last entry: its caller reads it, no worker ever sees it */
            break;
        }
        if (p->tail[q] != NULL) p->tail[q]->next = &jobs[i];
        else p->head[q] = &jobs[i];
        p->tail[q] = &jobs[i];
        entries++;
    }
    if (urgent) p->urgent_jobs += n;
    else p->background_jobs += n;
    /* a worker per queued entry (waking them all would have every idle one find the queue empty but one) */
    for (int32_t i = 0; i < entries && i < p->n_threads; i++) pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->lock);
}

/* Unlink the entries of `call` from queue q; the jobs unlinked (a chain counts all of its jobs).
   Lock held. */
static int64_t unlink_call(struct smoe_pool *p, int q, const struct smoe_call *call, struct smoe_job **first,
                           struct smoe_job **last) {
    int64_t n = 0;
    struct smoe_job *prev = NULL, *j = p->head[q];
    *first = *last = NULL;
    while (j != NULL) {
        struct smoe_job *next = j->next;
        if (j->call == call) {
            if (prev != NULL) prev->next = next;
            else p->head[q] = next;
            if (p->tail[q] == j) p->tail[q] = prev;
            j->next = NULL;
            if (*last != NULL) (*last)->next = j;
            else *first = j;
            *last = j;
            n += 1 + j->chain;
        } else {
            prev = j;
        }
        j = next;
    }
    return n;
}

/* Take a background call's jobs off the queue, if none of them has started: 1 (the call is over,
   its hook is not called), else 0 and nothing changes. */
int32_t smoe_pool_cancel(struct smoe_pool *p, struct smoe_call *call) {
    pthread_mutex_lock(&p->lock);
    int64_t queued = 0;
    for (struct smoe_job *j = p->head[1]; j != NULL; j = j->next)
        if (j->call == call) queued += 1 + j->chain;
    int32_t ok = queued > 0 && queued == call->remaining;
    if (ok) {
        struct smoe_job *first, *last;
        (void)unlink_call(p, 1, call, &first, &last);
        call->remaining = 0;
        p->background_jobs -= queued;
    }
    pthread_mutex_unlock(&p->lock);
    return ok;
}

/* Hold background jobs in the queue (1), every job (2: the workers take none, and only a caller
   waiting in smoe_pool_finish reads its own urgent jobs), or let them start again (0). What tests
   use to see queued jobs cancelled, promoted, and read by their caller. */
void smoe_pool_hold(struct smoe_pool *p, int32_t held) {
    pthread_mutex_lock(&p->lock);
    p->held = held;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
}

/* Move a background call's queued jobs to the end of the urgent queue (a gate needs them now). */
void smoe_pool_promote(struct smoe_pool *p, struct smoe_call *call) {
    pthread_mutex_lock(&p->lock);
    struct smoe_job *first, *last;
    int64_t n = unlink_call(p, 1, call, &first, &last);
    if (n > 0) {
        if (p->tail[0] != NULL) p->tail[0]->next = first;
        else p->head[0] = first;
        p->tail[0] = last;
        p->urgent_jobs += n;
        p->background_jobs -= n;
        pthread_cond_broadcast(&p->work);
    }
    pthread_mutex_unlock(&p->lock);
}

/* The first urgent entry of `call` still queued, unlinked (NULL: none). Lock held. */
static struct smoe_job *take_queued(struct smoe_pool *p, const struct smoe_call *call) {
    struct smoe_job *prev = NULL;
    for (struct smoe_job *j = p->head[0]; j != NULL; prev = j, j = j->next) {
        if (j->call != call) continue;
        if (prev != NULL) prev->next = j->next;
        else p->head[0] = j->next;
        if (p->tail[0] == j) p->tail[0] = prev;
        j->next = NULL;
        return j;
    }
    return NULL;
}

/* Wait until every job started as part of `call` is done; the number whose status is not 0.
   The caller reads the call's urgent jobs that no worker has taken yet itself, rather than wait
   for a worker to wake up for them and for it to wake the caller. */
int64_t smoe_pool_finish(struct smoe_pool *p, struct smoe_call *call) {
    if (!call->started) return 0;
    struct bounce own = {NULL, 0}, *b = &own;
    pthread_mutex_lock(&p->lock);
    if (!p->caller_bounce_busy) {
        p->caller_bounce_busy = 1;
        b = &p->caller_bounce;
    }
    while (call->remaining > 0) {
        struct smoe_job *j = call->own != NULL ? call->own : take_queued(p, call);
        call->own = NULL;
        if (j == NULL) {
            pthread_cond_wait(&call->done, &p->lock);
            continue;
        }
        p->caller_jobs += 1 + j->chain;
        p->urgent_busy++;
        (void)run_entry(p, j, b);
        end_urgent(p);
    }
    int64_t failed = call->failed;
    if (b == &p->caller_bounce) p->caller_bounce_busy = 0;
    pthread_mutex_unlock(&p->lock);
    free(own.buf);
    pthread_cond_destroy(&call->done);
    call->started = 0;
    return failed;
}

/* Queue n jobs (urgent: ahead of every background job) and wait until all are done.
   Returns the number of jobs whose status is not 0. */
int64_t smoe_pool_run(struct smoe_pool *p, struct smoe_job *jobs, int64_t n, int32_t urgent) {
    struct smoe_call call;
    memset(&call, 0, sizeof call);
    smoe_pool_start(p, &call, jobs, n, urgent ? SMOE_URGENT_LAST : 0);
    return smoe_pool_finish(p, &call);
}

/* Stop the workers (every call must have been finished: smoe_pool_run returned, smoe_pool_finish
   called) and free the pool. */
void smoe_pool_free(struct smoe_pool *p) {
    if (p == NULL) return;
    pthread_mutex_lock(&p->lock);
    p->closing = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (int32_t i = 0; i < p->n_threads; i++) pthread_join(p->workers[i], NULL);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->lock);
    free(p->caller_bounce.buf);
    free(p);
}

size_t smoe_job_sizeof(void) { return sizeof(struct smoe_job); }

#ifndef SMOE_NO_PYTHON
#include <Python.h>
static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_readpool", "ctypes-loaded read pool", -1, NULL};
PyMODINIT_FUNC PyInit__readpool(void) { return PyModule_Create(&moduledef); }
#endif
