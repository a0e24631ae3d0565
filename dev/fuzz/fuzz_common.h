/*
dev/fuzz/fuzz_common.h: what the fuzz targets share (doc/robustness.md).

Each target (fuzz_shard.c, fuzz_checkpoint.c, fuzz_toktab.c, fuzz_refstate.c, fuzz_ctxblock.c,
fuzz_trainstate.c, fuzz_lambada.c, fuzz_recall.c) defines
  static void fuzz_<name>(const char *path)
which hands the file at `path` to one of the program's loaders, uses what it loaded and frees
it. The loaders take paths, so the libFuzzer entry point writes each input to a memfd and
passes "/proc/self/fd/N". The code under test is included, not linked: test_ctxkv.c (for
refstate_load), which includes train_ctxkv.c, with TESTING (no main) and FUZZING (die() jumps
back here instead of exiting).

A loader that rejects its input calls die() part way, still holding what it had allocated
or opened; in the real program exit() reclaims that. Here it would pile up over millions of
inputs, so malloc/calloc/realloc/strdup/free and fopen/fclose are wrapped (by macros, for
the included code only) to track what is live, and fuzz_call releases it after die().
After an input that loaded cleanly nothing may be left: a block still tracked is a leak and
aborts, with the input saved as a crash.

Builds (Makefile): the targets with clang -fsanitize=fuzzer,address,undefined -DFUZZING
(TESTING is defined below); fuzz_replay.c defines FUZZ_REPLAY and includes all the targets,
without libFuzzer, to replay the committed corpus and regressions under `make test`.
*/
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H
#ifndef FUZZING
#error "build with -DFUZZING (see the Makefile's fuzz targets)"
#endif
#define _GNU_SOURCE // memfd_create
#define TESTING     // as test_ctxkv.c defines it: no main() in train_ctxkv.c

// every system header the included code uses, before the macros below rename its calls
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <glob.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// live allocations and open files of the code under test

#define FZ_SLOTS (1u << 18) // hash slots; the largest loader (a 65536-token table) keeps ~65k blocks
typedef struct { void *p; size_t idx; } FzSlot; // idx: where p is in fz_list
static FzSlot fz_slot[FZ_SLOTS];                // open addressing, linear probing
static void *fz_list[FZ_SLOTS / 2];             // the live blocks, dense, so releasing them is O(live)
static size_t fz_live;
static FILE *fz_files[16];

static size_t fz_hash(const void *p) { return (size_t)(((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull >> 46) & (FZ_SLOTS - 1); }

static size_t fz_find(const void *p) { // slot of p, or of the empty slot where it would go
    size_t i = fz_hash(p);
    while (fz_slot[i].p && fz_slot[i].p != p) i = (i + 1) & (FZ_SLOTS - 1);
    return i;
}

static void fz_track(void *p) {
    if (!p) return;
    if (fz_live + 1 >= FZ_SLOTS / 2) { fprintf(stderr, "fuzz harness: too many live blocks\n"); abort(); }
    fz_slot[fz_find(p)] = (FzSlot){p, fz_live};
    fz_list[fz_live++] = p;
}

// removes p if tracked (backward-shift deletion); untracked pointers are ignored
static void fz_untrack(void *p) {
    if (!p || !fz_live) return;
    size_t i = fz_find(p);
    if (!fz_slot[i].p) return;
    void *last = fz_list[--fz_live]; // the last live block takes p's place in the list
    fz_list[fz_slot[i].idx] = last;
    if (last != p) fz_slot[fz_find(last)].idx = fz_slot[i].idx;
    fz_slot[i].p = NULL;
    for (size_t j = (i + 1) & (FZ_SLOTS - 1); fz_slot[j].p; j = (j + 1) & (FZ_SLOTS - 1)) {
        size_t home = fz_hash(fz_slot[j].p);
        // move slot j back into the hole at i unless its home lies cyclically in (i, j]
        if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
            fz_slot[i] = fz_slot[j];
            fz_slot[j].p = NULL;
            i = j;
        }
    }
}

static void *fz_malloc(size_t n) { void *p = malloc(n); fz_track(p); return p; }
static void *fz_calloc(size_t n, size_t m) { void *p = calloc(n, m); fz_track(p); return p; }
static void *fz_realloc(void *p, size_t n) {
    void *old = p;
    fz_untrack(old);
    void *q = realloc(p, n);
    fz_track(q ? q : n ? old : NULL); // a failed realloc leaves the block as it was
    return q;
}
static char *fz_strdup(const char *s) { char *p = strdup(s); fz_track(p); return p; }
static void fz_free(void *p) { fz_untrack(p); free(p); }

static FILE *fz_fopen(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (f)
        for (int i = 0; i < 16; i++)
            if (!fz_files[i]) { fz_files[i] = f; break; }
    return f;
}
static int fz_fclose(FILE *f) {
    for (int i = 0; i < 16; i++)
        if (fz_files[i] == f) fz_files[i] = NULL;
    return fclose(f);
}

// closes and frees everything the code under test still holds (after die())
static void fz_release_all(void) {
    for (int i = 0; i < 16; i++)
        if (fz_files[i]) { fclose(fz_files[i]); fz_files[i] = NULL; }
    while (fz_live) {
        void *p = fz_list[fz_live - 1];
        fz_untrack(p);
        free(p);
    }
}

#undef strdup
#define malloc(n) fz_malloc(n)
#define calloc(n, m) fz_calloc(n, m)
#define realloc(p, n) fz_realloc(p, n)
#define strdup(s) fz_strdup(s)
#define free(p) fz_free(p)
#define fopen(p, m) fz_fopen(p, m)
#define fclose(f) fz_fclose(f)

#define main test_ctxkv_main // the harness's main() is compiled but never called
#include "../../test_ctxkv.c"
#undef main
// the macros stay on for the targets below, so what they free of a loader's result is untracked

// the eval-file targets score with test_configs.h's fuzz_small_config(), the config make_seeds.c
// writes the seeds from (the same weights every input)

// ----------------------------------------------------------------------------
// running one input

typedef void (*FuzzEntry)(const char *path);

// Runs entry on the file at path. Returns 0 if it loaded, 1 if a loader rejected it with
// die(); aborts (a finding) if a clean load left blocks or files behind.
static int fuzz_call(FuzzEntry entry, const char *path) {
    static jmp_buf jb;
    if (setjmp(jb)) { // die() was called: a clean rejection
        die_jump = NULL;
        fz_release_all();
        return 1;
    }
    die_jump = &jb;
    entry(path);
    die_jump = NULL;
    int open_files = 0;
    for (int i = 0; i < 16; i++) open_files += fz_files[i] != NULL;
    if (fz_live || open_files) {
        fprintf(stderr, "fuzz harness: %zu block(s) and %d file(s) still held after a clean load: a leak\n", fz_live, open_files);
        abort();
    }
    return 0;
}

#ifndef FUZZ_REPLAY
// libFuzzer: the input goes to an in-memory file that the loaders open by path
static int fuzz_run(FuzzEntry entry, const uint8_t *data, size_t size) {
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("fuzz_input", 0);
        if (fd < 0) { perror("memfd_create"); abort(); }
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0) { perror("ftruncate"); abort(); }
    for (size_t off = 0; off < size;) {
        ssize_t w = pwrite(fd, data + off, size - off, (off_t)off);
        if (w <= 0) { perror("pwrite"); abort(); }
        off += (size_t)w;
    }
    fuzz_call(entry, path);
    return 0;
}
#define FUZZ_TARGET(entry) \
    int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return fuzz_run(entry, data, size); }
#else
#define FUZZ_TARGET(entry)
#endif

#endif // FUZZ_COMMON_H
