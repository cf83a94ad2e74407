# Two commands do all the set-up on a fresh clone:  make demo  /  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install data bench clean

# Fashion-MNIST (issue 11): the Debian package dataset-fashion-mnist puts the four IDX files in
# FASHION_MNIST_SYSTEM; without root, the package is unpacked into FASHION_MNIST_LOCAL instead.
# spikeprune looks in that order (spikeprune.data.fashion_mnist_dirs); nothing is fetched at run time.
FASHION_MNIST_SYSTEM ?= /usr/share/datasets/fashion-mnist
FASHION_MNIST_LOCAL := data/fashion-mnist
FASHION_MNIST_FILE := t10k-labels-idx1-ubyte.gz

# SpikingJelly 2.0's model zoo (spikformer, qkformer, spike_driven_transformer, maxformer) is the test
# bed for tracing third-party models (tests/test_zoo.py). Its declared dependencies would pull a CUDA
# torch, torchvision, torchaudio and tensorboard, none of which its zoo needs on the torch backend, so
# it is installed without them, with the two its zoo imports at load time (loguru, h5py), pinned
# (scipy, numpy, matplotlib, tqdm come with spikeprune).
ZOO_PACKAGES := spikingjelly==2.0.0 loguru==0.7.3 h5py==3.16.0

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	if $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	  $(BIN)/python -m pip install -q --no-deps -c constraints.txt $(ZOO_PACKAGES); \
	else echo "SpikingJelly 2.0 needs Python 3.11+: tests/test_zoo.py will be skipped"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m spikeprune.demo

data:
	@if [ -f $(FASHION_MNIST_SYSTEM)/$(FASHION_MNIST_FILE) ] || [ -f $(FASHION_MNIST_LOCAL)/$(FASHION_MNIST_FILE) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "make data: installing Fashion-MNIST (Debian package dataset-fashion-mnist, 30 MB) into $(FASHION_MNIST_SYSTEM)/"; \
	  { apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } >/dev/null \
	  || { echo "make data: could not install dataset-fashion-mnist; put the four Fashion-MNIST IDX files in $(FASHION_MNIST_LOCAL)/" >&2; exit 1; }; \
	else \
	  echo "make data: not root, so unpacking the Debian package dataset-fashion-mnist (30 MB) into $(FASHION_MNIST_LOCAL)/"; \
	  rm -rf data/.deb && mkdir -p data/.deb && cd data/.deb && apt-get download -qq dataset-fashion-mnist \
	    && dpkg -x dataset-fashion-mnist_*.deb root && mkdir -p ../fashion-mnist \
	    && mv root/usr/share/datasets/fashion-mnist/* ../fashion-mnist/ && cd .. && rm -rf .deb \
	  || { echo "make data: could not fetch dataset-fashion-mnist; put the four Fashion-MNIST IDX files in $(FASHION_MNIST_LOCAL)/" >&2; exit 1; }; \
	fi

test: $(STAMP) data
	$(BIN)/python -m pytest -q -n 2 --durations=15

bench: $(STAMP)
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) runs .pytest_cache
