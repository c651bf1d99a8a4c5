# Two commands matter: `make demo` (install, then run the main job on the embedded
# default model) and `make test` (install, then run the test suite, editable
# install and built wheel both).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= llama,hf,eval,dev

.PHONY: install demo test test-fast test-wheel bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/personajudge generate "Why is the sky blue?" --prefer concise --prefer humorous

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) test-wheel

test-fast: install
	$(BIN)/python -m pytest -q -m "not model and not hf and not slow"

# Build the wheel and install it alone in a fresh virtual environment, then use it.
test-wheel: install
	rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w build/wheel-check/dist .
	$(PYTHON) -m venv build/wheel-check/venv
	build/wheel-check/venv/bin/python -m pip install -q build/wheel-check/dist/persona_judge-*.whl pytest scipy
	cd build/wheel-check && venv/bin/personajudge plugins >/dev/null
	cd build/wheel-check && venv/bin/personajudge generate "hello" --backend toy --prefer concise --prefer humor --max-new-tokens 8 --json >/dev/null
	cd build/wheel-check && venv/bin/python -c "import personajudge.core, sys; assert 'site-packages' in personajudge.core.__file__, personajudge.core.__file__"
	cd build/wheel-check && venv/bin/python -m pytest -q -p no:cacheprovider --rootdir=. ../../tests/test_acceptance.py ../../tests/test_decoding.py ../../tests/test_cli.py ../../tests/test_plugins.py ../../tests/test_config.py

bench: install
	$(BIN)/personajudge bench

clean:
	rm -rf build dist *.egg-info
