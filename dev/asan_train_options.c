// Linked into build/asan/train_ctxkv only (make test-asan): LeakSanitizer's default for that
// binary is off. Its main() returns without freeing the model on several paths (--bench,
// --generate, --phase 1, --stop-at); the process ends there and the OS reclaims everything,
// so leak reports from those runs say nothing. test_ctxkv keeps the default (leak checks on),
// and make test-asan also runs one full training run of this binary with
// ASAN_OPTIONS=detect_leaks=1 (which overrides this default), where main frees everything.
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "detect_leaks=0"; }
