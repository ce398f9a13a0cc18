/* groupnorm's CPU kernels for float32 tensors, compiled on first use by _cpu_kernel.py.

   A tensor is seen as the contiguous view (K, A, C, B): K kept rows (the batch), C channels in G groups of
   consecutive channels, and statistics over each group's (A, channels, B) block. NHWC and channels-last
   NCHW input is (N, H*W, C, 1); contiguous NCHW is (N, 1, C, H*W).

   Numerics are the project's (see _composite.py): every group is shifted by the mean of its leading corner
   (its first 8 reduced positions, every channel of the group), so that x - shift is exact for values near the mean, and the sums of
   (x - shift) and its square accumulate in float64 (where channels are innermost, from float32 sums of
   eight rows; a task whose float32 squares overflow is summed again in float64). The output is
   (x - shift) * scale + offset; where channels are innermost and the shift is within one standard
   deviation of zero, x * scale + (offset - shift * scale), which reads one coefficient stream fewer and
   differs from it by rounding of the output's own order (the input gradient likewise).

   Work is split into tasks of whole rows of K, or of A, or of whole groups (where B > 1, or where channels
   are innermost and a row of K fits in cache), each writing its own partial sums, which are then added in
   a fixed order. The split depends on the shape alone, so results do not depend on the number of
   threads. */

#if defined(__linux__)
#define _DEFAULT_SOURCE /* madvise */
#include <sys/mman.h>
#endif
#include <math.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define GROUPNORM_THREAD_SCRATCH 1
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

#define CORNER 8
/* elements of a row summed in float32 before the sum is added in float64 */
#define ROW_BLOCK 256
/* interleaved float32 accumulators of a row's sums: one AVX register (GCC's and Clang's vector
   extensions; two SSE registers where AVX is not enabled) */
#define LANES 8
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef double vdouble __attribute__((vector_size(4 * sizeof(double))));

_Static_assert(CORNER == LANES, "a channel's corner row is loaded as one vector");

static inline vfloat load_lanes(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}
static inline vdouble widen_low(vfloat f) {
    return __builtin_convertvector(__builtin_shufflevector(f, f, 0, 1, 2, 3), vdouble);
}
static inline vdouble widen_high(vfloat f) {
    return __builtin_convertvector(__builtin_shufflevector(f, f, 4, 5, 6, 7), vdouble);
}
/* per-channel coefficient planes of the affine pass */
#define COEFS 5
/* tasks wanted at least, where the input allows: enough to keep 16 threads busy */
#define TASKS 16
/* elements of a row of K that a task holding whole groups of channels-innermost input reads from cache
   (1 MiB of float32) */
#define CACHED_ROW ((i64)1 << 18)

/* A parallel loop over tasks [0, n): body(ctx, begin, end) runs each range once. A host that has its own
   thread pool installs it with groupnorm_set_parallel (torch's, for the C++ operators: one runtime in the
   process, and no idle threads spinning against it); otherwise OpenMP where compiled in, else one thread. */
typedef void (*groupnorm_body)(void *ctx, int64_t begin, int64_t end);
typedef void (*groupnorm_parallel_fn)(int64_t n, groupnorm_body body, void *ctx);
static groupnorm_parallel_fn host_parallel = NULL;

void groupnorm_set_parallel(groupnorm_parallel_fn fn) { host_parallel = fn; }

static void parallel_for(int64_t n, groupnorm_body body, void *ctx, int nthreads) {
    if (nthreads <= 1 || n <= 1) {
        body(ctx, 0, n);
    } else if (host_parallel) {
        host_parallel(n, body, ctx);
    } else {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t t = 0; t < n; t++) body(ctx, t, t + 1);
#else
        body(ctx, 0, n);
#endif
    }
}

/* Scratch memory. Each call needs per-channel arrays (shifts, partial sums, coefficients) of up to a few
   MiB; allocated afresh, their pages fault in on every call, which at mid-sized shapes costs as much as
   the normalization. So each thread keeps its scratch (two slots, used one inside the other) between
   calls, freed when the thread exits; buffers above SCRATCH_KEPT bytes, or where threads have no
   destructors, are allocated for the call alone. */
#define SCRATCH_KEPT ((size_t)16 << 20)

typedef struct {
    void *base[2];
    size_t size[2];
} scratch_slots;

#if defined(GROUPNORM_THREAD_SCRATCH)
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_keyed = 0;

static void scratch_release(void *p) {
    scratch_slots *slots = p;
    free(slots->base[0]);
    free(slots->base[1]);
    free(slots);
}

static void scratch_key_init(void) { scratch_keyed = pthread_key_create(&scratch_key, scratch_release) == 0; }

static scratch_slots *thread_slots(void) {
    pthread_once(&scratch_once, scratch_key_init);
    if (!scratch_keyed) return NULL;
    scratch_slots *slots = pthread_getspecific(scratch_key);
    if (!slots) {
        slots = calloc(1, sizeof *slots);
        if (slots && pthread_setspecific(scratch_key, slots) != 0) {
            free(slots);
            slots = NULL;
        }
    }
    return slots;
}
#else
static scratch_slots *thread_slots(void) { return NULL; }
#endif

/* At least `bytes` of memory for slot `slot` (0 or 1) of this call; *owned says whether the caller frees
   it (give_scratch). NULL when out of memory. */
static void *take_scratch(int slot, size_t bytes, int *owned) {
    scratch_slots *slots = bytes <= SCRATCH_KEPT ? thread_slots() : NULL;
    if (!slots) {
        *owned = 1;
        return malloc(bytes ? bytes : 1);
    }
    *owned = 0;
    if (slots->size[slot] < bytes) {
        free(slots->base[slot]);
        const size_t want = bytes + bytes / 4;
        slots->base[slot] = malloc(want);
        slots->size[slot] = slots->base[slot] ? want : 0;
    }
    return slots->base[slot];
}

static void give_scratch(void *p, int owned) {
    if (owned) free(p);
}

/* How the work is split: A into a_chunks chunks of a_step rows, groups into g_chunks chunks of g_step. */
typedef struct {
    i64 K, A, C, B, G, cg;
    i64 a_step, a_chunks, g_step, g_chunks;
} split;

static split make_split(i64 K, i64 A, i64 C, i64 B, i64 G) {
    split s = {K, A, C, B, G, C / G, A, 1, G, 1};
    const i64 per_a = C * B;      /* elements in one row of A */
    const i64 min_task = 1 << 15; /* elements: below this a task costs more to start than to run */
    /* Channels innermost (B == 1) and a row of K that stays in cache: tasks of whole groups (every row of
       A, a range of channels), which finish their groups while the rows are in cache instead of reading
       them again after a second parallel pass. Beyond that size a task's rows, short strided runs, come
       from memory slower than whole rows do, and the rows are split instead. */
    const int whole_rows = B == 1 && A * C <= CACHED_ROW;
    i64 tasks_k = K;
    if (tasks_k < TASKS && A > 1 && !whole_rows) {
        i64 chunks = (TASKS + K - 1) / K;
        i64 step = (A + chunks - 1) / chunks;
        i64 floor_step = (min_task + per_a - 1) / per_a;
        if (step < floor_step) step = floor_step;
        if (step > A) step = A;
        s.a_step = step;
        s.a_chunks = (A + step - 1) / step;
        tasks_k = K * s.a_chunks;
    }
    if (tasks_k < TASKS && (B > 1 || whole_rows) && G > 1) {
        i64 chunks = (TASKS + tasks_k - 1) / tasks_k;
        i64 step = (G + chunks - 1) / chunks;
        i64 per_g = s.a_step * s.cg * B;
        i64 floor_step = (min_task + per_g - 1) / per_g;
        if (step < floor_step) step = floor_step;
        if (step > G) step = G;
        s.g_step = step;
        s.g_chunks = (G + step - 1) / step;
    }
    return s;
}

/* Rows of K run at a time: the per-channel scratch (shifts, sums, coefficients: about 40 bytes per channel
   and row) stays a few MiB however many rows there are, as with (N, C) input of many rows. Each chunk has
   its own split; the chunks depend on the shape alone. */
static i64 rows_per_chunk(i64 K, i64 C) {
    i64 kc = C > 0 ? ((i64)1 << 16) / C : K;
    if (kc < TASKS) kc = TASKS;
    return kc < K ? kc : (K > 0 ? K : 1);
}

static i64 task_count(const split *s) { return s->K * s->a_chunks * s->g_chunks; }

/* The ranges of task t: k, rows [a0, a1), channels [c0, c1). */
static void task_range(const split *s, i64 t, i64 *k, i64 *a0, i64 *a1, i64 *c0, i64 *c1) {
    i64 gi = t % s->g_chunks;
    i64 ai = (t / s->g_chunks) % s->a_chunks;
    *k = t / (s->g_chunks * s->a_chunks);
    *a0 = ai * s->a_step;
    *a1 = *a0 + s->a_step < s->A ? *a0 + s->a_step : s->A;
    i64 g0 = gi * s->g_step;
    i64 g1 = g0 + s->g_step < s->G ? g0 + s->g_step : s->G;
    *c0 = g0 * s->cg;
    *c1 = g1 * s->cg;
}

/* The sums of u = p[i] - pshift and of u * v, v = q[i] - qshift (v = u without q), over n contiguous
   elements: LANES interleaved float32 accumulators (each lane sums every LANES-th element, so the loop
   vectorises with no horizontal sum inside it) over blocks of ROW_BLOCK elements (small terms, being
   shifted), each lane added to its own float64 total. Where the float32 squares overflow (beyond about
   1e19) the totals are not finite, and the run is summed again in float64. with_q is a constant at each
   call, so each variant is compiled on its own. */
static inline __attribute__((always_inline)) void run_sums(const float *p, const float *q, i64 n, float pshift,
                                                            float qshift, double *out1, double *out2,
                                                            const int with_q) {
    vdouble d1a = {0}, d1b = {0}, d2a = {0}, d2b = {0};
    double t1 = 0.0, t2 = 0.0;
    const vfloat pv = pshift - (vfloat){0}, qv = qshift - (vfloat){0};
    const i64 whole = n - n % LANES;
    for (i64 b0 = 0; b0 < whole; b0 += ROW_BLOCK) {
        const i64 b1 = b0 + ROW_BLOCK < whole ? b0 + ROW_BLOCK : whole;
        vfloat f1 = {0}, f2 = {0};
        for (i64 b = b0; b < b1; b += LANES) {
            const vfloat u = load_lanes(p + b) - pv;
            const vfloat v = with_q ? load_lanes(q + b) - qv : u;
            f1 += u;
            f2 += u * v;
        }
        d1a += widen_low(f1);
        d1b += widen_high(f1);
        d2a += widen_low(f2);
        d2b += widen_high(f2);
    }
    for (i64 b = whole; b < n; b++) {
        const double u = (double)p[b] - pshift, v = with_q ? (double)q[b] - qshift : u;
        t1 += u;
        t2 += u * v;
    }
    const vdouble e1 = d1a + d1b, e2 = d2a + d2b;
    t1 += (e1[0] + e1[1]) + (e1[2] + e1[3]);
    t2 += (e2[0] + e2[1]) + (e2[2] + e2[3]);
    if (!(isfinite(t1) && isfinite(t2))) {
        t1 = t2 = 0.0;
        for (i64 b = 0; b < n; b++) {
            const double u = (double)p[b] - pshift, v = with_q ? (double)q[b] - qshift : u;
            t1 += u;
            t2 += u * v;
        }
    }
    *out1 = t1;
    *out2 = t2;
}

/* One task's sums, per channel c in [c0, c1): of u and of u * v over rows [a0, a1) of row k of K, where
   u = p - pshift[c] and v = q - qshift[c] (q = NULL means v = u). The forward pass sums x - shift and its
   square; the backward pass sums dy and dy * (x - shift). Writes s1[c] and s2[c]. with_q is a constant
   at each call, so each variant is compiled on its own. */
static inline __attribute__((always_inline)) void task_sums(const split *s, i64 k, i64 a0, i64 a1, i64 c0,
                                                             i64 c1, const float *p, const float *pshift,
                                                             const float *q, const float *qshift,
                                                             double *restrict s1, double *restrict s2,
                                                             const int with_q) {
    const i64 A = s->A, C = s->C, B = s->B;
    const float *ps = pshift + k * C;
    const float *qs = with_q ? qshift + k * C : ps;
    if (B == 1) {
        /* channels innermost, vectorised across channels: each block of eight rows is summed in float32
           (its terms are small, being shifted), then added to the float64 sums */
        const float *restrict pf = ps, *restrict qf = qs;
        for (i64 c = c0; c < c1; c++) s1[c] = s2[c] = 0.0;
        i64 a = a0;
        for (; a + 8 <= a1; a += 8) {
            const float *restrict r = p + (k * A + a) * C;
            const float *restrict w = with_q ? q + (k * A + a) * C : r;
            for (i64 c = c0; c < c1; c++) {
                float f1 = 0.0f, f2 = 0.0f;
#define GROUPNORM_ROW(j)                                        \
    {                                                           \
        const float u = r[(j) * C + c] - pf[c];                 \
        const float v = with_q ? w[(j) * C + c] - qf[c] : u;    \
        f1 += u;                                                \
        f2 += u * v;                                            \
    }
                GROUPNORM_ROW(0) GROUPNORM_ROW(1) GROUPNORM_ROW(2) GROUPNORM_ROW(3)
                GROUPNORM_ROW(4) GROUPNORM_ROW(5) GROUPNORM_ROW(6) GROUPNORM_ROW(7)
#undef GROUPNORM_ROW
                s1[c] += f1;
                s2[c] += f2;
            }
        }
        for (; a < a1; a++) {
            const float *restrict r = p + (k * A + a) * C;
            const float *restrict w = with_q ? q + (k * A + a) * C : r;
            for (i64 c = c0; c < c1; c++) {
                const float u = r[c] - pf[c], v = with_q ? w[c] - qf[c] : u;
                s1[c] += u;
                s2[c] += u * v;
            }
        }
        /* float32 products overflow beyond about 1e19: then the whole task again, in float64 */
        int finite = 1;
        for (i64 c = c0; c < c1; c++) finite &= isfinite(s1[c]) && isfinite(s2[c]);
        if (!finite) {
            for (i64 c = c0; c < c1; c++) s1[c] = s2[c] = 0.0;
            for (a = a0; a < a1; a++) {
                const float *r = p + (k * A + a) * C;
                const float *w = with_q ? q + (k * A + a) * C : r;
                for (i64 c = c0; c < c1; c++) {
                    const double u = (double)r[c] - pf[c], v = with_q ? (double)w[c] - qf[c] : u;
                    s1[c] += u;
                    s2[c] += u * v;
                }
            }
        }
    } else if (!with_q) {
        /* rows of B innermost, one shift per group (the forward pass): each group's channels are one
           contiguous run of cg * B elements per row of A, summed as one */
        const i64 cg = s->cg, run = cg * B;
        for (i64 g0 = c0; g0 < c1; g0 += cg) {
            double t1 = 0.0, t2 = 0.0;
            for (i64 a = a0; a < a1; a++) {
                double r1, r2;
                run_sums(p + ((k * A + a) * C + g0) * B, NULL, run, ps[g0], 0.0f, &r1, &r2, 0);
                t1 += r1;
                t2 += r2;
            }
            s1[g0] = t1;
            s2[g0] = t2;
            for (i64 c = g0 + 1; c < g0 + cg; c++) s1[c] = s2[c] = 0.0;
        }
    } else {
        /* rows of B innermost: each channel's row summed as a run */
        for (i64 c = c0; c < c1; c++) {
            double t1 = 0.0, t2 = 0.0;
            for (i64 a = a0; a < a1; a++) {
                const i64 base = ((k * A + a) * C + c) * B;
                double r1, r2;
                if (with_q)
                    run_sums(p + base, q + base, B, ps[c], qs[c], &r1, &r2, 1);
                else
                    run_sums(p + base, NULL, B, ps[c], 0.0f, &r1, &r2, 0);
                t1 += r1;
                t2 += r2;
            }
            s1[c] = t1;
            s2[c] = t2;
        }
    }
}

/* One task's output, for rows [a0, a1) of row k and channels [c0, c1):
   out = (p - shift[c]) * m1[c] + m0[c], or, with q, r[c] * (q * mq[c] + (p - shift[c]) * m1[c] + m0[c]).
   coef is [K][COEFS][C] floats: shift, m1, m0, mq, r (the last two read only with q). (The backward pass's factor r keeps every
   coefficient within float32's range where rstd * rstd would not be.) */
static void task_affine(const split *s, i64 k, i64 a0, i64 a1, i64 c0, i64 c1, const float *p, const float *q,
                        const float *coef, float *out) {
    const i64 A = s->A, C = s->C, B = s->B;
    const float *restrict sh = coef + k * C * COEFS, *restrict m1 = sh + C, *restrict m0 = m1 + C;
    const float *restrict mq = m0 + C, *restrict rr = mq + C;
    /* channels innermost: where every shift of the range is zero (folded into the offset: see
       folds_shift), the same values from one coefficient stream fewer (x - 0 is x) */
    int zero = B == 1;
    for (i64 c = c0; c < c1 && zero; c++) zero = sh[c] == 0.0f;
    if (B == 1 && q) {
        for (i64 a = a0; a < a1; a++) {
            const float *restrict row = p + (k * A + a) * C, *restrict qrow = q + (k * A + a) * C;
            float *restrict dst = out + (k * A + a) * C;
            if (zero)
                for (i64 c = c0; c < c1; c++) dst[c] = rr[c] * (qrow[c] * mq[c] + (row[c] * m1[c] + m0[c]));
            else
                for (i64 c = c0; c < c1; c++)
                    dst[c] = rr[c] * (qrow[c] * mq[c] + ((row[c] - sh[c]) * m1[c] + m0[c]));
        }
    } else if (B == 1) {
        for (i64 a = a0; a < a1; a++) {
            const float *restrict row = p + (k * A + a) * C;
            float *restrict dst = out + (k * A + a) * C;
            if (zero)
                for (i64 c = c0; c < c1; c++) dst[c] = row[c] * m1[c] + m0[c];
            else
                for (i64 c = c0; c < c1; c++) dst[c] = (row[c] - sh[c]) * m1[c] + m0[c];
        }
    } else {
        for (i64 a = a0; a < a1; a++) {
            for (i64 c = c0; c < c1; c++) {
                const i64 base = ((k * A + a) * C + c) * B;
                const float *restrict row = p + base;
                float *restrict dst = out + base;
                const float shc = sh[c], m1c = m1[c], m0c = m0[c];
                if (q) {
                    const float *restrict qrow = q + base, mqc = mq[c], rc = rr[c];
                    for (i64 b = 0; b < B; b++) dst[b] = rc * (qrow[b] * mqc + ((row[b] - shc) * m1c + m0c));
                } else {
                    for (i64 b = 0; b < B; b++) dst[b] = (row[b] - shc) * m1c + m0c;
                }
            }
        }
    }
}

/* Asks the kernel to back a fresh (not yet written) buffer with huge pages where it can (Linux,
   transparent huge pages in "madvise" or "always" mode): its first write then takes one page fault per
   2 MiB instead of one per 4 KiB, which on a large output costs more than the normalization itself.
   Only a hint; errors are ignored. */
void groupnorm_prefer_huge_pages(void *buffer, i64 bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (bytes < (i64)(2 * huge)) return;
    uintptr_t start = ((uintptr_t)buffer + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)buffer + (uintptr_t)bytes) & ~(huge - 1);
    if (end > start) (void)madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
    (void)buffer;
    (void)bytes;
#endif
}

/* Per (k, channel): the group's shift, the mean over the group's channels of its first min(CORNER, A * B)
   reduced positions (row-major over (A, B), the flattened reduction axes). A corner that is not finite
   gives the shift 0. */
static void corner_shift(const split *s, const float *x, float *shift) {
    const i64 A = s->A, C = s->C, B = s->B, cg = s->cg;
    const i64 span = A * B < CORNER ? A * B : CORNER;
    for (i64 k = 0; k < s->K; k++) {
        for (i64 g = 0; g < s->G; g++) {
            double sum = 0.0;
            if (span == CORNER && B >= CORNER) {
                /* the corner is the first CORNER elements of each channel's row */
                vdouble lo = {0}, hi = {0};
                for (i64 c = g * cg; c < (g + 1) * cg; c++) {
                    const vfloat v = load_lanes(x + (k * A * C + c) * B);
                    lo += widen_low(v);
                    hi += widen_high(v);
                }
                const vdouble t = lo + hi;
                sum = (t[0] + t[1]) + (t[2] + t[3]);
            } else if (B == 1) {
                /* the corner is the group's channels at the first span rows of A: contiguous runs */
                vdouble lo = {0}, hi = {0};
                for (i64 p = 0; p < span; p++) {
                    const float *run = x + (k * A + p) * C + g * cg;
                    i64 c = 0;
                    for (; c + LANES <= cg; c += LANES) {
                        const vfloat v = load_lanes(run + c);
                        lo += widen_low(v);
                        hi += widen_high(v);
                    }
                    for (; c < cg; c++) sum += run[c];
                }
                const vdouble t = lo + hi;
                sum += (t[0] + t[1]) + (t[2] + t[3]);
            } else {
                for (i64 p = 0; p < span; p++) {
                    const i64 a = p / B, b = p % B;
                    for (i64 c = g * cg; c < (g + 1) * cg; c++) sum += x[((k * A + a) * C + c) * B + b];
                }
            }
            float mean = span ? (float)(sum / (double)(span * cg)) : 0.0f;
            if (!isfinite(mean)) mean = 0.0f;
            for (i64 c = g * cg; c < (g + 1) * cg; c++) shift[k * C + c] = mean;
        }
    }
}

/* Adds every task's sums into sums ([K][2][C]), in a fixed order. partial is [K * a_chunks][2][C]. */
static void total_sums(const split *s, const double *partial, double *sums) {
    const i64 C = s->C, tasks = task_count(s);
    memset(sums, 0, sizeof(double) * (size_t)(s->K * C * 2));
    for (i64 t = 0; t < tasks; t++) {
        i64 k, a0, a1, c0, c1;
        task_range(s, t, &k, &a0, &a1, &c0, &c1);
        const double *acc = partial + (t / s->g_chunks) * C * 2;
        double *out = sums + k * C * 2;
        for (i64 c = c0; c < c1; c++) {
            out[c] += acc[c];
            out[C + c] += acc[C + c];
        }
    }
}

/* The shape of both passes: per-channel sums of u and u * v (task_sums, over sum_p and sum_q), from them
   per-group coefficients (coefficients), then out = affine(affine_p, affine_q) (task_affine) unless out
   is NULL. */
typedef void (*coefficients_fn)(const split *, const void *, i64 k, i64 c0, i64 c1, const double *s1,
                                const double *s2);
typedef struct {
    const float *sum_p, *sum_pshift, *sum_q, *sum_qshift;
    coefficients_fn coefficients;
    const void *args;
    const float *affine_p, *affine_q, *coef;
    float *out;
} passes;

static inline void sums_of(const split *s, const passes *ps, i64 k, i64 a0, i64 a1, i64 c0, i64 c1, double *acc) {
    if (ps->sum_q)
        task_sums(s, k, a0, a1, c0, c1, ps->sum_p, ps->sum_pshift, ps->sum_q, ps->sum_qshift, acc, acc + s->C, 1);
    else
        task_sums(s, k, a0, a1, c0, c1, ps->sum_p, ps->sum_pshift, NULL, NULL, acc, acc + s->C, 0);
}

/* The state of one run of the passes, shared by its parallel loops. */
typedef struct {
    const split *s;
    const passes *ps;
    double *partial;
} pass_run;

/* Tasks that hold whole groups: sums, coefficients and output, while the rows are in cache. Where
   channels are not innermost (B > 1) each group's block is contiguous, and is finished one group at a
   time, so that its second read comes from the nearest cache. */
static void whole_groups(void *ctx, i64 begin, i64 end) {
    const pass_run *r = ctx;
    const split *s = r->s;
    const i64 C = s->C;
    for (i64 t = begin; t < end; t++) {
        i64 k, a0, a1, c0, c1;
        task_range(s, t, &k, &a0, &a1, &c0, &c1);
        double *acc = r->partial + (t / s->g_chunks) * C * 2;
        const i64 step = s->B > 1 ? s->cg : c1 - c0;
        for (i64 g0 = c0; g0 < c1; g0 += step) {
            const i64 g1 = g0 + step;
            sums_of(s, r->ps, k, a0, a1, g0, g1, acc);
            r->ps->coefficients(s, r->ps->args, k, g0, g1, acc, acc + C);
            if (r->ps->out) task_affine(s, k, a0, a1, g0, g1, r->ps->affine_p, r->ps->affine_q, r->ps->coef, r->ps->out);
        }
    }
}

static void partial_sums(void *ctx, i64 begin, i64 end) {
    const pass_run *r = ctx;
    for (i64 t = begin; t < end; t++) {
        i64 k, a0, a1, c0, c1;
        task_range(r->s, t, &k, &a0, &a1, &c0, &c1);
        sums_of(r->s, r->ps, k, a0, a1, c0, c1, r->partial + (t / r->s->g_chunks) * r->s->C * 2);
    }
}

static void affine_tasks(void *ctx, i64 begin, i64 end) {
    const pass_run *r = ctx;
    for (i64 t = begin; t < end; t++) {
        i64 k, a0, a1, c0, c1;
        task_range(r->s, t, &k, &a0, &a1, &c0, &c1);
        task_affine(r->s, k, a0, a1, c0, c1, r->ps->affine_p, r->ps->affine_q, r->ps->coef, r->ps->out);
    }
}

/* Runs the passes. Where every task holds whole groups, each task finishes its groups on its own while
   their rows are still in cache; otherwise the sums are completed between two parallel passes. Returns 0,
   or -1 when out of memory. */
static int run_passes(const split *s, const passes *ps, int nthreads) {
    const i64 tasks = task_count(s), C = s->C;
    /* one row of sums per (k, A chunk): its tasks' channel ranges are disjoint */
    const size_t rows = (size_t)(tasks / s->g_chunks), kept_rows = s->a_chunks > 1 ? (size_t)s->K : 0;
    int owned;
    double *partial = take_scratch(0, sizeof(double) * (rows + kept_rows) * (size_t)C * 2, &owned);
    if (!partial) return -1;
    double *sums = partial + rows * (size_t)C * 2;
    pass_run r = {s, ps, partial};
    if (s->a_chunks == 1) {
        parallel_for(tasks, whole_groups, &r, nthreads);
    } else {
        parallel_for(tasks, partial_sums, &r, nthreads);
        total_sums(s, partial, sums);
        for (i64 k = 0; k < s->K; k++) ps->coefficients(s, ps->args, k, 0, C, sums + k * C * 2, sums + k * C * 2 + C);
        if (ps->out) parallel_for(tasks, affine_tasks, &r, nthreads);
    }
    give_scratch(partial, owned);
    return 0;
}

/* What the forward pass needs besides its tensors. */
typedef struct {
    const float *gamma, *beta, *shift;
    double eps;
    float *shift_out, *mean_out, *rstd_out, *coef;
} forward_args;

/* Whether a group's shift is folded into the output's offset, y = x * scale + (offset - shift * scale),
   in the forward pass and the input gradient alike: where channels are innermost (the output pass then
   reads one coefficient stream fewer) and the shift is within one standard deviation of zero. The extra
   rounding, of x * scale and of the folded offset, is at most twice 2^-24 |shift * scale| <= 2^-23 |gamma|:
   of the order of the output's own. A larger shift (a mean far from zero against the spread, where
   subtracting it first is what keeps the output exact) stays. NaN statistics never fold. */
static inline int folds_shift(const split *s, double shift, double rstd) {
    return s->B == 1 && fabs(shift) * rstd <= 1.0;
}

/* Statistics and output coefficients of row k's groups in channels [c0, c1), from their sums. */
static void forward_coefficients(const split *s, const void *args, i64 k, i64 c0, i64 c1, const double *s1,
                                 const double *s2) {
    const forward_args *f = args;
    const i64 C = s->C, cg = s->cg;
    const double n = (double)(s->A * cg * s->B);
    for (i64 g = c0 / cg; g < c1 / cg; g++) {
        double t1 = 0.0, t2 = 0.0;
        for (i64 c = g * cg; c < (g + 1) * cg; c++) {
            t1 += s1[c];
            t2 += s2[c];
        }
        const double mean = t1 / n;
        double var = t2 / n - mean * mean;
        if (var < 0.0) var = 0.0; /* rounding; NaN stays NaN */
        const double rstd = 1.0 / sqrt(var + f->eps);
        f->shift_out[k * s->G + g] = f->shift[k * C + g * cg];
        f->mean_out[k * s->G + g] = (float)mean;
        f->rstd_out[k * s->G + g] = (float)rstd;
        /* the planes the forward pass's affine reads (shift, m1, m0; not mq and r, which it does not) */
        float *restrict sh = f->coef + k * C * COEFS, *restrict m1 = sh + C, *restrict m0 = m1 + C;
        const float *restrict gamma = f->gamma, *restrict beta = f->beta;
        const float group_shift = f->shift[k * C + g * cg];
        const int fold = folds_shift(s, group_shift, rstd);
        for (i64 c = g * cg; c < (g + 1) * cg; c++) {
            const double scale = gamma ? rstd * gamma[c] : rstd;
            const double centre = fold ? mean + group_shift : mean;
            const double offset = beta ? beta[c] - centre * scale : -centre * scale;
            sh[c] = fold ? 0.0f : group_shift;
            m1[c] = (float)scale;
            m0[c] = (float)offset;
        }
    }
}

/* The forward pass. gamma and beta may be NULL. Writes the output y and, per (k, group), the shift, the
   mean of x - shift and the reciprocal standard deviation (for the backward pass). Returns 0, or -1 when
   out of memory. */
int groupnorm_forward_f32(const float *x, float *y, i64 K, i64 A, i64 C, i64 B, i64 G, const float *gamma,
                          const float *beta, double eps, int shifted, float *shift_out, float *mean_out,
                          float *rstd_out, int nthreads) {
    const i64 kc = rows_per_chunk(K, C), per_k = A * C * B;
    int owned;
    float *shift = take_scratch(1, sizeof(float) * (size_t)(kc * C) * (1 + COEFS), &owned);
    float *coef = shift ? shift + kc * C : NULL;
    if (shift) memset(shift, 0, sizeof(float) * (size_t)(kc * C)); /* (no shift: zero) */
    int status = shift ? 0 : -1;
    for (i64 k0 = 0; k0 < K && status == 0; k0 += kc) {
        const split s = make_split(K - k0 < kc ? K - k0 : kc, A, C, B, G);
        const float *xk = x + k0 * per_k;
        if (shifted) corner_shift(&s, xk, shift);
        const forward_args f = {gamma, beta, shift, eps, shift_out + k0 * G, mean_out + k0 * G, rstd_out + k0 * G, coef};
        const passes ps = {xk, shift, NULL, NULL, forward_coefficients, &f, xk, NULL, coef, y + k0 * per_k};
        status = run_passes(&s, &ps, nthreads);
    }
    give_scratch(shift, owned);
    return status;
}

/* What the backward pass needs besides its tensors. */
typedef struct {
    const float *gamma, *shift, *mean, *rstd;
    double *sum_dy, *sum_dy_xhat; /* per (k, channel), for the parameters' gradients */
    float *coef;
} backward_args;

/* Input-gradient coefficients of row k's groups in channels [c0, c1), from the sums of dy and of
   dy * (x - shift) per channel:  dx = r (gamma dy - mean(gamma dy) - xhat mean(gamma dy xhat)), with
   means over the group, written as dx = r (gamma dy + (x - shift) * m1 + m0). */
static void backward_coefficients(const split *s, const void *args, i64 k, i64 c0, i64 c1, const double *s1,
                                  const double *s2) {
    const backward_args *b = args;
    const i64 C = s->C, cg = s->cg;
    const double n = (double)(s->A * cg * s->B);
    for (i64 g = c0 / cg; g < c1 / cg; g++) {
        const double mean = b->mean[k * s->G + g], r = b->rstd[k * s->G + g];
        double mg = 0.0, mgx = 0.0;
        for (i64 c = g * cg; c < (g + 1) * cg; c++) {
            const double dxhat = r * (s2[c] - mean * s1[c]); /* the sum of dy * xhat */
            const double gc = b->gamma ? b->gamma[c] : 1.0;
            b->sum_dy[k * C + c] = s1[c];
            b->sum_dy_xhat[k * C + c] = dxhat;
            mg += gc * s1[c];
            mgx += gc * dxhat;
        }
        mg /= n;
        mgx /= n;
        const double shift = b->shift[k * C + g * cg];
        const int fold = folds_shift(s, shift, r); /* then folded into m0 */
        for (i64 c = g * cg; c < (g + 1) * cg; c++) {
            const double gc = b->gamma ? b->gamma[c] : 1.0;
            float *cf = b->coef + k * C * COEFS + c;
            cf[0] = fold ? 0.0f : (float)shift;
            cf[C] = (float)(-r * mgx);
            cf[2 * C] = (float)(r * (fold ? mean + shift : mean) * mgx - mg);
            cf[3 * C] = (float)gc;
            cf[4 * C] = (float)r;
        }
    }
}

/* The backward pass, from the forward pass's shift, mean and rstd. dx, dgamma and dbeta may each be NULL
   (not wanted); gamma may be NULL. dgamma and dbeta are per channel, summed over K. Returns 0, or -1 when out of memory. */
int groupnorm_backward_f32(const float *x, const float *dy, float *dx, i64 K, i64 A, i64 C, i64 B, i64 G,
                           const float *gamma, const float *shift_in, const float *mean_in,
                           const float *rstd_in, float *dgamma, float *dbeta, int nthreads) {
    const i64 cg = C / G, kc = rows_per_chunk(K, C), per_k = A * C * B;
    /* doubles first: per (k, channel) sums, then the parameters' gradients; then the float arrays */
    const size_t doubles = (size_t)(kc * C * 2 + 2 * C), floats = (size_t)(kc * C) * (2 + COEFS);
    int owned;
    double *per_kc = take_scratch(1, sizeof(double) * doubles + sizeof(float) * floats, &owned);
    double *dg = per_kc ? per_kc + kc * C * 2 : NULL, *db = per_kc ? dg + C : NULL;
    float *zero = per_kc ? (float *)(per_kc + doubles) : NULL;
    float *shift = zero ? zero + kc * C : NULL, *coef = zero ? shift + kc * C : NULL;
    if (per_kc) {
        memset(dg, 0, sizeof(double) * (size_t)(2 * C));
        memset(zero, 0, sizeof(float) * (size_t)(kc * C));
    }
    int status = per_kc ? 0 : -1;
    for (i64 k0 = 0; k0 < K && status == 0; k0 += kc) {
        const i64 kn = K - k0 < kc ? K - k0 : kc;
        const split s = make_split(kn, A, C, B, G);
        for (i64 k = 0; k < kn; k++)
            for (i64 c = 0; c < C; c++) shift[k * C + c] = shift_in[(k0 + k) * G + c / cg];
        const backward_args b = {gamma, shift, mean_in + k0 * G, rstd_in + k0 * G, per_kc, per_kc + kn * C, coef};
        /* the sums of dy and of dy * (x - shift) */
        const float *xk = x + k0 * per_k;
        const passes ps = {dy + k0 * per_k, zero, xk, shift, backward_coefficients, &b, xk, dy + k0 * per_k, coef,
                           dx ? dx + k0 * per_k : NULL};
        status = run_passes(&s, &ps, nthreads);
        /* the parameters' gradients, summed over K in order */
        for (i64 k = 0; k < kn && status == 0; k++)
            for (i64 c = 0; c < C; c++) {
                dg[c] += per_kc[kn * C + k * C + c];
                db[c] += per_kc[k * C + c];
            }
    }
    if (status == 0)
        for (i64 c = 0; c < C; c++) {
            if (dgamma) dgamma[c] = (float)dg[c];
            if (dbeta) dbeta[c] = (float)db[c];
        }
    give_scratch(per_kc, owned);
    return status;
}
