"""Running a model: a served version (sessions, warm-up, state), the batcher that feeds it, the ONNX
Runtime session options, and image decoding / output postprocessing."""
