"""Export a fine-tuned model to GGUF (llama.cpp, Ollama, LM Studio), verified
by reading the file back. Entry point: :func:`loralab.export.run.export_gguf`."""

from loralab.export.run import export_gguf, report_path

__all__ = ["export_gguf", "report_path"]
