"""Export: a trained checkpoint as a Hugging Face transformers folder (``make export``) and
its upload to the Hub (``make push-hub``). Torch-free here: the launcher reads these names.

``hf_folder`` writes, checks and places the folder; ``hf_weights`` maps our config and
weights onto ``modeling_nanochat_full.py`` (the model for transformers, shipped in every
folder); ``hf_tokenizer`` writes the tokenizer and its chat template; ``model_card`` the
README. docs/export.md is the user's guide.
"""

EXPORT_DIR = "export"  # under BASE_DIR: every export folder, on Modal on the checkpoint volume
EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # the weights' type in the folder
DEFAULT_DTYPE = "float32"  # the training master copy; bfloat16 halves the size
