"""Guided training: the mutual-distillation objective of a guide and its students."""
