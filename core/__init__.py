"""The torch-free ground floor that training/, export/, the Triton models, client/ and bench/ import.

    specs.py       every model and tensor name, shape and dtype of the served system
    catalog.py     reading a catalog (CSV / JSONL / Parquet) with a report of every bad row
    queries.py     queries generated from attributes, relevance, the committed query-set format
    metrics.py     Recall@k, nDCG@10, MRR@10 and exact top-k ranking
    preprocess.py  text and image preprocessing, shared byte for byte with the Triton models

Only numpy, pandas and Pillow: nothing here may import torch, transformers or training/.
"""
