"""The one builder: every command gets what it runs from here, in one of its modes.

    training.py        a ready Trainer from a validated config (train, resume, lr-find),
                       the distillation teacher included
    inference.py       a checkpoint's model, ready for inference (eval, generate, explain,
                       export, compress), its stored config vetted by trust.py
    trained_inputs.py  a checkpoint's data and tokenizer
    planning.py        a config's model and optimizer on fake tensors (plan)
    finetune.py        a Trainer for a short fine-tune of a model in memory (compress)
    parts.py           config -> data, model, optimizer, schedule, with one-line errors

Nothing is imported here, so that importing one mode does not import the others.
"""
