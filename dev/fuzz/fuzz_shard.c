// Fuzz target: token shards (shard_load, doc/formats.md "Token shards"), read as training
// reads them: validated against Pythia's vocabulary, then a data loader of small B x T
// batches walks it (version-2 shards: the targets their mask does not score are IGNORE_INDEX). Build and run: make fuzz-shard (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_shard(const char *path) {
    size_t n;
    uint16_t *tok = shard_load(path, &n, 50304);
    free(tok);
    DataLoader d;
    dataloader_init(&d, path, 2, 4, 50304); // dies (cleanly) below B*T+1 = 9 tokens
    for (int i = 0; i < 8; i++) {
        dataloader_next(&d);
        for (int j = 0; j < d.B * d.T; j++)
            if (d.inputs[j] < 0 || d.inputs[j] >= 50304 || (d.targets[j] != IGNORE_INDEX && (d.targets[j] < 0 || d.targets[j] >= 50304))) abort();
    }
    dataloader_free(&d);
}
FUZZ_TARGET(fuzz_shard)
