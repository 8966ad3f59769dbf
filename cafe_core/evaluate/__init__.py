"""Evaluation: the benchmark sets in their real file formats, pure metric functions, and the stages that
embed, generate, score and report."""
