"""A user's subclass, for the subclass-mode CLI test (``--model custom_module.MySFT``)."""

from lit_align import SFTModule


class MySFT(SFTModule):
    """Adds a penalty-free twist: counts training steps it saw."""

    def __init__(self, *args, note: str = "mine", **kwargs):
        super().__init__(*args, **kwargs)
        self.note = note
        self.steps_seen = 0

    def training_step(self, batch, batch_idx):
        self.steps_seen += 1
        return super().training_step(batch, batch_idx)
