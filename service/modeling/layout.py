"""File names inside a model folder (no torch here: the engine and API read them without importing torch)."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
EVAL_FILE = "eval.json"
ROUTING_PROFILE_FILE = "routing_profile.json"
MODEL_TYPE = "moe-text-classifier"
ONNX_FILE = "model.onnx"  # written by `moe-serve export`
ONNX_INT8_FILE = "model.int8.onnx"  # written by `moe-serve export --quantize int8`
