"""mmscale: train multimodal encoders end-to-end with recommendation objectives."""
