"""Data for training: tables, instruction records, prompts, tokenization and batching."""
