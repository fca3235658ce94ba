"""Layout encoders (palette RGB, one-hot, class embeddings at H/4), the null layout, and the embedding table."""

from .class_embeddings import DEFAULT_TEMPLATE, build_class_embedding_table, class_prompts, clip_text_encode_fn
from .encoders import class_embedding_hint, null_layout_like, one_hot, palette_rgb, validate_label_tensor

__all__ = [
    "DEFAULT_TEMPLATE",
    "build_class_embedding_table",
    "class_embedding_hint",
    "class_prompts",
    "clip_text_encode_fn",
    "null_layout_like",
    "one_hot",
    "palette_rgb",
    "validate_label_tensor",
]
