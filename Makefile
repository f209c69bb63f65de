# distlocal: `make train` runs the default job, `make test` the test suite.
# Both create .venv on first use (pip from local disk: torch first, then deepspeed, then us).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
NPROC  ?= 2
ARGS   ?=
# `make test` leaves out the tests marked slow (over a minute: torch.compile's first compile on
# CPU); `make test MARKS=` runs everything, `make test MARKS=slow` those alone.
MARKS  ?= not slow
# Test processes (pytest-xdist, one test file per process): most tests wait on child processes'
# start-up, so two keep 2 cores busy; TEST_JOBS=0 runs them in this process (pdb, -x).
TEST_JOBS ?= 2
# Several ranks on few cores: one thread per rank, or steps get ~10x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: install train test lint bench data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-build-isolation deepspeed
	$(BIN)/pip install -q -e '.[dev,deepspeed]'
	touch $@

train: install
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) launch/train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "$(MARKS)" $(ARGS)

lint: install
	$(BIN)/ruff check .

# Fashion-MNIST (data=fashion_mnist, profiling/fashion.sh) from Debian's package, where apt-get exists.
data:
	@if test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz; then \
	  echo "Fashion-MNIST is installed in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null; then \
	  $$(test "$$(id -u)" = 0 || echo sudo) apt-get install -y dataset-fashion-mnist; \
	else \
	  echo "no apt-get here: put the four IDX files from https://github.com/zalandoresearch/fashion-mnist in a directory and pass data.root=<dir>" >&2; exit 2; \
	fi

bench: install
	$(BIN)/python profiling/bench.py --model resnet18 --data-shape 3,32,32 --classes 10 --batch-size 64 --steps 5 --device cpu

clean:
	rm -rf $(VENV) outputs multirun
