"""Models: timm ViT encoder / classifier with the LiVT init, and the MAE that wraps the encoder."""

from livt.models.mae import MAE, create_mae
from livt.models.vit import VIT_SIZES, create_vit, resize_pos_embed, sincos_pos_embed, vit_size

__all__ = ["MAE", "VIT_SIZES", "create_mae", "create_vit", "resize_pos_embed", "sincos_pos_embed", "vit_size"]
