"""What the operator, the model runtime and the trainer agree on, written once.

A neutral package: it imports nothing but the standard library and pydantic, so each image carries it (the
runtime image ships `model_runtime` + this, the operator image `distillery_operator` + this) and
neither side imports the other. One concept per module:

- `flags`: the runtime's command-line flags, port, mount path and probe paths (the renderer writes
  them, the runtime's parser reads them);
- `metric_names`: the Prometheus metrics the runtime exports and KEDA / alert rules query;
- `values`: the allowed values (quantization methods, int4 group sizes, dtypes, weight formats,
  architectures) and the serving defaults; pydantic models and argparse choices derive from them;
- `artifact`: the pre-quantized artifact's manifest (file name, format, fields);
- `apimodel`: the base of the API models (camelCase on the wire, unknown fields refused);
- `distillation`: the DistillationJob's spec, which the operator renders and the trainer runs.
"""
