"""Prompt pairs from files, templates or a chat model (ECG), the visual filter (VF), and shards.

pairs.py: the PromptPair schema · readers.py: file formats · ecg.py: pair generation ·
vf.py: teacher rollouts + concept classifiers · shards/: WebDataset shards, split by
rank and worker, resumable · commands.py: `ear-dist data build|inspect`.
"""
