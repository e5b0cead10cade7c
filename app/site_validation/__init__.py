"""Site validation: measure the shipped model on a hospital's own labelled cases and recalibrate."""
