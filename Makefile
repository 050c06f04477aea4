# Mamba-ASR: the two set-up commands are `make demo` and `make test`.
# Both create .venv with Python 3.11 when it is missing and install into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_OUT  := results/demo

.PHONY: install corpus demo test lint clean-demo

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

install: $(STAMP)

# Synthesises the bundled demo corpus once (LibriSpeech layout, verified against checksums).
corpus: $(STAMP)
	$(PY) -m mamba_asr.demo_corpus --out $(DEMO_DATA)

demo: corpus
	$(PY) librispeech_prepare.py --data_folder $(DEMO_DATA) --save_folder $(DEMO_OUT)/prepared \
		--tr_splits train-clean-100 --dev_splits dev-clean --te_splits test-clean test-other \
		--merge_lst train-clean-100 --merge_name train.csv

test: corpus
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_OUT)
