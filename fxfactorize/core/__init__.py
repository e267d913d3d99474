"""Closed-form low-rank solvers and the Composer-compatible solver API."""
