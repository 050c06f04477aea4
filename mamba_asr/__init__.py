"""Code shared by the Mamba-ASR recipe scripts (data, corpus, environment, training helpers).

Importing the package silences one log line: SpeechBrain warns on import
"torchvision is not available - cannot save figures" (torchvision is an optional dependency of
a sample logger the recipes do not use), which reads like a failure in every command's output.
SpeechBrain imports that logger's module lazily (when a YAML builds a ``FileTrainLogger``), after
the recipes have imported ``mamba_asr``; a script importing it at the top (``evaluate.py``)
imports ``mamba_asr`` before it. Other messages of that logger still pass.
"""

import logging

TORCHVISION_NOTICE = "torchvision is not available - cannot save figures"


def _not_torchvision_notice(record: logging.LogRecord) -> bool:
    return record.getMessage() != TORCHVISION_NOTICE


logging.getLogger("speechbrain.utils.train_logger").addFilter(_not_torchvision_notice)
