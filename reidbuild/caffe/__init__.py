"""Caffe support: reidbuild's own Caffe protobuf schema (``schema``, one variant per dialect), Caffe's shape
and pooling arithmetic (``shapes``, shared by the converter and the Caffe graph patches) and the ONNX -> Caffe
converter (the ``convert`` package). None needs a Caffe installation; running the result does
(``reidbuild.backends.caffe``: pycaffe or OpenCV's Caffe importer)."""

# part of the caffe.convert fingerprint; lives here so planning need not import the converter (and protobuf)
CONVERTER_VERSION = "reidbuild-onnx2caffe/1"

