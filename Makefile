# Headstart: `make run` serves, `make test` tests. Both create or reuse the virtualenv in .venv.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
# cpu for development and CI; gpu installs TensorFlow with CUDA.
EXTRAS ?= cpu,test

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma := ,

.PHONY: install run run-cluster test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

## Serve on 0.0.0.0:$(PORT); every HEADSTART_* variable applies (see README).
run: install
	$(BIN)/python -m service.weights
	PORT=$(PORT) exec $(BIN)/gunicorn -c service/gunicorn.conf.py service.wsgi:app

## The distributed topology on one machine: Redis, SeaweedFS's S3 (it honours conditional writes)
## on a fresh folder under var/cluster, APIs on $(PORT) and $(PORT)+1, two training workers.
## Ctrl-C stops them all.
run-cluster: install
	$(BIN)/python -m service.weights
	PORT=$(PORT) exec $(BIN)/python -m tools.cluster

## The test suite (fast: random weights, 32 px; real-weight tests skip without ../shared).
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.quality --write
	$(BIN)/python -m bench.train_speed --write

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
