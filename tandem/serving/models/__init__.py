"""Triton python-backend models.

Each served version folder holds a generated ``model.py`` of a few lines that makes tandem
importable inside the backend stub and re-exports ``TritonPythonModel`` from here. The request
parsing they share lives in :mod:`.common`, which does not need Triton and is tested directly."""
