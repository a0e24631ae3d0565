# ctxkv: build, data, training and tests.  `make train` and `make test` are the two that matter.
CC ?= gcc
CFLAGS ?= -O3
CFLAGS += -std=gnu11 -Wall -Wextra
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

STB = /usr/include/stb/stb_ds.h
TS_DIR = data/tinyshakespeare
TS_TRAIN = $(TS_DIR)/tiny_shakespeare_train.bin
TESTDATA = build/testdata

.PHONY: all train test data testdata venv stb clean ctxkv-demo

all: train_ctxkv test_ctxkv

# stb_ds comes from Debian's libstb-dev
stb: $(STB)
$(STB):
	@echo "stb_ds.h missing: installing libstb-dev"
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libstb-dev; \
	 else sudo apt-get update -qq && sudo apt-get install -y -qq libstb-dev; fi

train_ctxkv: train_ctxkv.c | $(STB)
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

# the harness includes train_ctxkv.c; main()'s helpers are unused there
test_ctxkv: test_ctxkv.c train_ctxkv.c | $(STB)
	$(CC) $(CFLAGS) -Wno-unused-function -o $@ $< $(LDLIBS)

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

# the Python prepro tests, then the C harness (whose last line is the overall "N passed, N failed")
test: train_ctxkv test_ctxkv testdata
	$(VPY) prepro/test_prepro.py
	OMP_NUM_THREADS=$(THREADS) ./test_ctxkv

# the default run: pythia-14m shape on Tiny Shakespeare, a few minutes on two cores
TRAIN_FLAGS ?= --model pythia-14m -b 4 -t 256 --steps 300 --lr 2e-3 --warmup 30 --val-every 50 --val-batches 16 --sample-every 150 --out out/pythia-14m
train: train_ctxkv data
	OMP_NUM_THREADS=$(THREADS) ./train_ctxkv $(TRAIN_FLAGS)

# Context-KV: phase 1 then phase 2 on Tiny Shakespeare, next to an MHA run with the same budget
ctxkv-demo: train_ctxkv data
	OMP_NUM_THREADS=$(THREADS) bash dev/ctxkv_demo.sh

clean:
	rm -rf train_ctxkv test_ctxkv build
