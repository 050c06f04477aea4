"""Reports on the outputs of SpeechBrain training runs (one command line tool per module).

    python -m mamba_asr.reports.curves     # train_log.txt -> training-curve PNG
    python -m mamba_asr.reports.wer_table  # wer_<test-set>.json scores -> WER/CER table
    python -m mamba_asr.reports.errors     # one wer_<test-set>.json -> error analysis

``scores`` holds the JSON format of the per-utterance scores the recipes write.
"""
