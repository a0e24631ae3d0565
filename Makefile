# ctxkv: build, data, training and tests.  `make train` and `make test` are the two that matter.
CC ?= gcc
CFLAGS ?= -O3
CFLAGS += -std=gnu11 -Wall -Wextra
# sqrt need not set errno: lets GCC vectorize AdamW's update (its results are the same: only
# errno, which nothing reads, is given up; unlike -ffast-math it changes no rounding)
CFLAGS += -fno-math-errno
LDLIBS = -lm
PYTHON ?= python3
VENV = .venv
VPY = $(VENV)/bin/python
THREADS ?= 2

# -march=native when the compiler accepts it
ifeq ($(shell echo 'int main(){return 0;}' | $(CC) -march=native -x c - -o /dev/null 2>/dev/null && echo ok),ok)
  CFLAGS += -march=native
endif
# OpenMP when available, unless NO_OMP=1
ifneq ($(NO_OMP),1)
  ifeq ($(shell echo 'int main(){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo ok),ok)
    CFLAGS += -fopenmp
  else
    $(info OpenMP not found: building single-threaded)
  endif
endif

# stb_ds.h (Debian's libstb-dev, installed when missing); STB_DIR=folder takes it from elsewhere,
# e.g. a copy carried to a machine without a package registry (dev/gpu_first_run.sh)
STB_DEFAULT_DIR = /usr/include/stb
STB_DIR ?= $(STB_DEFAULT_DIR)
STB = $(STB_DIR)/stb_ds.h
STB_INC = -isystem $(STB_DIR)
CFLAGS += $(STB_INC)
TS_DIR = data/tinyshakespeare
TS_TRAIN = $(TS_DIR)/tiny_shakespeare_train.bin
TESTDATA = build/testdata

.PHONY: all train test data testdata venv stb clean ctxkv-demo generate retrofit

all: train_ctxkv test_ctxkv

# stb_ds comes from Debian's libstb-dev
stb: $(STB)
$(STB):
ifeq ($(STB_DIR),$(STB_DEFAULT_DIR))
	@echo "stb_ds.h missing: installing libstb-dev"
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libstb-dev; \
	 else sudo apt-get update -qq && sudo apt-get install -y -qq libstb-dev; fi
else
	@echo "error: STB_DIR=$(STB_DIR) has no stb_ds.h" >&2; exit 1
endif

# a copy of stb_ds.h in build/stb, to carry to a machine without a package registry (the GPU
# machine: `bash dev/gpu_first_run.sh` finds it there)
gpu-carry: $(STB)
	@mkdir -p build/stb && cp $(STB) build/stb/ && echo "build/stb/stb_ds.h: carry build/stb with the tree"
# the one command for a GPU machine (dev/gpu_first_run.sh); DRY=1 prints its stages and commands
gpu-first-run:
	bash dev/gpu_first_run.sh $(if $(DRY),--dry-run)
.PHONY: gpu-carry gpu-first-run

# the host code both programs share (command line, config, checkpoints, data, evaluation, driver)
CTXKV_H = $(wildcard ctxkv/*.h)

train_ctxkv: train_ctxkv.c $(CTXKV_H) | $(STB)
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

# the harness includes train_ctxkv.c; main()'s helpers are unused there
# the tiny configs both harnesses test every variant with
TEST_H = test_configs.h
test_ctxkv: test_ctxkv.c train_ctxkv.c $(CTXKV_H) $(TEST_H) | $(STB)
	$(CC) $(CFLAGS) -Wno-unused-function -o $@ $< $(LDLIBS)

# -march=native with AVX-512 compiles ctxkv/simd.h's 16-lane GEMM: make test then also checks the
# AVX2 build's kernels (8 lanes, 6 x 16), which machines without AVX-512 run
NATIVE_AVX512 := $(shell $(CC) $(CFLAGS) -dM -E -x c /dev/null 2>/dev/null | grep -q __AVX512F__ && echo 1)
build/test_ctxkv_avx2: test_ctxkv.c train_ctxkv.c $(CTXKV_H) $(TEST_H) | $(STB)
	@mkdir -p build
	$(CC) $(CFLAGS) -mno-avx512f -Wno-unused-function -o $@ $< $(LDLIBS)

# Python venv for prepro (tokenizers + numpy only)
venv: $(VENV)/.stamp
$(VENV)/.stamp: prepro/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r prepro/requirements.txt
	touch $@

# Tiny Shakespeare shards and the token table (vendored text, works offline)
data: $(TS_TRAIN)
$(TS_TRAIN): $(VENV)/.stamp prepro/tinyshakespeare.py prepro/common.py data/vendor/tinyshakespeare.txt
	$(VPY) prepro/tinyshakespeare.py

# files the harness needs: round-trip shard, and the HF import of the committed fp16 model
testdata: $(TESTDATA)/.stamp
$(TESTDATA)/.stamp: $(VENV)/.stamp dev/make_test_data.py prepro/common.py prepro/import_hf.py prepro/ckpt.py dev/ref/hf_tiny/model.safetensors
	$(VPY) dev/make_test_data.py $(TESTDATA)
	$(VPY) prepro/import_hf.py dev/ref/hf_tiny $(TESTDATA)/imported.bin
	touch $@

# the CUDA compile check, the Python prepro tests, the fuzz regressions, the quick KV table
# (dev/kv_table.py --quick, ~2 min), the CUDA program built for the CPU emulator (its errors are
# compared with the CPU program's), then the C harness (whose last line is the overall
# "N passed, N failed")
test: train_ctxkv test_ctxkv testdata
	$(MAKE) --no-print-directory cuda-check
	@if [ -f $(MIRROR_OVERLAP) ]; then $(PYTHON) $(MIRROR_OVERLAP) . --max 120 || \
	  { echo "FAIL mirror: train_ctxkv.c and train_ctxkv.cu hold more than 120 copied lines (shared code goes in ctxkv/)"; exit 1; }; fi
	$(VPY) prepro/test_prepro.py
	$(MAKE) --no-print-directory fuzz-replay
	$(VPY) dev/test_kv_table.py --binary ./train_ctxkv
	@if [ -f $(CUDA_HOME)/include/cuda_bf16.h ]; then $(MAKE) --no-print-directory $(EMU)/train_ctxkv_cu_fp32; \
	 else echo "SKIP: no CUDA headers in $(CUDA_HOME)/include: the CUDA program's errors are not compared with the CPU's"; fi
	@if [ -n "$(NATIVE_AVX512)" ]; then $(MAKE) --no-print-directory build/test_ctxkv_avx2 && \
	  echo "build/test_ctxkv_avx2 --simd (the AVX2 build's kernels, on this AVX-512 machine)" && \
	  OMP_NUM_THREADS=$(THREADS) build/test_ctxkv_avx2 --simd; fi
	OMP_NUM_THREADS=$(THREADS) TRAIN_BIN_CU=$$([ -x $(EMU)/train_ctxkv_cu_fp32 ] && echo $(EMU)/train_ctxkv_cu_fp32) ./test_ctxkv

# the host lines the two programs hold twice (at most 120; it only goes down), where ../shared has the tool
MIRROR_OVERLAP = ../shared/tools/mirror_overlap.py

# the default run: pythia-14m shape on Tiny Shakespeare, a few minutes on two cores
TRAIN_FLAGS ?= --model pythia-14m -b 4 -t 256 --steps 300 --lr 2e-3 --warmup 30 --val-every 50 --val-batches 16 --sample-every 150 --out out/pythia-14m
train: train_ctxkv data
	OMP_NUM_THREADS=$(THREADS) ./train_ctxkv $(TRAIN_FLAGS)

# Text in, text out: CKPT (a checkpoint: trained here, retrofitted, or imported with
# prepro/import_hf.py) continues PROMPT for N tokens with the KV cache
CKPT ?= out/pythia-14m/model.bin
PROMPT ?= ROMEO:
N ?= 64
generate: train_ctxkv data
	@test -f "$(CKPT)" || { echo "error: CKPT=$(CKPT) is not a file (make train writes out/pythia-14m/model.bin)" >&2; exit 1; }
	ids=$$($(VPY) prepro/encode_text.py "$$PROMPT") && OMP_NUM_THREADS=$(THREADS) ./train_ctxkv --model "$(CKPT)" --steps 0 --val '' --generate $(N) --prompt-ids $$ids
export PROMPT

# Retrofit (doc/retrofit.md): an mha model pretrained here (or RETROFIT_FLAGS=--base M.bin)
# converted to gqa/mqa/mla/ctxkv and fine-tuned; writes results/retrofit/ (~30 min on 2 cores)
RETROFIT_FLAGS ?=
$(VENV)/.plot-stamp: $(VENV)/.stamp dev/requirements-plot.txt
	$(VPY) -m pip install -q -r dev/requirements-plot.txt
	touch $@
retrofit: train_ctxkv $(VENV)/.plot-stamp
	$(VPY) dev/retrofit.py --threads $(THREADS) $(RETROFIT_FLAGS)

# The KV table (dev/kv_table.py): every variant on language modelling and associative recall,
# over seeds, with the quality-vs-KV-bytes figure; writes results/. A fresh clone needs only make
# and python3: the venv (numpy, matplotlib), the build and the data are made here.
#   make table          the cpu-scale table the README shows (about 2 h on 2 cores; resumable:
#                       finished runs in results/ are reused)    TABLE_FLAGS: e.g. --seeds 5
#   make table-quick    the same pipeline in a few minutes (its numbers mean nothing)
TABLE_FLAGS ?=
.PHONY: table table-quick
table: train_ctxkv $(VENV)/.plot-stamp
	$(VPY) dev/kv_table.py --scale cpu --threads $(THREADS) $(TABLE_FLAGS)
table-quick: train_ctxkv $(VENV)/.plot-stamp
	$(VPY) dev/kv_table.py --quick $(TABLE_FLAGS)

# Context-KV: phase 1 then phase 2 on Tiny Shakespeare, next to an MHA run with the same budget
ctxkv-demo: train_ctxkv data
	OMP_NUM_THREADS=$(THREADS) bash dev/ctxkv_demo.sh

# The trainer's matmuls against OpenBLAS sgemm on the model's own shapes (dev/bench_gemm.c);
# OpenBLAS (Debian's libopenblas-dev) is the bench's baseline only, never the trainer's
OPENBLAS_H = /usr/include/x86_64-linux-gnu/cblas.h
$(OPENBLAS_H):
	@echo "cblas.h missing: installing libopenblas-dev (for the bench only)"
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libopenblas-dev; \
	 else sudo apt-get update -qq && sudo apt-get install -y -qq libopenblas-dev; fi
build/bench_gemm: dev/bench_gemm.c train_ctxkv.c $(CTXKV_H) | $(STB) $(OPENBLAS_H)
	@mkdir -p build
	$(CC) $(CFLAGS) -Wno-unused-function -o $@ $< -lopenblas $(LDLIBS)
.PHONY: bench-gemm bench-train bench-decode devvenv check-export reference
bench-gemm: build/bench_gemm
	OMP_NUM_THREADS=$(THREADS) OPENBLAS_NUM_THREADS=$(THREADS) OPENBLAS_THREAD_TIMEOUT=4 build/bench_gemm

# The dev venv (PyTorch, transformers: dev/requirements-dev.txt) for the PyTorch baselines and
# dev/reference.py; make test never uses it
DEVVENV = devvenv
DVPY = $(DEVVENV)/bin/python
devvenv: $(DEVVENV)/.stamp
$(DEVVENV)/.stamp: dev/requirements-dev.txt
	$(PYTHON) -m venv $(DEVVENV)
	$(DVPY) -m pip install -q -r dev/requirements-dev.txt
	touch $@
# a training step against PyTorch at pythia-14m and pythia-70m; decoding against HF generate
bench-train: train_ctxkv $(DEVVENV)/.stamp
	$(DVPY) dev/bench_train.py --threads $(THREADS)
	$(DVPY) dev/bench_train.py --model pythia-70m --threads $(THREADS) --steps 4 --warmup 1
# prepro/export_hf.py against Hugging Face itself: EXPORT_CKPT exported, loaded by transformers, and our
# program checked against it (logits, gradients, AdamW steps; dev/check_export_hf.py)
# the reference states in dev/ref (dev/reference.py: Hugging Face / PyTorch autograd in float64)
reference: $(DEVVENV)/.stamp
	$(DVPY) dev/reference.py
EXPORT_CKPT ?= dev/ref/tiny_model.bin
check-export: test_ctxkv $(DEVVENV)/.stamp
	$(DVPY) dev/check_export_hf.py $(EXPORT_CKPT)
# REPS: runs per side, the best of which counts (noise on a shared machine only slows a run down)
REPS ?= 5
bench-decode: train_ctxkv $(DEVVENV)/.stamp
	$(DVPY) dev/bench_decode.py --threads $(THREADS) --reps $(REPS)

clean:
	rm -rf train_ctxkv test_ctxkv build

# ---------------------------------------------------------------------------
# Robustness (doc/robustness.md): fuzzing the file loaders, replaying what it found, ASan.
#   make fuzz [FUZZ_SECONDS=60]   build and run every fuzz target (make -k -j2 fuzz: two at a time)
#   make fuzz-shard ...           one target; fuzz-seeds rewrites the seed corpora
#   make fuzz-replay              the committed corpora and regressions (part of make test)
#   make test-asan                the whole harness against ASan/UBSan builds
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_MAXLEN ?= 16384
FUZZ_TARGETS = shard checkpoint toktab refstate ctxblock trainstate lambada recall
FUZZ_DIR = dev/fuzz
FUZZ_BUILD = build/fuzz
FUZZ_SRC = $(FUZZ_DIR)/fuzz_common.h train_ctxkv.c test_ctxkv.c $(CTXKV_H)
# -march=native when the compiler accepts it (the same probe as above, for these builds)
NATIVE_FLAG = $(shell echo 'int main(){return 0;}' | $(1) -march=native -x c - -o /dev/null 2>/dev/null && echo -march=native)
SAN_WARN = -std=gnu11 -Wall -Wextra -Wno-unused-function -Wno-unknown-pragmas $(STB_INC)
FUZZ_CFLAGS = $(SAN_WARN) -g -O1 -DFUZZING -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
# the replay runs under make test with $(CC); ASan/UBSan when that compiler has them
REPLAY_SAN = $(shell echo 'int main(){return 0;}' | $(CC) -fsanitize=address,undefined -x c - -o /dev/null 2>/dev/null && echo -fsanitize=address,undefined -fno-sanitize-recover=undefined)
FUZZ_RUNS = $(FUZZ_TARGETS:%=fuzz-%)

.PHONY: fuzz $(FUZZ_RUNS) fuzz-replay fuzz-seeds test-asan

$(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz_%): $(FUZZ_BUILD)/fuzz_%: $(FUZZ_DIR)/fuzz_%.c $(FUZZ_SRC) | $(STB)
	@mkdir -p $(FUZZ_BUILD)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(call NATIVE_FLAG,$(FUZZ_CC)) -o $@ $< -lm

# Each run starts from the committed seeds (dev/fuzz/corpus/T) and grows its own corpus in
# build/fuzz/corpus/T. A finding (crash, leak, timeout, out-of-memory) is moved to
# dev/fuzz/regressions/T/, which make test replays, and fails the target (make -k fuzz goes
# on with the other targets).
$(FUZZ_RUNS): fuzz-%: $(FUZZ_BUILD)/fuzz_%
	@mkdir -p $(FUZZ_BUILD)/corpus/$* $(FUZZ_BUILD)/artifacts/$*
	@echo "fuzz_$*: up to $(FUZZ_SECONDS) s, log in $(FUZZ_BUILD)/fuzz_$*.log"
	@t0=$$(date +%s); \
	 $(FUZZ_BUILD)/fuzz_$* -max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAXLEN) -timeout=30 -rss_limit_mb=4096 \
	  -close_fd_mask=3 -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/$*/ \
	  $(FUZZ_BUILD)/corpus/$* $(FUZZ_DIR)/corpus/$* > $(FUZZ_BUILD)/fuzz_$*.log 2>&1; \
	 rc=$$?; secs=$$(( $$(date +%s) - t0 )); found=0; \
	 for f in $(FUZZ_BUILD)/artifacts/$*/*; do \
	   [ -f "$$f" ] || continue; mkdir -p $(FUZZ_DIR)/regressions/$*; mv "$$f" $(FUZZ_DIR)/regressions/$*/; \
	   echo "fuzz_$*: FINDING $(FUZZ_DIR)/regressions/$*/$$(basename $$f)"; found=1; done; \
	 runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $(FUZZ_BUILD)/fuzz_$*.log); \
	 echo "fuzz_$*: $${runs:-?} executions in $$secs s, corpus $$(ls $(FUZZ_BUILD)/corpus/$* | wc -l) inputs, exit $$rc"; \
	 if [ $$found = 1 ] || [ $$rc != 0 ]; then grep -m1 -A12 -E '^==[0-9]+==|ERROR|runtime error' $(FUZZ_BUILD)/fuzz_$*.log; exit 1; fi

fuzz: $(FUZZ_RUNS)

$(FUZZ_BUILD)/fuzz_replay: $(FUZZ_DIR)/fuzz_replay.c $(FUZZ_TARGETS:%=$(FUZZ_DIR)/fuzz_%.c) $(FUZZ_SRC) | $(STB)
	@mkdir -p $(FUZZ_BUILD)
	$(CC) $(SAN_WARN) -g -O1 -DFUZZING $(REPLAY_SAN) $(call NATIVE_FLAG,$(CC)) -o $@ $< -lm

fuzz-replay: $(FUZZ_BUILD)/fuzz_replay
	$(FUZZ_BUILD)/fuzz_replay $(FUZZ_DIR)

$(FUZZ_BUILD)/make_seeds: $(FUZZ_DIR)/make_seeds.c train_ctxkv.c $(CTXKV_H) | $(STB)
	@mkdir -p $(FUZZ_BUILD)
	$(CC) $(SAN_WARN) -O1 -g -o $@ $< -lm

fuzz-seeds: $(FUZZ_BUILD)/make_seeds testdata
	rm -rf $(FUZZ_DIR)/corpus
	$(FUZZ_BUILD)/make_seeds $(FUZZ_DIR)/corpus $(TESTDATA)/tokenizer.bin

# ASan + UBSan builds of both binaries, without OpenMP (its runtime gives ASan false
# positives); test_ctxkv runs the asan train_ctxkv through TRAIN_BIN. Leak checks: on for
# test_ctxkv; off by default for train_ctxkv (dev/asan_train_options.c says why), then on for
# one full run (train, val, samples, generation, save) where its main frees everything.
ASAN_BUILD = build/asan
ASAN_CFLAGS = $(SAN_WARN) -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
UBSAN_ENV = UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

$(ASAN_BUILD)/train_ctxkv: train_ctxkv.c dev/asan_train_options.c $(CTXKV_H) | $(STB)
	@mkdir -p $(ASAN_BUILD)
	$(CC) $(ASAN_CFLAGS) $(call NATIVE_FLAG,$(CC)) -o $@ train_ctxkv.c dev/asan_train_options.c -lm

$(ASAN_BUILD)/test_ctxkv: test_ctxkv.c train_ctxkv.c $(CTXKV_H) $(TEST_H) | $(STB)
	@mkdir -p $(ASAN_BUILD)
	$(CC) $(ASAN_CFLAGS) $(call NATIVE_FLAG,$(CC)) -o $@ $< -lm

test-asan: $(ASAN_BUILD)/train_ctxkv $(ASAN_BUILD)/test_ctxkv testdata
	rm -rf $(ASAN_BUILD)/run
	$(UBSAN_ENV) ASAN_OPTIONS=detect_leaks=1 $(ASAN_BUILD)/train_ctxkv --model pythia-14m -b 2 -t 16 --steps 3 \
	  --train $(TESTDATA)/roundtrip.bin --val $(TESTDATA)/roundtrip.bin --val-every 2 --val-batches 2 --sample-every 2 \
	  --sample-len 4 --tokenizer $(TESTDATA)/tokenizer.bin --eval-gen --gen-prompt 4 --gen-new 4 --out $(ASAN_BUILD)/run > $(ASAN_BUILD)/run.log
	@echo "asan: a full training run of $(ASAN_BUILD)/train_ctxkv exits 0 with leak checks on (log: $(ASAN_BUILD)/run.log)"
	$(UBSAN_ENV) TRAIN_BIN=$(ASAN_BUILD)/train_ctxkv $(ASAN_BUILD)/test_ctxkv

# ---------------------------------------------------------------------------
# CUDA (README, GPU section): train_ctxkv.cu, the CUDA mirror of train_ctxkv.c, and its harness
# test_ctxkv_cu.cu, which links the CPU program through test_ctxkv_cpu.c. Nothing CUDA runs in
# CI: `make test` only compiles both (cuda-check) when nvcc exists, warnings as errors.
#   make train_ctxkv_cu test_ctxkv_cu          bf16 + fp32 master weights, for sm_80 and sm_90
#   ... PRECISION=FP32                         all fp32: compares with the CPU exactly
#   ... GPU_COMPUTE_CAPABILITY=90              one architecture (faster to build)
#   make cuda-emu                              the harness on the CPU through dev/cuda/emu (no GPU)
#   make dev-cuda                              build the kernel files in dev/cuda
NVCC ?= nvcc
NVCC_FOUND := $(shell command -v $(NVCC) 2>/dev/null)
GPU_COMPUTE_CAPABILITY ?= 80 90
NVCC_GENCODE = $(foreach cc,$(GPU_COMPUTE_CAPABILITY),-gencode arch=compute_$(cc),code=sm_$(cc))
NVCC_FLAGS ?= -O3 -std=c++17
NVCC_WERROR = --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
NVCC_LDLIBS = -lcublasLt -lcublas -lm
CU_PREC = $(if $(filter FP32,$(PRECISION)),-DENABLE_FP32)
CU_FLAGS = $(NVCC_FLAGS) $(CU_PREC) $(NVCC_GENCODE) $(STB_INC)
DEV_CUDA = $(wildcard dev/cuda/*.cu)
CU_EMPTY :=
CU_SPACE := $(CU_EMPTY) $(CU_EMPTY)
CU_ARCHS = $(subst $(CU_SPACE),$(CU_SPACE)and$(CU_SPACE),$(strip $(patsubst %,sm_%,$(GPU_COMPUTE_CAPABILITY))))
# the CPU program as an object for the harness, with OpenMP and -march=native where the CPU build
# has them (the real-shape checks run pythia-160m steps on the CPU side); its users link OpenMP
CPUREF_OMP = $(filter -fopenmp,$(CFLAGS))
CPUREF_CFLAGS = -O2 -std=gnu11 -Wall -Wextra -Wno-psabi -Wno-unused-function -Wno-unknown-pragmas $(STB_INC) \
                $(filter -march=native -fopenmp,$(CFLAGS))
CPUREF_LINK_NVCC = $(if $(CPUREF_OMP),-Xcompiler -fopenmp)

.PHONY: cuda-flags cuda-check cuda-emu dev-cuda clean-cuda

# the CUDA binaries rebuild when PRECISION or the architectures change
build/cu_flags.txt: cuda-flags
	@mkdir -p build
	@echo '$(CU_FLAGS)' | cmp -s - $@ || echo '$(CU_FLAGS)' > $@

train_ctxkv_cu: train_ctxkv.cu $(CTXKV_H) build/cu_flags.txt | $(STB)
	$(NVCC) $(CU_FLAGS) -o $@ $< $(NVCC_LDLIBS)

build/test_ctxkv_cpu.o: test_ctxkv_cpu.c train_ctxkv.c $(CTXKV_H) | $(STB)
	@mkdir -p build
	$(CC) $(CPUREF_CFLAGS) -c -o $@ $<

test_ctxkv_cu: test_ctxkv_cu.cu train_ctxkv.cu $(CTXKV_H) $(TEST_H) build/test_ctxkv_cpu.o build/cu_flags.txt | $(STB)
	$(NVCC) $(CU_FLAGS) -o $@ $< build/test_ctxkv_cpu.o $(NVCC_LDLIBS) $(CPUREF_LINK_NVCC)

# make test's CUDA check: both targets and the kernel files in dev/cuda compile, warnings as
# errors, for every architecture (two compiles at a time; outputs in build/cuda-check, never run:
# CI has no GPU). About a minute on two cores.
CUDA_CHECK = build/cuda-check
cuda-check: | $(STB)
	@mkdir -p $(CUDA_CHECK); rm -f $(CUDA_CHECK)/result.txt; \
	if [ -z "$(NVCC_FOUND)" ]; then echo "SKIP cuda: $(NVCC) not found, train_ctxkv_cu and test_ctxkv_cu not compiled" | tee $(CUDA_CHECK)/result.txt; exit 0; fi; \
	mkdir -p $(CUDA_CHECK) && \
	$(CC) $(CPUREF_CFLAGS) -c -o $(CUDA_CHECK)/test_ctxkv_cpu.o test_ctxkv_cpu.c && \
	{ $(NVCC) $(CU_FLAGS) $(NVCC_WERROR) -o $(CUDA_CHECK)/train_ctxkv_cu train_ctxkv.cu $(NVCC_LDLIBS) & p1=$$!; \
	  $(NVCC) $(CU_FLAGS) $(NVCC_WERROR) -o $(CUDA_CHECK)/test_ctxkv_cu test_ctxkv_cu.cu $(CUDA_CHECK)/test_ctxkv_cpu.o $(NVCC_LDLIBS) $(CPUREF_LINK_NVCC) & p2=$$!; \
	  wait $$p1; r1=$$?; wait $$p2; r2=$$?; [ $$r1 = 0 ] && [ $$r2 = 0 ]; } && \
	{ $(MAKE) --no-print-directory -s -j2 dev-cuda > $(CUDA_CHECK)/dev-cuda.log 2>&1 || { cat $(CUDA_CHECK)/dev-cuda.log; false; }; } && \
	echo "PASS cuda: train_ctxkv_cu, test_ctxkv_cu and the $(words $(DEV_CUDA)) kernel files in dev/cuda compile for $(CU_ARCHS) ($(if $(CU_PREC),fp32,bf16), warnings as errors), not run" | tee $(CUDA_CHECK)/result.txt || \
	{ echo "FAIL cuda: the CUDA sources do not compile with warnings as errors"; exit 1; }

# The CUDA program on the CPU, through the emulator in dev/cuda/emu: test_ctxkv_cu in both
# precisions, the dev/cuda kernel files, and test_ctxkv with the CUDA binary as TRAIN_BIN. It
# checks the CUDA program's logic (kernels, cuBLASLt arguments, barriers) where there is no GPU,
# not its speed nor anything only a GPU shows (races between blocks, cuBLASLt's algorithms).
# About 3 minutes on two cores.
EMU = build/emu
CUDA_HOME ?= /usr/local/cuda
EMU_CXX = g++ -std=c++17 -O2 -U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=0 -w -I. $(STB_INC) -I$(CUDA_HOME)/include -Idev/cuda/emu -I$(EMU)
$(EMU)/%.emu.cpp: %.cu dev/cuda/emu/emulate.py
	@mkdir -p $(EMU)
	$(PYTHON) dev/cuda/emu/emulate.py $< $@
$(EMU)/train_ctxkv_cu_fp32: $(EMU)/train_ctxkv.emu.cpp dev/cuda/emu/cuda_emu.h $(CTXKV_H) | $(STB)
	$(EMU_CXX) -DENABLE_FP32 -o $@ $<
$(EMU)/train_ctxkv_cu_bf16: $(EMU)/train_ctxkv.emu.cpp dev/cuda/emu/cuda_emu.h $(CTXKV_H) | $(STB)
	$(EMU_CXX) -o $@ $<
$(EMU)/test_ctxkv_cu_fp32: $(EMU)/test_ctxkv_cu.emu.cpp $(EMU)/train_ctxkv.emu.cpp dev/cuda/emu/cuda_emu.h $(CTXKV_H) $(TEST_H) build/test_ctxkv_cpu.o | $(STB)
	$(EMU_CXX) -DENABLE_FP32 -o $@ $< build/test_ctxkv_cpu.o -lm $(CPUREF_OMP)
$(EMU)/test_ctxkv_cu_bf16: $(EMU)/test_ctxkv_cu.emu.cpp $(EMU)/train_ctxkv.emu.cpp dev/cuda/emu/cuda_emu.h $(CTXKV_H) $(TEST_H) build/test_ctxkv_cpu.o | $(STB)
	$(EMU_CXX) -o $@ $< build/test_ctxkv_cpu.o -lm $(CPUREF_OMP)
$(EMU)/dev/common.h: dev/cuda/common.h dev/cuda/emu/emulate.py
	@mkdir -p $(EMU)/dev
	$(PYTHON) dev/cuda/emu/emulate.py $< $@
$(EMU)/dev/%: dev/cuda/%.cu $(EMU)/dev/common.h dev/cuda/emu/cuda_emu.h
	$(PYTHON) dev/cuda/emu/emulate.py $< $@.cpp
	$(EMU_CXX) -o $@ $@.cpp
cuda-emu: train_ctxkv test_ctxkv testdata $(EMU)/train_ctxkv_cu_fp32 $(EMU)/train_ctxkv_cu_bf16 $(EMU)/test_ctxkv_cu_fp32 $(EMU)/test_ctxkv_cu_bf16 $(DEV_CUDA:dev/cuda/%.cu=$(EMU)/dev/%)
	@for k in $(DEV_CUDA:dev/cuda/%.cu=%); do $(EMU)/dev/$$k > $(EMU)/dev/$$k.log 2>&1 || { cat $(EMU)/dev/$$k.log; exit 1; }; \
	  echo "cuda-emu dev/cuda/$$k.cu: $$(tail -n 1 $(EMU)/dev/$$k.log)"; done
	@for p in fp32 bf16; do \
	  TRAIN_BIN_CU=$(EMU)/train_ctxkv_cu_$$p $(EMU)/test_ctxkv_cu_$$p > $(EMU)/$$p.log 2>&1 || { grep FAIL $(EMU)/$$p.log; tail -n 1 $(EMU)/$$p.log; exit 1; }; \
	  echo "cuda-emu $$p: $$(tail -n 1 $(EMU)/$$p.log) (log: $(EMU)/$$p.log)"; done
	@TRAIN_BIN=$(EMU)/train_ctxkv_cu_fp32 OMP_NUM_THREADS=$(THREADS) ./test_ctxkv > $(EMU)/cpu_harness.log 2>&1 || { grep FAIL $(EMU)/cpu_harness.log; exit 1; }; \
	  echo "cuda-emu: test_ctxkv's command-line checks (bad input, --resume, --kv-report) against the CUDA binary: $$(tail -n 1 $(EMU)/cpu_harness.log)"

# dev/cuda: one file per kernel (CPU reference, kernel versions, validation, timing)
dev-cuda: $(DEV_CUDA:dev/cuda/%.cu=$(CUDA_CHECK)/dev/%)
$(CUDA_CHECK)/dev/%: dev/cuda/%.cu dev/cuda/common.h build/cu_flags.txt
	@mkdir -p $(CUDA_CHECK)/dev
	$(NVCC) $(NVCC_FLAGS) $(CU_PREC) $(NVCC_GENCODE) $(NVCC_WERROR) -o $@ $< $(NVCC_LDLIBS)

clean-cuda:
	rm -f train_ctxkv_cu test_ctxkv_cu
	rm -rf $(CUDA_CHECK) $(EMU) build/test_ctxkv_cpu.o build/cu_flags.txt
