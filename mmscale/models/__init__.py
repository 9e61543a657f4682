"""Item encoders (CLIP, VLMo) behind one interface, item/user towers and sequence encoders."""
