"""Data formats: image folders (NEU prefix and class-per-folder), splits, and more per task."""
