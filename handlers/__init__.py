"""Built-in handlers shipped with sippet-listener."""
