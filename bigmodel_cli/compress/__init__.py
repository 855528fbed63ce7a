"""`bigmodel compress`: a trained checkpoint made smaller (pruned or int8-quantized), with
before/after numbers a user can trust.

    pipeline.py   checkpoint in -> measured, compressed, measured, written out
    prune.py      global magnitude pruning (unstructured), kept on through a fine-tune
    structured.py whole hidden units/channels removed: really smaller layers (mlp, cnn)
    finetune.py   a short fine-tune on the checkpoint's own training data (the Trainer)
    quantize.py   int8: which layers, why not the others, the scheme per checkpoint (dynamic
                  int8 of Linear/LSTM/GRU, or weight-only for language models) and the int8
                  weights' storage (torch.load(weights_only=True) reads it back)
    weight_only.py weight-only int8 (a scale per output channel, float activations; a tied
                  head and embedding share one int8 table)
    measure.py    parameters, sparsity per layer, size, CPU latency, the metric
    report.py     compress.json, report.md and the console table
"""
