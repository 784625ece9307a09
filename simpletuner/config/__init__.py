"""Configuration: the option table, config-file loading and validation."""
