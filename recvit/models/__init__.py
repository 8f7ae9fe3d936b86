"""The models: the layers, the recursive block, Edge-RecViT and MoR-ViT, their losses, the registry
behind ``recvit.create_model`` and CUDA-graph capture of a forward."""
