"""torch.hub entry points: a trained CSN in three lines.

    import torch
    model = torch.hub.load('/path/to/this/repo', 'csn', source='local', checkpoint='runs/csn/model_best.pth.tar')
    model.distance(model.transform(im1)[None], model.transform(im2)[None], 'font')
"""
dependencies = ['torch', 'torchvision', 'numpy', 'PIL']


def csn(checkpoint=None, device='cpu'):
    """A checkpoint of main.py (any --model: CSN, triplet network, task-specific networks) as a trained.TrainedCSN in
    eval mode: notions, image_size, transform, embed, distance, nearest, index."""
    from csnlib.trained_csn import TrainedCSN
    if checkpoint is None:
        raise ValueError('csn() needs checkpoint=PATH, a checkpoint of main.py (e.g. runs/NAME/model_best.pth.tar)')
    return TrainedCSN.load(checkpoint, device)
