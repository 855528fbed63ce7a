"""Plain nn.Modules. They know nothing of devices, distribution or logging.

Each built-in model declares `input_kinds`: the kinds of input it can read
("vector", "sequence", "image", "tokens"), so an impossible model/data pairing is
refused before training starts. Constructors take data-dependent sizes by the names
`input_shape`, `num_outputs`, `vocab_size` and `block_size`; a user model gets whichever
of these its constructor names.
"""
