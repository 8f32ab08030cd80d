"""The model: the depth dial (torch-free arithmetic) and the GPT itself."""
