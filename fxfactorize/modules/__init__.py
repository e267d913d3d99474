"""The replacement modules: Composer-compatible factorized Linear and Conv2d."""
