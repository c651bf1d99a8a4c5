# Two commands matter: `make demo` (install, then run the main job on the embedded
# default model) and `make test` (install, then run the test suite, editable
# install and built wheel both).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0, installed before the extras so they keep it. The version does not choose the build: this
# machine's pip finds the CPU wheel in a local folder; elsewhere pass
# TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu" (PyPI's Linux torch is the multi-GB CUDA build).
TORCH  ?= torch==2.13.0
TORCH_ARGS ?=
EXTRAS ?= llama,hf,eval,ray,serve,dev

# A venv with pip. `python -m venv` runs ensurepip with its output captured, so when that fails (CI saw it
# once: "ensurepip ... returned non-zero exit status 1" and nothing else) the cause is lost. Then: make the
# venv without pip, run ensurepip where its output shows, and if it fails again have this Python's own pip
# install pip into the venv (pip >= 22.3 has --python).
define make-venv
	$(PYTHON) -m venv $(1) || { echo "make-venv: venv's ensurepip failed; retrying it with its output shown" >&2; \
	    rm -rf $(1) && $(PYTHON) -m venv --without-pip $(1) && \
	    { $(1)/bin/python -m ensurepip --default-pip || $(PYTHON) -m pip --python $(1)/bin/python install -q pip; }; }
endef

.PHONY: install demo test test-fast wheel test-wheel lint bench gpu-wheels gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(call make-venv,$(VENV))
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(TORCH_ARGS)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The same prompt with no preference, with `prompt` and with Persona-judge (two views), on one screen.
demo: install
	$(BIN)/python examples/demo.py

test: install
	$(MAKE) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) test-wheel

# ruff (lint and format) and mypy, configured in pyproject.toml.
# mypy needs the import layout (personajudge.core is the folder core/): a tree of links gives it one.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf build/typecheck && mkdir -p build/typecheck/personajudge
	for f in personajudge/*; do ln -s ../../../$$f build/typecheck/personajudge/; done
	for d in core backends preferences plugins; do ln -s ../../../$$d build/typecheck/personajudge/$$d; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p personajudge

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not model and not hf and not slow"

# The wheel, into $(WHEEL_DIR), from a clean state: pip builds in the tree, and setuptools packs whatever an
# earlier build left in build/lib, so a module deleted or moved since would still ship. Hence the rm first.
# --check-build-dependencies: the setuptools in the venv must meet [build-system] (no isolation here).
WHEEL_DIR ?= dist
define build-wheel
	rm -rf build/lib build/bdist.* $(1)/persona_judge-*.whl
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation --check-build-dependencies -w $(1) .
endef

wheel: install
	$(call build-wheel,$(WHEEL_DIR))

# Build the wheel and install it alone in a fresh virtual environment, then use it.
test-wheel: install
	rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(call build-wheel,build/wheel-check/dist)
	$(call make-venv,build/wheel-check/venv)
	build/wheel-check/venv/bin/python -m pip install -q build/wheel-check/dist/persona_judge-*.whl pytest scipy
	cd build/wheel-check && venv/bin/personajudge plugins >/dev/null
	cd build/wheel-check && venv/bin/personajudge generate "hello" --backend toy --prefer concise --prefer humor --max-new-tokens 8 --json >/dev/null
	cd build/wheel-check && venv/bin/personajudge --version
	cd build/wheel-check && venv/bin/python -c "import personajudge, personajudge.core; assert all('site-packages' in m.__file__ for m in (personajudge, personajudge.core)), personajudge.__file__"
	cd build/wheel-check && PYTHONPATH=$(CURDIR)/tests/helpers venv/bin/python -m pytest -q -p no:cacheprovider --rootdir=. ../../tests/core/test_acceptance.py ../../tests/core/test_decoding.py ../../tests/core/test_config.py ../../tests/cli/test_cli.py ../../tests/cli/test_public_face.py ../../tests/plugins/test_plugins.py ../../tests/backends/test_conformance.py

bench: install
	$(BIN)/personajudge bench

# The prepared GPU check (examples/gpu_check.py). `make gpu-wheels` here, with internet: the wheels the bare
# GPU image lacks (it has torch, transformers, accelerate, numpy, pluggy, pytest, tqdm), for its Python on
# x86-64 Linux, into .whl/. It is git-ignored, so it does NOT travel with the working tree by itself: the
# device call must name it (carry: [".whl"]); without it the check stops at once, saying so (exit 2).
# There: `make gpu-check GPU_OUT=DIR` installs them and the project with --no-index, runs what the issue needs
# (targets on 1B and 7B, the CUDA tests, persona-judge-base on 1B, the CUDA-graph tests, the compiled step on
# 1B), then the rest while its 465 s budget lasts, and writes DIR/gpu_check.* (exit 0: all that is needed ran
# and passed; 1: something failed; 2: could not start; 3: a needed step not run for time; 4: a compiled step
# fell back to eager or replayed no CUDA graphs). Device call: timeout_s 525 (README "GPU check": Budget).
GPU_PYTHON     ?= 3.12
GPU_WHEELS_DIR ?= .whl
GPU_WHEELS     ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
                  typing-extensions==4.16.0 array-api-compat==1.16.0
GPU_OUT        ?= runs/gpu-check

gpu-wheels:
	rm -rf $(GPU_WHEELS_DIR) && mkdir -p $(GPU_WHEELS_DIR)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)

gpu-check:
	$(PYTHON) examples/gpu_check.py $(GPU_OUT)

clean:
	rm -rf build dist *.egg-info
