"""Whether an upstream may take requests: passive state from exchanges, and active checks."""
