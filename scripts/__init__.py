"""One entry module per stage: ``python -m scripts.<stage_module>`` (see backends/stages.py)."""
