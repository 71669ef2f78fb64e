"""Data: LLaVA records, conversation templates and label masks, images, datasets, collation."""
