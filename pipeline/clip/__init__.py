"""The CLIP model every stage uses: stage one's teacher, stage two's segment-crop targets, evaluation's text encoder."""
