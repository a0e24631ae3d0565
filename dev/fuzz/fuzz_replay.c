/*
dev/fuzz/fuzz_replay.c: replays fuzz inputs without libFuzzer (`make fuzz-replay`, part of
`make test`). It includes the eight targets (FUZZ_REPLAY drops their libFuzzer entry points)
and runs each input in a child process, so a crash fails that input and not the run.

  fuzz_replay DIR             every file of DIR/corpus/<target>/ and DIR/regressions/<target>/
  fuzz_replay TARGET FILE...  the given files through one target (shard, checkpoint, toktab, refstate,
                              ctxblock, trainstate, lambada, recall)

An input passes when its target returns: the file loaded, or a loader rejected it with
die(). It fails on a crash, a sanitizer report (the Makefile builds this with ASan and UBSan
when the compiler has them; with ASan an allocation over 4 GB is an error, as in the fuzz
runs), a leak the harness sees, or 60 s without returning.
Ends with "fuzz replay: N passed, N failed"; exits 1 if any failed.
*/
#define FUZZ_REPLAY
#include "fuzz_shard.c"
#include "fuzz_checkpoint.c"
#include "fuzz_toktab.c"
#include "fuzz_refstate.c"
#include "fuzz_ctxblock.c"
#include "fuzz_trainstate.c"
#include "fuzz_lambada.c"
#include "fuzz_recall.c"
#include <dirent.h>
#include <fcntl.h>

static const struct { const char *name; FuzzEntry entry; } TARGETS[] = {
    {"shard", fuzz_shard}, {"checkpoint", fuzz_checkpoint}, {"toktab", fuzz_toktab}, {"refstate", fuzz_refstate},
    {"ctxblock", fuzz_ctxblock}, {"trainstate", fuzz_trainstate}, {"lambada", fuzz_lambada},
    {"recall", fuzz_recall},
};
#define N_TARGETS ((int)(sizeof TARGETS / sizeof TARGETS[0]))

static int replay_passed, replay_failed, replay_loaded;

// with ASan, an allocation over 4 GB is an error here as in the fuzz runs (-rss_limit_mb=4096),
// so an out-of-memory finding fails its replay too
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "max_allocation_size_mb=4096"; }

// child exit codes: 0 loaded, 3 rejected cleanly; anything else is a failure
static void replay_file(int target, const char *path) {
    int pipefd[2];
    if (pipe(pipefd) != 0) { perror("pipe"); exit(2); }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); exit(2); }
    if (pid == 0) {
        close(pipefd[0]);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 1); // tokenizer_print and refstate_load's messages
        dup2(pipefd[1], 2);                 // die()'s message and any sanitizer report
        alarm(60);
        int rejected = fuzz_call(TARGETS[target].entry, path);
        fflush(NULL);
        _exit(rejected ? 3 : 0);
    }
    close(pipefd[1]);
    char msg[4096];
    size_t len = 0;
    for (;;) { // keep the first bytes, drain the rest
        char buf[4096];
        ssize_t n = read(pipefd[0], buf, sizeof buf);
        if (n <= 0) break;
        size_t take = (size_t)n < sizeof msg - 1 - len ? (size_t)n : sizeof msg - 1 - len;
        memcpy(msg + len, buf, take);
        len += take;
    }
    msg[len] = 0;
    close(pipefd[0]);
    int status;
    waitpid(pid, &status, 0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (code == 0 || code == 3) {
        replay_passed++;
        replay_loaded += code == 0;
        return;
    }
    replay_failed++;
    if (WIFSIGNALED(status)) printf("FAIL fuzz_%s %s: killed by signal %d\n", TARGETS[target].name, path, WTERMSIG(status));
    else printf("FAIL fuzz_%s %s: exit %d\n", TARGETS[target].name, path, code);
    printf("%s\n", msg);
}

static int by_name(const struct dirent **a, const struct dirent **b) { return strcmp((*a)->d_name, (*b)->d_name); }

static void replay_dir(int target, const char *dir) {
    struct dirent **names;
    int n = scandir(dir, &names, NULL, by_name);
    if (n < 0) return; // no such directory: nothing to replay
    int files = 0, before = replay_failed, loaded = replay_loaded;
    for (int i = 0; i < n; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        struct stat st;
        if (names[i]->d_name[0] != '.' && stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            replay_file(target, path);
            files++;
        }
        free(names[i]);
    }
    free(names);
    if (files)
        printf("%s replay %s: %d input(s) through fuzz_%s (%d loaded, %d rejected cleanly)\n",
               replay_failed == before ? "PASS" : "FAIL", dir, files, TARGETS[target].name, replay_loaded - loaded,
               files - (replay_failed - before) - (replay_loaded - loaded));
}

int main(int argc, char **argv) {
    int target = -1;
    if (argc >= 3)
        for (int t = 0; t < N_TARGETS; t++)
            if (!strcmp(argv[1], TARGETS[t].name)) target = t;
    if (argc == 2) {
        for (int t = 0; t < N_TARGETS; t++) {
            const char *kinds[] = {"corpus", "regressions"};
            for (int k = 0; k < 2; k++) {
                char dir[4096];
                snprintf(dir, sizeof dir, "%s/%s/%s", argv[1], kinds[k], TARGETS[t].name);
                replay_dir(t, dir);
            }
        }
    } else if (target >= 0) {
        for (int i = 2; i < argc; i++) replay_file(target, argv[i]);
    } else {
        fprintf(stderr, "usage: fuzz_replay DIR | fuzz_replay {shard,checkpoint,toktab,refstate,ctxblock,trainstate,lambada,recall} FILE...\n");
        return 2;
    }
    printf("fuzz replay: %d passed, %d failed\n", replay_passed, replay_failed);
    return replay_failed ? 1 : 0;
}
