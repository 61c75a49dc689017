"""ASEN, the Attribute-Specific Embedding Network (Ma et al., AAAI 2020), on this repository's backbone.

The backbone's last feature map V (ResNet-18 cut after layer3: C = 256 channels, H x W positions) is attended twice,
both times conditioned on the attribute (the notion) c through its one-hot a_c, then embedded and L2-normalised:

    spatial   s = tanh(conv1x1(V)) * tanh(W_s a_c)          (B, C/2, H, W)
              alpha = softmax over positions of tanh(conv1x1(s))    (B, H*W), sums to 1
              v = sum_p alpha_p V_p                          (B, C)
    channel   beta = sigmoid(fc2(relu(fc1([v, relu(W_c a_c)]))))    (B, C), in (0, 1)
    embedding f(x | c) = normalize(fc(v * beta))            (B, D)

Similarity is the dot product f(x | c) . f(y | c); the loss is the margin ranking loss on it. Here the distance is
d(x, y | c) = 1 - f(x | c) . f(y | c), so tripletnet.ranking_loss(d_far, d_close, margin) is ASEN's loss
max(0, margin - (s_close - s_far)), and nearest neighbours by Euclidean distance (the search index) rank as the
dot product does, since ||f(x) - f(y)||^2 = 2 d for unit vectors.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ASEN(nn.Module):
    """One network conditioned on the notion: embed(x, c) is the notion-c embedding (B, D), L2-normalised.
    embeddingnet: the backbone (Resnet_18.EmbeddingNet); its fc (C -> D) is ASEN's last linear layer."""

    per_notion_backbone = True  # the embedding depends on the notion: each image is embedded once per notion
    norm_penalties = False      # the loss is the ranking loss alone (unit embeddings, no masks)

    def __init__(self, embeddingnet, n_notions, channels=256):
        super().__init__()
        self.embeddingnet = embeddingnet
        self.n_notions = n_notions
        hidden = channels // 2  # ASEN's 512 for ResNet-50's 1024 channels
        # attribute-aware spatial attention
        self.attr_spatial = nn.Linear(n_notions, hidden, bias=False)  # W_s
        self.conv_img = nn.Conv2d(channels, hidden, 1)
        self.conv_att = nn.Conv2d(hidden, 1, 1)
        # attribute-aware channel attention
        self.attr_channel = nn.Linear(n_notions, channels, bias=False)  # W_c
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def one_hot(self, c, like):
        """Notions c (int or (B,) tensor) -> one-hot (B or 1, n_notions) in like's dtype and device."""
        c = torch.as_tensor(c, device=like.device).reshape(-1)
        return F.one_hot(c, self.n_notions).to(like.dtype)

    def spatial_attention(self, fmap, a):
        """fmap (B, C, H, W), a (B or 1, n) -> attention weights over the positions (B, H*W), summing to 1."""
        img = torch.tanh(self.conv_img(fmap))  # (B, C/2, H, W)
        attr = torch.tanh(self.attr_spatial(a))[:, :, None, None]  # (B or 1, C/2, 1, 1)
        score = torch.tanh(self.conv_att(img * attr)).flatten(1)  # (B, H*W)
        return score.softmax(1)  # (B, H*W)

    def channel_attention(self, v, a):
        """Attended feature v (B, C), a (B or 1, n) -> channel weights (B, C) in (0, 1)."""
        attr = F.relu(self.attr_channel(a)).expand(v.shape[0], -1)  # (B, C)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([v, attr], 1)))))  # (B, C)

    def embed(self, x, c):  # images (B, 3, H, W), notions c: int or (B,)
        fmap = self.embeddingnet.feature_map(x)  # (B, C, H', W')
        a = self.one_hot(c, fmap)  # (B or 1, n)
        alpha = self.spatial_attention(fmap, a)  # (B, H'W')
        v = (fmap.flatten(2) * alpha[:, None, :]).sum(2)  # (B, C)
        v = v * self.channel_attention(v, a)  # (B, C)
        return F.normalize(self.embeddingnet.fc(v), dim=1)  # (B, D)

    def triplet_distances(self, emb, c):
        """Embeddings (3B, D) of anchors, fars, closes under their notions -> d_far, d_close (B,) with
        d = 1 - dot product, and the mask L1 norms (3B,): zeros, ASEN has no masks."""
        ea, ef, ec = emb.float().chunk(3)  # (B, D) each
        return 1 - (ea * ef).sum(1), 1 - (ea * ec).sum(1), emb.new_zeros(emb.shape[0])

    def mask_weights(self):
        return None

    def apply_mask(self, emb, c):
        return emb, emb.new_zeros(emb.shape[0])

    @property
    def nets(self):
        """ASEN seen as one network per notion sharing all weights: nets[c](x) = embed(x, c) (what code written for
        task-specific networks calls: the API's embedding size, ONNX export)."""
        return [NotionView(self, c) for c in range(self.n_notions)]


class NotionView(nn.Module):
    """x -> ASEN's embedding under notion c. Holds the ASEN outside its submodules: no weights of its own."""

    def __init__(self, asen, c):
        super().__init__()
        self.__dict__['asen'] = asen  # not registered: a view, not a copy
        self.c = c

    @property
    def fc(self):
        return self.asen.embeddingnet.fc

    def forward(self, x):  # (B, 3, H, W)
        return self.asen.embed(x, self.c)  # (B, D)
