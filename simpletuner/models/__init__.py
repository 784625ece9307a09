"""Model families (one module each), their registry and tiny random-weight builders."""
