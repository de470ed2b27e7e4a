"""Built-in protocol parsers; each module or package holds one protocol (see registry.BUILTINS)."""
