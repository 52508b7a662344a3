// ggml_mulmat: time ggml's CPU MUL_MAT (quantized weights x f32 activations) the way
// fastkern's harness times its own kernels (DESIGN.md section 5): the weights are rotated
// among several copies whose total is well beyond the last-level cache, each call is timed,
// and the median after warm-up is reported, beside a streaming read bandwidth measured in
// the same process.
//
// It uses only ggml's public API (ggml.h, ggml-alloc.h, ggml-backend.h, ggml-cpu.h):
// weights are made with ggml_quantize_chunk from random data; y = ggml_mul_mat(W, x) with W
// [K, N] of type Q4_0 / Q4_K / Q8_0 and x [K, M] f32, computed by the CPU backend.
//
// Two weight layouts:
//   plain  - an ordinary CPU buffer: what `test-backend-ops perf -o MUL_MAT -b CPU` times.
//   repack - the CPU backend's "CPU_REPACK" extra buffer type, which llama.cpp uses by default
//            for weights: Q4_0 and Q4_K become 8-row interleaved layouts (on AVX2 machines) with
//            their own GEMV/GEMM kernels. Types without a repacked form on this CPU are skipped.
//
// Phases: (1) random weights are generated and quantized once per (type, shape), under a
// shared flock on --lock if given; (2) the timing runs under an exclusive flock on the same
// file, so that nobody's build disturbs it. See bench/peers/README.md.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#define MAX_ITEMS 16

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void * a, const void * b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static double percentile(double * v, int n, double p) {
    qsort(v, n, sizeof(double), cmp_double);
    double pos = p * (n - 1);
    int i = (int) pos;
    if (i + 1 >= n) return v[n - 1];
    return v[i] + (pos - i) * (v[i + 1] - v[i]);
}

// xorshift64* -> approximately Gaussian (sum of 4 uniforms, scaled to unit variance)
static uint64_t rng_next(uint64_t * s) {
    uint64_t x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}
static float rng_gauss(uint64_t * s) {
    float acc = 0.0f;
    for (int i = 0; i < 4; i++) acc += (float) ((rng_next(s) >> 40) * (1.0 / 16777216.0));
    return (acc - 2.0f) * 1.7320508f;  // var of sum of 4 U(0,1) is 1/3
}

static void fill_gauss(float * a, int64_t n, uint64_t seed) {
#pragma omp parallel
    {
        int nt = omp_get_num_threads(), it = omp_get_thread_num();
        int64_t lo = n * it / nt, hi = n * (it + 1) / nt;
        uint64_t s = seed * 0x9E3779B97F4A7C15ULL + (uint64_t) it * 0xBF58476D1CE4E5B9ULL + 1;
        for (int64_t i = lo; i < hi; i++) a[i] = rng_gauss(&s);
    }
}

// ---------------------------------------------------------------------------------------------
// streaming read bandwidth: every thread sums its slice of a large float array with vector loads

static float read_slice(const float * a, int64_t n) {
#if defined(__AVX__)
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
        s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_load_ps(a + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_load_ps(a + i + 24));
        s4 = _mm256_add_ps(s4, _mm256_load_ps(a + i + 32));
        s5 = _mm256_add_ps(s5, _mm256_load_ps(a + i + 40));
        s6 = _mm256_add_ps(s6, _mm256_load_ps(a + i + 48));
        s7 = _mm256_add_ps(s7, _mm256_load_ps(a + i + 56));
    }
    s0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)),
                       _mm256_add_ps(_mm256_add_ps(s4, s5), _mm256_add_ps(s6, s7)));
    float t[8];
    _mm256_storeu_ps(t, s0);
    float r = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    for (; i < n; i++) r += a[i];
    return r;
#else
    float r = 0.0f;
    for (int64_t i = 0; i < n; i++) r += a[i];
    return r;
#endif
}

static double read_bandwidth(float * a, int64_t n, int nthreads, int reps) {
    double * t = malloc(sizeof(double) * reps);
    volatile float sink = 0.0f;
    for (int r = -1; r < reps; r++) {
        double t0 = now_s();
        float tot = 0.0f;
#pragma omp parallel num_threads(nthreads) reduction(+ : tot)
        {
            int nt = omp_get_num_threads(), it = omp_get_thread_num();
            int64_t lo = (n / 64) * it / nt * 64, hi = (n / 64) * (it + 1) / nt * 64;
            tot += read_slice(a + lo, hi - lo);
        }
        double t1 = now_s();
        sink += tot;
        if (r >= 0) t[r] = t1 - t0;
    }
    (void) sink;
    double med = percentile(t, reps, 0.5);
    free(t);
    return (double) n * sizeof(float) / med / 1e9;
}

// ---------------------------------------------------------------------------------------------

struct item {          // one (type, shape): its quantized weights, made once
    enum ggml_type type;
    int64_t n, k;
    void * q;          // N rows of ggml_row_size(type, K) bytes
    size_t qbytes;
};

struct result {
    const char * type, * layout;
    int64_t n, k, m;
    int copies, calls;
    double ms, p10, p90, wgb, gbs, rel_err, bw;
};

static int parse_list(const char * s, char out[][32], int max) {
    int n = 0;
    const char * p = s;
    while (*p && n < max) {
        const char * e = strchr(p, ',');
        size_t len = e ? (size_t) (e - p) : strlen(p);
        if (len >= 32) len = 31;
        memcpy(out[n], p, len);
        out[n][len] = 0;
        if (len) n++;
        if (!e) break;
        p = e + 1;
    }
    return n;
}

static enum ggml_type type_by_name(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * tn = ggml_type_name((enum ggml_type) t);
        if (tn && strcasecmp(tn, name) == 0) return (enum ggml_type) t;
    }
    fprintf(stderr, "ggml_mulmat: unknown ggml type '%s' (expected e.g. q4_0, q4_K, q8_0)\n", name);
    exit(2);
}

static int lock_fd = -1;
static void take_lock(int how, const char * what) {
    if (lock_fd < 0) return;
    double t0 = now_s();
    if (flock(lock_fd, how) != 0) {
        fprintf(stderr, "ggml_mulmat: flock failed: %s\n", strerror(errno));
        exit(1);
    }
    double w = now_s() - t0;
    if (w > 0.5) fprintf(stderr, "# waited %.1f s for the %s lock\n", w, what);
}

static void usage(void) {
    fprintf(stderr,
        "usage: ggml_mulmat [--types q4_0,q4_K,q8_0] [--shapes NxK,...] [--m 1,16]\n"
        "                   [--layouts plain,repack] [--threads 2] [--rotate-mib 128]\n"
        "                   [--min-time 0.4] [--min-calls 20] [--bw-mib 256] [--lock FILE]\n"
        "                   [--json PATH] [--no-check]\n"
        "shapes are weight shapes N x K (out x in features), as fastkern-bench's --shapes.\n");
    exit(2);
}

int main(int argc, char ** argv) {
    const char * types_s = "q4_0,q4_K,q8_0";
    const char * shapes_s = "4096x4096,11008x4096,4096x11008,4096x14336";
    const char * m_s = "1,16";
    const char * layouts_s = "plain,repack";
    const char * json_path = NULL, * lock_path = NULL;
    int nthreads = 2, min_calls = 20, check = 1;
    double rotate_mib = 128.0, min_time = 0.4, bw_mib = 256.0;

    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        const char * v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--no-check")) { check = 0; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help") || !v) usage();
        if      (!strcmp(a, "--types"))      types_s = v;
        else if (!strcmp(a, "--shapes"))     shapes_s = v;
        else if (!strcmp(a, "--m"))          m_s = v;
        else if (!strcmp(a, "--layouts"))    layouts_s = v;
        else if (!strcmp(a, "--threads"))    nthreads = atoi(v);
        else if (!strcmp(a, "--rotate-mib")) rotate_mib = atof(v);
        else if (!strcmp(a, "--min-time"))   min_time = atof(v);
        else if (!strcmp(a, "--min-calls"))  min_calls = atoi(v);
        else if (!strcmp(a, "--bw-mib"))     bw_mib = atof(v);
        else if (!strcmp(a, "--json"))       json_path = v;
        else if (!strcmp(a, "--lock"))       lock_path = v;
        else usage();
        i++;
    }

    char types[MAX_ITEMS][32], shapes[MAX_ITEMS][32], ms[MAX_ITEMS][32], layouts[4][32];
    int ntypes = parse_list(types_s, types, MAX_ITEMS), nshapes = parse_list(shapes_s, shapes, MAX_ITEMS);
    int nm = parse_list(m_s, ms, MAX_ITEMS), nlayouts = parse_list(layouts_s, layouts, 4);
    for (int l = 0; l < nlayouts; l++) {
        if (strcmp(layouts[l], "plain") && strcmp(layouts[l], "repack")) {
            fprintf(stderr, "ggml_mulmat: --layouts takes plain and/or repack, got '%s'\n", layouts[l]);
            return 2;
        }
    }

    if (lock_path) {
        lock_fd = open(lock_path, O_RDWR | O_CREAT, 0666);
        if (lock_fd < 0) { fprintf(stderr, "ggml_mulmat: cannot open lock %s: %s\n", lock_path, strerror(errno)); return 1; }
    }
    omp_set_num_threads(nthreads);

    // ---- backend
    ggml_backend_t backend = ggml_backend_cpu_init();
    if (!backend) { fprintf(stderr, "ggml_mulmat: ggml_backend_cpu_init failed\n"); return 1; }
    ggml_backend_cpu_set_n_threads(backend, nthreads);
    ggml_backend_buffer_type_t buft_plain = ggml_backend_cpu_buffer_type(), buft_repack = NULL;
    {
        ggml_backend_reg_t reg = ggml_backend_cpu_reg();
        ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
        ggml_backend_dev_get_extra_bufts_t get_extra =
            (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
        if (get_extra) {
            for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b; b++) {
                if (!strcmp(ggml_backend_buft_name(*b), "CPU_REPACK")) buft_repack = *b;
            }
        }
    }

    printf("# ggml %s (commit %s), CPU backend, %d threads; compiled-in: AVX %d AVX2 %d FMA %d F16C %d AVX_VNNI %d AVX512 %d AVX512_VNNI %d AVX512_BF16 %d; repack buffer %s\n",
           ggml_version(), ggml_commit(), nthreads, ggml_cpu_has_avx(), ggml_cpu_has_avx2(), ggml_cpu_has_fma(), ggml_cpu_has_f16c(),
           ggml_cpu_has_avx_vnni(), ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vnni(), ggml_cpu_has_avx512_bf16(),
           buft_repack ? "yes" : "no");

    // ---- phase 1: quantize every (type, shape) once (shared lock: heavy, not timing)
    take_lock(LOCK_SH, "shared");
    struct item items[MAX_ITEMS * MAX_ITEMS];
    int nitems = 0;
    double tq0 = now_s();
    for (int t = 0; t < ntypes; t++) {
        enum ggml_type type = type_by_name(types[t]);
        ggml_quantize_init(type);
        for (int s = 0; s < nshapes; s++) {
            long long n, k;
            if (sscanf(shapes[s], "%lldx%lld", &n, &k) != 2 || n <= 0 || k <= 0) {
                fprintf(stderr, "ggml_mulmat: shape '%s' is not NxK\n", shapes[s]); return 2;
            }
            if (k % ggml_blck_size(type) != 0) {
                fprintf(stderr, "ggml_mulmat: skip %s %lldx%lld: K=%lld is not a multiple of its block %lld\n",
                        ggml_type_name(type), n, k, k, (long long) ggml_blck_size(type));
                continue;
            }
            struct item * it = &items[nitems++];
            it->type = type; it->n = n; it->k = k;
            size_t row = ggml_row_size(type, k);
            it->qbytes = row * n;
            it->q = aligned_alloc(64, (it->qbytes + 63) / 64 * 64);
            float * w = aligned_alloc(64, (size_t) n * k * sizeof(float));
            fill_gauss(w, n * k, 1000 + s);
#pragma omp parallel
            {
                int nt = omp_get_num_threads(), th = omp_get_thread_num();
                int64_t r0 = n * th / nt, r1 = n * (th + 1) / nt;
                if (r1 > r0) ggml_quantize_chunk(type, w, it->q, r0 * k, r1 - r0, k, NULL);  // offsets applied inside
            }
            free(w);
        }
    }
    float * bw_buf = NULL;
    int64_t bw_n = (int64_t) (bw_mib * 1048576.0 / sizeof(float)) / 64 * 64;
    bw_buf = aligned_alloc(64, bw_n * sizeof(float));
    fill_gauss(bw_buf, bw_n, 7);
    fprintf(stderr, "# quantized %d weight sets in %.1f s\n", nitems, now_s() - tq0);

    // ---- phase 2: timing (exclusive lock)
    if (lock_fd >= 0) flock(lock_fd, LOCK_UN);
    take_lock(LOCK_EX, "exclusive");
    double t_start = now_s();
    double bw0 = read_bandwidth(bw_buf, bw_n, nthreads, 7);
    printf("# streaming read bandwidth (%d threads, %.0f MiB, vector loads): %.1f GB/s at the start\n", nthreads, bw_mib, bw0);

    struct result res[MAX_ITEMS * MAX_ITEMS * MAX_ITEMS * 2];
    int nres = 0;
    printf("%-6s %-6s %6s %6s %4s %6s %6s %9s %8s %8s %8s %7s %7s %5s %9s\n",
           "type", "layout", "N", "K", "M", "copies", "calls", "ms(med)", "p10", "p90", "weightMB", "GB/s", "readBW", "%BW", "rel_err");
    fflush(stdout);
    for (int i = 0; i < nitems; i++) {
        struct item * it = &items[i];
        for (int l = 0; l < nlayouts; l++) {
            int repack = !strcmp(layouts[l], "repack");
            ggml_backend_buffer_type_t buft = repack ? buft_repack : buft_plain;
            if (repack && !buft) { fprintf(stderr, "# no CPU_REPACK buffer type in this build: skip repack\n"); continue; }
            // the host's memory bandwidth may change within minutes: measure it beside each weight set
            double bw_here = read_bandwidth(bw_buf, bw_n, nthreads, 3);
            int copies = (int) ceil(rotate_mib * 1048576.0 / (double) it->qbytes);
            if (copies < 2) copies = 2;
            if (copies > 64) copies = 64;

            struct ggml_init_params ip = { ggml_tensor_overhead() * (copies + 4), NULL, true };
            struct ggml_context * cw = ggml_init(ip);
            struct ggml_tensor * w[64];
            for (int c = 0; c < copies; c++) w[c] = ggml_new_tensor_2d(cw, it->type, it->k, it->n);
            ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(cw, buft);
            if (!wbuf) { fprintf(stderr, "ggml_mulmat: weight buffer allocation failed\n"); return 1; }
            ggml_backend_buffer_set_usage(wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            if (repack) {  // does this CPU have a repacked form of this type? (asked before any data goes in)
                struct ggml_init_params pp = { ggml_tensor_overhead() * 4, NULL, true };
                struct ggml_context * cp = ggml_init(pp);
                struct ggml_tensor * xp = ggml_new_tensor_2d(cp, GGML_TYPE_F32, it->k, 1);
                int ok = ggml_backend_supports_op(backend, ggml_mul_mat(cp, w[0], xp));
                ggml_free(cp);
                if (!ok) {
                    printf("%-6s %-6s %6lld %6lld    - (no repacked form of this type on this CPU: llama.cpp uses the plain layout)\n",
                           ggml_type_name(it->type), "repack", (long long) it->n, (long long) it->k);
                    ggml_backend_buffer_free(wbuf);
                    ggml_free(cw);
                    continue;
                }
            }
            for (int c = 0; c < copies; c++) ggml_backend_tensor_set(w[c], it->q, 0, it->qbytes);

            for (int mi = 0; mi < nm; mi++) {
                int64_t m = atoll(ms[mi]);
                struct ggml_init_params gp = { ggml_tensor_overhead() * (2 * copies + 8) + ggml_graph_overhead() * copies, NULL, true };
                struct ggml_context * cg = ggml_init(gp);
                struct ggml_tensor * x = ggml_new_tensor_2d(cg, GGML_TYPE_F32, it->k, m);
                struct ggml_tensor * y[64];
                struct ggml_cgraph * gf[64];
                for (int c = 0; c < copies; c++) {
                    y[c] = ggml_mul_mat(cg, w[c], x);
                    gf[c] = ggml_new_graph(cg);
                    ggml_build_forward_expand(gf[c], y[c]);
                }
                ggml_backend_buffer_t abuf = ggml_backend_alloc_ctx_tensors(cg, backend);
                float * xh = malloc(sizeof(float) * it->k * m);
                fill_gauss(xh, it->k * m, 99 + m);
                ggml_backend_tensor_set(x, xh, 0, sizeof(float) * it->k * m);

                // warm-up: every copy once, then a few more calls
                for (int c = 0; c < copies + 3; c++) ggml_backend_graph_compute(backend, gf[c % copies]);
                int cap = 4096, ncall = 0;
                double * tt = malloc(sizeof(double) * cap);
                double t0 = now_s();
                while (ncall < cap && (ncall < min_calls || now_s() - t0 < min_time)) {
                    double a = now_s();
                    ggml_backend_graph_compute(backend, gf[ncall % copies]);
                    tt[ncall++] = now_s() - a;
                }
                double med = percentile(tt, ncall, 0.5) * 1e3;
                double p10 = percentile(tt, ncall, 0.1) * 1e3, p90 = percentile(tt, ncall, 0.9) * 1e3;
                free(tt);

                double rel = NAN;
                if (check) {  // y[0] against x @ dequant(W)^T in double: what 8-bit activations etc. cost
                    int64_t n = it->n, k = it->k;
                    float * yh = malloc(sizeof(float) * n * m);
                    ggml_backend_tensor_get(y[0], yh, 0, sizeof(float) * n * m);
                    const struct ggml_type_traits * tr = ggml_get_type_traits(it->type);
                    double num = 0.0, den = 0.0;
                    const int64_t mcheck = m < 4 ? m : 4;  // the first rows of x are enough
                    size_t row = ggml_row_size(it->type, k);
#pragma omp parallel reduction(+ : num, den)
                    {
                        float * wr = malloc(sizeof(float) * k);
#pragma omp for schedule(static)
                        for (int64_t r = 0; r < n; r++) {
                            tr->to_float((const char *) it->q + r * row, wr, k);
                            for (int64_t j = 0; j < mcheck; j++) {
                                double acc = 0.0;
                                const float * xr = xh + j * k;
                                for (int64_t q = 0; q < k; q++) acc += (double) wr[q] * xr[q];
                                double d = yh[j * n + r] - acc;
                                num += d * d; den += acc * acc;
                            }
                        }
                        free(wr);
                    }
                    rel = sqrt(num / den);
                    free(yh);
                }

                struct result * r = &res[nres++];
                r->type = ggml_type_name(it->type); r->layout = layouts[l];
                r->n = it->n; r->k = it->k; r->m = m; r->copies = copies; r->calls = ncall;
                r->ms = med; r->p10 = p10; r->p90 = p90;
                r->wgb = it->qbytes / 1e9;
                r->gbs = (it->qbytes + sizeof(float) * (it->k + it->n) * m) / (med * 1e-3) / 1e9;
                r->rel_err = rel;
                r->bw = bw_here;
                printf("%-6s %-6s %6lld %6lld %4lld %6d %6d %9.3f %8.3f %8.3f %8.1f %7.1f %7.1f %4.0f%% %9.2e\n",
                       r->type, r->layout, (long long) r->n, (long long) r->k, (long long) m, copies, ncall,
                       med, p10, p90, it->qbytes / 1e6, r->gbs, bw_here, 100.0 * r->gbs / bw_here, rel);
                fflush(stdout);

                free(xh);
                ggml_backend_buffer_free(abuf);
                ggml_free(cg);
            }
            ggml_backend_buffer_free(wbuf);
            ggml_free(cw);
        }
    }
    double bw1 = read_bandwidth(bw_buf, bw_n, nthreads, 7);
    double t_end = now_s();
    if (lock_fd >= 0) flock(lock_fd, LOCK_UN);
    printf("# streaming read bandwidth at the end: %.1f GB/s%s; timing phase %.1f s\n", bw1,
           fabs(bw1 - bw0) > 0.15 * bw0 ? " - CHANGED DURING THE RUN" : "", t_end - t_start);
    printf("# GB/s = (weight bytes as stored + x + y) / median time; readBW = streaming read bandwidth measured just before "
           "this weight set; %%BW = GB/s / readBW; "
           "rel_err = ||y - x @ dequant(W)^T|| / ||x @ dequant(W)^T|| (copy 0, first <= 4 rows of x)\n");

    if (json_path) {
        FILE * f = fopen(json_path, "w");
        if (!f) { fprintf(stderr, "ggml_mulmat: cannot write %s\n", json_path); return 1; }
        fprintf(f, "{\n \"ggml_version\": \"%s\", \"threads\": %d,\n \"cpu\": {\"avx2\": %d, \"fma\": %d, \"f16c\": %d, \"avx_vnni\": %d, \"avx512\": %d, \"avx512_vnni\": %d, \"avx512_bf16\": %d},\n"
                   " \"read_bw_gbs\": %.2f, \"read_bw_gbs_end\": %.2f, \"timing_s\": %.1f,\n \"results\": [\n",
                ggml_version(), nthreads, ggml_cpu_has_avx2(), ggml_cpu_has_fma(), ggml_cpu_has_f16c(), ggml_cpu_has_avx_vnni(),
                ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vnni(), ggml_cpu_has_avx512_bf16(), bw0, bw1, t_end - t_start);
        for (int i = 0; i < nres; i++) {
            struct result * r = &res[i];
            fprintf(f, "  {\"type\": \"%s\", \"layout\": \"%s\", \"n\": %lld, \"k\": %lld, \"m\": %lld, \"copies\": %d, \"calls\": %d,"
                       " \"ms\": %.5f, \"p10_ms\": %.5f, \"p90_ms\": %.5f, \"weight_bytes\": %.0f, \"gbs\": %.2f, \"read_bw_gbs\": %.2f, \"rel_err\": %.4g}%s\n",
                    r->type, r->layout, (long long) r->n, (long long) r->k, (long long) r->m, r->copies, r->calls,
                    r->ms, r->p10, r->p90, r->wgb * 1e9, r->gbs, r->bw, isnan(r->rel_err) ? -1.0 : r->rel_err, i + 1 < nres ? "," : "");
        }
        fprintf(f, " ]\n}\n");
        fclose(f);
    }
    for (int i = 0; i < nitems; i++) free(items[i].q);
    free(bw_buf);
    ggml_backend_free(backend);
    return 0;
}
