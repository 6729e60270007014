"""Getting models in and out: GGUF import (convert, gguf), the default offline model, fusing
adapters into a standalone model (fuse) with its model card (card), and the Hugging Face Hub (hub).

Built on the core (model loading, run directories); the core never imports this package.
"""
