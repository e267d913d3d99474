"""The pipeline, one pass per module: trace (``trace``, ``regions``) → analyse (``functional``,
``shapes``, ``cost``) → plan → calibrate → (re)plan → solve → rewrite; ``pipeline`` runs them the
same way for a whole graph and for traced regions (see docs/architecture.md)."""
