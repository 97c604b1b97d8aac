"""Tools for tests and the bench (test models, the reference model, the stock llama.cpp runner). The runtime never imports this package."""
