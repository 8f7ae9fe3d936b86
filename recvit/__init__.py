"""recvit: Vision Transformers with token-level dynamic depth (Edge-RecViT, MoR-ViT, early-exit
DeiT/ViT), running attention and MLP over only the shrinking set of active tokens.
"""
from .checkpoint import (ConvertedCheckpoint, convert_state_dict, from_pretrained, load_checkpoint,
                         no_source_prefixes, save_checkpoint)
from .depthmap import depth_heatmap, plot_depthmap
from .flops import (FlopsBreakdown, count_flops, count_params, expert_choice_flops, full_depth_flops,
                    profile_flops)
from .models.early_exit import EarlyExitViT, from_vit
from .models.edge_recvit import EdgeAwareRanker, EdgeRecViT, RecViTOutput, ThreeLayerRanker
from .models.graph import GraphedForward, compile_graph
from .models.layers import Block
from .models.losses import (EdgeRecViTLoss, MoRViTLoss, balancing_loss, cce_loss, du_loss, router_z_loss,
                            stb_loss)
from .models.mor_vit import GatedRecursiveBlock, MoRViT, MoRViTOutput
from .models.recursion import DepthAdaptiveBlocks, DepthSteps, RecursiveBlock
from .models.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "Block", "ConvertedCheckpoint", "DepthAdaptiveBlocks", "DepthSteps", "EarlyExitViT",
    "EdgeAwareRanker", "EdgeRecViT", "EdgeRecViTLoss", "FlopsBreakdown", "GatedRecursiveBlock",
    "GraphedForward", "MoRViT", "MoRViTLoss", "MoRViTOutput", "RecViTOutput", "RecursiveBlock",
    "balancing_loss", "cce_loss", "compile_graph", "convert_state_dict", "count_flops",
    "count_params", "create_model", "depth_heatmap", "du_loss", "expert_choice_flops",
    "from_pretrained", "from_vit", "full_depth_flops", "list_models", "load_checkpoint",
    "no_source_prefixes", "plot_depthmap", "profile_flops", "register_model", "router_z_loss",
    "save_checkpoint", "stb_loss", "ThreeLayerRanker",
]

from .timm_registry import register_when_timm_loads  # noqa: E402  (after the names it registers)

register_when_timm_loads()  # timm.create_model("edge_recvit_small") where timm is installed
