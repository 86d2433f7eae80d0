"""The CLI's measuring commands: bench (the layout), bench-io (checkpoint I/O), demo."""
