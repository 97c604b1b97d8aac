/* Sanitizer stress test of the read pool (smoe_gguf/_readpool.c), run by `make sanitize` under
 * ThreadSanitizer and under AddressSanitizer + UndefinedBehaviorSanitizer.
 *
 * A temporary file of about 32 MiB of random bytes (its last block partial) is opened twice: with
 * O_DIRECT where the file system takes it (a plain descriptor where open says EINVAL, e.g. tmpfs;
 * F_NOCACHE on macOS) and plain. Parts like a pack's (4 KiB-aligned offsets, lengths of whole
 * blocks, odd lengths, tiny ones, ~1 MiB ones), parts at unaligned offsets (the bounce path),
 * parts that end at the end of the file and parts that run past it are read by several submitter
 * threads at once through one pool, in random batches, urgent and background mixed, into
 * destinations both block-aligned and misaligned, each between guard bytes. Every job's status is
 * checked (0, SMOE_MISMATCH for a deliberately wrong digest, SMOE_SHORT past the end of the file),
 * and so are its bytes (against the file's, read plainly), its guards, in_place and bytes_read.
 * Also: background calls ended by a hook (a native prefetch's shape), cancelled and promoted while
 * queued; the portable sha256 against known vectors and against the library digest, a pass with the
 * portable digest in the workers, and pools created and freed over and over.
 *
 * Prints one line and exits 0 on success; on any failure, prints what failed and exits 1.
 * Environment: SMOE_STRESS_SEED (a number) to replay a run, SMOE_STRESS_ROUNDS (rounds per
 * submitter in the main phase, 40 by default: a few seconds under ThreadSanitizer),
 * SMOE_STRESS_VERBOSE=1 (each stage's time on stderr).
 *
 * Deliberate bugs in this harness only, to see the sanitizers fail the make:
 *   -DSMOE_TEST_RACE      an unsynchronized counter shared by the submitters (ThreadSanitizer)
 *   -DSMOE_TEST_OVERFLOW  one byte read past a destination buffer (AddressSanitizer)
 * and, to exercise an edge the main stress leaves out: -DSMOE_STRESS_ZERO_LENGTH adds zero-length
 * jobs (expected status 0).
 */
#ifndef SMOE_NO_PYTHON
#define SMOE_NO_PYTHON
#endif
#include "../../smoe_gguf/_readpool.c" /* defines _GNU_SOURCE before any system header */

#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/types.h>

#define FILE_SIZE (((int64_t)32 << 20) + 2731) /* not a whole number of blocks */
#define GUARD 4096                             /* guard bytes each side of a destination */
#define MAX_LEN (((int64_t)1 << 20) + 16384)
#define MAX_MISALIGN 4095
#define SLOT_BYTES ((size_t)(GUARD + MAX_MISALIGN + MAX_LEN + GUARD))
#define N_SUBMITTERS 4
#define N_WORKERS 4
#define MAX_BATCH 16
#define GUARD_BYTE 0xA5

static uint64_t g_seed;
static uint8_t *g_ref;      /* the file's bytes, read through the plain descriptor */
static uint8_t *g_neg;      /* their complement, and zeros' past the end (what a destination holds before a read) */
static uint8_t g_guard[GUARD];
static int g_fd_plain = -1, g_fd_direct = -1;
static int g_o_direct;      /* g_fd_direct was really opened with O_DIRECT */
static const char *g_direct_how = "";

/* ------------------------------------------------------------------ failing */

static void fail(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "readpool_stress: FAIL (seed %" PRIu64 "): ", g_seed);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    _exit(1);
}

/* ------------------------------------------------------------------ random */

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t below(uint64_t *s, uint64_t n) { return n ? splitmix(s) % n : 0; }

/* ------------------------------------------------------------------ parts */

enum { P_OK, P_EOF_END, P_PAST_EOF };

struct part {
    int64_t offset, length;
    int kind;
    uint8_t digest[32]; /* of the file's bytes (P_OK, P_EOF_END) */
    uint64_t xxh;       /* their XXH64 */
};

#define MAX_PARTS 512
static struct part g_parts[MAX_PARTS];
static int g_n_parts;
static int g_leaves[32];    /* the first of three parts that follow each other in the file */
static int g_n_leaves;

static int64_t length_of(uint64_t *s, int shape) {
    switch (shape) {
    case 0: return 4096 * (int64_t)(1 + below(s, 64));                             /* whole blocks */
    case 1: return 4096 * (int64_t)below(s, 32) + 1 + (int64_t)below(s, 4095);     /* odd */
    case 2: return 1 + (int64_t)below(s, 100);                                     /* tiny */
    default:                                                                       /* ~1 MiB */
        return below(s, 3) == 0 ? ((int64_t)1 << 20) : ((int64_t)1 << 20) + (int64_t)below(s, 16384) - 8192;
    }
}

static void add_part(int64_t offset, int64_t length, int kind) {
    if (g_n_parts == MAX_PARTS) fail("too many parts");
    if (length < 1 || length > MAX_LEN || offset < 0) fail("bad part %" PRId64 "+%" PRId64, offset, length);
    int past = offset + length > FILE_SIZE;
    if (past != (kind == P_PAST_EOF)) fail("part %" PRId64 "+%" PRId64 " of the wrong kind", offset, length);
    struct part *p = &g_parts[g_n_parts++];
    p->offset = offset;
    p->length = length;
    p->kind = kind;
    if (!past) smoe_sha256_portable(g_ref + offset, (size_t)length, p->digest);
    else memset(p->digest, 0x11, sizeof p->digest);
    p->xxh = past ? 0x1111 : smoe_xxh64(g_ref + offset, (size_t)length, 0);
}

static void build_parts(uint64_t *s) {
    const int64_t blocks = FILE_SIZE / SMOE_BLOCK; /* whole blocks in the file */
    for (int shape = 0; shape < 4; shape++) {
        int big = shape == 3; /* fewer ~1 MiB parts: they would make most of the run time */
        for (int i = 0; i < (big ? 12 : 48); i++) { /* block-aligned offsets, as a pack's parts */
            int64_t len = length_of(s, shape);
            add_part(SMOE_BLOCK * (int64_t)below(s, (uint64_t)((FILE_SIZE - len) / SMOE_BLOCK + 1)), len, P_OK);
        }
        for (int i = 0; i < (big ? 4 : 16); i++) { /* unaligned offsets: the bounce path */
            int64_t len = length_of(s, shape);
            int64_t off = 1 + (int64_t)below(s, (uint64_t)(FILE_SIZE - len - 1));
            if (off % SMOE_BLOCK == 0) off -= 1;
            add_part(off, len, P_OK);
        }
    }
    /* leaves: three parts of whole blocks, each where the last ends (a chain: one preadv) */
    for (int i = 0; i < 16; i++) {
        int64_t len[3], total = 0;
        for (int q = 0; q < 3; q++) total += len[q] = SMOE_BLOCK * (int64_t)(1 + below(s, 48));
        int64_t off = SMOE_BLOCK * (int64_t)below(s, (uint64_t)((FILE_SIZE - total) / SMOE_BLOCK + 1));
        g_leaves[g_n_leaves++] = g_n_parts;
        for (int q = 0; q < 3; q++, off += len[q - 1]) add_part(off, len[q], P_OK);
    }
    for (int i = 0; i < 4; i++) { /* ... whose last part runs past the end of the file */
        int64_t off3 = (blocks - (int64_t)below(s, 3)) * SMOE_BLOCK;
        int64_t len3 = (FILE_SIZE - off3 + SMOE_BLOCK - 1) / SMOE_BLOCK * SMOE_BLOCK + SMOE_BLOCK * (int64_t)below(s, 2);
        int64_t len2 = SMOE_BLOCK * (int64_t)(1 + below(s, 8)), len1 = SMOE_BLOCK * (int64_t)(1 + below(s, 8));
        g_leaves[g_n_leaves++] = g_n_parts;
        add_part(off3 - len2 - len1, len1, P_OK);
        add_part(off3 - len2, len2, P_OK);
        add_part(off3, len3, P_PAST_EOF);
    }
    add_part(0, 4096, P_OK);
    add_part(0, 1, P_OK);
    for (int i = 0; i < 16; i++) { /* ending at the end of the file */
        if (i % 2 == 0) {
            int64_t off = (blocks - (int64_t)below(s, 4)) * SMOE_BLOCK;
            add_part(off, FILE_SIZE - off, P_EOF_END);
        } else {
            int64_t len = length_of(s, (int)below(s, 4));
            add_part(FILE_SIZE - len, len, P_EOF_END);
        }
    }
    for (int i = 0; i < 32; i++) { /* running past it */
        int64_t off;
        switch (i % 4) {
        case 0: off = (blocks - (int64_t)below(s, 4)) * SMOE_BLOCK; break;        /* aligned, inside */
        case 1: off = FILE_SIZE - 1 - (int64_t)below(s, 5000); break;              /* unaligned, inside */
        case 2: off = (blocks + 1 + (int64_t)below(s, 3)) * SMOE_BLOCK; break;    /* aligned, beyond */
        default: off = FILE_SIZE + (int64_t)below(s, 10000); break;                 /* at or beyond */
        }
        int64_t len = (off < FILE_SIZE ? FILE_SIZE - off : 0) + 1 + (int64_t)below(s, 9000);
        if (i % 8 == 0) len = len + SMOE_BLOCK - len % SMOE_BLOCK; /* whole blocks */
        add_part(off, len, P_PAST_EOF);
    }
}

/* ------------------------------------------------------------------ the file */

static void make_file(uint64_t *s) {
    const char *dir = getenv("TMPDIR");
    if (dir == NULL || *dir == '\0') dir = "/tmp";
    char path[4096];
    snprintf(path, sizeof path, "%s/smoe-readpool-stress-XXXXXX", dir);
    int wfd = mkstemp(path);
    if (wfd < 0) fail("mkstemp in %s: %s", dir, strerror(errno));
    /* whole words, the tail of the last one unused: a byte at a time is slow under ThreadSanitizer */
    const size_t words = (size_t)(FILE_SIZE + 2 * MAX_LEN + 7) / 8;
    g_ref = (uint8_t *)malloc(words * 8);
    uint8_t *data = (uint8_t *)malloc(words * 8);
    g_neg = (uint8_t *)malloc(words * 8); /* past-EOF parts end before FILE_SIZE + 2 MAX_LEN */
    if (g_ref == NULL || data == NULL || g_neg == NULL) fail("out of memory");
    for (size_t i = 0; i < words; i++) ((uint64_t *)data)[i] = splitmix(s);
    for (int64_t done = 0; done < FILE_SIZE;) {
        ssize_t w = write(wfd, data + done, (size_t)(FILE_SIZE - done));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail("write %s: %s", path, strerror(errno));
        done += w;
    }
    if (fsync(wfd) != 0) fail("fsync %s: %s", path, strerror(errno));
    close(wfd);

    g_fd_plain = open(path, O_RDONLY);
    if (g_fd_plain < 0) fail("open %s: %s", path, strerror(errno));
#if defined(O_DIRECT)
    g_fd_direct = open(path, O_RDONLY | O_DIRECT);
    if (g_fd_direct >= 0) {
        g_o_direct = 1;
        g_direct_how = "O_DIRECT";
    } else if (errno == EINVAL) {
        g_fd_direct = open(path, O_RDONLY);
        g_direct_how = "plain (O_DIRECT refused: EINVAL)";
    } else {
        fail("open %s with O_DIRECT: %s", path, strerror(errno));
    }
#else
    g_fd_direct = open(path, O_RDONLY);
#if defined(F_NOCACHE)
    if (g_fd_direct >= 0 && fcntl(g_fd_direct, F_NOCACHE, 1) != 0) fail("F_NOCACHE: %s", strerror(errno));
    g_direct_how = "F_NOCACHE";
#else
    g_direct_how = "plain (no O_DIRECT)";
#endif
#endif
    if (g_fd_direct < 0) fail("open %s: %s", path, strerror(errno));
    if (unlink(path) != 0) fail("unlink %s: %s", path, strerror(errno)); /* gone however we exit */

    int64_t got = read_full(g_fd_plain, g_ref, FILE_SIZE, 0, 0);
    if (got != FILE_SIZE) fail("reading the file back: %" PRId64 " of %" PRId64 " bytes", got, FILE_SIZE);
    if (memcmp(g_ref, data, (size_t)FILE_SIZE) != 0) fail("the file does not read back as written");
    free(data);
    memset(g_ref + FILE_SIZE, 0, words * 8 - (size_t)FILE_SIZE);
    for (size_t i = 0; i < words; i++) ((uint64_t *)g_neg)[i] = ~((uint64_t *)g_ref)[i];
    memset(g_guard, GUARD_BYTE, sizeof g_guard);
}

/* ------------------------------------------------------------------ submitters */

struct expect {
    const struct part *part; /* NULL: a zero-length job */
    int32_t status;
    int digest;              /* 0: none, 1: the right one, 2: a wrong one */
    size_t misalign;
};

struct submitter {
    pthread_t thread;
    int id;
    struct smoe_pool *pool;
    int rounds;
    uint64_t seed;
    uint8_t *slots[MAX_BATCH];
    /* tallies */
    int64_t jobs, ok, mismatch, short_, in_place, bounced, urgent_jobs, background_jobs, bytes;
};

#ifdef SMOE_TEST_RACE
static int64_t g_racy_counter; /* deliberately unsynchronized: ThreadSanitizer must report it */
#endif

static void check_guards(const struct submitter *t, int k, const uint8_t *slot, const uint8_t *dest, int64_t len) {
    /* memcmp, not a loop: the sanitizers check a range at once instead of each byte */
    if (memcmp(slot, g_guard, GUARD) != 0 || memcmp(slot + GUARD, g_guard, (size_t)(dest - slot - GUARD)) != 0)
        for (const uint8_t *q = slot; q < dest; q++)
            if (*q != GUARD_BYTE)
                fail("submitter %d job %d: guard byte %td before the destination was written", t->id, k, dest - q);
    if (memcmp(dest + len, g_guard, GUARD) != 0)
        for (const uint8_t *q = dest + len; q < dest + len + GUARD; q++)
            if (*q != GUARD_BYTE)
                fail("submitter %d job %d: guard byte %td after the destination (length %" PRId64 ") was written",
                     t->id, k, q - (dest + len), len);
}

static void *submit(void *arg) {
    struct submitter *t = (struct submitter *)arg;
    uint64_t s = t->seed;
    struct smoe_job jobs[MAX_BATCH];
    struct expect exp[MAX_BATCH];
    uint8_t wrong[MAX_BATCH][32];
    for (int r = 0; r < t->rounds; r++) {
        int n = 1 + (int)below(&s, MAX_BATCH);
        int urgent = (int)below(&s, 2);
        int64_t expect_failed = 0;
        int leaf = -1, leaf_left = 0; /* a leaf's parts in jobs one after another: the pool chains them */
        int32_t leaf_fd = -1, leaf_direct = 0;
        for (int k = 0; k < n; k++) {
            struct smoe_job *j = &jobs[k];
            struct expect *e = &exp[k];
            memset(j, 0, sizeof *j);
            /* stale results: the pool must overwrite them */
            j->status = 12345;
            j->in_place = 7;
            j->bytes_read = -5;
            if (leaf_left == 0 && k + 3 <= n && below(&s, 3) == 0) {
                leaf = g_leaves[below(&s, (uint64_t)g_n_leaves)];
                leaf_left = 3;
            }
            e->part = leaf_left > 0 ? &g_parts[leaf + 3 - leaf_left] : &g_parts[below(&s, (uint64_t)g_n_parts)];
#ifdef SMOE_STRESS_ZERO_LENGTH
            if (leaf_left == 0 && below(&s, 16) == 0) e->part = NULL;
#endif
            int64_t off = e->part ? e->part->offset : SMOE_BLOCK * (int64_t)below(&s, 16);
            int64_t len = e->part ? e->part->length : 0;
            if (below(&s, 3) == 0) {
                j->fd = g_fd_direct;
                j->direct = g_o_direct;
            } else {
                j->fd = g_fd_plain;
                j->direct = (int32_t)below(&s, 2); /* the block-aligned path works on any descriptor */
            }
            if (leaf_left == 3) {
                leaf_fd = j->fd;
                leaf_direct = j->direct;
            } else if (leaf_left > 0) { /* the leaf's descriptor; a destination out of line now and then */
                j->fd = leaf_fd;
                j->direct = leaf_direct;
            }
            uint64_t m = below(&s, leaf_left > 0 ? 24 : 4);
            e->misalign = m < 2 || m > 3 ? 0 : m == 2 ? 8 : 1 + (size_t)below(&s, MAX_MISALIGN);
            if (leaf_left > 0) leaf_left--;
            uint8_t *slot = t->slots[k];
            uint8_t *dest = slot + GUARD + e->misalign;
            j->offset = off;
            j->length = len;
            j->dest = dest;
            uint64_t d = below(&s, 20);
            e->digest = e->part == NULL ? 0 : d < 11 ? 1 : d < 14 ? 2 : 0;
            if (e->digest == 1) {
                j->sha256 = e->part->digest;
            } else if (e->digest == 2) { /* one bit off */
                memcpy(wrong[k], e->part->digest, 32);
                wrong[k][below(&s, 32)] ^= (uint8_t)(1u << below(&s, 8));
                j->sha256 = wrong[k];
            } else {
                j->sha256 = NULL;
            }
            if (e->part != NULL && below(&s, 3) == 0) { /* the fast check instead (of the same verdict) */
                j->check_xxh64 = 1;
                j->xxh64 = e->digest == 2 ? e->part->xxh ^ (1ull << below(&s, 64)) : e->part->xxh;
                if (e->digest == 0) e->digest = 1;  /* checked: right */
            }
            if (e->part && e->part->kind == P_PAST_EOF) e->status = SMOE_SHORT;
            else if (e->digest == 2) e->status = SMOE_MISMATCH;
            else e->status = 0;
            expect_failed += e->status != 0;
            /* guards around, and the complement of the file's bytes inside (a byte not written differs) */
            memset(slot, GUARD_BYTE, GUARD + e->misalign);
            memcpy(dest, g_neg + off, (size_t)len);
            memset(dest + len, GUARD_BYTE, GUARD);
        }
#ifdef SMOE_TEST_RACE
        g_racy_counter++;
#endif
        int64_t failed = smoe_pool_run(t->pool, jobs, n, urgent);
        if (urgent) t->urgent_jobs += n;
        else t->background_jobs += n;
        for (int k = 0; k < n; k++) {
            struct smoe_job *j = &jobs[k];
            struct expect *e = &exp[k];
            const uint8_t *slot = t->slots[k];
            const uint8_t *dest = (const uint8_t *)j->dest;
            int64_t off = j->offset, len = j->length;
            const char *fdname = j->fd == g_fd_plain ? "plain" : "direct";
            if (j->status != e->status)
                fail("submitter %d round %d job %d (%s fd, direct=%d, offset %" PRId64 ", length %" PRId64
                     ", dest+%zu, digest %s, %s): status %d, expected %d",
                     t->id, r, k, fdname, j->direct, off, len, e->misalign,
                     e->digest == 0 ? "none" : e->digest == 1 ? "right" : "wrong",
                     urgent ? "urgent" : "background", j->status, e->status);
            check_guards(t, k, slot, dest, len);
#ifdef SMOE_TEST_OVERFLOW
            if (r == 0 && k == 0 && dest[SLOT_BYTES - GUARD - e->misalign] == 0x42) t->bytes++; /* past the slot */
#endif
            if (j->read_seconds < 0 || j->hash_seconds < 0) fail("submitter %d job %d: negative times", t->id, k);
            int hashed = j->status != SMOE_SHORT && (j->sha256 != NULL || j->check_xxh64);
            if (!hashed && j->hash_seconds != 0.0) fail("submitter %d job %d: hash time without a hash", t->id, k);
            t->jobs++;
            if (j->status == SMOE_SHORT) {
                t->short_++;
                int64_t avail = off < FILE_SIZE ? FILE_SIZE - off : 0;
                if (!j->direct) {
                    if (j->bytes_read != avail)
                        fail("submitter %d job %d (offset %" PRId64 ", length %" PRId64 "): short read of %" PRId64
                             " bytes, expected %" PRId64, t->id, k, off, len, j->bytes_read, avail);
                    if (memcmp(dest, g_ref + off, (size_t)avail) != 0)
                        fail("submitter %d job %d: the bytes before the end of the file are wrong", t->id, k);
                } else if (j->bytes_read < 0 || j->bytes_read > avail + SMOE_BLOCK) {
                    fail("submitter %d job %d: short direct read of %" PRId64 " bytes, %" PRId64 " available",
                         t->id, k, j->bytes_read, avail);
                }
                continue;
            }
            /* 0 or SMOE_MISMATCH: the bytes were read in full */
            if (j->status == 0) t->ok++;
            else t->mismatch++;
            t->bytes += len;
            if (len > 0 && memcmp(dest, g_ref + off, (size_t)len) != 0) {
                int64_t at = 0;
                while (dest[at] == g_ref[off + at]) at++;
                fail("submitter %d round %d job %d (%s fd, direct=%d, offset %" PRId64 ", length %" PRId64
                     ", dest+%zu): byte %" PRId64 " differs from the file's",
                     t->id, r, k, fdname, j->direct, off, len, e->misalign, at);
            }
            int want_in_place = j->direct && off % SMOE_BLOCK == 0 && (uintptr_t)dest % SMOE_BLOCK == 0 && len >= SMOE_BLOCK;
            if (j->in_place != want_in_place)
                fail("submitter %d job %d (direct=%d, offset %" PRId64 ", length %" PRId64 ", dest+%zu): in_place %d, expected %d",
                     t->id, k, j->direct, off, len, e->misalign, j->in_place, want_in_place);
            if (j->in_place) t->in_place++;
            else if (j->direct) t->bounced++;
            if (!j->direct ? j->bytes_read != len : (j->bytes_read < len || j->bytes_read >= len + 2 * SMOE_BLOCK))
                fail("submitter %d job %d (direct=%d, offset %" PRId64 ", length %" PRId64 "): bytes_read %" PRId64,
                     t->id, k, j->direct, off, len, j->bytes_read);
        }
        if (failed != expect_failed)
            fail("submitter %d round %d: smoe_pool_run says %" PRId64 " failed, expected %" PRId64, t->id, r, failed,
                 expect_failed);
    }
    return NULL;
}

struct phase {
    int64_t jobs, ok, mismatch, short_, in_place, bounced, bytes;
    double seconds;
};

static void run_phase(struct smoe_pool *pool, int submitters, int rounds, uint64_t *s, struct phase *ph) {
    struct submitter t[N_SUBMITTERS];
    double t0 = now_seconds();
    int64_t urgent0 = pool->urgent_jobs, background0 = pool->background_jobs;
    for (int i = 0; i < submitters; i++) {
        memset(&t[i], 0, sizeof t[i]);
        t[i].id = i;
        t[i].pool = pool;
        t[i].rounds = rounds;
        t[i].seed = splitmix(s);
        for (int k = 0; k < MAX_BATCH; k++)
            if (posix_memalign((void **)&t[i].slots[k], SMOE_BLOCK, SLOT_BYTES) != 0) fail("out of memory");
    }
    for (int i = 0; i < submitters; i++)
        if (pthread_create(&t[i].thread, NULL, submit, &t[i]) != 0) fail("pthread_create: %s", strerror(errno));
    int64_t urgent = 0, background = 0;
    for (int i = 0; i < submitters; i++) {
        pthread_join(t[i].thread, NULL);
        ph->jobs += t[i].jobs;
        ph->ok += t[i].ok;
        ph->mismatch += t[i].mismatch;
        ph->short_ += t[i].short_;
        ph->in_place += t[i].in_place;
        ph->bounced += t[i].bounced;
        ph->bytes += t[i].bytes;
        urgent += t[i].urgent_jobs;
        background += t[i].background_jobs;
        for (int k = 0; k < MAX_BATCH; k++) free(t[i].slots[k]);
    }
    ph->seconds += now_seconds() - t0;
    pthread_mutex_lock(&pool->lock);
    int64_t pu = pool->urgent_jobs - urgent0, pb = pool->background_jobs - background0;
    int idle = pool->head[0] == NULL && pool->head[1] == NULL && pool->busy == 0;
    pthread_mutex_unlock(&pool->lock);
    if (pu != urgent || pb != background)
        fail("the pool counted %" PRId64 " urgent and %" PRId64 " background jobs, submitted %" PRId64 " and %" PRId64,
             pu, pb, urgent, background);
    if (!idle) fail("the pool is not idle after every run returned");
}

/* ------------------------------------------------------------------ sha256 */

static void hex(const uint8_t *md, char *out) {
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void check_vector(const char *name, const void *data, size_t n, const char *want) {
    uint8_t md[32];
    char got[65];
    if (smoe_sha256_portable((const unsigned char *)data, n, md) != md) fail("smoe_sha256_portable returns not md");
    hex(md, got);
    if (strcmp(got, want) != 0) fail("sha256(%s) = %s, expected %s", name, got, want);
}

static int64_t check_sha256(uint64_t *s) {
    check_vector("\"\"", "", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    check_vector("\"abc\"", "abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    check_vector("the 56-byte FIPS message", "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 56,
                 "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    check_vector("the 112-byte FIPS message",
                 "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
                 112, "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    uint8_t *million = (uint8_t *)malloc(1000000);
    if (million == NULL) fail("out of memory");
    memset(million, 'a', 1000000);
    check_vector("a million 'a'", million, 1000000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(million);

    struct smoe_pool *p = smoe_pool_new(1, 1);
    if (p == NULL) fail("smoe_pool_new(1, 1) failed");
    int64_t compared = 0;
    if (smoe_pool_library_sha256(p)) {
        if (p->sha256 == NULL) fail("smoe_pool_library_sha256 says 1 without a library function");
        for (int i = 0; i < 400; i++) {
            size_t n = i < 200 ? (size_t)i : i < 390 ? (size_t)below(s, 20000) : (size_t)below(s, 3 << 20);
            const uint8_t *d = g_ref + below(s, (uint64_t)(FILE_SIZE - (int64_t)n)); /* any alignment */
            uint8_t a[32], b[32];
            p->sha256(d, n, a);
            smoe_sha256_portable(d, n, b);
            if (memcmp(a, b, 32) != 0) {
                char ha[65], hb[65];
                hex(a, ha);
                hex(b, hb);
                fail("sha256 of %zu bytes: library %s, portable %s", n, ha, hb);
            }
            compared++;
        }
    }
    smoe_pool_free(p);
    return compared;
}

/* ------------------------------------------------------------------ lifecycle */

static int lifecycle(uint64_t *s) {
    smoe_pool_free(NULL);
    int cycles = 0;
    for (int i = 0; i < 120; i++, cycles++) {
        int32_t want = 1 + i % 8;
        struct smoe_pool *p = smoe_pool_new(want, i % 2);
        if (p == NULL) fail("smoe_pool_new(%d, %d) failed", want, i % 2);
        if (smoe_pool_workers(p) != want) fail("smoe_pool_workers = %d, asked for %d", smoe_pool_workers(p), want);
        if (smoe_pool_background_cap(p) != (int64_t)want * SMOE_BACKGROUND_BYTES)
            fail("background reads may hold %" PRId64 " bytes on %d workers", smoe_pool_background_cap(p), want);
        if (smoe_pool_library_sha256(p) && i % 2 == 0) fail("use_library=0 but the pool uses the library");
        if (i % 3 == 0) { /* one small run before the free */
            const struct part *pt = &g_parts[below(s, 64 * 3)]; /* within the file */
            uint8_t *buf = NULL;
            if (posix_memalign((void **)&buf, SMOE_BLOCK, (size_t)pt->length) != 0) fail("out of memory");
            struct smoe_job j;
            memset(&j, 0, sizeof j);
            j.fd = i % 2 ? g_fd_direct : g_fd_plain;
            j.direct = i % 2 ? g_o_direct : 1;
            j.offset = pt->offset;
            j.length = pt->length;
            j.dest = buf;
            j.sha256 = pt->digest;
            if (smoe_pool_run(p, &j, 1, i % 2) != 0 || j.status != 0)
                fail("lifecycle %d: one job failed with status %d", i, j.status);
            if (memcmp(buf, g_ref + pt->offset, (size_t)pt->length) != 0) fail("lifecycle %d: wrong bytes", i);
            free(buf);
        }
        if (smoe_pool_run(p, NULL, 0, 1) != 0) fail("smoe_pool_run of no jobs");
        smoe_pool_free(p);
    }
    struct smoe_pool *p = smoe_pool_new(0, 0); /* clamped to 1 */
    if (p == NULL || smoe_pool_workers(p) != 1) fail("smoe_pool_new(0, 0) is not one worker");
    smoe_pool_free(p);
    p = smoe_pool_new(SMOE_MAX_WORKERS + 10, 0); /* clamped to the maximum */
    if (p == NULL || smoe_pool_workers(p) < 1 || smoe_pool_workers(p) > SMOE_MAX_WORKERS)
        fail("smoe_pool_new(%d, 0) has %d workers", SMOE_MAX_WORKERS + 10, p ? smoe_pool_workers(p) : -1);
    smoe_pool_free(p);
    return cycles + 2;
}

/* ------------------------------------------------------------------ background calls */

/* A native prefetch's shape (the pager's): a leaf's three parts started as one background call
   whose last job calls a hook, cancelled or promoted to urgent by another thread meanwhile, and
   started again once over. Background jobs are held now and then, so that cancels and promotes
   find queued jobs, and one or two are let run at once whatever their bytes. Each call must end
   exactly once: by its hook (bytes right) or by a cancel. */
#define N_CALLS 24

struct hooked {
    struct smoe_call call; /* first: the hook gets it */
    struct smoe_job jobs[3];
    uint8_t *buf[3];
    int leaf;
    int in_flight;         /* the main thread's view: started, not yet seen over */
};

static pthread_mutex_t g_hook_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_hook_cond = PTHREAD_COND_INITIALIZER;
static int64_t g_hooks_run, g_hook_over[N_CALLS];

static struct hooked g_calls[N_CALLS];

static void hook(struct smoe_call *call) {
    struct hooked *h = (struct hooked *)call;
    if (call->failed != 0) fail("a background call's jobs failed");
    for (int i = 0; i < 3; i++)
        if (memcmp(h->buf[i], g_ref + h->jobs[i].offset, (size_t)h->jobs[i].length) != 0)
            fail("a background call's part %d has wrong bytes", i);
    pthread_mutex_lock(&g_hook_lock);
    g_hooks_run++;
    g_hook_over[h - g_calls]++;
    pthread_cond_broadcast(&g_hook_cond);
    pthread_mutex_unlock(&g_hook_lock);
}

static void start_call(struct smoe_pool *pool, struct hooked *h, uint64_t *s) {
    h->leaf = g_leaves[below(s, 16)]; /* the leaves within the file */
    for (int i = 0; i < 3; i++) {
        const struct part *pt = &g_parts[h->leaf + i];
        memset(&h->jobs[i], 0, sizeof h->jobs[i]);
        h->jobs[i].fd = g_fd_direct;
        h->jobs[i].direct = g_o_direct;
        h->jobs[i].offset = pt->offset;
        h->jobs[i].length = pt->length;
        h->jobs[i].dest = h->buf[i];
        memset(h->buf[i], 0, (size_t)h->jobs[i].length);
    }
    h->call.remaining = h->call.failed = 0;
    h->in_flight = 1;
    smoe_pool_start(pool, &h->call, h->jobs, 3, 0);
}

static void background_calls(uint64_t *s, int rounds, int64_t *cancels, int64_t *promotes, int64_t *hooks) {
    struct smoe_pool *pool = smoe_pool_new(2, 1);
    if (pool == NULL) fail("smoe_pool_new(2, 1) failed");
    int64_t started = 0, cancelled = 0, seen_over[N_CALLS] = {0};
    for (int i = 0; i < N_CALLS; i++) {
        g_calls[i].call.on_done = hook;
        for (int k = 0; k < 3; k++)
            if (posix_memalign((void **)&g_calls[i].buf[k], SMOE_BLOCK, (size_t)MAX_LEN) != 0) fail("out of memory");
    }
    for (int r = 0; r < rounds * 40; r++) {
        if (below(s, 8) == 0) smoe_pool_hold(pool, (int32_t)below(s, 2));
        if (below(s, 8) == 0) smoe_pool_set_background_entries(pool, 1 + (int32_t)below(s, 2));
        struct hooked *h = &g_calls[below(s, N_CALLS)];
        int idx = (int)(h - g_calls);
        pthread_mutex_lock(&g_hook_lock);
        int over = g_hook_over[idx] > seen_over[idx];
        if (over) seen_over[idx] = g_hook_over[idx];
        pthread_mutex_unlock(&g_hook_lock);
        if (over) h->in_flight = 0;
        if (!h->in_flight) {
            start_call(pool, h, s);
            started++;
        } else if (below(s, 2) == 0) {
            if (smoe_pool_cancel(pool, &h->call)) {
                h->in_flight = 0;
                cancelled++;
            }
        } else {
            smoe_pool_promote(pool, &h->call);
            (*promotes)++;
        }
    }
    smoe_pool_hold(pool, 0);
    pthread_mutex_lock(&g_hook_lock); /* every call not cancelled ends by its hook */
    for (int i = 0; i < N_CALLS; i++)
        while (g_calls[i].in_flight && g_hook_over[i] == seen_over[i]) pthread_cond_wait(&g_hook_cond, &g_hook_lock);
    int64_t run = g_hooks_run;
    pthread_mutex_unlock(&g_hook_lock);
    smoe_pool_free(pool);
    if (run + cancelled != started)
        fail("%" PRId64 " background calls started, %" PRId64 " hooks run and %" PRId64 " cancelled", started, run, cancelled);
    if (cancelled == 0) fail("no queued background call was cancelled");
    for (int i = 0; i < N_CALLS; i++)
        for (int k = 0; k < 3; k++) free(g_calls[i].buf[k]);
    *cancels = cancelled;
    *hooks = run;
}

/* ------------------------------------------------------------------ main */

static int g_verbose;

static void stage(const char *what, double *t) { /* SMOE_STRESS_VERBOSE=1: each stage's time */
    double now = now_seconds();
    if (g_verbose) fprintf(stderr, "readpool_stress: %s: %.2f s\n", what, now - *t);
    *t = now;
}

int main(void) {
    double start = now_seconds(), t0 = start;
    g_verbose = getenv("SMOE_STRESS_VERBOSE") != NULL && atoi(getenv("SMOE_STRESS_VERBOSE")) > 0;
    const char *seed_env = getenv("SMOE_STRESS_SEED");
    g_seed = seed_env && *seed_env ? strtoull(seed_env, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    const char *rounds_env = getenv("SMOE_STRESS_ROUNDS");
    int rounds = rounds_env && *rounds_env ? atoi(rounds_env) : 40;
    if (rounds < 1) rounds = 1;
    if (smoe_job_sizeof() != sizeof(struct smoe_job)) fail("smoe_job_sizeof() is %zu", smoe_job_sizeof());
    uint64_t s = g_seed;

    make_file(&s);
    stage("the file", &t0);
    build_parts(&s);
    stage("the parts", &t0);
    int64_t compared = check_sha256(&s);
    stage("sha256", &t0);
    int cycles = lifecycle(&s);
    stage("lifecycle", &t0);

    struct phase main_phase = {0}, portable = {0};
    struct smoe_pool *pool = smoe_pool_new(N_WORKERS, 1);
    if (pool == NULL || smoe_pool_workers(pool) != N_WORKERS) fail("smoe_pool_new(%d, 1) failed", N_WORKERS);
    if (smoe_pool_threads(pool) != N_WORKERS + 1) fail("%d threads, not the workers and a spare", smoe_pool_threads(pool));
    int library = smoe_pool_library_sha256(pool);
    run_phase(pool, N_SUBMITTERS, rounds, &s, &main_phase);
    int64_t chains = pool->chains, chained = pool->chained_jobs; /* the pool is idle: no lock needed */
    if (chains == 0) fail("no leaf's parts were read as one chain");
    /* the spare thread stays free for urgent jobs: background ones never ran on more than the workers */
    if (smoe_pool_peak_background(pool) < 1 || smoe_pool_peak_background(pool) > N_WORKERS)
        fail("background jobs ran %d at once on %d workers", smoe_pool_peak_background(pool), N_WORKERS);
    smoe_pool_free(pool);
    stage("the main stress", &t0);

    int64_t cancels = 0, promotes = 0, hooks = 0;
    background_calls(&s, rounds, &cancels, &promotes, &hooks);
    stage("background calls", &t0);

    pool = smoe_pool_new(N_WORKERS, 0); /* the portable digest in the workers */
    if (pool == NULL) fail("smoe_pool_new(%d, 0) failed", N_WORKERS);
    run_phase(pool, N_SUBMITTERS, rounds / 5 + 1, &s, &portable);
    smoe_pool_free(pool);
    stage("the portable stress", &t0);

    if (main_phase.ok == 0 || main_phase.mismatch == 0 || main_phase.short_ == 0 || main_phase.bounced == 0)
        fail("the stress missed a case: %" PRId64 " ok, %" PRId64 " mismatch, %" PRId64 " short, %" PRId64 " bounced",
             main_phase.ok, main_phase.mismatch, main_phase.short_, main_phase.bounced);
    if (main_phase.in_place == 0) fail("no job was read in place");
    close(g_fd_plain);
    close(g_fd_direct);
    free(g_ref);
    free(g_neg);
    printf("readpool_stress: ok: %" PRId64 " jobs (%" PRId64 " ok, %" PRId64 " mismatch, %" PRId64 " short; %" PRId64
           " in place, %" PRId64 " bounced, %" PRId64 " in %" PRId64 " chains; %.0f MiB) by %d submitters on %d workers in %.1f s, %" PRId64
           " more with the portable sha256; fd %s; sha256 vectors ok, library %s; %d pool lifecycles; seed %" PRIu64
           "; %.1f s\n",
           main_phase.jobs, main_phase.ok, main_phase.mismatch, main_phase.short_, main_phase.in_place,
           main_phase.bounced, chained, chains, (double)main_phase.bytes / (1 << 20), N_SUBMITTERS, N_WORKERS, main_phase.seconds,
           portable.jobs, g_direct_how,
           library ? (compared ? "= portable" : "unchecked") : "absent", cycles, g_seed, now_seconds() - start);
    printf("readpool_stress: background calls: %" PRId64 " hooks run, %" PRId64 " cancelled, %" PRId64 " promotes\n",
           hooks, cancels, promotes);
    return 0;
}
