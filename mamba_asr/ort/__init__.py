"""Run an exported model without PyTorch: onnxruntime, NumPy, SciPy and soundfile only.

Nothing under this package imports torch, torchaudio, SpeechBrain or the model code
(``modules``): ``OnnxTranscriber`` (:mod:`mamba_asr.ort.transcriber`) reads the ONNX files an
export folder holds (``features.onnx``, ``model.onnx``, ``tokens.txt``) and gives the
transcripts the PyTorch ``Transcriber`` gives.
"""
