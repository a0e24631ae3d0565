// Fuzz target: token tables (tokenizer_load, doc/formats.md "Token table"), then every id
// printed as samples print them (stdout is discarded while fuzzing).
// Build and run: make fuzz-toktab (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_toktab(const char *path) {
    Tokenizer tk;
    if (!tokenizer_load(&tk, path)) return; // no such file: samples print ids instead
    for (int id = -1; id <= (int)arrlen(tk.tokens); id++) tokenizer_print(&tk, id);
    tokenizer_print(&tk, tk.eot);
    tokenizer_free(&tk);
}
FUZZ_TARGET(fuzz_toktab)
