# kiln: `make demo` runs the whole lifecycle on a local Ray (data, train, an ASHA sweep whose
# best model is registered and promoted, score, the tracked runs and a report, serve, drift);
# `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
KILN := $(BIN)/kiln
DEMO_DATA ?= data/digits
DEMO_PORT ?= 8000
LM_DATA ?= data/pystdlib

.PHONY: install demo demo-lm test test-fast lint format bench bench-tune bench-lm clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(KILN) data example digits $(DEMO_DATA) --overwrite
	$(KILN) validate jobs/configs/digits-mlp.yaml
	$(KILN) train jobs/configs/digits-mlp.yaml
	$(KILN) plan jobs/configs/digits-sweep.yaml
	$(KILN) tune jobs/configs/digits-sweep.yaml
	$(KILN) models promote digits-mlp@latest production
	$(KILN) models list digits-mlp
	$(KILN) score digits-mlp@production --input $(DEMO_DATA)/test --output out/scores --overwrite
	$(BIN)/python jobs/demo_check.py accuracy out/scores $(DEMO_DATA)/test
	$(KILN) runs list
	$(KILN) report latest --kind tune --output out/report.html
	$(KILN) serve digits-mlp@production --port $(DEMO_PORT) & serve=$$!; \
	  $(BIN)/python jobs/demo_check.py requests $(DEMO_PORT) $(DEMO_DATA)/test \
	  && $(KILN) monitor digits-mlp --url http://127.0.0.1:$(DEMO_PORT); status=$$?; \
	  kill -INT $$serve; wait $$serve; exit $$status

# The language-model path: stdlib corpus -> tiny GPT (DeepSpeed ZeRO-2, 2 workers) -> batch
# generation -> OpenAI-compatible endpoint queried with the official client (~6 minutes).
demo-lm: install
	$(KILN) data example python-stdlib $(LM_DATA) --overwrite
	$(KILN) train jobs/configs/tiny-gpt.yaml
	$(KILN) models promote tiny-gpt@latest production
	$(KILN) score tiny-gpt@production --input $(LM_DATA)/prompts.parquet --output out/gen \
	  --task generate --max-tokens 64 --overwrite
	$(BIN)/python jobs/demo_check.py generations out/gen 3
	$(KILN) serve tiny-gpt@production --port $(DEMO_PORT) & serve=$$!; \
	  $(BIN)/python jobs/demo_check.py completions $(DEMO_PORT) tiny-gpt; status=$$?; \
	  kill -INT $$serve; wait $$serve; exit $$status

lint: install
	$(BIN)/ruff check platform tests jobs benchmarks
	$(BIN)/ruff format --check platform tests jobs benchmarks
	$(BIN)/mypy platform/kiln

format: install
	$(BIN)/ruff check --fix platform tests jobs benchmarks
	$(BIN)/ruff format platform tests jobs benchmarks

test: lint
	$(BIN)/pytest tests -q --durations=25

test-fast: install
	$(BIN)/pytest tests -q -m "not slow and not e2e"

bench: install
	$(BIN)/python benchmarks/train.py

bench-tune: install
	$(BIN)/python benchmarks/tune.py

# Language-model training tokens/s (kiln vs torchrun) and generation tokens/s (endpoint vs
# in-process), ~5 minutes; see benchmarks/README.md.
bench-lm: install
	$(BIN)/python benchmarks/lm.py

clean:
	rm -rf .kiln data/digits out .pytest_cache .mypy_cache .ruff_cache
