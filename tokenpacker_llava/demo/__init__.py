"""The embedded demo: a synthetic fine-detail dataset and a tiny TokenPacker MLLM trained on CPU."""
