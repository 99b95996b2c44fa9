"""reidbuild: declarative, locked, parity-checked builds of fast-reid models for ONNX, Caffe and TensorRT."""
import os as _os

# reidbuild writes only its output folder and lock: keep onnxruntime (imported later, by stages and backends)
# from writing a device id and a telemetry database under ~/.cache/Microsoft on every run
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
