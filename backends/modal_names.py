"""The names the Modal launcher and the Modal app share, kept free of imports.

``backends/modal_backend.py`` (on the laptop; a dry run needs no modal package) and
``backends/modal_app.py`` (in the container) both read these, so neither imports the other's
module for them: the volumes BASE_DIR lives on, and how chat-web's knobs reach the app.
"""

DATA_VOLUME = "nanochat-data"  # downloaded or derived from the corpus
CHECKPOINT_VOLUME = "nanochat-checkpoints"  # what training produces
VOLUME_NAMES = (DATA_VOLUME, CHECKPOINT_VOLUME)
WEB_KNOBS_ENV = "NANOCHAT_WEB_KNOBS"  # chat-web's knobs (JSON), fixed when the app is built
WEB_IDLE_S = 600  # chat-web's container stays up this long after the last request
