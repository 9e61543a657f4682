"""Losses, one family a file. Each takes (already gathered) embeddings and returns a scalar.

The one list of loss names a config may weight (`objectives.weights`), and what each needs of the item encoder.
"""

# name -> the encoder capability it needs (None: any encoder, or none)
LOSSES: dict[str, str | None] = {
    "rec": None,  # the recommender's loss: in-batch softmax or BPR (two-tower), next-item cross-entropy (sequential)
    "itc": None,  # image-text contrastive (CLIP's)
    "seq_item": None,  # MP4SR pre-training: sequence to item
    "seq_seq": None,  # MP4SR pre-training: sequence to sequence
    "itm": "fusion",  # image-text matching with hard negatives, fusion mode (VLMo)
    "mlm": "fusion",  # masked language modelling read with the image, fusion mode (VLMo)
}
FUSION_LOSSES = tuple(name for name, needs in LOSSES.items() if needs == "fusion")
VISION_LANGUAGE_LOSSES = ("itc", *FUSION_LOSSES)  # the encoder's own losses (fine_tuned adapts with these)
