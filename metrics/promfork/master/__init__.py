"""Runs in the Gunicorn master: the hooks' bodies (hooks), folding dead workers' files (compaction) and worker slots."""
