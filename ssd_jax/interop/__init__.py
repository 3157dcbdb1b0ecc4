"""Interop with the PyTorch reference: the .pth reader and the importer."""
