"""Vision models: timm ViT helpers, the continual-learning ViT, the TrackNet heat-map tracker."""
