"""`bigmodel export`: a trained model in a format other tools load.

One small module per format, each a `Format` (format.py): what it needs installed, whether
a model can take it, how it writes its files and how they are read back to check them.
`export.py` runs one: the model from the checkpoint (build/inference.py), the files
written, read back and compared with the model on the same input, and a report.
"""
