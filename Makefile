# Mamba-ASR: the two set-up commands are `make demo` and `make test`.
# Both create .venv with Python 3.11 when it is missing and install into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_OUT  := results/demo
DEMO_CTC  := $(DEMO_OUT)/demo_CTC/3402
DEMO_MODEL := models/demo-ctc
# Two test-clean recordings the demo model transcribes at the end (expanded after `corpus`).
DEMO_AUDIO = $(wordlist 1,2,$(sort $(wildcard $(DEMO_DATA)/LibriSpeech/test-clean/*/*/*.flac)))

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

# Trains the CTC demo configuration on CPU (rerunning resumes or just re-evaluates), evaluates
# the average of its best checkpoints on the unseen-voice test sets, plots the curves, exports
# the model to models/demo-ctc (with its ONNX files) and transcribes two test recordings with
# it (text, word times), then again with onnxruntime alone.
demo: corpus
	$(PY) train_CTC.py hparams/CTC/demo.yaml --data_folder $(DEMO_DATA) --noprogressbar
	$(PY) -m mamba_asr.reports.curves $(DEMO_CTC)/train_log.txt --out $(DEMO_CTC)/curves.png \
		--title "CTC demo (hparams/CTC/demo.yaml)"
	$(PY) -m mamba_asr.reports.wer_table $(DEMO_CTC)
	@echo "curves: $(DEMO_CTC)/curves.png  WER details: $(DEMO_CTC)/wer_test-*.txt"
	$(PY) export.py $(DEMO_CTC) --out $(DEMO_MODEL) --overwrite --format onnx --quantize int8
	$(PY) transcribe.py $(DEMO_MODEL) $(DEMO_AUDIO) --output_dir $(DEMO_OUT)/transcripts \
		--verbose --quiet
	@echo "model: $(DEMO_MODEL)  transcripts (txt json srt vtt tsv): $(DEMO_OUT)/transcripts"
	@echo "the same recordings through the model's ONNX files with onnxruntime, without PyTorch:"
	$(PY) transcribe.py $(DEMO_MODEL) $(DEMO_AUDIO) --backend onnxruntime \
		--output_dir $(DEMO_OUT)/transcripts-onnxruntime --verbose --quiet

# The suite runs in one pytest-xdist worker per core (TEST_WORKERS), a test file to a worker
# at a time; every process single-threaded (OMP_NUM_THREADS=1): its work is many small
# processes, and torch threads of two workers on the same cores only wait on each other.
TEST_WORKERS ?= auto
test: corpus
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_OUT) $(DEMO_MODEL) $(DEMO_STREAM_MODEL)

# Fine-tuning demo (docs/demo.md): trains the CTC demo model (or reuses it: a finished run is
# only re-evaluated), fine-tunes it on the demo corpus's adapt splits (voices it has not
# heard; hparams/CTC/finetune_demo.yaml, rerunning resumes or re-evaluates), evaluates the
# source model on the same adapt-test and test-clean manifests, and prints the before/after
# WER table (test-clean: what fine-tuning forgot).
DEMO_FT := $(DEMO_OUT)/demo_CTC_finetune/3402
.PHONY: demo-finetune
demo-finetune: corpus
	$(PY) train_CTC.py hparams/CTC/demo.yaml --data_folder $(DEMO_DATA) --noprogressbar
	$(PY) train_CTC.py hparams/CTC/finetune_demo.yaml --data_folder $(DEMO_DATA) --noprogressbar
	$(PY) evaluate.py hparams/CTC/demo.yaml --ckpt $(DEMO_CTC) --out_dir $(DEMO_FT)/before \
		--test_csv $(DEMO_FT)/prepared/adapt-test.csv $(DEMO_FT)/prepared/test-clean.csv
	@echo "WER before (the demo model) and after fine-tuning on adapt-train:"
	@$(PY) -m mamba_asr.reports.wer_table $(DEMO_FT)/before $(DEMO_FT) \
		--names before after --wide

# Streaming demo (docs/streaming.md): trains the causal ConMamba demo configuration
# (hparams/CTC/conmamba_streaming_demo.yaml; rerunning resumes or re-evaluates), exports it to
# models/demo-stream and streams a test-clean recording through it in 160-ms chunks at real-time
# pace, printing the partial results with their stream times, then the final transcript.
DEMO_STREAM := $(DEMO_OUT)/demo_CTC_streaming/3402
DEMO_STREAM_MODEL := models/demo-stream
.PHONY: demo-stream
demo-stream: corpus
	$(PY) train_CTC.py hparams/CTC/conmamba_streaming_demo.yaml --data_folder $(DEMO_DATA) \
		--noprogressbar
	$(PY) -m mamba_asr.reports.wer_table $(DEMO_STREAM)
	$(PY) export.py $(DEMO_STREAM) --out $(DEMO_STREAM_MODEL) --overwrite
	$(PY) transcribe.py $(DEMO_STREAM_MODEL) --stream $(lastword $(DEMO_AUDIO)) --output_format txt

# Serves the model `make demo` exported: adds it to the registry models/registry as demo-ctc
# with the alias production (adding it again changes nothing) and starts serve.py on it.
SERVE_PORT ?= 8000
REGISTRY   := models/registry
.PHONY: serve
serve: $(STAMP)
	@test -f $(DEMO_MODEL)/model_card.json || \
		{ echo "make serve: no model in $(DEMO_MODEL): run make demo first" >&2; exit 1; }
	$(PY) -m mamba_asr.registry add $(DEMO_MODEL) --name demo-ctc --alias production \
		--models $(REGISTRY)
	$(PY) serve.py --models $(REGISTRY) --model demo-ctc@production --port $(SERVE_PORT)

# S2S demo: the demo LM and its tokenizer (hparams/LM/demo.yaml), then the S2S demo model
# (ConMamba encoder + Mamba decoder, hparams/S2S/demo.yaml) on CPU; decodes the unseen-voice
# test sets with the LM (wer_*.txt) and without (no_lm/wer_*.txt), prints both WERs and
# plots the curves (valid ACC every epoch, valid WER every 4); exports it to models/demo-s2s
# with its ONNX files and transcribes two test recordings with onnxruntime alone.
# Rerunning resumes, or only re-evaluates a finished run.
DEMO_S2S := $(DEMO_OUT)/demo_S2S/7775
.PHONY: demo-s2s
demo-s2s: corpus
	$(PY) train_LM.py hparams/LM/demo.yaml --data_folder $(DEMO_DATA) --noprogressbar
	$(PY) train_S2S.py hparams/S2S/demo.yaml --data_folder $(DEMO_DATA) --noprogressbar
	$(PY) train_S2S.py hparams/S2S/demo.yaml --data_folder $(DEMO_DATA) --noprogressbar \
		--no_lm True
	$(PY) -m mamba_asr.reports.curves $(DEMO_S2S)/train_log.txt --out $(DEMO_S2S)/curves.png \
		--rates "valid WER" "valid ACC" --title "S2S demo (hparams/S2S/demo.yaml)"
	$(PY) -m mamba_asr.reports.wer_table $(DEMO_S2S)
	@echo "curves: $(DEMO_S2S)/curves.png  WER details: $(DEMO_S2S)/wer_test-*.txt, $(DEMO_S2S)/no_lm/wer_test-*.txt"
	$(PY) export.py $(DEMO_S2S) --out models/demo-s2s --overwrite --format onnx --quantize int8
	$(PY) transcribe.py models/demo-s2s $(DEMO_AUDIO) --backend onnxruntime --verbose --quiet \
		--output_dir $(DEMO_OUT)/transcripts-s2s-onnxruntime
