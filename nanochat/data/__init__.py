"""Data: the dataset table, shard download and integrity checks, custom data, and the pretraining
and chat batch loaders (stages 1 to 5 read through here).
"""
