"""The backbone: torchvision's ResNet-18 cut after layer3 (256 channels), global average pool, a linear embedding."""
import torch
import torch.nn as nn
from torchvision.models import resnet18


class EmbeddingNet(nn.Module):
    """Image -> raw embedding f(x) of dim_embed dimensions (the paper's ResNet-18 up to layer3)."""

    def __init__(self, dim_embed=64):
        super().__init__()
        r = resnet18(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3
        self.fc = nn.Linear(256, dim_embed)

    def load_backbone(self, state_dict):
        """Copy a torchvision resnet18 state dict's conv layers (conv1..layer3) in; layer4 and fc are not used."""
        wanted = {k: v for k, v in state_dict.items()
                  if k.split('.')[0] in ('conv1', 'bn1', 'layer1', 'layer2', 'layer3')}
        own = {k for k in self.state_dict() if not k.startswith('fc.')}
        missing = sorted(own - set(wanted))
        if missing:
            raise KeyError(f'not a torchvision resnet18 state dict: {len(missing)} keys missing, e.g. {missing[:3]}')
        self.load_state_dict(wanted, strict=False)

    def feature_map(self, x):  # (B, 3, H, W)
        """The last feature map, before pooling (ASEN attends over it): (B, 256, H/16, W/16)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 256, H/16, W/16)

    def features(self, x):  # (B, 3, H, W)
        """The pooled backbone features before the embedding layer: (B, 256)."""
        return torch.flatten(self.feature_map(x).mean((2, 3)), 1)  # (B, 256)

    def forward(self, x):  # (B, 3, H, W)
        return self.fc(self.features(x))  # (B, D)
